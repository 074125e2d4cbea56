"""Tokenizing a conversation with the model's own chat template, and the label
mask that trains exactly the assistant turns (their content and end-of-turn
token), computed from the template's rendering rather than hard-coded per format.

How the trained spans are found, for any template that renders a conversation
prefix as a prefix of the whole conversation:
  - start of assistant turn i: the length of the text of messages[:i] rendered
    with add_generation_prompt=True (everything the model is given at inference);
    for an opening answer (i = 0), what the template writes before its content;
  - end: the length of messages[:i+1] rendered, less trailing whitespace (so the
    end-of-turn token is trained and the newline a template puts after it is not);
    a template that closes the last turn differently from earlier ones (ms-swift's
    `default`: eos after the last answer, a blank line between rounds) ends an
    earlier turn where the two renderings part, once all of its content is rendered.
Character spans become token labels through the fast tokenizer's offset mapping
of the full rendered text. Without a chat template (`--use_chat_template false`)
a row is its texts concatenated with eos after them (see encode_plain).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
import weakref
from typing import Generator

import numpy as np

from libs.common.errors import FailedPrecondition, InvalidArgument
from libs.dataset.schema import IGNORE_INDEX
from services.dataprep import layout, templates
from services.dataprep.loss_scale import trained_messages



class TemplateError(ValueError):
    """The chat template refuses this conversation, or does not render its prefixes
    as prefixes, so its assistant turns cannot be located. `field` names the place."""

    def __init__(self, message: str, field: str = "messages"):
        super().__init__(message)
        self.message = message
        self.field = field


@dataclasses.dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @functools.cached_property  # read per row by the pipeline and the task; computed once
    def trained_tokens(self) -> int:
        return len(self.labels) - list(self.labels).count(IGNORE_INDEX)


def load_tokenizer(model_dir: str | pathlib.Path, template_name: str | None = None,
                   use_chat_template: bool = True, field: str = "model"):
    """The model's fast tokenizer (offsets need a fast one) with the chat template rows
    are rendered with: built-in `template_name` when given, else the model's own,
    which it must then have (unless use_chat_template is false). `field` names the flag
    that gave `model_dir` (model, or tokenizer) in errors."""
    from transformers import AutoTokenizer

    builtin = templates.load(template_name) if template_name else None  # unknown name: fail before loading
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError, KeyError) as exc:  # what transformers raises for files it cannot use
        raise FailedPrecondition(f"{model_dir}: cannot load its tokenizer: {exc}", field=field) from None
    if not getattr(tokenizer, "is_fast", False):
        raise FailedPrecondition(f"{model_dir}: tokenizer is not a fast (tokenizers) tokenizer; "
                                 "offsets are needed to mask labels", field=field)
    if builtin is not None:
        tokenizer.chat_template = builtin
        try:  # a built-in that needs what this tokenizer lacks (llama3's bos_token) fails here, not on every row
            render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
        except TemplateError as exc:
            raise InvalidArgument(f"template {template_name!r} does not fit the tokenizer of {model_dir}: "
                                  f"{exc.message}", field="template") from None
    elif use_chat_template and (not isinstance(tokenizer.chat_template, str) or not tokenizer.chat_template):
        raise FailedPrecondition(f"{model_dir}: the tokenizer has no chat template; name a built-in one with "
                                 f"--template ({', '.join(templates.NAMES)}) or pass --use_chat_template false",
                                 field=field)
    if not use_chat_template and tokenizer.eos_token_id is None:
        raise FailedPrecondition(f"{model_dir}: the tokenizer has no eos token to end texts with "
                                 "(--use_chat_template false)", field=field)
    return tokenizer


def template_fingerprint(tokenizer) -> str:
    """sha256 of the chat template text (of the empty text when there is none)."""
    return hashlib.sha256((tokenizer.chat_template or "").encode("utf-8")).hexdigest()


def supports_tools(tokenizer) -> bool:
    """Whether the chat template renders a `tools` list (it names the variable)."""
    return "tools" in (tokenizer.chat_template or "")


def supports_tool_calls(tokenizer) -> bool:
    """Whether the chat template renders assistant `tool_calls`."""
    return "tool_calls" in (tokenizer.chat_template or "")


def with_tool_calls(tokenizer, messages: list[dict], losses: list[bool | None]) -> tuple[list[dict], list]:
    """ms-swift's `tool_call` turns (assistant messages carrying TOOL_CALL, the parsed
    call) for this template: where it renders `tool_calls`, each run of them becomes
    one assistant message with those calls and no text; elsewhere the call's JSON
    text is the turn's content, as ms-swift writes it."""
    native = supports_tool_calls(tokenizer)
    out, out_losses = [], []
    for message, loss in zip(messages, losses, strict=True):
        call = message.get(TOOL_CALL)
        if call is None:
            out.append(message)
            out_losses.append(loss)
            continue
        plain = {k: v for k, v in message.items() if k != TOOL_CALL}
        if not native:
            out.append(plain)
            out_losses.append(loss)
        elif out and out[-1].get("tool_calls") is not None and out[-1].get("_merged"):
            out[-1]["tool_calls"].append({"type": "function", "function": call})
            out_losses[-1] = out_losses[-1] if out_losses[-1] is not None else loss
        else:
            out.append({**plain, "content": "", "tool_calls": [{"type": "function", "function": call}],
                        "_merged": True})
            out_losses.append(loss)
    return [{k: v for k, v in m.items() if k != "_merged"} for m in out], out_losses


