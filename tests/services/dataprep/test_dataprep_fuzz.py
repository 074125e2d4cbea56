"""Regressions of the dataprep fuzzer (issue 12): each minimal example Hypothesis printed, as a plain test."""

from __future__ import annotations

import json

import pytest

from libs.common.errors import InvalidArgument
from services.dataprep.config import PrepareConfig
from services.dataprep.pipeline import prepare


# ---------------------------------------------------------------------------------------------------------------
# What the fuzzers found: each minimal example Hypothesis printed, as a plain test. Before its fix each one
# ended the whole preparation with a traceback.

@pytest.mark.parametrize("line,reason,field,error", [
    # case = Case(model='default', family='sft', suffix='.jsonl', rows=[Row(value='@@deep:3000@@', ...)], ...)
    (b"[" * 3000 + b"]" * 3000, "invalid_json", None,
     "not a JSON object: nested more deeply than the JSON reader allows (about 1000 levels)"),  # RecursionError
    # case = Case(model='default', family='sft', suffix='.jsonl', rows=[Row(value='@@bigint@@', ...)], ...)
    (b"9" * 5000, "invalid_json", None, "not a JSON object: an integer of more than 4300 digits"),  # ValueError
    # case = Case(model='default', family='sft', suffix='.jsonl',
    #             rows=[Row(value=None, good=False, raw=b'{"text": "\xed\xa0\x80"}', ascii=True)], ...)
    (b'{"text": "\xed\xa0\x80"}', "invalid_content", "text",  # TypeError: TextInputSequence must be str
     "not Unicode text: a lone surrogate (a JSON \\ud800-\\udfff escape without its pair, or bytes that are not "
     "UTF-8); no tokenizer or Arrow file takes it"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "ok"}]}',
     "invalid_content", "messages[0].content", None),  # the same surrogate as a JSON escape
], ids=["nested_3000_deep", "integer_of_5000_digits", "surrogate_bytes", "surrogate_escape"])
def test_json_lines_python_cannot_read_or_tokenize_are_rejected_naming_their_line(tmp_path, conversation, line, reason,
                                                                                  field, error):
    data = tmp_path / "data.jsonl"
    data.write_bytes(json.dumps(conversation(1)).encode() + b"\n" + line + b"\n")
    out = tmp_path / "out"
    manifest = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out)))
    assert (manifest["rows_out"], manifest["rejected_by_reason"]) == (1, {reason: 1})
    reject = json.loads((out / "rejects.jsonl").read_bytes().decode("utf-8"))
    assert (reject["line"], reject["field"], reject["reason"]) == (2, field, reason)
    if error is not None:
        assert reject["error"] == f"{data}:2: " + (f"{field}: " if field else "") + error
    assert reject["raw"] == line.decode("utf-8", errors="replace")


@pytest.mark.parametrize("row,error", [
    ("[" * 3000 + "]" * 3000, "row 2: nested more deeply than the JSON reader allows (about 1000 levels)"),
    ("9" * 5000, "row 2: an integer of more than 4300 digits"),
])
def test_a_json_array_row_python_cannot_read_is_one_line_naming_the_row(tmp_path, conversation, row, error):
    """In a .json array nothing after such a row can be read: one line, as for a broken array."""
    data = tmp_path / "data.json"
    data.write_text(f"[{json.dumps(conversation(1))}, {row}, {json.dumps(conversation(2))}]")
    with pytest.raises(InvalidArgument) as raised:
        prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out")))
    assert str(raised.value) == f"dataset: {data}: not a JSON array: {error}"


def test_a_lone_surrogate_in_a_json_array_row_is_rejected_and_its_raw_text_kept_escaped(tmp_path, conversation):
    """The row's raw text in rejects.jsonl keeps the surrogate as its JSON escape: a file that
    UTF-8 cannot write stopped the run (UnicodeEncodeError) once the row's check let it through."""
    data = tmp_path / "data.json"
    data.write_text(f'[{json.dumps(conversation(1))}, {{"text": "a\\udc80b"}}]')
    out = tmp_path / "out"
    manifest = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out)))
    assert manifest["rejected_by_reason"] == {"invalid_content": 1}
    reject = json.loads((out / "rejects.jsonl").read_bytes().decode("utf-8"))
    assert (reject["line"], reject["field"], reject["raw"]) == (2, "text", '{"text": "a\\udc80b"}')
