"""Fuzzing a whole preparation (issue 12: bad input never stops a run).

Hypothesis writes dataset files (.jsonl mostly, .json arrays and .csv too) that
mix rows built valid, of every row format and task, with broken ones (wrong
types at every field, missing and extra fields, empty and whitespace-only
contents, roles in any order, huge and deeply nested values, invalid UTF-8,
lone surrogates, NUL and control characters, template markers and special
tokens, numbers where strings belong, `loss` flags of any type, tools that are
not JSON), and runs the real preparation over each, with the default model's
chat template, Qwen2.5's and Llama-3's, in-process (layout and per-row paths,
--streaming, --packing), with --num_proc 2, and through the CLI; and one row at
a time through tasks.encode_record, which is cheap enough for many more rows
and lets Hypothesis shrink a failure to the row at fault. For every file:
  - the run ends with a manifest, or with one of the documented one-line
    INVALID_ARGUMENT errors (every row rejected, no rows, binary data, a row of
    another kind, ...), leaving nothing that looks complete;
  - rows_in == rows_out + rows_rejected, and rows_in is the file's rows;
  - every reject names its file and line, its field where a field is at fault,
    a reason of the bounded set (never internal_error), and keeps the row's text;
  - every kept row satisfies the label rules (invariants.py), and every row
    built valid is kept unless it is too long.

Budgets (tests/conftest.py): the `ci` profile, a fixed seed, runs with the
suite; `pytest --hypothesis-profile=long tests/services/dataprep/test_dataprep_fuzz.py`
runs fifty times the examples, randomized.
"""

from __future__ import annotations

import collections
import copy
import csv
import dataclasses
import io
import json
import pathlib
import re
import tempfile

import pyarrow as pa
import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from libs.common.errors import InvalidArgument
from services.dataprep import formats, inputs, jsonl, layout, pretraining, tasks, template
from services.dataprep.config import PrepareConfig
from services.dataprep.pipeline import prepare
from services.dataprep.template import IGNORE_INDEX
from tests.services.dataprep.invariants import check_labels, expected_sequence, reference

# ---------------------------------------------------------------------------------------------------------------
# What a row is made of

MARKERS = ["<|im_start|>", "<|im_end|>", "<|im_start|>assistant\n", "<|endoftext|>", "<|eot_id|>",
           "<|begin_of_text|>", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<tool_call>", "</tool_call>",
           "<tool_response>", layout.OPEN, layout.CLOSE, layout.marker(0), layout.marker(7), "{{ messages }}",
           "{% endfor %}", "{{ raise_exception('x') }}", "### Human:\n", "### Assistant:\n", "<s>", "</s>", "[INST]"]
ODD = ["", " ", "  \n\t", "\r\n", "\n\n", "\x00", "\x01\x02", "\x1b[31m", "\x7f", "\u2028\u2029", "\ufeff", "\u200b",
       "é", "e\u0301", "😀", "\U0010ffff", "\ufffd", "\uffff", "x" * 300]
PIECES = st.sampled_from(MARKERS + ODD)
GOOD_TEXT = st.one_of(st.text(max_size=12), PIECES, st.lists(st.one_of(st.text(max_size=6), PIECES), max_size=4)
                      .map("".join))
HUGE_TEXT = st.sampled_from([4_000, 60_000]).map(lambda n: "lorem ipsum " * (n // 12))
ODD_CHARS = st.text(st.characters(categories=["Cs", "Cc", "Co", "Cn"]), min_size=1, max_size=4)  # lone surrogates
BAD_TEXT = st.one_of(GOOD_TEXT, GOOD_TEXT, ODD_CHARS, HUGE_TEXT)


def rarely(n: int) -> st.SearchStrategy[bool]:
    """True once in n + 1 draws; shrinks to False (shrinking drops what it adds)."""
    return st.integers(0, n).map(lambda k: k == n)


# Spliced into the file's bytes in place of the JSON string holding them: what json.dumps cannot write.
DEEP = ["@@deep:50@@", "@@deep:990@@", "@@deep:3000@@", "@@deep:200000@@"]  # nested lists
BIGINT = "@@bigint@@"  # an integer of 5000 digits (json.loads refuses more than 4300)
BAD_UTF8 = "@@badutf8@@"  # bytes that are not UTF-8, inside a string
RAW_CONTROL = "@@rawctrl@@"  # raw control characters inside a string (not valid JSON)
SPLICES = [*DEEP, BIGINT, BAD_UTF8, RAW_CONTROL]

KIND_MARKERS = ["label", "rejected_response", "rejected_messages", "chosen", "rejected"]
FIELDS = ["messages", "conversations", "conversation", "role", "from", "content", "value", "loss", "tool_calls",
          "name", "tool_call_id", "function", "arguments", "system", "system_prompt", "query", "response", "prompt",
          "instruction", "input", "output", "text", "history", "tools", "margin", "solution", "input_ids", "length",
          "labels", "type"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), BAD_TEXT,
                    st.sampled_from(SPLICES))
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), inner, max_size=3), max_leaves=5)
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
BAD_TOOLS = st.one_of(JUNK, st.just("[{not json"), st.just('{"type": "function"}'), st.just("[1, 2]"),
                      st.just([TOOLS[0], "x"]), st.just([{"type": "function", "function": None}]))
FROM = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation", "tool_call": "function_call",
        "tool_response": "tool_response"}