TOOL_CALL = "_tuneforge_tool_call"  # key formats.py puts on an assistant message written as a tool_call turn


def tokenizer_fingerprint(model_dir: str | pathlib.Path, tokenizer) -> str:
    """sha256 of the model's tokenizer.json (of the serialized tokenizer when the
    model ships only a slow tokenizer's files that transformers converted)."""
    path = pathlib.Path(model_dir) / "tokenizer.json"
    data = path.read_bytes() if path.is_file() else tokenizer.backend_tokenizer.to_str().encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
    """The template's text; every refusal of apply_chat_template becomes TemplateError:
    the template's own (`raise_exception(...)` in Jinja, e.g. roles that do not
    alternate), and whatever a row's values make it or transformers raise (a
    template that adds a string to a number, tools it cannot print)."""
    from jinja2.exceptions import TemplateError as JinjaError

    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except JinjaError as exc:
        raise TemplateError(f"the chat template refused the conversation: {exc}") from exc
    except Exception as exc:  # the template runs the row's own values: any error there is the row's
        raise TemplateError(f"the chat template cannot render the conversation: {type(exc).__name__}: {exc}") \
            from exc


def template_ids(tokenizer, messages: list[dict], tools: list | None = None,
                 add_generation_prompt: bool = False) -> list[int]:
    """The reference: apply_chat_template's own token ids (transformers 5 returns a
    BatchEncoding here, older versions a plain list)."""
    result = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True,
                                           add_generation_prompt=add_generation_prompt)
    ids = result["input_ids"] if not isinstance(result, list) else result
    return list(ids)


def assistant_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of `text` (the whole conversation rendered)
    to train: each assistant turn's content and end-of-turn marker."""
    return trained_spans(tokenizer, messages, text, [m["role"] == "assistant" for m in messages], everything=False)


def _not_prefix(i: int) -> TemplateError:
    return TemplateError("the chat template does not render the conversation up to this turn as a prefix "
                         "of the whole conversation", field=f"messages[{i}]")


def _prefix(tokenizer, messages: list[dict], text: str, i: int, add_generation_prompt: bool = False,
            tools: list | None = None) -> str:
    """What `text` holds before turn i: messages[:i] rendered (with the generation
    prompt when asked), which must be a prefix of it."""
    if i == 0:
        return _opening(tokenizer, messages[0], text, tools) if add_generation_prompt else ""
    rendered = render(tokenizer, messages[:i], add_generation_prompt=add_generation_prompt, tools=tools)
    if not text.startswith(rendered):
        raise _not_prefix(i)
    return rendered


_PROBES = ("\ue000", "\ue001")  # two contents no template treats apart but for printing them


def _opening(tokenizer, message: dict, text: str, tools: list | None) -> str:
    """The generation prompt before a conversation's first turn (an opening answer:
    ms-swift's pre-training rows, a greeting): transformers renders no empty
    conversation, so it is what the template writes before that turn's content,
    the common start of the turn rendered alone with two different contents
    (the template's preamble, default system prompt and bos included)."""
    first, second = (render(tokenizer, [{**message, "content": probe}], tools=tools) for probe in _PROBES)
    if first == second:
        raise TemplateError("the chat template does not render the content of this opening turn", "messages[0]")
    opening = os.path.commonprefix([first, second])
    if not text.startswith(opening):
        raise _not_prefix(0)
    return opening


