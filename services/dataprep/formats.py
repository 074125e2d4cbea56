"""Row formats, detected per row with ms-swift's field names and aliases, turned
into one conversation (messages plus each message's optional `loss`) or a
problem naming the offending field:
  - messages: [{role, content, loss?}] with roles system/user/assistant/tool and
    ms-swift's agent roles tool_call (an assistant turn) and tool_response (a tool turn);
  - sharegpt: `conversation(s)`: [{from, value}] with from human/gpt/bot/system/tool/...;
  - alpaca: instruction, input, output (+ system);
  - query/response/history (+ system), with ms-swift's aliases; a row with only a
    response alias (e.g. pre-training `text`) is a single assistant turn;
and, on top of any of them (see to_example), the row's `tools`, its preference
side (`rejected_response` / `rejected_messages`, `margin`; TRL's `prompt`/`chosen`/
`rejected` texts or message lists are read as these), its KTO `label`, or,
for prompt-only rows, every column no format consumed.
"""

from __future__ import annotations

import dataclasses
import json
import re

# Reject reasons of this stage (see jsonl.REASONS for the full bounded set).
from services.dataprep.jsonl import (INVALID_CONTENT, INVALID_JSON, INVALID_LABEL, INVALID_MESSAGES, INVALID_ROLE,
                                     INVALID_TOOLS, NO_ASSISTANT, NO_REJECTED, NOT_PROMPT, UNKNOWN_FORMAT)
from services.dataprep.template import TOOL_CALL

MESSAGE_KEYS = ("messages", "conversations", "conversation")
# `role` keys take OpenAI/ms-swift role names; sharegpt `from` keys take its aliases.
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
         "tool_call": "assistant", "tool_response": "tool"}
FROM_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "bot": "assistant",
              "assistant": "assistant", "tool": "tool", "function": "tool", "observation": "tool",
              "tool_response": "tool", "function_call": "assistant", "tool_call": "assistant"}
# ms-swift's ResponsePreprocessor aliases, first match wins.
SYSTEM_KEYS = ("system", "system_prompt")
QUERY_KEYS = ("query", "prompt", "input", "instruction", "question", "problem")
RESPONSE_KEYS = ("response", "answer", "output", "targets", "target", "answer_key", "answers", "solution",
                 "text", "completion", "content")


# Dataset tasks (--task); `auto` takes the most common kind of the first rows (tasks.start).
TASKS = ("auto", "sft", "pt", "preference", "kto", "reward", "prompt")
REJECTED_KEYS = ("rejected_response", "rejected_messages")
# --format: forces one row format (auto detects it per row); the columns that make each.
FORMATS = ("auto", "messages", "sharegpt", "alpaca", "query_response", "text")


FORMAT_KEYS = {"messages": ("messages",), "sharegpt": ("conversations", "conversation"),
               "alpaca": ("instruction",), "query_response": QUERY_KEYS + RESPONSE_KEYS + ("history",),
               "text": ("text",)}


@dataclasses.dataclass(frozen=True)
class Conversation:
    """messages as the chat template takes them; losses[i] is message i's `loss` or None.
    The rest is set by to_example: the row's kind (one of TASKS but auto), its
    tools, its rejected conversation (the same prompt, then the rejected answer),
    preference margin, KTO label and, for prompt rows, the untouched extra columns."""

    messages: list[dict]
    losses: list[bool | None]
    kind: str = "sft"
    tools: list | None = None
    rejected: list[dict] | None = None
    rejected_losses: list[bool | None] | None = None
    margin: float | None = None
    label: bool | None = None
    extras: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Problem:
    field: str | None
    reason: str
    message: str


def _text(value) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except RecursionError:  # valid JSON nested nearly as deep as Python reads: too deep to print here
        return "a value nested too deeply to show"
    return text if len(text) <= 60 else text[:57] + "..."


_SURROGATE = re.compile("[\ud800-\udfff]")


def _not_unicode(value: dict) -> str | None:
    """The place of the first string (or key) in a row holding a lone surrogate, which
    JSON decoding lets through (escapes, and bytes json.loads reads with surrogatepass);
    None when there is none. Iterative: a row may be nested as deep as JSON allows."""
    stack = [(None, value)]
    while stack:
        place, item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return place
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                name = key.encode("utf-8", "backslashreplace").decode("utf-8")
                where = name if place is None else f"{place}.{name}"
                if not key.isascii() and _SURROGATE.search(key):
                    return where
                stack.append((where, child))
        elif isinstance(item, list):
            stack.extend((f"{place}[{i}]", child) for i, child in reversed(list(enumerate(item))))
    return None


