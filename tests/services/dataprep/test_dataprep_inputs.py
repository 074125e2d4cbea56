"""Input files: .jsonl, .json arrays, .csv, .parquet, directories and globs of
them, several datasets in one run, and `path#N` seeded sampling."""

import csv
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from libs.common.errors import InvalidArgument, NotFound
from services.dataprep import inputs, template
from services.dataprep.config import PrepareConfig
from services.dataprep.pipeline import prepare


def rows(datasets, seed=42):
    return [(r.file.rsplit("/", 1)[-1], r.line, r.value, r.error) for r in inputs.read(datasets, seed)]


def test_every_file_type_reads_rows_with_their_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a1"}\n\n{broken\n')
    (tmp_path / "b.json").write_text(json.dumps([{"text": "b1"}, {"text": "b2"}], indent=2))
    (tmp_path / "c.json").write_text('{"text": "c1"}\n{"text": "c2"}\n')  # JSON Lines named .json
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["query", "response", "system"], ["q1", "two\nlines", ""], ["q2", "r2", "s"]])
    pq.write_table(pa.table({"query": ["p1"], "response": ["r1"]}), tmp_path / "e.parquet")
    datasets = inputs.resolve([str(tmp_path / n) for n in ("a.jsonl", "b.json", "c.json", "d.csv", "e.parquet")])
    got = rows(datasets)
    assert got[0] == ("a.jsonl", 1, {"text": "a1"}, None)
    assert got[1][:2] == ("a.jsonl", 3) and got[1][3].startswith("not a JSON object")
    assert got[2:] == [
        ("b.json", 1, {"text": "b1"}, None), ("b.json", 2, {"text": "b2"}, None),
        ("c.json", 1, {"text": "c1"}, None), ("c.json", 2, {"text": "c2"}, None),
        ("d.csv", 2, {"query": "q1", "response": "two\nlines", "system": None}, None),
        ("d.csv", 4, {"query": "q2", "response": "r2", "system": "s"}, None),  # the row above spans lines 2-3
        ("e.parquet", 1, {"query": "p1", "response": "r1"}, None),
    ]
    assert [(s.rows, len(s.sha256)) for d in datasets for s in d.sources] == [(2, 64), (2, 64), (2, 64), (2, 64),
                                                                               (1, 64)]