def _turn_end(tokenizer, messages: list[dict], text: str, i: int, start: int, tools: list | None,
              prefix_only: bool = False) -> int:
    """Where turn i ends in `text`: through its end-of-turn marker (trailing
    whitespace excluded) when messages[:i+1] renders as a prefix; else, for a
    template that closes the last turn its own way (unless prefix_only), where
    the renderings part, provided the turn's whole content precedes that point."""
    # the last turn's rendering through it is the whole text, rendered already
    through = text if i + 1 == len(messages) else render(tokenizer, messages[:i + 1], tools=tools)
    if text.startswith(through):
        return max(start, len(through.rstrip()))  # an empty answer with no end marker trains nothing
    if prefix_only:
        raise _not_prefix(i)
    common = len(os.path.commonprefix([through, text]))
    content = messages[i].get("content")
    if common > start and isinstance(content, str) and content.strip():
        if text[start:common].endswith(content):  # the answer as written, its own whitespace included
            return common
        if text[start:common].rstrip().endswith(content.strip()):
            return len(text[:common].rstrip())
    raise _not_prefix(i)


def trained_spans(tokenizer, messages: list[dict], text: str, trained: list[bool],
                  everything: bool, tools: list | None = None, prefix_only: bool = False) -> list[tuple[int, int]]:
    """Character spans of `text` to train. everything=False: the turns marked
    trained (an assistant turn from after its generation prompt, any other turn
    whole; both through the end-of-turn marker, not the whitespace after it).
    everything=True (`loss_scale all`): the whole text less the untrained turns
    (a run of untrained turns is cut out whole, so templates that group turns,
    e.g. consecutive tool responses, need no prefix inside the run).
    prefix_only: refuse (TemplateError) rather than find a turn's end where two
    renderings part (see layout.py)."""
    if everything:
        spans, start, i = [], 0, 0
        while i < len(trained):
            if trained[i]:
                i += 1
                continue
            last = i
            while last + 1 < len(trained) and not trained[last + 1]:
                last += 1
            turn_start = len(_prefix(tokenizer, messages, text, i, tools=tools))
            spans.append((start, turn_start))
            through = text if last + 1 == len(messages) else render(tokenizer, messages[:last + 1], tools=tools)
            start = len(through) if text.startswith(through) else _turn_end(tokenizer, messages, text, last,
                                                                               turn_start, tools, prefix_only)
            i = last + 1
        spans.append((start, len(text)))
        return [(a, b) for a, b in spans if b > a]
    spans = []
    for i, message in enumerate(messages):
        if not trained[i]:
            continue
        before = _prefix(tokenizer, messages, text, i, add_generation_prompt=message["role"] == "assistant",
                         tools=tools)
        spans.append((len(before), _turn_end(tokenizer, messages, text, i, len(before), tools, prefix_only)))
    return spans


def labels_from_spans(input_ids: list[int], offsets: list[tuple[int, int]],
                      spans: list[tuple[int, int]]) -> list[int]:
    """Token j is trained when its characters overlap a span (a token straddling a
    span edge is trained: it holds characters the model must produce); a token
    with no characters is trained when it sits inside a span; an empty span
    trains nothing."""
    if not input_ids:
        return []
    ids = np.asarray(input_ids, dtype=np.int64)
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # [tokens, (start, end)]
    token_start, token_end = bounds[:, 0], bounds[:, 1]
    trained = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        if end > start:
            trained |= _overlaps(token_start, token_end, start, end)
    return np.where(trained, ids, IGNORE_INDEX).tolist()


def _overlaps(token_start, token_end, start: int, end: int):
    return (token_start < end) & (token_end > start) | (token_start == token_end) & (token_start >= start) & (
        token_start < end)


