"""Reads dataset files in the OpenAI `messages` JSONL format into validated
conversations, and every row that is not one into a Reject naming its place."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Iterator

from libs.common.errors import InvalidArgument, NotFound

ROLES = ("system", "user", "assistant", "tool")

# Reject reasons: the bounded label set of the rejected-rows metric and the
# keys of the manifest's rejected_by_reason.
INVALID_JSON = "invalid_json"
INVALID_MESSAGES = "invalid_messages"
INVALID_ROLE = "invalid_role"
INVALID_CONTENT = "invalid_content"
NO_ASSISTANT = "no_assistant"
NO_TRAINABLE = "no_trainable"
UNKNOWN_FORMAT = "unknown_format"
TOO_LONG = "too_long"
TEMPLATE = "template"
INVALID_TOOLS = "invalid_tools"
INVALID_LABEL = "invalid_label"
NO_REJECTED = "no_rejected"
NOT_PROMPT = "not_prompt"
INVALID_EXTRA = "invalid_extra"
INVALID_TEXT = "invalid_text"  # a .txt document or line that is not UTF-8
INTERNAL_ERROR = "internal_error"  # a bug of ours met on this row (logged with its traceback); never the row's fault
REASONS = (INVALID_JSON, INVALID_MESSAGES, INVALID_ROLE, INVALID_CONTENT, NO_ASSISTANT, NO_TRAINABLE, UNKNOWN_FORMAT,
           TOO_LONG, TEMPLATE, INVALID_TOOLS, INVALID_LABEL, NO_REJECTED, NOT_PROMPT, INVALID_EXTRA, INVALID_TEXT,
           INTERNAL_ERROR)


@dataclasses.dataclass(frozen=True)
class Row:
    """One valid conversation and where it came from."""

    file: str
    line: int
    messages: list[dict]
    raw: str
    losses: tuple[bool | None, ...] | None = None  # each message's `loss`; None: all unset

    def reject(self, field: str | None, reason: str, message: str) -> "Reject":
        """This row, rejected at a later stage (tokenizing, length)."""
        return Reject(self.file, self.line, field, reason, message, self.raw)


@dataclasses.dataclass(frozen=True)
class Reject:
    """A row that is not kept, with its place, the offending field and why."""

    file: str
    line: int
    field: str | None
    reason: str
    message: str
    raw: str

    def __str__(self) -> str:
        place = f"{self.file}:{self.line}"
        return f"{place}: {self.field}: {self.message}" if self.field else f"{place}: {self.message}"

    def to_json(self) -> str:
        record = {"file": self.file, "line": self.line, "field": self.field, "reason": self.reason,
                  "error": str(self), "raw": self.raw}
        return dumps(record)


def dumps(value) -> str:
    """JSON text of `value`, its characters as they are, or, where a string holds a lone
    surrogate (a JSON "\\ud800" escape without its pair, which UTF-8 cannot write),
    with \\u escapes: the same value, and a text any UTF-8 file takes."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value)
    return text


@dataclasses.dataclass
class Source:
    """A dataset file being read; `sha256` and `rows` are complete once read."""

    path: str
    sha256: str = ""
    rows: int = 0


def check_files(paths: list[str]) -> list[Source]:
    """Fails before any work if a dataset file is missing or not a file, naming every such file."""
    missing = [p for p in paths if not pathlib.Path(p).exists()]
    if missing:
        raise NotFound(f"no such file: {', '.join(missing)}", field="dataset")
    not_files = [p for p in paths if not pathlib.Path(p).is_file()]
    if not_files:
        raise InvalidArgument(f"not a file: {', '.join(not_files)}", field="dataset")
    return [Source(p) for p in paths]


def _json_text(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_messages(value) -> tuple[str, str, str] | None:
    """Returns (field, reason, message) of the first problem of a row's `messages`, or None."""
    if not isinstance(value, list) or not value:
        return "messages", INVALID_MESSAGES, f"expected a non-empty list of messages; got {_json_text(value)}"
    for i, message in enumerate(value):
        place = f"messages[{i}]"
        if not isinstance(message, dict):
            return place, INVALID_MESSAGES, f"expected an object with role and content; got {_json_text(message)}"
        role = message.get("role")
        if role not in ROLES:
            got = "nothing" if "role" not in message else _json_text(role)
            return f"{place}.role", INVALID_ROLE, f"expected one of {', '.join(ROLES)}; got {got}"
        content = message.get("content")
        if not isinstance(content, str):
            got = "nothing" if "content" not in message else _json_text(content)
            return f"{place}.content", INVALID_CONTENT, f"expected a string; got {got}"
    if not any(m["role"] == "assistant" for m in value):
        return "messages", NO_ASSISTANT, "no assistant message to train on"
    return None


def parse_line(file: str, line: int, raw: bytes) -> Row | Reject:
    """Turns one non-blank line into a Row or a Reject."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Reject(file, line, None, INVALID_JSON, f"not a JSON object: {exc}", text)
    if not isinstance(record, dict):
        return Reject(file, line, None, INVALID_JSON, f"expected a JSON object; got {_json_text(record)}", text)
    if "messages" not in record:
        return Reject(file, line, "messages", INVALID_MESSAGES, "missing", text)
    problem = _check_messages(record["messages"])
    if problem:
        field, reason, message = problem
        return Reject(file, line, field, reason, message, text)
    return Row(file, line, record["messages"], text)


def read(sources: list[Source]) -> Iterator[Row | Reject]:
    """Yields every row of every source in order; blank lines are not rows.
    Fills each source's sha256 and row count as it is read."""
    for source in sources:
        digest = hashlib.sha256()
        with open(source.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                digest.update(raw)
                if not raw.strip():
                    continue
                source.rows += 1
                yield parse_line(source.path, number, raw)
        source.sha256 = digest.hexdigest()