def test_directories_and_globs_expand_sorted_and_missing_ones_are_all_named(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.jsonl", "d/sub/a.jsonl", "d/notes.md"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    (directory,) = inputs.resolve([str(tmp_path / "d")])
    assert [s.path for s in directory.sources] == [str(tmp_path / "d/b.jsonl"), str(tmp_path / "d/sub/a.jsonl")]
    (globbed,) = inputs.resolve([str(tmp_path / "d" / "**" / "*.jsonl")])
    assert [s.path for s in globbed.sources] == [str(tmp_path / "d/b.jsonl"), str(tmp_path / "d/sub/a.jsonl")]
    with pytest.raises(NotFound) as error:
        inputs.resolve([str(tmp_path / "d"), str(tmp_path / "none.jsonl"), str(tmp_path / "*.csv")])
    assert str(error.value) == f"dataset: no such file: {tmp_path / 'none.jsonl'}; no file matches {tmp_path / '*.csv'}"
    with pytest.raises(InvalidArgument, match="notes.md: not a dataset file type"):
        inputs.resolve([str(tmp_path / "d" / "notes.md")])
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(InvalidArgument, match="bad.parquet: not a Parquet file"):
        inputs.resolve([str(tmp_path / "bad.parquet")])
    (tmp_path / "bad.json").write_text('[{"text": 1},')
    with pytest.raises(InvalidArgument, match="bad.json: not a JSON array"):
        list(inputs.read(inputs.resolve([str(tmp_path / "bad.json")]), 42))


def test_binary_data_behind_a_text_suffix_fails_before_any_work(tmp_path):
    """A .csv (or .json/.jsonl) that is really binary: one error naming the file, not
    every row rejected as unknown_format."""
    binary = bytes(range(256)) * 8  # has a NUL byte at offset 0 of each 256
    for name, kind in (("data.csv", "CSV"), ("data.jsonl", "JSON Lines"), ("data.json", "JSON")):
        (tmp_path / name).write_bytes(b"instruction,output\n" + binary)
        with pytest.raises(InvalidArgument, match=rf"{name}: not a {kind} file: binary data \(a NUL byte at offset 19\)"):
            inputs.resolve([str(tmp_path / name)])
    (tmp_path / "text.csv").write_text("instruction,output\nhi,\u00e9t\u00e9\n", encoding="utf-8")
    assert [s.path for d in inputs.resolve([str(tmp_path / "text.csv")]) for s in d.sources] == \
        [str(tmp_path / "text.csv")]


def test_sample_suffix_is_seeded_and_oversamples_past_the_end(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(10)))
    assert inputs.split_sample(f"{path}#3") == (str(path), 3)
    assert inputs.split_sample(str(path)) == (str(path), None)
    three = [r[1] for r in rows(inputs.resolve([f"{path}#3"]))]
    assert three == [r[1] for r in rows(inputs.resolve([f"{path}#3"]))]  # same seed, same rows
    assert len(set(three)) == 3 and three == sorted(three)
    assert any([r[1] for r in rows(inputs.resolve([f"{path}#3"]), seed=s)] != three for s in range(1, 20))
    twelve = [r[1] for r in rows(inputs.resolve([f"{path}#12"]))]
    assert twelve[:10] == list(range(1, 11)) and len(set(twelve[10:])) == 2
    assert inputs.sample_indices(10, 12, 42)[10:] == sorted(__import__("random").Random(42).sample(range(10), 2))
    with pytest.raises(InvalidArgument, match="at least one row"):
        inputs.resolve([f"{path}#0"])


def test_a_sampled_dataset_is_read_in_passes_not_held(tmp_path):
    """path#N: rows stream through (a counting pass, then the sample), so memory does not
    hold the dataset; the source's row count is its real one, not one per pass."""
    import tracemalloc

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i} " + "x" * 300}) + "\n" for i in range(10_000)))
    tracemalloc.start()
    try:
        held = list(inputs.read(inputs.resolve([str(path)]), 42))
        whole = tracemalloc.get_traced_memory()[0]
        del held
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        datasets = inputs.resolve([f"{path}#25000"])  # twice every row, then 5000 drawn
        assert sum(1 for _ in inputs.read(datasets, 42)) == 25_000
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    lines = [record.line for record in inputs.read(datasets, 42)]
    assert lines[:20_000] == [*range(1, 10_001)] * 2 and len(set(lines[20_000:])) == 5000
    assert datasets[0].sources[0].rows == 10_000
    assert peak < whole / 2, (peak, whole)  # read buffers and the drawn indices, not the rows


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_json_arrays_stream_row_by_row_and_parse_as_json_loads(tmp_path, monkeypatch, chunk):
    """A .json array is read in chunks (here as small as 1 character, so every value is
    cut somewhere): the same values as json.loads, broken arrays named, rows not held."""
    monkeypatch.setattr(inputs, "JSON_CHUNK", chunk)
    path = tmp_path / "a.json"
    values = [{"text": 'a]b,c"[ \u00e9\U0001F600', "n": 12345}, {"x": [1, {"y": None}]}, 12.5e3, -7, True, "s", []]
    for text in (json.dumps(values), json.dumps(values, indent=2), "\ufeff" + json.dumps(values), " [ ] ", "[12]"):
        path.write_text(text, encoding="utf-8")
        got = [(r.line, r.value) for r in inputs.read(inputs.resolve([str(path)]), 42)]
        assert got == list(enumerate(json.loads(text.lstrip("\ufeff")), start=1))
    for broken, message in (('[{"a": 1},', "Expecting value in row 2"), ('[{"a": 1} {"b": 2}]', "after row 1, got '{'"),
                            ("[1, 2] x", "extra data after the array"), ('[{"a": 1', "in row 1"),
                            ("[1, 2", "unterminated array after row 2"), (b"[\"\xff\"]", "not UTF-8")):
        path.write_bytes(broken if isinstance(broken, bytes) else broken.encode())
        with pytest.raises(InvalidArgument, match=rf"a.json: not a JSON array: .*{re.escape(message)}"):
            list(inputs.read(inputs.resolve([str(path)]), 42))
    if chunk == 1 << 20:
        import tracemalloc

        path.write_text(json.dumps([{"text": f"row {i} " + "x" * 300} for i in range(10_000)]))
        tracemalloc.start()
        try:
            held = list(inputs.read(inputs.resolve([str(path)]), 42))
            whole = tracemalloc.get_traced_memory()[0]
            del held
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            assert sum(1 for _ in inputs.read(inputs.resolve([str(path)]), 42)) == 10_000
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        assert peak < whole / 2, (peak, whole)  # a chunk of text, not the rows


