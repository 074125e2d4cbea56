"""Pre-training corpora (--task pt): .txt files one document per file or per line,
directories and globs of them, .gz and .zst compressed files streamed, broken files
named; documents never dropped for their length: cut into --block_size blocks
(run_clm's group_texts) or split at max_length and packed; every token accounted."""

import gzip
import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st

from libs.common.config import from_proto, to_proto
from libs.common.errors import InvalidArgument
from protos.tuneforge.dataprep.v1 import dataprep_pb2
from services.dataprep import inputs, pretraining
from services.dataprep.config import PrepareConfig
from services.dataprep.pipeline import prepare

# The default model's tokens of four documents, each ending in eos (2); checked by hand
# against its tokenizer in test_the_hand_checked_tokens_are_the_tokenizers.
DOCS = {"one two": [448, 737], "three": [721, 566], "four five six": [72, 471, 1199, 1449], "seven": [384, 616]}
EOS = 2
# block_size 4 over the stream 448 737 2 | 721 566 2 | 72 471 1199 1449 2 | 384 616 2 (14 tokens)
BLOCKS = [[448, 737, 2, 721], [566, 2, 72, 471], [1199, 1449, 2, 384]]
TAIL = [616, 2]


def zstd(path, data: bytes) -> None:
    with pa.CompressedOutputStream(str(path), "zstd") as f:
        f.write(data)


def rows(out) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [row for shard in manifest["shards"]
            for row in pa.ipc.open_file(pa.memory_map(str(out / shard["file"]))).read_all().to_pylist()]


def pt(tmp_path, dataset, **args) -> tuple[dict, list[dict]]:
    out = tmp_path / "out"
    manifest = prepare(PrepareConfig(dataset=[str(d) for d in dataset], output_dir=str(out), task="pt", **args))
    accounting = manifest["pt"]
    assert accounting["tokens_in"] == accounting["tokens_out"] + sum(accounting["tokens_dropped"].values())
    got = rows(out)
    assert manifest["tokens"] == accounting["tokens_out"] == sum(len(r["input_ids"]) for r in got)
    return manifest, got


def test_the_hand_checked_tokens_are_the_tokenizers(tokenizer):
    assert {text: tokenizer(text, add_special_tokens=False)["input_ids"] for text in DOCS} == DOCS
    assert tokenizer.eos_token_id == EOS