@st.composite
def conversations(draw, end: str = "assistant") -> list[dict]:
    """A valid conversation with roles in any order (an answer first, users in a row,
    system in the middle, a tool response without a call), ending on an answer
    (end="assistant") or on a user turn with no answer at all (end="prompt")."""
    pool = ["user", "assistant", "system", "tool", "tool_call", "openai_call"] if end == "assistant" \
        else ["user", "system", "tool"]
    roles = draw(st.lists(st.sampled_from(pool), max_size=4))
    roles += (["user", "assistant"] if draw(st.booleans()) else ["assistant"]) if end == "assistant" else ["user"]
    messages = []
    for role in roles:
        call = {"name": draw(st.sampled_from(["add", "search"])),
                "arguments": draw(st.dictionaries(st.sampled_from("ab"), st.integers(), max_size=2))}
        if role == "openai_call":  # OpenAI's assistant message with tool_calls (arguments as JSON text or not)
            arguments = json.dumps(call["arguments"]) if draw(st.booleans()) else call["arguments"]
            message = {"role": "assistant", "content": draw(st.sampled_from([None, ""])), "tool_calls": [
                {"type": "function", "id": "call_1", "function": {**call, "arguments": arguments}}]}
        else:
            message = {"role": role, "content": json.dumps(call) if role == "tool_call" else draw(GOOD_TEXT)}
        if role == "tool" and draw(st.booleans()):
            message.update(tool_call_id="call_1", name=call["name"])
        if role != "tool" and draw(rarely(7)):
            message["loss"] = True
        messages.append(message)
    return messages


def sharegpt(messages: list[dict]) -> list[dict]:
    """The conversation as sharegpt turns (an OpenAI tool call as a function_call turn)."""
    turns = []
    for m in messages:
        if m.get("tool_calls"):
            turn = {"from": "function_call", "value": json.dumps(m["tool_calls"][0]["function"])}
        else:
            turn = {"from": FROM[m["role"]], "value": m["content"]}
        turns.append({**turn, **({"loss": m["loss"]} if "loss" in m else {})})
    return turns


@st.composite
def good_rows(draw, family: str, tools: bool, renamed: bool = False) -> dict:
    """A row every code path must keep (unless too long): one of the family's formats."""
    text = GOOD_TEXT
    if family == "pt":
        return draw(st.one_of(st.builds(lambda t: {"text": t}, text),
                              st.builds(lambda c: {"messages": c}, conversations())))
    if family == "prompt":
        row = {"messages": draw(conversations("prompt")), "solution": draw(text), "level": draw(st.integers(0, 9))}
    elif family == "preference":
        chosen, other = draw(conversations()), {"role": "assistant", "content": draw(text)}
        shape = draw(st.sampled_from(["response", "messages", "trl_text", "trl_list", "trl_implicit"]))
        row = {"response": {"messages": chosen, "rejected_response": other["content"]},
               "messages": {"messages": chosen, "rejected_messages": [*chosen[:-1], other]},
               "trl_text": {"prompt": draw(text), "chosen": chosen[-1]["content"], "rejected": other["content"]},
               "trl_list": {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": [other]},
               "trl_implicit": {"chosen": chosen, "rejected": [*chosen[:-1], other]}}[shape]
        if shape == "trl_list" and not chosen[:-1]:
            row = {"prompt": [{"role": "user", "content": draw(text)}], "chosen": chosen, "rejected": [other]}
        if draw(st.booleans()):
            row["margin"] = draw(st.one_of(st.integers(-5, 5), st.floats(-3, 3), st.just("0.5")))
    else:  # sft and kto: every format
        shape = draw(st.sampled_from(["messages", "sharegpt", "alpaca", "query_response", "text"]))
        if shape == "messages":
            row = {"messages": draw(conversations())}
        elif shape == "sharegpt":
            row = {draw(st.sampled_from(["conversations", "conversation"])): sharegpt(draw(conversations()))}
        elif shape == "alpaca":
            row = {"instruction": draw(text), "input": draw(text), "output": draw(text)}
        elif shape == "query_response":
            row = {draw(st.sampled_from(["query", "question", "problem"])): draw(text),
                   draw(st.sampled_from(["response", "answer", "output", "completion"])): draw(text)}
            if renamed and draw(st.booleans()):  # the row's own names, which --columns maps
                row = {"q_text": draw(text), "a_text": draw(text)}
            if draw(st.booleans()):
                row["history"] = draw(st.lists(st.tuples(text, text).map(list), max_size=2))
        else:
            row = {"text": draw(text)}
        if shape != "messages" and draw(rarely(3)):
            row["system"] = draw(text)
        if family == "kto":
            row["label"] = draw(st.booleans())
    if tools and family != "preference" and draw(st.booleans()):
        row["tools"] = copy.deepcopy(TOOLS) if draw(st.booleans()) else json.dumps(TOOLS)
    return row


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _at(value, path):
    for step in path:
        value = value[step]
    return value


@st.composite
def mutated(draw, row: dict):
    """The row with one to three faults: any value (nested ones too) replaced by a
    value of any type, a key removed, a key added, a text made odd."""
    row = copy.deepcopy(row)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(row))
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "replace", "remove", "add", "text", "tools", "loss"]))
        if action == "tools" and isinstance(row, dict):
            row["tools"] = copy.deepcopy(draw(BAD_TOOLS))  # later faults may change it in place
            continue
        if action == "loss":
            messages = [p for p in paths if len(p) == 2 and p[0] in formats.MESSAGE_KEYS
                        and isinstance(_at(row, p), dict)]
            if messages:
                _at(row, draw(st.sampled_from(messages)))["loss"] = draw(JUNK)
                continue
        if not path:
            if action in ("replace", "text"):
                row = draw(JUNK if action == "replace" else BAD_TEXT)
            continue
        parent, key = _at(row, path[:-1]), path[-1]
        if action == "replace":
            parent[key] = draw(JUNK)
        elif action == "text":
            parent[key] = draw(BAD_TEXT)
        elif action == "remove":
            del parent[key]
        elif isinstance(parent, dict):
            name = draw(st.one_of(st.sampled_from(FIELDS), st.text(max_size=4), st.sampled_from(KIND_MARKERS))
                        if draw(rarely(15)) else st.sampled_from(FIELDS))
            parent[name] = draw(JUNK)
    return row


