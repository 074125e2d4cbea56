"""--engine ray: the same preparation on Ray Data writes byte-identical shards, manifest
and rejects.jsonl as the local engine, on every row format and task, with and without
packing; chunks cross several Ray Data windows and come back in input order. One local
Ray runtime (2 CPUs) for the module."""

from __future__ import annotations

import json
import logging

import pytest

from libs.common.errors import InvalidArgument, Problems
from services.dataprep import pipeline, ray_engine, tasks
from services.dataprep.config import PrepareConfig
from services.dataprep.pipeline import prepare


@pytest.fixture(scope="module")
def ray_runtime():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def small_windows(monkeypatch):
    """8 rows read ahead (the driver encodes them to fix the kind), then 4-row chunks, 2 chunks a
    window: a few dozen rows cross several windows and Ray tasks."""
    monkeypatch.setattr(tasks, "PEEK_VALID", 4)
    monkeypatch.setattr(tasks, "PEEK_LIMIT", 8)
    monkeypatch.setattr(pipeline, "CHUNK_ROWS", 4)
    monkeypatch.setattr(ray_engine, "WINDOW_CHUNKS_PER_CPU", 1)
    monkeypatch.setattr(ray_engine, "MIN_WINDOW_CHUNKS", 2)


def chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {i} plus {i}?" + " please" * (i % 5)},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]


SFT = [row for i in range(8) for row in (
    {"messages": chat(i)},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"Hi {i}"},
                       {"from": "gpt", "value": f"Hello {i}."}]},
    {"instruction": "Translate", "input": f"chat {i}", "output": f"cat {i}"},
    {"query": f"q{i}", "response": f"r{i}", "history": [[f"h{i}", f"a{i}"]]},
)] + ["not json", json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
      json.dumps({"messages": chat(99) + [{"role": "assistant", "content": "long " * 200}]})]
PAIRS = [{"query": f"{i}+{i}?", "response": str(2 * i), "rejected_response": str(i), "margin": i}
         for i in range(30)] + [{"query": "q", "response": "r " * 200, "rejected_response": "x"}]
KTO = [{"messages": chat(i), "label": i % 3 != 0} for i in range(30)] + [{"messages": chat(1), "label": "yes"}]
PROMPTS = [{"messages": [{"role": "user", "content": f"{i}+1?"}], "solution": str(i + 1), "n": i} for i in range(30)]
TEXT = [{"text": f"Document {i}. " + "words " * (i % 11)} for i in range(30)] + [{"text": 3}]


def write(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def both(tmp_path, dataset: list[str], **args) -> dict:
    """Prepares with each engine; asserts every output file and the manifest are the same bytes."""
    local = prepare(PrepareConfig(dataset=dataset, output_dir=str(tmp_path / "local"), shard_rows=7, **args))
    ray = prepare(PrepareConfig(dataset=dataset, output_dir=str(tmp_path / "ray"), shard_rows=7, engine="ray",
                                **args))
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ray").iterdir())
    for name in names:
        left, right = (tmp_path / "local" / name).read_bytes(), (tmp_path / "ray" / name).read_bytes()
        if name == "manifest.json":  # the output directory is the one difference
            left = left.replace(str(tmp_path / "local").encode(), b"OUT")
            right = right.replace(str(tmp_path / "ray").encode(), b"OUT")
        assert left == right, name
    assert ray["fingerprint"] == local["fingerprint"] and "engine" not in ray["args"]
    assert sum(ray_engine.LAST_RUN.chunks_by_worker.values()) > 2  # several windows' tasks ran on Ray
    return local


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_every_sft_row_format_and_its_rejects_are_byte_identical(tmp_path, ray_runtime, small_windows, packing):
    manifest = both(tmp_path, [write(tmp_path / "sft.jsonl", SFT)], max_length=96, packing=packing)
    assert (manifest["rows_in"], manifest["rows_out"]) == (35, 32)
    assert manifest["rejected_by_reason"] == {"invalid_json": 1, "invalid_role": 1, "too_long": 1}


@pytest.mark.parametrize("task, rows, packing, kept", [
    ("preference", PAIRS, False, 30), ("preference", PAIRS, True, 30), ("kto", KTO, False, 30),
    ("prompt", PROMPTS, False, 30), ("pt", TEXT, False, 30), ("pt", TEXT, True, 30)],
    ids=["preference", "preference_packed", "kto", "prompt", "pt_blocks", "pt_packed"])
def test_every_task_is_byte_identical(tmp_path, ray_runtime, small_windows, task, rows, packing, kept):
    args = {"block_size": 16} if task == "pt" and not packing else {}
    manifest = both(tmp_path, [write(tmp_path / "rows.jsonl", rows)], task=task, max_length=64, packing=packing,
                    **args)
    assert manifest["task"] == task and manifest["rows_out"] == kept


def test_txt_files_cut_into_blocks_are_byte_identical(tmp_path, ray_runtime, small_windows):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"{i:02d}.txt").write_text(f"Chapter {i}.\n" + "A line of text.\n" * (i + 1))
    (corpus / "lines.txt").write_text("".join(f"line {i}\n\n" for i in range(9)))
    for mode in ("file", "line"):
        manifest = both(tmp_path / mode, [str(corpus)], task="pt", block_size=32, txt_mode=mode, max_length=0,
                        drop_last_block=False)
        # line mode: each file's non-blank lines (its chapter line + i + 1 lines), and lines.txt's 9
        assert manifest["rows_in"] == (13 if mode == "file" else sum(i + 2 for i in range(12)) + 9)


def test_ray_address_needs_engine_ray_and_an_unknown_engine_is_named():
    with pytest.raises(Problems) as caught:
        prepare(PrepareConfig(dataset=["d.jsonl"], output_dir="out", engine="spark", ray_address="x:1"))
    assert "engine: expected one of local, ray; got 'spark'" in str(caught.value)
    assert "ray_address: only --engine ray runs on a Ray cluster; add --engine ray" in str(caught.value)
    assert isinstance(caught.value, InvalidArgument)


def test_the_dataprep_service_runs_engine_ray_from_its_arguments(tmp_path, ray_runtime, small_windows,
                                                                 dataprep_server):
    """PrepareArguments.engine travels over gRPC; the service's worker thread drives Ray."""
    from libs.dataset import client

    address, _ = dataprep_server
    data = write(tmp_path / "sft.jsonl", SFT)
    remote = client.prepare(address, PrepareConfig(dataset=[data], output_dir=str(tmp_path / "ray"), shard_rows=7,
                                                   max_length=96, engine="ray"), timeout=120)
    assert sum(ray_engine.LAST_RUN.chunks_by_worker.values()) == (35 - 4 + 3) // 4  # after the 4 read ahead
    local = prepare(PrepareConfig(dataset=[data], output_dir=str(tmp_path / "local"), shard_rows=7, max_length=96))
    assert [s["sha256"] for s in remote["shards"]] == [s["sha256"] for s in local["shards"]]
    assert remote["rejected_by_reason"] == local["rejected_by_reason"] and "engine" not in remote["args"]
