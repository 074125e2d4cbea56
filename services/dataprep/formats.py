"""Row formats, detected per row with ms-swift's field names and aliases, turned
into one conversation (messages plus each message's optional `loss`) or a
problem naming the offending field:
  - messages: [{role, content, loss?}] with roles system/user/assistant/tool and
    ms-swift's agent roles tool_call (an assistant turn) and tool_response (a tool turn);
  - sharegpt: `conversation(s)`: [{from, value}] with from human/gpt/bot/system/tool/...;
  - alpaca: instruction, input, output (+ system);
  - query/response/history (+ system), with ms-swift's aliases; a row with only a
    response alias (e.g. pre-training `text`) is a single assistant turn.
"""

from __future__ import annotations

import dataclasses
import json

# Reject reasons of this stage (see jsonl.REASONS for the full bounded set).
from services.dataprep.jsonl import (INVALID_CONTENT, INVALID_JSON, INVALID_MESSAGES, INVALID_ROLE, NO_ASSISTANT,
                                     UNKNOWN_FORMAT)

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


@dataclasses.dataclass(frozen=True)
class Conversation:
    """messages as the chat template takes them; losses[i] is message i's `loss` or None."""

    messages: list[dict]
    losses: list[bool | None]


@dataclasses.dataclass(frozen=True)
class Problem:
    field: str | None
    reason: str
    message: str


def _text(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


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
        messages.append({"role": role, "content": content, **extra})
        losses.append(loss)
    if not any(m["role"] == "assistant" for m in messages):
        return Problem(key, NO_ASSISTANT, "no assistant message to train on")
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
        losses.insert(0, None)
    return Conversation(messages, losses)


def _first(row: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if row.get(k) is not None), None)


def _string(row: dict, key: str | None, names: dict[str, str]) -> str | None | Problem:
    if key is None:
        return None
    if not isinstance(row[key], str):
        return Problem(names.get(key, key), INVALID_CONTENT, f"expected a string; got {_text(row[key])}")
    return row[key]


def _response(row: dict, names: dict[str, str], system: str | None) -> Conversation | Problem:
    if row.get("instruction") is not None and "input" in row:  # alpaca, as ms-swift's AlpacaPreprocessor
        parts = [_string(row, k, names) for k in ("instruction", "input") if row.get(k) is not None]
        for part in parts:
            if isinstance(part, Problem):
                return part
        query = "\n".join(p for p in parts if p)
    else:
        query = _string(row, _first(row, QUERY_KEYS), names)
    response_key = _first(row, RESPONSE_KEYS)
    response = _string(row, response_key, names)
    for value in (query, response):
        if isinstance(value, Problem):
            return value
    if response is None:
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
    messages.append({"role": "assistant", "content": response})
    return Conversation(messages, [None] * len(messages))


def to_conversation(value, columns: dict[str, str] | None = None) -> Conversation | Problem:
    """One decoded row to a conversation. `columns` renames keys first; problems name
    the row's own column names."""
    if not isinstance(value, dict):
        return Problem(None, INVALID_JSON, f"expected a JSON object; got {_text(value)}")
    columns = columns or {}
    row, names = {}, {}
    for key, item in value.items():
        target = columns.get(key, key)
        if target in row and row[target] is not None and key not in columns:
            continue  # a mapped column wins over a same-named original one
        row[target] = item
        if target != key:
            names[target] = key
    system_key = _first(row, SYSTEM_KEYS)
    system = _string(row, system_key, names)
    if isinstance(system, Problem):
        return system
    system = system or None  # an empty system cell is no system prompt (CSV has no null)
    chat_key = next((k for k in MESSAGE_KEYS if k in row), None)
    if chat_key is not None:
        return _chat(names.get(chat_key, chat_key), row[chat_key], system)
    if _first(row, QUERY_KEYS + RESPONSE_KEYS) is not None or row.get("history") is not None:
        return _response(row, names, system)
    keys = ", ".join(sorted(map(str, value))) or "none"
    return Problem(None, UNKNOWN_FORMAT, "no known row format (messages, conversations, instruction/output, "
                   f"query/response, text); keys: {keys}")
