"""Shards as they fill: ReadShards serves a dataset still being prepared (waiting for
more shards until the preparation ends, a clear status if it fails); a failed or
cancelled preparation leaves nothing that looks complete; --streaming keeps peak
memory flat when the input grows tenfold."""

import json
import os
import subprocess
import sys
import textwrap
import threading

import grpc
import pyarrow as pa
import pytest

from libs.common.errors import Cancelled, FailedPrecondition
from protos.tuneforge.dataprep.v1 import dataprep_pb2 as pb
from protos.tuneforge.dataprep.v1 import dataprep_pb2_grpc as pb_grpc
from libs.dataset import client
from services.dataprep import pipeline, tasks
from services.dataprep.config import PrepareConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def start(address, data, out):
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.DataprepServiceStub(channel).PrepareDataset(pb.PrepareDatasetRequest(
            arguments=pb.PrepareArguments(dataset=[str(data)], output_dir=str(out), shard_rows=2)),
            timeout=10).preparation.id


def state_of(address, operation_id):
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.DataprepServiceStub(channel).GetPreparation(
            pb.GetPreparationRequest(id=operation_id), timeout=5).preparation.state


def test_read_shards_serves_a_dataset_while_it_is_being_prepared(dataprep_server, gated, tmp_path, write_jsonl,
                                                                  conversation):
    address, _ = dataprep_server
    gate, _ = gated
    data = write_jsonl("train.jsonl", [conversation(i) for i in range(10)])
    out = tmp_path / "out"
    operation_id = start(address, data, out)

    for rank in (0, 1):
        reader = client.read_batches(address, str(out), rank=rank, world_size=2, max_batch_rows=1, timeout=60)
        early = [next(reader) for _ in range(2)]  # rows 0-3 are in shards 0 and 1; row 4 waits for the gate
        assert [cursor for _, cursor in early] == [client.Cursor(0, rank + 1) if rank == 0 else client.Cursor(1, 0),
                                                   client.Cursor(1, rank + 1) if rank == 0 else client.Cursor(2, 0)]
        reader.close()
    assert state_of(address, operation_id) == pb.PREPARATION_STATE_RUNNING
    assert not (out / "manifest.json").exists()
    with pytest.raises(FailedPrecondition, match="shuffle needs a complete dataset"):
        next(client.read_batches(address, str(out), shuffle=True, seed=1, timeout=60))

    reader = client.read_batches(address, str(out), max_batch_rows=3, timeout=60)
    rows = [row for batch, _ in [next(reader)] for row in batch.to_pylist()]  # shard 0, before the gate opens
    gate.set()
    rows += [row for batch, _ in reader for row in batch.to_pylist()]

    assert state_of(address, operation_id) == pb.PREPARATION_STATE_SUCCEEDED
    manifest = json.loads((out / "manifest.json").read_text())
    expected = []
    for shard in manifest["shards"]:
        expected += pa.ipc.open_file(pa.memory_map(str(out / shard["file"]))).read_all().to_pylist()
    assert len(expected) == 10 and rows == expected
    assert not (out / "shards.partial.json").exists()


def test_a_reader_of_a_preparation_that_fails_gets_its_error_and_nothing_is_left(dataprep_server, gated, tmp_path,
                                                                                 write_jsonl, conversation):
    address, _ = dataprep_server
    gate, state = gated
    state["fail"] = True
    data = write_jsonl("train.jsonl", [conversation(i) for i in range(10)])
    out = tmp_path / "out"
    operation_id = start(address, data, out)
    reader = client.read_batches(address, str(out), max_batch_rows=2, timeout=60)
    assert len(next(reader)[0]) == 2
    gate.set()
    with pytest.raises(FailedPrecondition, match=f"preparation {operation_id} failed while being read: "
                                                 "dataset: train.jsonl:5: the disk went away"):
        list(reader)
    assert state_of(address, operation_id) == pb.PREPARATION_STATE_FAILED
    assert sorted(p.name for p in out.iterdir()) == ["rejects.jsonl"]  # no shard, no listing, no manifest


def test_wait_complete_waits_for_the_preparation_to_end(dataprep_server, gated, tmp_path, write_jsonl, conversation):
    """What the trainer does before it reads shuffled or counts rows: ask until the dataset is complete."""
    address, _ = dataprep_server
    gate, state = gated
    data = write_jsonl("train.jsonl", [conversation(i) for i in range(10)])
    for fail in (False, True):
        state["fail"] = fail
        gate.clear()
        out = tmp_path / f"out-{fail}"
        operation_id = start(address, data, out)
        next(client.read_batches(address, str(out), timeout=60))  # a shard is written: the dataset is described
        stop = threading.Event()
        stop.set()
        assert client.wait_complete(address, str(out), stop, poll_seconds=0.05) is None  # stopped while waiting
        waited = {}

        def wait():
            try:
                waited["info"] = client.wait_complete(address, str(out), poll_seconds=0.05)
            except FailedPrecondition as exc:
                waited["error"] = exc

        waiter = threading.Thread(target=wait)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and state_of(address, operation_id) == pb.PREPARATION_STATE_RUNNING
        gate.set()
        waiter.join(60)
        if fail:
            assert str(waited["error"]) == f"dataset_dir: {out}: no manifest.json; the preparation has not completed"
        else:
            info = waited["info"]
            assert info.complete and info.rows == 10 and sum(info.shard_rows) == 10