RAW_LINES = [b"", b"   ", b"\r", b"{", b"not json", b"[1, 2]", b"null", b'"a string"', b"1e999", b"{}",
             b'{"messages": [}', b"\xff\xfe{}", b'{"text": "\xc3"}', b'{"text": "\xed\xa0\x80"}',
             b'\xef\xbb\xbf{"text": "bom"}', b'{"text": "a"}{"text": "b"}', b'{"text": "nul\x00"}']


@dataclasses.dataclass
class Row:
    value: object = None  # a JSON value, or for CSV a dict of cells
    good: bool = False  # built valid: must be kept unless too long
    raw: bytes | None = None  # a line written as it is (JSON Lines only)
    ascii: bool = True  # json.dumps(ensure_ascii=...): lone surrogates as escapes, or as the bytes they are


@dataclasses.dataclass
class Case:
    model: str  # which chat template: default (the default model's), qwen, llama
    family: str  # what the file's rows are for: sft, pt, preference, kto, prompt
    suffix: str
    rows: list[Row]
    config: dict
    crlf: bool = False


CSV_COLUMNS = {"sft": ["query", "response", "system"], "pt": ["text"], "kto": ["query", "response", "label"],
               "preference": ["query", "response", "rejected_response", "margin"], "prompt": ["query", "solution"]}


@st.composite
def csv_rows(draw, family: str) -> Row:
    """A CSV record of the family's columns (all text), or one with an odd cell: empty (a
    missing value), not UTF-8, quotes, separators, newlines, control characters, huge.
    (Which CSV rows must be kept is not checked: an empty cell is a missing value.)"""
    cells = {column: draw(GOOD_TEXT.map(lambda t: t if t.strip() else f"x{t}")) for column in CSV_COLUMNS[family]}
    if "system" in cells and draw(st.booleans()):
        del cells["system"]
    if family == "kto":
        cells["label"] = draw(st.sampled_from(["true", "False", " TRUE "]))
    if family == "preference":
        cells["margin"] = draw(st.sampled_from(["", "1", "-0.5", "1e3"]))
    if draw(st.booleans()):
        column = draw(st.sampled_from(sorted(cells)))
        cells[column] = draw(st.one_of(BAD_TEXT.map(str), st.sampled_from(["", BAD_UTF8, "1,2", '"', "\n"])))
    return Row(cells)


@st.composite
def rows(draw, family: str, model: str, suffix: str = ".jsonl", renamed: bool = False) -> Row:
    """A row of a file: built valid, or with faults, or any JSON value, or (JSON Lines) a line of any bytes."""
    if suffix == ".csv":
        return draw(csv_rows(family))
    good = draw(good_rows(family, tools=model == "qwen", renamed=renamed))
    kind = draw(st.sampled_from(["good"] * 3 + ["mutated"] * 3 + ["junk", "raw"]))
    if kind == "good":
        return Row(good, good=True, ascii=draw(st.booleans()))
    if kind == "mutated" or kind == "raw" and suffix != ".jsonl":
        return Row(draw(mutated(good)), ascii=draw(st.booleans()))
    if kind == "junk":
        return Row(draw(JUNK), ascii=draw(st.booleans()))
    return Row(raw=draw(st.sampled_from(RAW_LINES)))


COLUMNS = json.dumps({"q_text": "query", "a_text": "response"})  # --columns, as ms-swift takes it
FAMILIES = st.sampled_from(["sft", "sft", "sft", "preference", "kto", "prompt", "pt"])


@st.composite
def configs(draw, family: str, suffix: str = ".jsonl") -> dict:
    """The preparation's arguments: a task that fits the family (mostly auto), any
    loss_scale, lengths that keep, cut or reject rows, a --system, packing, streaming."""
    task = {"sft": st.sampled_from(["auto", "auto", "sft"]), "pt": st.just("pt"),
            "preference": st.sampled_from(["auto", "preference", "reward"]), "kto": st.sampled_from(["auto", "kto"]),
            "prompt": st.sampled_from(["auto", "prompt"])}[family]
    if suffix == ".csv" and family == "prompt":
        task = st.just("prompt")  # query/solution rows are prompts only when asked
    packing = family in ("sft", "pt", "preference") and draw(rarely(3))
    config = {"task": draw(task), "loss_scale": draw(st.sampled_from(["default", "default", "last_round", "all"])),
              "max_length": draw(st.sampled_from([2048, 40] if packing else [2048, 2048, 0, 40])),
              "truncation_strategy": draw(st.sampled_from(["delete", "delete", "left", "right"])),
              "system": draw(st.one_of(st.none(), st.none(), GOOD_TEXT)),
              "packing": packing, "streaming": draw(st.booleans())}
    if family == "pt":  # never truncated: cut into blocks (of max_length or --block_size), or split and packed
        config["truncation_strategy"] = "delete"
        if not packing:
            config["max_length"] = draw(st.sampled_from([2048, 40]))
            config["block_size"] = draw(st.sampled_from([None, None, 1, 7, 64]))
            config["drop_last_block"] = draw(st.booleans())
    if draw(rarely(15)):
        config["format"] = draw(st.sampled_from(formats.FORMATS[1:]))
    if draw(rarely(7)):
        config["columns"] = COLUMNS
    return config