def _token_range(encoding, count: int, start: int, end: int) -> tuple[int, int] | None:
    """[first, last) of the tokens labels_from_spans trains for span [start, end),
    asking the encoding for a few tokens' offsets instead of all of them (which
    costs more than the labels). Token offsets run in text order, so the trained
    tokens are one run: from the token holding the span's first character (that
    any token holds) to the one holding its last, widened while the neighbours
    overlap. None when no token holds one (the span is only characters the
    offsets leave out, such as trimmed spaces)."""
    first = next((t for t in map(encoding.char_to_token, range(start, end)) if t is not None), None)
    if first is None:
        return None
    last = next(t for t in map(encoding.char_to_token, range(end - 1, start - 1, -1)) if t is not None) + 1

    def inside(j: int) -> bool:
        s, e = encoding.token_to_chars(j)
        return bool(_overlaps(s, e, start, end))

    while first > 0 and inside(first - 1):
        first -= 1
    while last < count and inside(last):
        last += 1
    return first, last


_OUT_OF_ORDER: weakref.WeakSet = weakref.WeakSet()  # tokenizers whose offsets do not run in text order


# A row's encoding as steps: the generator yields each text to tokenize, is sent back the
# fast tokenizer's Encoding of it, and returns the row's value; run() drives it.
Steps = Generator[str, object, object]


def tokenize_one(tokenizer, text: str):
    """The fast tokenizer's own encode of `text` (what tokenizer(text, add_special_tokens=False)
    runs, without transformers' per-call wrapping)."""
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)


def run(tokenizer, steps: Steps):
    """The value of `steps`, tokenizing each text it asks for on its own."""
    try:
        text = next(steps)
        while True:
            text = steps.send(tokenize_one(tokenizer, text))
    except StopIteration as done:
        return done.value


def _encode_labels(tokenizer, text: str, spans: list[tuple[int, int]],
                   check: bool = False, encoding=None) -> tuple[list[int], list[int]]:
    """The ids of `text` (its `encoding` when given, else tokenize_one's) and the labels
    that train `spans`, as labels_from_spans gives them. check: compare with
    labels_from_spans on every offset, and keep to it for good if they differ."""
    if encoding is None:
        encoding = tokenize_one(tokenizer, text)
    input_ids = encoding.ids
    if check or tokenizer in _OUT_OF_ORDER:
        general = labels_from_spans(input_ids, encoding.offsets, spans)
        if tokenizer in _OUT_OF_ORDER:
            return input_ids, general
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        found = _token_range(encoding, len(input_ids), start, end) if end > start else None
        if found is None:
            if end > start:  # only characters no token holds: the general rule decides (empty tokens)
                return input_ids, labels_from_spans(input_ids, encoding.offsets, spans)
            continue
        first, last = found
        labels[first:last] = input_ids[first:last]
    if check and labels != general:
        _OUT_OF_ORDER.add(tokenizer)
        return input_ids, general
    return input_ids, labels


REFERENCE_CHECKS = 32  # rows per tokenizer checked against apply_chat_template(tokenize=True)
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _needs_reference(tokenizer) -> bool:
    """Whether to check this row's ids against apply_chat_template's own: for the
    first REFERENCE_CHECKS rows of each tokenizer. Both tokenize the same rendered
    text, so they agree on every row once they agree on the first (the tests check
    every row); re-tokenizing each row would double the preparation's cost."""
    count = _checked.get(tokenizer, 0)
    if count >= REFERENCE_CHECKS:
        return False
    _checked[tokenizer] = count + 1
    return True


def encode(tokenizer, messages: list[dict], losses: list[bool | None] | None = None,
           loss_scale: str = "default", tools: list | None = None) -> Encoded:
    """input_ids exactly as apply_chat_template(messages, tools=tools, tokenize=True)
    gives them, and labels that are IGNORE_INDEX everywhere but the turns
    `loss_scale` and each message's own `loss` (losses[i]) train; by default the
    assistant turns. Messages written as ms-swift tool_call turns are adapted first."""
    return run(tokenizer, encode_steps(tokenizer, messages, losses, loss_scale, tools))


def encode_steps(tokenizer, messages: list[dict], losses: list[bool | None] | None = None,
                 loss_scale: str = "default", tools: list | None = None) -> Steps:
    """encode as steps (see Steps): all of a row's Python work, the one text it tokenizes
    left to the driver."""
    messages, losses = with_tool_calls(tokenizer, messages, list(losses or [None] * len(messages)))
    text = render(tokenizer, messages, tools=tools)
    trained = trained_messages([m["role"] for m in messages], losses, loss_scale)
    spans = _spans(tokenizer, messages, text, trained, loss_scale == "all", tools)
    check = _needs_reference(tokenizer)
    encoding = yield text
    input_ids, labels = _encode_labels(tokenizer, text, spans, check, encoding)
    if check:
        _check_reference(input_ids, template_ids(tokenizer, messages, tools))
    return Encoded(input_ids, labels)