def parse_columns(text: str | None) -> dict[str, str]:
    """`--columns '{"src": "dst", ...}'` (ms-swift): renames a row's keys before detection."""
    if not text:
        return {}
    mapping = json.loads(text)
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in mapping.items()):
        raise ValueError("expected a JSON object of column name -> column name")
    return mapping


def _chat(key: str, value, system: str | None) -> Conversation | Problem:
    if not isinstance(value, list) or not value:
        return Problem(key, INVALID_MESSAGES, f"expected a non-empty list of messages; got {_text(value)}")
    messages, losses = [], []
    for i, message in enumerate(value):
        place = f"{key}[{i}]"
        if not isinstance(message, dict):
            return Problem(place, INVALID_MESSAGES, f"expected an object with role and content; got {_text(message)}")
        role_key, names = ("from", FROM_ROLES) if "role" not in message and "from" in message else ("role", ROLES)
        role = names.get(message.get(role_key)) if isinstance(message.get(role_key), str) else None
        if role is None:
            got = "nothing" if role_key not in message else _text(message[role_key])
            expected = ", ".join(dict.fromkeys(names))
            return Problem(f"{place}.{role_key}", INVALID_ROLE, f"expected one of {expected}; got {got}")
        content_key = "content" if "content" in message or "value" not in message else "value"
        content = message.get(content_key)
        if content is None and role == "assistant" and message.get("tool_calls"):
            content = ""  # OpenAI-style assistant message carrying only tool_calls
        if not isinstance(content, str):
            got = "nothing" if content_key not in message else _text(content)
            return Problem(f"{place}.{content_key}", INVALID_CONTENT, f"expected a string; got {got}")
        loss = message.get("loss")
        if loss is not None and not isinstance(loss, bool):
            return Problem(f"{place}.loss", INVALID_MESSAGES, f"expected true or false; got {_text(loss)}")
        if loss and role == "tool":
            return Problem(f"{place}.loss", INVALID_MESSAGES, "tool responses never train; loss must not be true")
        # the template gets the message's own extra keys (tool_call_id, name, ...), never ours
        extra = {k: v for k, v in message.items()
                 if k not in ("role", "from", "content", "value", "loss") and v is not None}
        if isinstance(extra.get("tool_calls"), list):
            calls = _openai_tool_calls(extra["tool_calls"])
            if isinstance(calls, str):
                return Problem(f"{place}.tool_calls", INVALID_MESSAGES, calls)
            extra["tool_calls"] = calls
        if message.get(role_key) in ("tool_call", "function_call"):
            call = _tool_call(content)
            if call is None:
                return Problem(f"{place}.{content_key}", INVALID_CONTENT, "a tool_call turn's content must be a JSON "
                               f'object {{"name": ..., "arguments": ...}}; got {_text(content)}')
            extra[TOOL_CALL] = call
        messages.append({"role": role, "content": content, **extra})
        losses.append(loss)
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
        losses.insert(0, None)
    return Conversation(messages, losses)


def _openai_tool_calls(calls: list) -> list | str:
    """OpenAI-style `tool_calls` with `arguments` as JSON text get them as an object,
    as chat templates render them (Qwen2.5 writes `arguments | tojson`); a problem as text."""
    out = []
    for j, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return f'[{j}]: expected {{"type": "function", "function": {{"name", "arguments"}}}}; got {_text(call)}'
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return f"[{j}].function.arguments: not JSON: {_text(arguments)}"
        function = {**function, "arguments": arguments}
        out.append({**call, "function": function} if "function" in call else function)
    return out


def _tool_call(content: str) -> dict | None:
    """A tool_call turn's JSON text -> {"name", "arguments" (an object)}, as chat templates take it."""
    try:
        call = json.loads(content)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return {"name": call["name"], "arguments": arguments}


def _first(row: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if row.get(k) is not None), None)