def test_several_datasets_in_several_formats_prepare_into_one_run(tmp_path, tokenizer):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "yo"}]}) + "\n")
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "hi", "input": "", "output": "yo"},
                                                      {"instruction": "hi", "output": 5}]))
    with open(tmp_path / "qa.csv", "w", newline="") as f:
        csv.writer(f).writerows([["question", "answer"], ["hi", "yo"], ["hi", ""]])
    pq.write_table(pa.table({"conversations": [[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]]
                                               * 4}), tmp_path / "sharegpt.parquet")
    out = tmp_path / "out"
    manifest = prepare(PrepareConfig(dataset=[str(tmp_path / "chat.jsonl"), str(tmp_path / "alpaca.json"),
                                              str(tmp_path / "qa.csv"), f"{tmp_path / 'sharegpt.parquet'}#2"],
                                     output_dir=str(out)))
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (7, 5, 2)
    assert manifest["rejected_by_reason"] == {"invalid_content": 1, "no_assistant": 1}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["file"].rsplit("/", 1)[-1], r["line"], r["field"]) for r in rejects] == [
        ("alpaca.json", 2, "output"), ("qa.csv", 3, "response")]
    assert [s["rows"] for s in manifest["sources"]] == [1, 2, 2, 4]
    # every kept row is the same conversation, whatever its format
    expected = template.encode(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    table = pa.ipc.open_file(pa.memory_map(str(out / "shard-00000.arrow"))).read_all()
    assert table.column("input_ids").to_pylist() == [expected.input_ids] * 5
    assert table.column("labels").to_pylist() == [expected.labels] * 5


def test_undecoded_json_lines_decode_to_what_read_gives(tmp_path):
    """decode=False (the pipeline: its --num_proc workers decode) holds each line's bytes;
    decoded() gives the very record read() gives, broken lines included."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n{broken\n\xff{"text": "b"}\n[1, 2]\n')
    datasets = inputs.resolve([str(path)])
    lazy = list(inputs.read(datasets, 0, decode=False))
    assert [r.line for r in lazy] == [1, 3, 4, 5] and all(r.value is None and r.data for r in lazy)
    assert [r.decoded() for r in lazy] == list(inputs.read(datasets, 0))
    assert [(r.value, r.error is not None) for r in inputs.read(datasets, 0)] == [
        ({"text": "a"}, False), (None, True), (None, True), ([1, 2], False)]


def test_a_json_array_row_keeps_its_text_as_written(tmp_path, monkeypatch):
    """A reject's raw text is the row as the file holds it (escapes, spacing), also when a
    row is cut across chunks, not the row written again by a JSON writer."""
    monkeypatch.setattr(inputs, "JSON_CHUNK", 3)
    path = tmp_path / "a.json"
    path.write_text('[ {"a": 1,\n  "b": "\\u00e9\\ud800"} ,2.50]')
    assert [r.raw for r in inputs.read(inputs.resolve([str(path)]), 42)] == ['{"a": 1,\n  "b": "\\u00e9\\ud800"}', "2.50"]