def test_lines_of_a_txt_file_are_documents_joined_with_eos_and_cut_into_exact_blocks(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one two\n\nthree\r\nfour five six\nseven\n")  # a blank line is no document
    manifest, got = pt(tmp_path / "drop", [corpus], block_size=4, txt_mode="line")
    assert got == [{"input_ids": block, "labels": block, "length": 4} for block in BLOCKS]  # no padding, all trained
    assert manifest["pt"] == {"mode": "blocks", "block_size": 4, "drop_last_block": True, "documents": 4, "blocks": 3,
                              "tokens_in": 14, "tokens_out": 12, "tokens_dropped": {"tail_shorter_than_block": 2}}
    assert (manifest["rows_in"], manifest["rows_out"], manifest["trained_tokens"]) == (4, 4, 12)
    assert manifest["args"]["block_size"] == 4 and manifest["args"]["txt_mode"] == "line"
    manifest, got = pt(tmp_path / "keep", [corpus], block_size=4, txt_mode="line", drop_last_block=False)
    assert [r["input_ids"] for r in got] == [*BLOCKS, TAIL]
    assert manifest["pt"]["tokens_dropped"] == {} and manifest["pt"]["tokens_out"] == 14


def test_each_txt_file_is_one_document_by_default(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("one two")
    (folder / "sub" / "b.txt").write_text("three")
    (folder / "c.txt").write_text("  \n")  # blank: no document
    manifest, got = pt(tmp_path, [folder], block_size=3)
    assert [r["input_ids"] for r in got] == [[448, 737, 2], [721, 566, 2]]
    assert [(s["path"].rsplit("/", 1)[-1], s["rows"]) for s in manifest["sources"]] == [("a.txt", 1), ("c.txt", 0),
                                                                                      ("b.txt", 1)]
    # a whole file keeps its line breaks: the document is its text
    (tmp_path / "two.txt").write_text("one two\nthree\n")
    records = list(inputs.read(inputs.resolve([str(tmp_path / "two.txt")]), 0))
    assert [(r.line, r.value) for r in records] == [(1, {"text": "one two\nthree\n"})]


def test_directories_and_globs_of_txt_and_compressed_files(tmp_path):
    folder = tmp_path / "c"
    (folder / "deep").mkdir(parents=True)
    (folder / "1.txt").write_text("one two\nthree\n")
    with gzip.open(folder / "2.txt.gz", "wt") as f:
        f.write("four five six\n")
    zstd(folder / "deep" / "3.txt.zst", b"seven\n")
    (folder / "notes.md").write_text("not a corpus")
    (folder / "4.csv.gz").write_bytes(gzip.compress(b"text\nx\n"))  # .csv is not read compressed: skipped
    (directory,) = inputs.resolve([str(folder)])
    assert [s.path.removeprefix(str(folder)) for s in directory.sources] == ["/1.txt", "/2.txt.gz", "/deep/3.txt.zst"]
    _, got = pt(tmp_path / "dir", [folder], block_size=4, txt_mode="line")
    assert [r["input_ids"] for r in got] == BLOCKS
    _, got = pt(tmp_path / "glob", [folder / "**" / "*.txt*"], block_size=4, txt_mode="line")
    assert [r["input_ids"] for r in got] == BLOCKS
    with pytest.raises(InvalidArgument, match=r"4.csv.gz: not a dataset file type; expected one of .*\.gz, \.zst"):
        inputs.resolve([str(folder / "4.csv.gz")])


@pytest.mark.parametrize("name", ["c.jsonl.gz", "c.jsonl.zst", "c.txt.gz", "c.txt.zst"])
def test_each_compression_streams_the_same_rows_as_the_plain_file(tmp_path, name):
    plain = (b"".join(json.dumps({"text": t}).encode() + b"\n" for t in DOCS) if ".jsonl" in name
             else "".join(t + "\n" for t in DOCS).encode())
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(plain))
    else:
        zstd(path, plain)
    (uncompressed := tmp_path / name.rsplit(".", 1)[0]).write_bytes(plain)
    read = [(r.line, r.value) for r in inputs.read(inputs.resolve([str(path)]), 0, txt_mode="line")]
    assert read == [(r.line, r.value) for r in inputs.read(inputs.resolve([str(uncompressed)]), 0, txt_mode="line")]
    assert read == [(i, {"text": t}) for i, t in enumerate(DOCS, start=1)]
    _, got = pt(tmp_path, [path], block_size=4, txt_mode="line")
    assert [r["input_ids"] for r in got] == BLOCKS


def test_a_broken_compressed_file_is_named_with_its_line_and_nothing_else_is_lost(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("one two\n")
    lines = b"".join(b"line %d of a long corpus\n" % i for i in range(3000))
    truncated = tmp_path / "cut.txt.gz"
    truncated.write_bytes(gzip.compress(lines)[:-200])
    out = tmp_path / "out"
    with pytest.raises(InvalidArgument) as error:
        prepare(PrepareConfig(dataset=[str(good), str(truncated)], output_dir=str(out), task="pt", block_size=4,
                              txt_mode="line"))
    message = str(error.value)
    assert message.startswith(f"dataset: {truncated}:") and "a broken gzip stream" in message, message
    line = int(message.split(f"{truncated}:")[1].split(":")[0])
    assert 2500 < line <= 3000 and f"(the {line - 1} lines before it were read)" in message
    assert not list(out.glob("shard-*")) and not (out / "manifest.json").exists()  # no partial dataset
    assert good.read_text() == "one two\n"  # the input is left as it was
    # not compressed at all, or not zstd: refused before any work, naming the file
    (tmp_path / "plain.txt.gz").write_text("plain text\n")
    (tmp_path / "bad.jsonl.zst").write_bytes(gzip.compress(b"{}\n"))
    with pytest.raises(InvalidArgument, match=r"plain.txt.gz: not a gzip file"):
        inputs.resolve([str(tmp_path / "plain.txt.gz")])
    with pytest.raises(InvalidArgument, match=r"bad.jsonl.zst: not a zstd file"):
        inputs.resolve([str(tmp_path / "bad.jsonl.zst")])
    zstd(tmp_path / "cut.txt.zst", lines)
    (tmp_path / "cut.txt.zst").write_bytes((tmp_path / "cut.txt.zst").read_bytes()[:-100])
    with pytest.raises(InvalidArgument, match=r"cut.txt.zst:\d+: a broken zstd stream"):
        list(inputs.read(inputs.resolve([str(tmp_path / "cut.txt.zst")]), 0, txt_mode="line"))


def test_text_that_is_not_utf8_is_rejected_naming_its_line_and_the_rest_is_kept(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"one two\nbad \xff byte\nthree\n")
    manifest, got = pt(tmp_path / "lines", [corpus], block_size=3, txt_mode="line")
    assert [r["input_ids"] for r in got] == [[448, 737, 2], [721, 566, 2]]
    (reject,) = [json.loads(line) for line in (tmp_path / "lines" / "out" / "rejects.jsonl").read_text().splitlines()]
    assert (reject["line"], reject["reason"], reject["raw"]) == (2, "invalid_text", "bad \ufffd byte")
    assert reject["error"] == f"{corpus}:2: not UTF-8 text: byte 0xff at line 2 (invalid start byte)"
    assert manifest["rejected_by_reason"] == {"invalid_text": 1}
    # a whole file: the document is rejected, the place of its bad byte named
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_bytes(b"one two\nbad \xff byte\n")
    (tmp_path / "docs" / "b.txt").write_text("three")
    manifest, got = pt(tmp_path / "files", [tmp_path / "docs"], block_size=3)
    assert [r["input_ids"] for r in got] == [[721, 566, 2]]
    (reject,) = [json.loads(line) for line in (tmp_path / "files" / "out" / "rejects.jsonl").read_text().splitlines()]
    assert reject["line"] == 1 and "byte 0xff at line 2" in reject["error"]


def test_a_long_document_is_never_dropped(tmp_path, tokenizer):
    """What `tuneforge pt` used to reject (too_long) is cut into blocks, or split and packed."""
    text = " ".join(["pretraining keeps every token"] * 60)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [EOS]
    assert len(ids) > 100
    corpus = tmp_path / "long.txt"
    corpus.write_text(text)
    manifest, got = pt(tmp_path / "blocks", [corpus], max_length=32, drop_last_block=False)
    assert [t for r in got for t in r["input_ids"]] == ids and manifest["rows_rejected"] == 0
    assert [r["length"] for r in got] == [32] * (len(ids) // 32) + [len(ids) % 32]
    manifest, got = pt(tmp_path / "packed", [corpus], max_length=32, packing=True)
    pieces = pretraining.split(np.array(ids), np.array(ids), 32)
    assert manifest["pt"] == {"mode": "packing", "max_length": 32, "documents": 1, "pieces": len(pieces),
                              "tokens_in": len(ids), "tokens_out": len(ids), "tokens_dropped": {}}
    samples = []
    for row in got:  # each piece a sample of its own: positions restart, whole within its row
        start = 0
        for n in row["seq_lens"]:
            assert row["position_ids"][start:start + n] == list(range(n))
            samples.append(row["input_ids"][start:start + n])
            start += n
    assert sorted(samples) == sorted(list(piece) for piece, _ in pieces)


def test_corpus_flags_are_checked_together_and_travel_in_the_proto(tmp_path):
    from libs.common.config import Problems, validate

    with pytest.raises(Problems) as error:
        validate(PrepareConfig(dataset=["a.txt"], output_dir="o", task="pt", block_size=0, txt_mode="para",
                               truncation_strategy="left"))
    text = str(error.value)
    for expected in ("block_size: expected a positive number; got 0", "txt_mode: expected one of file, line",
                     "truncation_strategy: task pt never truncates"):
        assert expected in text, text
    assert "block_size: only --task pt" in PrepareConfig(block_size=8).corpus_problems()[0]
    assert "leave block_size unset" in PrepareConfig(task="pt", block_size=8, packing=True).corpus_problems()[0]
    assert "give --block_size" in PrepareConfig(task="pt", max_length=0).corpus_problems()[0]
    config = PrepareConfig(dataset=["a.txt"], output_dir="o", task="pt", block_size=7, drop_last_block=False,
                           txt_mode="line")
    back = from_proto(PrepareConfig, to_proto(config, dataprep_pb2.PrepareArguments))
    assert (back.block_size, back.drop_last_block, back.txt_mode) == (7, False, "line")
    unset = to_proto(PrepareConfig(dataset=["a.txt"], output_dir="o"), dataprep_pb2.PrepareArguments)
    assert not unset.HasField("block_size") and from_proto(PrepareConfig, unset).block_size is None


def test_fewer_tokens_than_one_block_fails_naming_block_size(tmp_path):
    (tmp_path / "tiny.txt").write_text("seven")
    with pytest.raises(InvalidArgument, match=r"block_size: .*tiny.txt: 3 tokens, fewer than one block of 4; "
                                              r"lower --block_size, or keep .* \(--drop_last_block false\)"):
        prepare(PrepareConfig(dataset=[str(tmp_path / "tiny.txt")], output_dir=str(tmp_path / "o"), task="pt",
                              block_size=4))


def test_line_mode_streams_a_compressed_file_in_bounded_memory(tmp_path):
    lines = b"".join(b"%d some words of a corpus line\n" % i for i in range(150_000))  # 5 MB
    path = tmp_path / "big.txt.gz"
    path.write_bytes(gzip.compress(lines))
    datasets = inputs.resolve([str(path)])
    tracemalloc.start()
    try:
        count = sum(1 for _ in inputs.read(datasets, 0, txt_mode="line"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 150_000
    # the decompressor's buffers and the file's sha256, read 1 MiB at a time; never the text
    assert peak < 2 << 20 < len(lines) / 2, (peak, len(lines))


@settings(max_examples=settings().max_examples // 2)
@given(documents=st.lists(st.lists(st.integers(0, 50), max_size=12), max_size=12), block_size=st.integers(1, 9),
       drop_last=st.booleans())
def test_blocks_and_the_dropped_tail_are_the_eos_joined_stream(documents, block_size, drop_last):
    """group_texts' blocks concatenated + its tail == the stream; the streaming Blocks
    (one document at a time) gives group_texts' blocks of the whole stream, and its
    accounting adds up."""
    stream = [t for doc in documents for t in [*doc, EOS]]
    blocks, tail = pretraining.group_texts(stream, block_size)
    assert [t for b in blocks for t in b] + list(tail) == stream
    assert all(len(b) == block_size for b in blocks) and len(tail) < block_size
    grouper = pretraining.Blocks(block_size, drop_last)
    out = [list(ids) for doc in documents for ids, _ in grouper.add(np.array([*doc, EOS]), np.array([*doc, EOS]))]
    out += [list(ids) for ids, _ in grouper.finish()]
    assert out == [list(b) for b in blocks] + ([] if drop_last or not tail else [list(tail)])
    accounting = grouper.manifest()
    assert accounting["tokens_in"] == len(stream) == accounting["tokens_out"] + sum(
        accounting["tokens_dropped"].values())
    assert accounting["tokens_dropped"] == ({pretraining.TAIL: len(tail)} if drop_last and tail else {})