def _string(row: dict, key: str | None, names: dict[str, str]) -> str | None | Problem:
    if key is None:
        return None
    if not isinstance(row[key], str):
        return Problem(names.get(key, key), INVALID_CONTENT, f"expected a string; got {_text(row[key])}")
    return row[key]


def _response(row: dict, names: dict[str, str], system: str | None, prompt: bool = False) -> Conversation | Problem:
    if row.get("instruction") is not None and "input" in row:  # alpaca, as ms-swift's AlpacaPreprocessor
        parts = [_string(row, k, names) for k in ("instruction", "input") if row.get(k) is not None]
        for part in parts:
            if isinstance(part, Problem):
                return part
        query = "\n".join(p for p in parts if p)
    else:
        query = _string(row, _first(row, QUERY_KEYS), names)
    response_key = None if prompt else _first(row, RESPONSE_KEYS)
    response = _string(row, response_key, names)
    for value in (query, response):
        if isinstance(value, Problem):
            return value
    if response is None and not prompt:
        return Problem("response", NO_ASSISTANT, "no response to train on (expected one of "
                       f"{', '.join(RESPONSE_KEYS)})")
    messages = [] if system is None else [{"role": "system", "content": system}]
    history = row.get("history")
    if history is not None:
        name = names.get("history", "history")
        if not isinstance(history, list):
            return Problem(name, INVALID_MESSAGES, f"expected a list of [query, response] pairs; got {_text(history)}")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                return Problem(f"{name}[{i}]", INVALID_CONTENT, f"expected [query, response] strings; got {_text(pair)}")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    if query is not None:
        messages.append({"role": "user", "content": query})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    elif query is None:
        return Problem("query", NOT_PROMPT, f"no prompt (expected one of {', '.join(QUERY_KEYS)})")
    return Conversation(messages, [None] * len(messages))


def _rename(value: dict, columns: dict[str, str]) -> tuple[dict, dict[str, str]]:
    row, names = {}, {}
    for key, item in value.items():
        target = columns.get(key, key)
        if target in row and row[target] is not None and key not in columns:
            continue  # a mapped column wins over a same-named original one
        row[target] = item
        if target != key:
            names[target] = key
    return row, names


def _forced(row: dict, value: dict, fmt: str) -> Problem | None:
    """--format FMT: the row must have that format's column."""
    if any(row.get(k) is not None for k in FORMAT_KEYS[fmt]):
        return None
    keys = ", ".join(sorted(map(str, value))) or "none"
    return Problem(None, UNKNOWN_FORMAT, f"not a {fmt} row (--format {fmt} expects "
                   f"{' or '.join(FORMAT_KEYS[fmt][:3])}{', ...' if len(FORMAT_KEYS[fmt]) > 3 else ''}); keys: {keys}")


def _base(row: dict, names: dict[str, str], value: dict, prompt: bool,
          fmt: str = "auto") -> tuple[Conversation | Problem, set[str]]:
    """The row's conversation (without the assistant-turn check) and the columns it consumed."""
    if fmt != "auto":
        problem = _forced(row, value, fmt)
        if problem is not None:
            return problem, set()
        if fmt == "text":
            text = _string(row, "text", names)
            if isinstance(text, Problem):
                return text, set()
            return Conversation([{"role": "assistant", "content": text}], [None]), {"text"}
    system_key = _first(row, SYSTEM_KEYS)
    system = _string(row, system_key, names)
    if isinstance(system, Problem):
        return system, set()
    system = system or None  # an empty system cell is no system prompt (CSV has no null)
    used = {system_key} if system_key else set()
    chat_key = next((k for k in FORMAT_KEYS.get(fmt, MESSAGE_KEYS) if k in row), None) \
        if fmt in ("auto", "messages", "sharegpt") else None
    if chat_key is not None:
        return _chat(names.get(chat_key, chat_key), row[chat_key], system), used | {chat_key}
    if prompt and (_first(row, QUERY_KEYS) is not None or row.get("history") is not None):
        keys = {"history", "instruction", "input"} if row.get("instruction") is not None and "input" in row \
            else {"history", _first(row, QUERY_KEYS)}
        return _response(row, names, system, prompt=True), used | keys
    if _first(row, QUERY_KEYS + RESPONSE_KEYS) is not None or row.get("history") is not None:
        keys = {"history", "instruction", "input", _first(row, QUERY_KEYS), _first(row, RESPONSE_KEYS)}
        return _response(row, names, system), used | keys
    keys = ", ".join(sorted(map(str, value))) or "none"
    return Problem(None, UNKNOWN_FORMAT, "no known row format (messages, conversations, instruction/output, "
                   f"query/response, text); keys: {keys}"), set()