@st.composite
def cases(draw, models=("default", "qwen", "llama"), rows_per_file=(2, 12),
          suffixes=(".jsonl",) * 6 + (".json", ".csv")) -> Case:
    model, family, suffix = draw(st.sampled_from(models)), draw(FAMILIES), draw(st.sampled_from(suffixes))
    config = draw(configs(family, suffix))
    lines = draw(st.lists(rows(family, model, suffix, renamed="columns" in config), min_size=rows_per_file[0],
                          max_size=rows_per_file[1]))
    return Case(model, family, suffix, lines, config, crlf=draw(rarely(7)))


# ---------------------------------------------------------------------------------------------------------------
# Writing the file

def _splice(text: str) -> bytes:
    """The file's bytes, each SPLICES placeholder replaced by what it stands for."""
    data = text.encode("utf-8", errors="surrogatepass")  # lone surrogates as the (invalid UTF-8) bytes they are
    for deep in DEEP:
        depth = int(deep.split(":")[1].rstrip("@"))
        data = data.replace(f'"{deep}"'.encode(), b"[" * depth + b"]" * depth)
    data = data.replace(f'"{BIGINT}"'.encode(), b"9" * 5000)
    data = data.replace(BAD_UTF8.encode(), b"\xff\xc3(")
    return data.replace(RAW_CONTROL.encode(), b"\x01\x1f")


def line_of(row: Row) -> bytes:
    """A JSON Lines row's bytes (without the newline)."""
    return row.raw if row.raw is not None else _splice(json.dumps(row.value, ensure_ascii=row.ascii))


def write(case: Case, directory: pathlib.Path) -> tuple[pathlib.Path, dict[int, Row]]:
    """The case's file, and its rows by their line (JSON Lines), or by row (.json, .csv)."""
    path = directory / f"data{case.suffix}"
    if case.suffix == ".csv":
        columns = sorted({column for row in case.rows for column in row.value})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, lineterminator="\r\n" if case.crlf else "\n")
        writer.writeheader()
        writer.writerows(row.value for row in case.rows)
        path.write_bytes(_splice(buffer.getvalue()))
        return path, {}
    if case.suffix == ".json":
        path.write_bytes(_splice(json.dumps([row.value for row in case.rows], ensure_ascii=case.rows[0].ascii)))
        return path, {i: row for i, row in enumerate(case.rows, start=1)}
    lines = [line_of(row) for row in case.rows]
    path.write_bytes(b"".join(line + (b"\r\n" if case.crlf else b"\n") for line in lines))
    return path, {number: row for number, (row, line) in enumerate(zip(case.rows, lines), start=1) if line.strip()}


# ---------------------------------------------------------------------------------------------------------------
# What every run must satisfy

# The whole-run INVALID_ARGUMENT errors docs/dataset-format.md promises, each one line.
RUN_ERRORS = {
    "every row rejected": r"dataset: .+: every row was rejected \(\d+; [a-z_: ,0-9]+\); see .+rejects\.jsonl",
    "no rows": r"dataset: .+: no rows",
    "binary data": r"dataset: .+: not a (JSON Lines|JSON|CSV) file: binary data \(a NUL byte at offset \d+\); "
                   r"expected UTF-8 text",
    "broken array": r"dataset: .+: not a JSON array: .+",
    "another kind": r"dataset: .+:\d+: a [a-z]+ row in a [a-z]+ dataset \(the dataset's kind .+\); one dataset "
                    r"holds one kind of row",
    "not packed": r"packing: (kto|prompt) rows are not packed; use --packing false",
    "short corpus": r"block_size: .+: \d+ tokens, fewer than one block of \d+; lower --block_size, or keep the "
                    r"shorter last block \(--drop_last_block false\)",
}
FIELD_FREE = {jsonl.INVALID_JSON, jsonl.UNKNOWN_FORMAT}  # reasons that may name no field: the row as a whole
PLACES = {"messages", "chosen", "rejected", "response", "query", "prompt", "label", "rejected_response",
          "rejected_messages", "tools", "margin", "history", "system"}  # fields named though the row may lack them


def dataset_kind(columns: dict) -> str:
    if "chosen_input_ids" in columns or "margins" in columns:
        return "preference"
    if "label" in columns:
        return "kto"
    return "sft" if "labels" in columns else "prompt"