def test_cancel_removes_the_shards_written_so_far(tmp_path, write_jsonl, conversation, monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK_ROWS", 2)
    data = write_jsonl("train.jsonl", [conversation(i) for i in range(10)])
    out = tmp_path / "out"
    cancelled = threading.Event()

    def progress(p):
        if p.shards_written == 2:
            assert sorted(f.name for f in out.glob("shard-*")) == ["shard-00000.arrow", "shard-00001.arrow"]
            cancelled.set()

    with pytest.raises(Cancelled):
        pipeline.prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out), shard_rows=2),
                         progress=progress, cancelled=cancelled)
    assert sorted(p.name for p in out.iterdir()) == ["rejects.jsonl"]


PEAK_RSS = textwrap.dedent("""
    import json, resource, sys
    from services.dataprep.config import PrepareConfig
    from services.dataprep import pipeline
    pipeline.STREAMING_PACK_WINDOW = 500
    data, out, streaming = sys.argv[1], sys.argv[2], sys.argv[3] == "true"
    manifest = pipeline.prepare(PrepareConfig(dataset=[data], output_dir=out, max_length=1024, packing=True,
                                              streaming=streaming, shard_rows=200))
    print(json.dumps({"rows": manifest["rows_out"], "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def peak_rss(data, out, streaming):
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(data), str(out), streaming], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_streaming_peak_memory_stays_flat_when_the_input_grows_tenfold(tmp_path):
    answer = "The quick brown fox jumps over the lazy dog; " * 40  # ~1.8 KB a row
    def write(name, n):
        path = tmp_path / name
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"Tell me story {i}."},
                                                 {"role": "assistant", "content": f"{i}: {answer}"}]}) + "\n")
        return path

    small, large = write("small.jsonl", 1500), write("large.jsonl", 15000)
    base = peak_rss(small, tmp_path / "small", "true")
    grown = peak_rss(large, tmp_path / "large", "true")
    assert (base["rows"], grown["rows"]) == (1500, 15000)
    print(f"peak RSS, streaming: {base['peak_kib']} KiB at 1,500 rows, {grown['peak_kib']} KiB at 15,000")
    # The promise is "within 20%"; the bound is tighter because at these sizes the whole-dataset
    # packer (no --streaming) grew 14% (541 -> 615 MiB) and streaming 0.6%: 20% would not catch a regression.
    assert grown["peak_kib"] <= 1.08 * base["peak_kib"]


KILLED_CHILD = textwrap.dedent("""
    import pathlib, sys, time
    from services.dataprep import pipeline, tasks
    from services.dataprep.config import PrepareConfig

    data, out, stuck = sys.argv[1:4]
    real = pipeline.encode_chunk
    pipeline.CHUNK_ROWS = 1
    tasks.PEEK_VALID = 1  # only the first row is encoded ahead, to fix the dataset's kind

    def encode_chunk(tokenizer, records, columns, config):
        if records[0].line >= 5:  # two shards of two rows are written: stop here until killed
            pathlib.Path(stuck).touch()
            time.sleep(600)
        return real(tokenizer, records, columns, config)

    pipeline.encode_chunk = encode_chunk
    pipeline.prepare(PrepareConfig(dataset=[data], output_dir=out, shard_rows=2))
""")


def test_a_preparation_killed_midway_is_refused_to_readers_and_prepared_again_on_rerun(
        tmp_path, write_jsonl, conversation, dataprep_server):
    """SIGKILL leaves shards and shards.partial.json but no manifest: a reader gets
    FAILED_PRECONDITION saying the preparation did not complete, the cache does not take
    it for a dataset, and re-running prepares it whole and removes the stale listing."""
    address, _servicer = dataprep_server
    data = write_jsonl("train.jsonl", [conversation(i) for i in range(8)])
    out, stuck = tmp_path / "out", tmp_path / "stuck"
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(data), str(out), str(stuck)], cwd=REPO)
    try:
        for _ in range(1200):
            if stuck.exists() or child.poll() is not None:
                break
            threading.Event().wait(0.05)
        assert stuck.exists(), f"the child ended with {child.returncode} before row 5"
    finally:
        child.kill()
        child.wait()
    listed = json.loads((out / "shards.partial.json").read_text())["shards"]
    assert [s["file"] for s in listed] == ["shard-00000.arrow", "shard-00001.arrow"]
    assert not (out / "manifest.json").exists()

    with pytest.raises(FailedPrecondition, match="shards.partial.json of a preparation that did not complete"):
        list(client.read_batches(address, str(out)))

    progress = []
    manifest = pipeline.prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out), shard_rows=2),
                                progress=progress.append)
    assert not any(p.reused for p in progress)
    assert (manifest["rows_out"], len(manifest["shards"])) == (8, 4)
    assert not (out / "shards.partial.json").exists()
    assert sum(b.num_rows for b, _ in client.read_batches(address, str(out))) == 8
