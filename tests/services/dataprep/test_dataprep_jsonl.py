"""Reading OpenAI-messages JSONL: every bad row becomes a Reject naming its place."""

import json

import pytest

from libs.common.errors import InvalidArgument, NotFound
from services.dataprep import jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("line, reason, text", [
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}, {"role": "bot", "content": "d"}]}',
     jsonl.INVALID_ROLE,
     'train.jsonl:4: messages[3].role: expected one of system, user, assistant, tool; got "bot"'),
    ('not json', jsonl.INVALID_JSON,
     "train.jsonl:4: not a JSON object: Expecting value: line 1 column 1 (char 0)"),
    ('[1, 2]', jsonl.INVALID_JSON, "train.jsonl:4: expected a JSON object; got [1, 2]"),
    ('{"conversations": []}', jsonl.INVALID_MESSAGES, "train.jsonl:4: messages: missing"),
    ('{"messages": []}', jsonl.INVALID_MESSAGES,
     "train.jsonl:4: messages: expected a non-empty list of messages; got []"),
    ('{"messages": ["hi"]}', jsonl.INVALID_MESSAGES,
     'train.jsonl:4: messages[0]: expected an object with role and content; got "hi"'),
    ('{"messages": [{"content": "x"}]}', jsonl.INVALID_ROLE,
     "train.jsonl:4: messages[0].role: expected one of system, user, assistant, tool; got nothing"),
    ('{"messages": [{"role": "user", "content": null}]}', jsonl.INVALID_CONTENT,
     "train.jsonl:4: messages[0].content: expected a string; got null"),
    ('{"messages": [{"role": "user"}]}', jsonl.INVALID_CONTENT,
     "train.jsonl:4: messages[0].content: expected a string; got nothing"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', jsonl.NO_ASSISTANT,
     "train.jsonl:4: messages: no assistant message to train on"),
])
def test_bad_rows_name_their_place(line, reason, text):
    reject = jsonl.parse_line("train.jsonl", 4, line.encode() + b"\n")
    assert isinstance(reject, jsonl.Reject)
    assert reject.reason == reason
    assert str(reject) == text
    assert reject.raw == line
    record = json.loads(reject.to_json())
    assert record["file"] == "train.jsonl" and record["line"] == 4 and record["reason"] == reason
    assert record["raw"] == line and record["error"] == text


def test_invalid_utf8_is_rejected_not_raised():
    reject = jsonl.parse_line("a.jsonl", 1, b'{"messages": "\xff"}\n')
    assert isinstance(reject, jsonl.Reject) and reject.reason == jsonl.INVALID_JSON


def test_good_row_keeps_messages_and_extra_keys():
    messages = [{"role": "tool", "content": "42", "tool_call_id": "t1"}, *GOOD["messages"]]
    row = jsonl.parse_line("a.jsonl", 2, json.dumps({"messages": messages, "id": 7}).encode())
    assert isinstance(row, jsonl.Row)
    assert (row.file, row.line, row.messages) == ("a.jsonl", 2, messages)


def test_blank_lines_are_not_rows_and_line_numbers_count_them(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n   \n" + "oops\n" + json.dumps(GOOD))  # no final newline
    sources = jsonl.check_files([str(path)])
    rows = list(jsonl.read(sources))
    assert [(type(r).__name__, r.line) for r in rows] == [("Row", 1), ("Reject", 4), ("Row", 5)]
    assert sources[0].rows == 3
    import hashlib
    assert sources[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_files_are_all_named(tmp_path):
    present = tmp_path / "a.jsonl"
    present.write_text("")
    with pytest.raises(NotFound) as error:
        jsonl.check_files([str(present), str(tmp_path / "b.jsonl"), str(tmp_path / "c.jsonl")])
    assert error.value.field == "dataset"
    assert str(tmp_path / "b.jsonl") in str(error.value) and str(tmp_path / "c.jsonl") in str(error.value)
    assert str(present) not in str(error.value)
    with pytest.raises(InvalidArgument, match="not a file"):
        jsonl.check_files([str(tmp_path)])