def run_case(case: Case, model_dirs: dict, tokenizers: dict, directory: pathlib.Path, num_proc: int = 1,
             run=None) -> None:
    note(f"case = {case!r}")  # pytest 9 loses Hypothesis' own print of the arguments
    path, by_line = write(case, directory)
    out = directory / "out"
    config = PrepareConfig(model=model_dirs[case.model], dataset=[str(path)], output_dir=str(out),
                           num_proc=num_proc, **case.config)
    try:
        manifest = (run or prepare)(config)
    except InvalidArgument as exc:
        message = str(exc)
        matched = [name for name, pattern in RUN_ERRORS.items() if re.fullmatch(pattern, message)]
        assert "\n" not in message and matched, message
        event(f"run error: {matched[0]}")
        assert not (out / "manifest.json").exists() and not list(out.glob("shard-*.arrow"))
        if "every row was rejected" in message:
            rejected = check_rejects(path, out, by_line, case)
            assert len(rejected) == int(re.search(r"rejected \((\d+);", message).group(1))
            check_good_rows(case, by_line, rejected, None)
        return
    records = list(inputs.read(inputs.resolve([str(path)]), seed=42))
    assert manifest["rows_in"] == len(records) == manifest["rows_out"] + manifest["rows_rejected"]
    if case.suffix == ".jsonl":
        assert [record.line for record in records] == sorted(by_line)
    rejected = check_rejects(path, out, by_line, case)
    event(f"kept rows: {min(manifest['rows_out'], 3)}{'+' if manifest['rows_out'] >= 3 else ''} ({case.suffix})")
    for reason in set(rejected.values()):
        event(f"reject: {reason}")
    assert len(rejected) == manifest["rows_rejected"]
    assert manifest["rejected_by_reason"] == dict(sorted(collections.Counter(rejected.values()).items()))
    kept = [record for record in records if record.line not in rejected]
    shard_rows = [row for shard in manifest["shards"]
                  for row in pa.ipc.open_file(pa.memory_map(str(out / shard["file"]))).read_all().to_pylist()]
    kind = "pt" if case.config["task"] == "pt" else dataset_kind(manifest["columns"])
    tokenizer = tokenizers[case.model]
    expected = [expect(tokenizer, record, kind, case.config) for record in kept]
    for record, columns in zip(kept, expected):
        assert columns is not None, f"kept a row that must not be: {record}"
    if kind == "pt":
        check_pt(shard_rows, expected, manifest, case.config)
    elif case.config["packing"]:
        check_packed(shard_rows, expected, kind, case.config["max_length"])
    else:
        assert len(shard_rows) == len(kept)
        for row, columns in zip(shard_rows, expected):
            check_row(row, columns, kind)
    assert manifest["tokens"] == sum(len(ids) for row in shard_rows for ids in token_lists(row))
    assert manifest["trained_tokens"] == sum(sum(label != IGNORE_INDEX for label in labels)
                                             for row in shard_rows for labels in label_lists(row))
    check_good_rows(case, by_line, rejected, kind)


def check_good_rows(case: Case, by_line: dict[int, Row], rejected: dict[int, str], kind: str | None) -> None:
    """Rows built valid are kept, or rejected only for their length, for a pt row's
    having no text, for a prompt row's extra columns differing from the first
    row's, or (every row rejected, --task auto) for not being of the kind most of
    the first valid rows have. `kind`: the dataset's, None when every row was rejected."""
    if case.config["task"] not in ("auto", case.family) or "format" in case.config or kind not in (None, case.family):
        return
    allowed = {jsonl.TOO_LONG, *{"prompt": [jsonl.INVALID_EXTRA]}.get(case.family, [])}
    if case.family == "pt":  # pt text is never dropped for its length
        allowed = {jsonl.NO_TRAINABLE}
    if kind is None and case.config["task"] == "auto":
        allowed |= {"sft": {jsonl.NOT_PROMPT}, "prompt": {jsonl.NO_ASSISTANT}}.get(case.family, set())
    for line, row in by_line.items():
        if row.good and line in rejected:
            assert rejected[line] in allowed, f"row {line} built valid was rejected: {rejected[line]}"


def check_rejects(path: pathlib.Path, out: pathlib.Path, by_line: dict[int, Row], case: Case) -> dict[int, str]:
    """Every reject of the run is well formed (check_reject); its reason by line."""
    reasons = {}
    text = (out / "rejects.jsonl").read_bytes().decode("utf-8")  # strict: a reject is valid UTF-8
    for line in filter(None, text.split("\n")):
        reject = json.loads(line)
        assert reject["line"] not in reasons
        if by_line:
            assert reject["line"] in by_line, reject
        check_reject(reject, path, by_line.get(reject["line"]) if case.suffix == ".jsonl" else None)
        reasons[reject["line"]] = reject["reason"]
    return reasons


def check_reject(reject: dict, path, row: Row | None) -> None:
    """A reject names its file and line, its field where a field is at fault (one of
    the row's own columns, or a place the reason names), a reason of the bounded set
    but internal_error, and keeps the row's text (given `row`, the JSON Lines row)."""
    assert set(reject) == {"file", "line", "field", "reason", "error", "raw"}
    assert reject["file"] == str(path) and isinstance(reject["line"], int)
    assert reject["reason"] in jsonl.REASONS and reject["reason"] != jsonl.INTERNAL_ERROR, reject
    field = reject["field"]
    if reject["reason"] not in FIELD_FREE:
        assert isinstance(field, str) and field, reject
    place = f"{path}:{reject['line']}: " + (f"{field}: " if field else "")
    assert reject["error"].startswith(place) and len(reject["error"]) > len(place), reject
    if row is not None:
        assert reject["raw"] == line_of(row).decode("utf-8", errors="replace").rstrip("\r\n")
        if field and isinstance(row.value, dict) and row.raw is None:
            root = re.split(r"[.\[]", field)[0]
            assert root in row.value or root in PLACES, reject