def _tools(row: dict, names: dict[str, str]) -> list | None | Problem:
    """`tools`: a JSON list (or its text) of tool/function schemas, handed to the template as they are."""
    tools = row.get("tools")
    name = names.get("tools", "tools")
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            return Problem(name, INVALID_TOOLS, f"not JSON: {exc}")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        return Problem(name, INVALID_TOOLS, f"expected a list of tool objects; got {_text(tools)}")
    return tools or None


def _conversation_field(row: dict, names: dict[str, str]) -> str:
    """The row's own name of the column holding its conversation (for problems)."""
    chat_key = next((k for k in MESSAGE_KEYS if k in row), None)
    if chat_key is not None:
        return names.get(chat_key, chat_key)
    key = _first(row, QUERY_KEYS) or "query"
    return names.get(key, key)


def _margin(value, name: str) -> float | None | Problem:
    """A pair's `margin`: a number (CSV text of one too); empty means none."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return Problem(name, INVALID_LABEL, f"expected a number; got {_text(value)}")


def row_kind(row: dict) -> str:
    """The kind a row declares by its columns: preference (a rejected side), kto (a
    label), else sft; prompt rows are told apart by their conversation (see to_example)."""
    if any(row.get(k) is not None for k in REJECTED_KEYS):
        return "preference"
    if "label" in row:
        return "kto"
    return "sft"


def _label(value, name: str) -> bool | Problem:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # CSV cells are text
        return value.strip().lower() == "true"
    return Problem(name, INVALID_LABEL, f"expected true or false; got {_text(value)}")


def _rejected(row: dict, names: dict[str, str], chosen: Conversation) -> Conversation | Problem:
    """The rejected conversation: the chosen one's prompt, then the rejected answer."""
    prompt, prompt_losses = chosen.messages[:-1], chosen.losses[:-1]
    if row.get("rejected_messages") is not None:
        name = names.get("rejected_messages", "rejected_messages")
        system = chosen.messages[0]["content"] if chosen.messages[0]["role"] == "system" else None
        rejected = _chat(name, row["rejected_messages"], system)
        if isinstance(rejected, Problem):
            return rejected
        if rejected.messages[-1]["role"] != "assistant":
            return Problem(name, NO_ASSISTANT, "the rejected conversation must end with an assistant turn")
        if rejected.messages[:-1] != prompt:
            return Problem(name, INVALID_MESSAGES, "must repeat the chosen conversation's prompt (every turn before "
                           "the last answer) and differ only in the last assistant turn")
        return Conversation(rejected.messages, [*prompt_losses, rejected.losses[-1]])
    name = names.get("rejected_response", "rejected_response")
    if not isinstance(row["rejected_response"], str):
        return Problem(name, INVALID_CONTENT, f"expected a string; got {_text(row['rejected_response'])}")
    return Conversation([*prompt, {"role": "assistant", "content": row["rejected_response"]}], [*prompt_losses, None])