_LAYOUTS = layout.Cache()
_PLAIN = frozenset(("role", "content"))


def _spans(tokenizer, messages: list[dict], text: str, trained: list[bool], everything: bool,
           tools: list | None) -> list[tuple[int, int]]:
    """trained_spans, through the layout of the conversation's shape when the row
    fits it (rows without tools whose messages are a role and a text)."""
    if tools is None and all(m.keys() <= _PLAIN and isinstance(m["content"], str) for m in messages):
        # the template text too: a layout belongs to the template it was rendered with, and a
        # caller may set tokenizer.chat_template anew (str keys hash once; this is a lookup)
        shape = (tokenizer.chat_template, tuple(m["role"] for m in messages), tuple(trained), everything)
        found = _LAYOUTS.get(tokenizer, shape, lambda: _layout(tokenizer, messages, trained, everything))
        spans = found.spans([m["content"] for m in messages], text) if found is not None else None
        if spans is not None:
            return spans
    return trained_spans(tokenizer, messages, text, trained, everything, tools)


def _layout(tokenizer, messages: list[dict], trained: list[bool], everything: bool) -> layout.Layout | None:
    skeleton = [{"role": m["role"], "content": layout.marker(i)} for i, m in enumerate(messages)]
    try:
        text = render(tokenizer, skeleton)
        return layout.build(text, trained_spans(tokenizer, skeleton, text, trained, everything, prefix_only=True))
    except TemplateError:
        return None


def encode_prompt(tokenizer, messages: list[dict], tools: list | None = None) -> list[int]:
    """A prompt for generation (GRPO/PPO rows): the conversation and the template's
    generation prompt, exactly as apply_chat_template(add_generation_prompt=True)."""
    return run(tokenizer, encode_prompt_steps(tokenizer, messages, tools))


def encode_prompt_steps(tokenizer, messages: list[dict], tools: list | None = None) -> Steps:
    """encode_prompt as steps (see Steps)."""
    messages, _ = with_tool_calls(tokenizer, messages, [None] * len(messages))
    input_ids = (yield render(tokenizer, messages, add_generation_prompt=True, tools=tools)).ids
    if _needs_reference(tokenizer):
        _check_reference(input_ids, template_ids(tokenizer, messages, tools, add_generation_prompt=True))
    return input_ids


def encode_plain(tokenizer, messages: list[dict], losses: list[bool | None] | None = None,
                 loss_scale: str = "all") -> Encoded:
    """`--use_chat_template false` (`tuneforge pt`): the messages' texts concatenated
    as they are, then eos. Under `all` every token trains; otherwise the trained
    messages' texts do, and eos after a trained last message."""
    return run(tokenizer, encode_plain_steps(tokenizer, messages, losses, loss_scale))


def encode_plain_steps(tokenizer, messages: list[dict], losses: list[bool | None] | None = None,
                       loss_scale: str = "all") -> Steps:
    """encode_plain as steps (see Steps)."""
    losses = list(losses or [None] * len(messages))
    trained = trained_messages([m["role"] for m in messages], losses, loss_scale)
    text, spans = "", []
    for message, keep in zip(messages, trained, strict=True):
        if keep or loss_scale == "all" and message["role"] != "tool":
            spans.append((len(text), len(text) + len(message["content"])))
        text += message["content"]
    check = _needs_reference(tokenizer)
    encoding = yield text
    input_ids, labels = _encode_labels(tokenizer, text, spans, check, encoding)
    eos = tokenizer.eos_token_id
    last_trained = bool(spans) and spans[-1][1] == len(text) and spans[-1][1] > spans[-1][0]
    return Encoded(input_ids + [eos], labels + [eos if last_trained else IGNORE_INDEX])


class ReferenceMismatch(RuntimeError):
    """Our tokens differ from apply_chat_template's: no row's labels can be trusted, so
    the preparation stops (never one row's reject)."""


def _check_reference(input_ids: list[int], reference: list[int]) -> None:
    if input_ids != reference:
        # Both tokenize the same rendered text; a difference means transformers
        # changed how apply_chat_template tokenizes, and the offsets cannot be trusted.
        raise ReferenceMismatch("tokenizing the rendered chat template text does not reproduce "
                                "apply_chat_template's input_ids")