def expect(tokenizer, record: inputs.Record, kind: str, config: dict) -> dict | None:
    """The columns a kept row must have, from apply_chat_template and the per-row
    path (invariants.py); None where the row must not be kept."""
    conversation = formats.to_example(record.value, formats.parse_columns(config.get("columns")), config["task"],
                                      config.get("format", "auto"))
    assert not isinstance(conversation, formats.Problem), conversation
    assert kind == "pt" or conversation.kind in (kind, "reward" if kind == "preference" else kind)
    cut = config["max_length"], config["truncation_strategy"]

    def sequence(messages, losses):
        messages, losses = tasks.with_system(messages, losses, config["system"])
        if kind == "pt":  # never cut: the pipeline cuts the stream into blocks, or splits it to pack
            text = "".join(m["content"] for m in messages)
            ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids + [tokenizer.eos_token_id]
            return ids, None  # labels: check_labels' rules only
        messages, losses = template.with_tool_calls(tokenizer, messages, losses)
        return expected_sequence(tokenizer, messages, losses, config["loss_scale"], conversation.tools, *cut)

    if kind == "prompt":
        messages, _ = tasks.with_system(conversation.messages, conversation.losses, config["system"])
        messages, _ = template.with_tool_calls(tokenizer, messages, [None] * len(messages))
        ids = reference(tokenizer, messages, tools=conversation.tools, add_generation_prompt=True)
        if cut[0] and len(ids) > cut[0]:
            if cut[1] != "left":
                return None
            ids = ids[-cut[0]:]
        return {"input_ids": ids, "extras": conversation.extras}
    if kind == "preference":
        chosen = sequence(conversation.messages, conversation.losses)
        rejected = sequence(conversation.rejected, conversation.rejected_losses)
        if chosen is None or rejected is None:
            return None
        return {"chosen": chosen, "rejected": rejected, "margin": conversation.margin}
    found = sequence(conversation.messages, conversation.losses)
    return None if found is None else {"sequence": found, "label": conversation.label}


def _same(got, want) -> None:
    ids, labels = want
    assert list(got[0]) == ids
    if labels is not None:
        assert list(got[1]) == labels
    check_labels(*got)


def check_row(row: dict, columns: dict, kind: str) -> None:
    if kind == "prompt":
        assert row["input_ids"] == columns["input_ids"] and row["length"] == len(row["input_ids"])
        for name, value in columns["extras"].items():
            if isinstance(value, str) or isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53:
                assert row[name] == value, name
        return
    if kind == "preference":
        _same((row["chosen_input_ids"], row["chosen_labels"]), columns["chosen"])
        _same((row["rejected_input_ids"], row["rejected_labels"]), columns["rejected"])
        assert row["length"] == len(row["chosen_input_ids"]) + len(row["rejected_input_ids"])
        assert row["margin"] == columns["margin"] or row["margin"] != row["margin"]  # NaN stays NaN
        return
    _same((row["input_ids"], row["labels"]), columns["sequence"])
    assert row["length"] == len(row["input_ids"])
    if kind == "kto":
        assert row["label"] is columns["label"]


def check_packed(rows: list[dict], expected: list[dict], kind: str, max_length: int) -> None:
    """Packed rows hold every kept sample whole (a pair side by side), within max_length."""
    samples = []
    for row in rows:
        assert row["length"] == len(row["input_ids"]) == sum(row["seq_lens"]) <= max_length
        start = 0
        for length in row["seq_lens"]:
            samples.append((row["input_ids"][start:start + length], row["labels"][start:start + length]))
            assert row["position_ids"][start:start + length] == list(range(length))
            start += length
    wanted = [side for columns in expected for side in
              ((columns["chosen"], columns["rejected"]) if kind == "preference" else (columns["sequence"],))]
    assert len(samples) == len(wanted)
    for got in samples:
        check_labels(*got)
    if kind == "pt":
        assert sorted(ids for ids, _ in samples) == sorted(ids for ids, _ in wanted)
    else:
        assert sorted(samples) == sorted(wanted)


def check_pt(rows: list[dict], expected: list[dict], manifest: dict, config: dict) -> None:
    """pt: the kept documents' tokens, joined in order, cut into blocks (group_texts; the
    tail kept or dropped and counted), or each split at max_length and packed whole."""
    documents = [columns["sequence"][0] for columns in expected]
    stream = [token for ids in documents for token in ids]
    accounting = manifest["pt"]
    event(f"pt: {accounting['mode']}{', tail dropped' if accounting['tokens_dropped'] else ''}")
    assert accounting["documents"] == len(documents) and accounting["tokens_in"] == len(stream)
    assert accounting["tokens_in"] == accounting["tokens_out"] + sum(accounting["tokens_dropped"].values())
    for row in rows:
        assert row["length"] == len(row["input_ids"]) == len(row["labels"])
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(row["input_ids"], row["labels"]))
    if config["packing"]:
        pieces = [list(piece) for ids in documents for piece, _ in pretraining.split(ids, ids, config["max_length"])]
        samples = []
        for row in rows:
            assert sum(row["seq_lens"]) == row["length"] <= config["max_length"]
            start = 0
            for length in row["seq_lens"]:
                assert row["position_ids"][start:start + length] == list(range(length))
                samples.append(row["input_ids"][start:start + length])
                start += length
        assert sorted(samples) == sorted(pieces) and accounting["tokens_dropped"] == {}
        return
    size = config.get("block_size") or config["max_length"]
    blocks, tail = pretraining.group_texts(stream, size)
    drop = config.get("drop_last_block", True)
    assert [row["input_ids"] for row in rows] == blocks + ([] if drop or not tail else [tail])
    assert accounting["tokens_dropped"] == ({pretraining.TAIL: len(tail)} if drop and tail else {})


def token_lists(row: dict) -> list[list[int]]:
    return [row["chosen_input_ids"], row["rejected_input_ids"]] if "chosen_input_ids" in row else [row["input_ids"]]


def label_lists(row: dict) -> list[list[int]]:
    if "chosen_labels" in row:
        return [row["chosen_labels"], row["rejected_labels"]]
    return [row["labels"]] if "labels" in row else []


# ---------------------------------------------------------------------------------------------------------------
# The fuzzers

@pytest.fixture(scope="module")
def targets(default_model, qwen_dir, llama_dir, tokenizer, qwen, llama, tmp_path_factory):
    """(model directory by name, the same template's tokenizer by name, a folder for the files)."""
    return ({"default": str(default_model), "qwen": str(qwen_dir), "llama": str(llama_dir)},
            {"default": tokenizer, "qwen": qwen, "llama": llama}, tmp_path_factory.mktemp("fuzz"))


