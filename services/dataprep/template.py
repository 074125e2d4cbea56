"""Tokenizing a conversation with the model's own chat template, and the label
mask that trains exactly the assistant turns (their content and end-of-turn
token), computed from the template's rendering rather than hard-coded per format.

How the trained spans are found, for any template that renders a conversation
prefix as a prefix of the whole conversation:
  - start of assistant turn i: the length of the text of messages[:i] rendered
    with add_generation_prompt=True (everything the model is given at inference);
  - end: the length of messages[:i+1] rendered, less trailing whitespace (so the
    end-of-turn token is trained and the newline a template puts after it is not).
Character spans become token labels through the fast tokenizer's offset mapping
of the full rendered text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib

from libs.common.errors import FailedPrecondition
from services.dataprep.loss_scale import trained_messages

IGNORE_INDEX = -100  # label value the cross-entropy loss skips (torch's and HF's default)


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

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def load_tokenizer(model_dir: str | pathlib.Path):
    """The model's fast tokenizer; it must have a chat template (offsets need a fast one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not getattr(tokenizer, "is_fast", False):
        raise FailedPrecondition(f"{model_dir}: tokenizer is not a fast (tokenizers) tokenizer; "
                                 "offsets are needed to mask labels", field="model")
    if not isinstance(tokenizer.chat_template, str) or not tokenizer.chat_template:
        raise FailedPrecondition(f"{model_dir}: the tokenizer has no chat template", field="model")
    return tokenizer


def template_fingerprint(tokenizer) -> str:
    """sha256 of the chat template text."""
    return hashlib.sha256(tokenizer.chat_template.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(model_dir: str | pathlib.Path, tokenizer) -> str:
    """sha256 of the model's tokenizer.json (of the serialized tokenizer when the
    model ships only a slow tokenizer's files that transformers converted)."""
    path = pathlib.Path(model_dir) / "tokenizer.json"
    data = path.read_bytes() if path.is_file() else tokenizer.backend_tokenizer.to_str().encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template's text; its own refusals (`raise_exception(...)` in Jinja, e.g.
    roles that do not alternate) become TemplateError."""
    from jinja2.exceptions import TemplateError as JinjaError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except JinjaError as exc:
        raise TemplateError(f"the chat template refused the conversation: {exc}") from exc


def template_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The reference: apply_chat_template's own token ids (transformers 5 returns a
    BatchEncoding here, older versions a plain list)."""
    result = tokenizer.apply_chat_template(messages, tokenize=True)
    ids = result["input_ids"] if not isinstance(result, list) else result
    return list(ids)


def assistant_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of `text` (the whole conversation rendered)
    to train: each assistant turn's content and end-of-turn marker."""
    return trained_spans(tokenizer, messages, text, [m["role"] == "assistant" for m in messages], everything=False)


def _prefix(tokenizer, messages: list[dict], text: str, i: int, add_generation_prompt: bool = False) -> str:
    rendered = render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    if not text.startswith(rendered):
        raise TemplateError("the chat template does not render the conversation up to this turn as a prefix "
                            "of the whole conversation", field=f"messages[{i}]")
    return rendered


def trained_spans(tokenizer, messages: list[dict], text: str, trained: list[bool],
                  everything: bool) -> list[tuple[int, int]]:
    """Character spans of `text` to train. everything=False: the turns marked
    trained (an assistant turn from after its generation prompt, any other turn
    whole; both through the end-of-turn marker, not the whitespace after it).
    everything=True (`loss_scale all`): the whole text less the untrained turns."""
    if everything:
        spans, start = [], 0
        for i, keep in enumerate(trained):
            if keep:
                continue
            turn_start = len(_prefix(tokenizer, messages[:i], text, i)) if i else 0
            spans.append((start, turn_start))
            start = len(_prefix(tokenizer, messages[:i + 1], text, i))
        spans.append((start, len(text)))
        return [(a, b) for a, b in spans if b > a]
    spans = []
    for i, message in enumerate(messages):
        if not trained[i]:
            continue
        before = _prefix(tokenizer, messages[:i], text, i, add_generation_prompt=message["role"] == "assistant")
        through = _prefix(tokenizer, messages[:i + 1], text, i)
        # max(): an empty answer in a template without an end-of-turn marker trains nothing
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return spans


def labels_from_spans(input_ids: list[int], offsets: list[tuple[int, int]],
                      spans: list[tuple[int, int]]) -> list[int]:
    """Token j is trained when its characters overlap a span (a token straddling a
    span edge is trained: it holds characters the model must produce)."""
    labels = [IGNORE_INDEX] * len(input_ids)
    for j, (token_start, token_end) in enumerate(offsets):
        for start, end in spans:
            overlaps = token_start < end and token_end > start
            empty_inside = token_start == token_end and start <= token_start < end
            if overlaps or empty_inside:
                labels[j] = input_ids[j]
                break
    return labels


def encode(tokenizer, messages: list[dict], losses: list[bool | None] | None = None,
           loss_scale: str = "default") -> Encoded:
    """input_ids exactly as apply_chat_template(tokenize=True) gives them, and labels
    that are IGNORE_INDEX everywhere but the turns `loss_scale` and each message's
    own `loss` (losses[i]) train; by default the assistant turns."""
    text = render(tokenizer, messages)
    trained = trained_messages([m["role"] for m in messages], list(losses or [None] * len(messages)), loss_scale)
    spans = trained_spans(tokenizer, messages, text, trained, everything=loss_scale == "all")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    reference = template_ids(tokenizer, messages)
    if input_ids != reference:
        # Both tokenize the same rendered text; a difference means transformers
        # changed how apply_chat_template tokenizes, and the offsets cannot be trusted.
        raise RuntimeError("tokenizing the rendered chat template text does not reproduce "
                           "apply_chat_template's input_ids")
    return Encoded(input_ids, labels_from_spans(input_ids, encoding["offset_mapping"], spans))
