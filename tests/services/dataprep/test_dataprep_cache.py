"""Determinism and reuse: the same input and arguments give byte-identical shards
whatever --num_proc; re-running on an unchanged input reuses the shards and says so;
a changed input, argument or damaged shard prepares again."""

import json

from services.dataprep import cli
from services.dataprep.config import PrepareConfig
from services.dataprep.pipeline import prepare


def rows(n, offset=0):
    return [{"messages": [{"role": "user", "content": f"What is {i} times {i}? " + "please " * (i % 7)},
                          {"role": "assistant", "content": f"{i} times {i} is {i * i}."}]}
            for i in range(offset, offset + n)]


def shard_bytes(out, manifest):
    return [(out / s["file"]).read_bytes() for s in manifest["shards"]]


def test_num_proc_2_gives_the_same_bytes_as_1(tmp_path, write_jsonl):
    data = write_jsonl("train.jsonl", [*rows(300), "not json", *rows(300, 300)])
    one = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "one"), shard_rows=128))
    two = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "two"), shard_rows=128, num_proc=2))
    assert len(one["shards"]) == 5
    assert shard_bytes(tmp_path / "one", one) == shard_bytes(tmp_path / "two", two)
    assert one["shards"] == two["shards"]
    assert (tmp_path / "one" / "rejects.jsonl").read_bytes() == (tmp_path / "two" / "rejects.jsonl").read_bytes()
    assert (two["rows_in"], two["rows_out"], two["rejected_by_reason"]) == (601, 600, {"invalid_json": 1})
    assert one["fingerprint"] == two["fingerprint"]  # num_proc changes how fast, not what


def test_same_input_and_arguments_give_byte_identical_shards_and_packing_too(tmp_path, write_jsonl):
    data = write_jsonl("train.jsonl", rows(50))
    for packing in (False, True):
        a = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / f"a{packing}"), packing=packing,
                                  max_length=128, shard_rows=4))
        b = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / f"b{packing}"), packing=packing,
                                  max_length=128, shard_rows=4))
        assert shard_bytes(tmp_path / f"a{packing}", a) == shard_bytes(tmp_path / f"b{packing}", b)


def test_rerun_reuses_the_cached_shards_and_says_so(tmp_path, write_jsonl, capsys):
    data = write_jsonl("train.jsonl", rows(20))
    out = tmp_path / "out"
    argv = ["--dataset", str(data), "--output_dir", str(out), "--shard_rows", "8"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "reused" not in first and "prepared 20 rows" in first
    manifest = json.loads((out / "manifest.json").read_text())
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert cli.main(argv) == 0
    second = capsys.readouterr().out
    assert f"reused the cached shards in {out}" in second and "prepared 20 rows" in second
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten
    seen = []
    assert prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out), shard_rows=8),
                   progress=seen.append) == manifest
    assert [p.reused for p in seen] == [True]

    # another argument: prepared again
    seen.clear()
    again = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out), shard_rows=5), progress=seen.append)
    assert not any(p.reused for p in seen) and len(again["shards"]) == 4
    assert again["fingerprint"] != manifest["fingerprint"]

    # a changed input file: prepared again, from the new rows
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(21)))
    seen.clear()
    changed = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out), shard_rows=5), progress=seen.append)
    assert not any(p.reused for p in seen) and changed["rows_in"] == 21

    # a damaged shard is not reused
    (out / changed["shards"][0]["file"]).write_bytes(b"garbage")
    seen.clear()
    repaired = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out), shard_rows=5), progress=seen.append)
    assert not any(p.reused for p in seen)
    assert repaired["shards"] == changed["shards"]