@settings(max_examples=settings().max_examples * 2)
@given(case=cases(suffixes=(".jsonl",)))
def test_any_json_lines_file_prepares_row_by_row_and_never_stops_the_run(targets, case):
    model_dirs, tokenizers, base = targets
    with tempfile.TemporaryDirectory(dir=base) as directory:
        run_case(case, model_dirs, tokenizers, pathlib.Path(directory))


@settings(max_examples=settings().max_examples // 2)
@given(case=cases(suffixes=(".json", ".csv")))
def test_any_json_array_or_csv_file_prepares_row_by_row(targets, case):
    model_dirs, tokenizers, base = targets
    with tempfile.TemporaryDirectory(dir=base) as directory:
        run_case(case, model_dirs, tokenizers, pathlib.Path(directory))


@settings(max_examples=settings().max_examples * 3)
@given(case=cases(rows_per_file=(1, 1), suffixes=(".jsonl",)))
def test_any_row_is_kept_with_its_labels_or_rejected_naming_its_field(targets, case):
    """One row at a time through tasks.encode_record (what each chunk's worker runs):
    cheap, so many rows, and Hypothesis shrinks a failure to the row at fault."""
    note(f"case = {case!r}")
    _, tokenizers, _ = targets
    row, tokenizer = case.rows[0], tokenizers[case.model]
    record = inputs.Record("data.jsonl", 1, "", data=line_of(row))
    arguments = {k: v for k, v in case.config.items() if k not in ("packing", "streaming")}
    columns = formats.parse_columns(case.config.get("columns"))
    result = tasks.encode_record(tokenizer, record, columns, PrepareConfig(dataset=["data.jsonl"], output_dir="out",
                                                                      **arguments))
    if isinstance(result, jsonl.Reject):
        check_reject(json.loads(result.to_json()), "data.jsonl", row)
        if row.good and case.config["task"] in ("auto", case.family) and "format" not in case.config:
            allowed = {jsonl.NO_TRAINABLE} if case.family == "pt" else {jsonl.TOO_LONG}  # pt: never for its length
            assert result.reason in allowed, f"a row built valid was rejected: {result}"
        return
    kind = "preference" if result.kind == "reward" else result.kind
    expected = expect(tokenizer, record.decoded(), kind, case.config)
    assert expected is not None, "kept a row that must not be"
    check_row(result.columns, expected, kind)


@settings(max_examples=settings().max_examples // 10)
@given(case=cases(models=("default", "qwen")))
def test_num_proc_2_prepares_any_file_as_one_process_does(targets, case):
    """--num_proc 2: the rows are decoded and tokenized in forked workers."""
    model_dirs, tokenizers, base = targets
    with tempfile.TemporaryDirectory(dir=base) as directory:
        run_case(case, model_dirs, tokenizers, pathlib.Path(directory), num_proc=2)


@settings(max_examples=settings().max_examples // 10)
@given(case=cases(models=("default", "llama")))
def test_the_cli_prepares_any_file_or_prints_one_line(targets, case, capsys):
    """`tuneforge prepare`: exit 0 with a summary, or exit 2 with one line and no traceback."""
    from cli.main import main as tuneforge

    model_dirs, tokenizers, base = targets

    def run(config: PrepareConfig) -> dict:
        argv = ["prepare", "--model", config.model, "--dataset", *config.dataset, "--output_dir", config.output_dir]
        for name in ("task", "loss_scale", "max_length", "truncation_strategy", "packing", "streaming", "format",
                     "block_size", "drop_last_block", "system", "columns"):
            value = getattr(config, name)
            if value is not None:
                argv.append(f"--{name}={str(value).lower() if isinstance(value, bool) else value}")
        capsys.readouterr()
        code = tuneforge(argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        errors = [line for line in re.split(r"[\r\n]+", err) if line.startswith("tuneforge prepare: error: ")]
        if code == 2:
            assert len(errors) == 1, err
            raise InvalidArgument(errors[0][len("tuneforge prepare: error: "):])
        assert code == 0 and not errors, err
        return json.loads((pathlib.Path(config.output_dir) / "manifest.json").read_text())

    with tempfile.TemporaryDirectory(dir=base) as directory:
        run_case(case, model_dirs, tokenizers, pathlib.Path(directory), run=run)


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


DEEPEST = range(750, 1001)  # nestings about the JSON reader's limit, wherever pytest's stack puts it


def test_rows_nested_as_deeply_as_the_reader_takes_are_rejected_naming_their_field(tmp_path, conversation):
    """case = Case(model='default', family='sft', suffix='.jsonl', rows=[Row(value={'messages': '@@deep:990@@'}),
    ...]): json.loads read the row, then printing the value for its reject (formats._text) ran out of stack
    frames a few calls deeper (RecursionError, internal_error once rows were guarded). Which depth hits it
    moves with the caller's stack, so every depth about the reader's limit is one row of the file."""
    data = tmp_path / "data.jsonl"
    rows = [json.dumps(conversation(1))]
    for depth in DEEPEST:
        deep = "[" * depth + "]" * depth
        rows += ['{"messages": %s}' % deep,
                 '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": %s}]}' % deep]
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    manifest = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out)))
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert manifest["rows_out"] == 1 and len(rejects) == 2 * len(DEEPEST)
    by_reason = collections.Counter(r["reason"] for r in rejects)
    assert by_reason.keys() == {"invalid_json", "invalid_messages", "invalid_content"}, by_reason  # the limit lies within
    for reject in rejects:
        if reject["reason"] == "invalid_messages":
            assert reject["field"] == "messages[0]", reject
        elif reject["reason"] == "invalid_content":
            assert reject["field"] == "messages[1].content", reject


def test_a_json_array_of_rows_nested_ever_deeper_ends_with_one_line_naming_the_first_too_deep(tmp_path,
                                                                                             conversation):
    """A .json array row nested nearly as deeply as the reader takes was written again with json.dumps for
    its raw text, deeper in the stack: RecursionError out of the reader, the run ended with a traceback
    (found by the fuzzer's '@@deep:990@@' in .json arrays). Rows of every depth about the limit, in order:
    each is read (and rejected) until the first one too deep, which ends the run in one line."""
    data = tmp_path / "data.json"
    rows = [json.dumps(conversation(1))] + ['{"messages": %s}' % ("[" * depth + "]" * depth) for depth in DEEPEST]
    data.write_text("[" + ", ".join(rows) + "]")
    with pytest.raises(InvalidArgument) as raised:
        prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out")))
    found = re.fullmatch(rf"dataset: {re.escape(str(data))}: not a JSON array: row (\d+): nested more deeply than "
                         r"the JSON reader allows \(about 1000 levels\)", str(raised.value))
    assert found and 2 < int(found.group(1)) <= len(rows), str(raised.value)  # some deep rows were read first


PROMPT = {"role": "user", "content": ""}


@pytest.mark.parametrize("solution,kept,rejected", [
    # pyarrow cannot type the first row's value (OverflowError: Python int too large to convert to C long, out
    # of Admission, ending the run): the column is a string one, and that row's value is refused
    ({"messages": 9223372036854775808}, [2], [(1, "solution")]),
    # struct<> from the first row took '' as {} alone, then failed on the shard's whole column (ArrowTypeError)
    ({}, [1], [(2, "solution")]),
    # list<null> from the first row stored '' as [] (the string read as its characters): the value was lost
    ([], [1], [(2, "solution")]),
    # 64 levels deep: written, but Arrow's IPC reader refuses such a shard (Max recursion depth reached)
    (json.loads("[" * 64 + "]" * 64), [2], [(1, "solution")]),
], ids=["int_beyond_int64", "empty_object", "empty_list", "nested_64_deep"])
def test_prompt_extra_columns_are_stored_as_given_or_rejected(tmp_path, solution, kept, rejected):
    """Minimal example (case = Case(model='default', family='prompt', suffix='.json', rows=[Row(value={'messages':
    [{'role': 'user', 'content': ''}] * 3, 'solution': <solution>, 'level': 0}), Row(value={'messages': [{'role':
    'user', 'content': ''}], 'solution': '', 'level': 0}, good=True)], config={'task': 'auto', ...})): the first
    row types the extra columns; a value Arrow would not keep as it is, is that row's reject."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"messages": [PROMPT] * 3, "solution": solution, "level": 0},
                                {"messages": [PROMPT], "solution": "", "level": 0}]))
    out = tmp_path / "out"
    manifest = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out)))
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"], r["reason"]) for r in rejects] == [(*r, "invalid_extra") for r in rejected]
    table = pa.concat_tables(pa.ipc.open_file(pa.memory_map(str(out / s["file"]))).read_all()
                             for s in manifest["shards"])  # readable back
    rows = json.loads(data.read_text())
    assert table.column("solution").to_pylist() == [rows[line - 1]["solution"] for line in kept]


def test_packing_a_prompt_dataset_is_one_line_naming_the_flag_once(tmp_path):
    """Minimal example (case = Case(model='default', family='sft', suffix='.jsonl', rows=[Row(value=None),
    Row(value=None), Row(value={'conversations': [{'from': 'human', 'value': ''}]})], config={..., 'packing':
    True})): the only valid row is a prompt, so the dataset is one; the error said `packing: packing: ...`."""
    data = tmp_path / "data.jsonl"
    data.write_text('null\nnull\n{"conversations": [{"from": "human", "value": ""}]}\n')
    with pytest.raises(InvalidArgument) as raised:
        prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out"), packing=True))
    assert str(raised.value) == "packing: prompt rows are not packed; use --packing false"


@pytest.mark.parametrize("labels", ["", None, 1180591620717411303424])
def test_a_prompt_row_extra_column_named_like_a_shard_column_is_rejected(tmp_path, labels):
    """Minimal example (case = Case(model='qwen', family='prompt', suffix='.jsonl', rows=[Row(value={'messages':
    [{'role': 'user', 'content': ''}], 'solution': '', 'level': 0}, good=True)] * 8 + [Row(value={'messages':
    [{'role': 'user', 'content': ''}], 'solution': '', 'level': 0, 'labels': <labels>})], ...); Hypothesis stopped
    shrinking it, the eight good rows do not matter): `labels` was taken for a token column (Example.as_arrays),
    ValueError/TypeError/OverflowError out of the run; and a prompt dataset with a `labels` (or `label`,
    `seq_lens`, ...) column reads as another kind of dataset while it is prepared."""
    good = {"messages": [PROMPT], "solution": "", "level": 0}
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in [good, {**good, "labels": labels}]))
    out = tmp_path / "out"
    manifest = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out)))
    reject = json.loads((out / "rejects.jsonl").read_text())
    assert (manifest["rows_out"], reject["line"], reject["field"], reject["reason"]) == (1, 2, "labels",
                                                                                         "invalid_extra")
    assert reject["error"].endswith("labels: an extra column may not be named like a shard column of any task "
                                    "(chosen_input_ids, chosen_labels, input_ids, label, labels, length, margin, "
                                    "margins, position_ids, rejected_input_ids, rejected_labels, seq_lens); rename "
                                    "it with --columns")