def _trl_pair(row: dict, names: dict[str, str]) -> tuple[dict, dict[str, str]] | Problem:
    """TRL's preference columns to ours: `prompt` + `chosen` + `rejected` as texts
    (-> query, response, rejected_response) or as message lists (the prompt's turns,
    then each side's answer -> messages, rejected_messages), or `chosen` + `rejected`
    as whole conversations with the prompt inside them (implicit prompt)."""
    chosen, rejected, prompt = row.pop("chosen"), row.pop("rejected"), row.get("prompt")
    names = dict(names)
    chosen_name, rejected_name = names.pop("chosen", "chosen"), names.pop("rejected", "rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        if isinstance(prompt, list):
            row.pop("prompt")
            chosen, rejected = [*prompt, *chosen], [*prompt, *rejected]
        elif prompt is not None:
            return Problem(names.get("prompt", "prompt"), INVALID_MESSAGES,
                           "chosen and rejected are message lists, so the prompt must be one too")
        row["messages"], row["rejected_messages"] = chosen, rejected
        names.update(messages=chosen_name, rejected_messages=rejected_name)
        return row, names
    if prompt is None:
        return Problem(names.get("prompt", "prompt"), NOT_PROMPT,
                       "chosen and rejected texts need a prompt column (TRL's explicit-prompt format), or give "
                       "them as message lists")
    row["response"], row["rejected_response"] = chosen, rejected
    names.update(response=chosen_name, rejected_response=rejected_name)
    return row, names


def to_example(value, columns: dict[str, str] | None = None, task: str = "auto",
               fmt: str = "auto", surrogate_free: bool = False) -> Conversation | Problem:
    """One decoded row to what `task` trains on; `auto` takes the row's own kind.
    `columns` renames keys first; `fmt` forces a row format (FORMATS); problems
    name the row's own column names. surrogate_free: the caller knows no string of
    the row holds a lone surrogate (inputs.Record.surrogate_free), so none is looked for."""
    if not isinstance(value, dict):
        return Problem(None, INVALID_JSON, f"expected a JSON object; got {_text(value)}")
    place = None if surrogate_free else _not_unicode(value)
    if place is not None:
        return Problem(place, INVALID_CONTENT, "not Unicode text: a lone surrogate (a JSON \\ud800-\\udfff escape "
                       "without its pair, or bytes that are not UTF-8); no tokenizer or Arrow file takes it")
    row, names = _rename(value, columns or {})
    if row.get("chosen") is not None and row.get("rejected") is not None \
            and not any(row.get(k) is not None for k in (*REJECTED_KEYS, *MESSAGE_KEYS)):
        renamed = _trl_pair(row, names)
        if isinstance(renamed, Problem):
            return renamed
        row, names = renamed
    declared = row_kind(row)
    kind = task if task != "auto" else declared
    base, used = _base(row, names, value, prompt=kind == "prompt", fmt=fmt)
    if isinstance(base, Problem):
        return base
    ends_on_prompt = base.messages[-1]["role"] in ("user", "tool")
    if task == "auto" and declared == "sft" and not any(m["role"] == "assistant" for m in base.messages):
        kind = "prompt"  # a conversation with no answer at all: a prompt for generation
    tools = _tools(row, names)
    if isinstance(tools, Problem):
        return tools
    if kind == "prompt":
        if not ends_on_prompt:
            return Problem(_conversation_field(row, names), NOT_PROMPT,
                           "a prompt row must end on a user (or tool) turn")
        consumed = used | {"tools"}
        extras = {names.get(k, k): v for k, v in row.items() if k not in consumed}
        return dataclasses.replace(base, kind="prompt", tools=tools, extras=extras)
    if not any(m["role"] == "assistant" for m in base.messages):
        chat_key = next((k for k in MESSAGE_KEYS if k in row), None)
        return Problem(names.get(chat_key, chat_key) if chat_key else "response", NO_ASSISTANT,
                       "no assistant message to train on")
    if kind == "kto":
        if "label" not in row:
            return Problem("label", INVALID_LABEL, "missing (a KTO row needs label true or false)")
        label = _label(row["label"], names.get("label", "label"))
        if isinstance(label, Problem):
            return label
        return dataclasses.replace(base, kind="kto", tools=tools, label=label)
    if kind in ("preference", "reward"):
        if not any(row.get(k) is not None for k in REJECTED_KEYS):
            return Problem("rejected_response", NO_REJECTED,
                           "missing: a preference row needs rejected_response or rejected_messages")
        if base.messages[-1]["role"] != "assistant":
            return Problem(_conversation_field(row, names), NO_ASSISTANT,
                           "the chosen conversation must end with an assistant turn")
        rejected = _rejected(row, names, base)
        if isinstance(rejected, Problem):
            return rejected
        margin = _margin(row.get("margin"), names.get("margin", "margin"))
        if isinstance(margin, Problem):
            return margin
        return dataclasses.replace(base, kind=kind, tools=tools, rejected=rejected.messages,
                                   rejected_losses=rejected.losses, margin=margin)
    return dataclasses.replace(base, kind=kind, tools=tools)


def to_conversation(value, columns: dict[str, str] | None = None) -> Conversation | Problem:
    """One decoded row to a supervised conversation (to_example with task sft)."""
    return to_example(value, columns, task="sft")
