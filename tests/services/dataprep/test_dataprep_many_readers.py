"""64 ReadShards streams held open at once on a real dataprep server (2 epochs x 32 ranks, the
issue's training job): every reader gets its rows, health checks and unary RPCs answer
promptly meanwhile, and the 65th stream is refused with RESOURCE_EXHAUSTED naming the flag.
The streams share one verified copy of each shard; a shard changed on disk is verified again."""

import gc
import time

import grpc
import pyarrow as pa
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from libs.common.config import parse
from libs.common.errors import FailedPrecondition, Problems
from libs.common.server import create_server
from protos.tuneforge.dataprep.v1 import dataprep_pb2 as pb
from protos.tuneforge.dataprep.v1 import dataprep_pb2_grpc as pb_grpc
from libs.dataset import client
from libs.dataset.ipc import from_ipc_stream
from services.dataprep.config import DataprepServerConfig, PrepareConfig
from services.dataprep.pipeline import prepare as prepare_in_process
from services.dataprep.shared_shards import SHARED
from services.dataprep.servicer import DataprepServicer, register

RANKS, EPOCHS, ROWS = 32, 2, 256
# A reader whose receive buffer is full, as a training rank's is while it computes: without BDP
# probing and with 1 KiB of lookahead the server's send blocks after a few rows, so each stream
# keeps its server thread (a rank's share here is ~20 KiB; a real epoch's is MiBs).
SLOW_READER = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
REFUSAL = ("all 64 stream slots of this dataprep server are taken (--max_streams 64); retry when a stream "
           "ends, or run the server with a larger --max_streams")


def streams_open(method):
    return REGISTRY.get_sample_value("tuneforge_dataprep_grpc_streams_open", {"method": method})


def refused(method):
    return REGISTRY.get_sample_value("tuneforge_dataprep_grpc_streams_refused_total", {"method": method})


@pytest.fixture(scope="module")
def server():
    config = DataprepServerConfig(max_streams=64)
    servicer = DataprepServicer(config)
    grpc_server, port, _health = create_server("127.0.0.1:0", register(servicer), "dataprep",
                                               config.max_streams, config.unary_threads)
    yield f"127.0.0.1:{port}"
    servicer.shutdown(5)
    grpc_server.stop(1).wait()


@pytest.fixture(scope="module")
def prepared(server, tmp_path_factory):
    """256 rows prepared by the server itself; returns (dataset dir, preparation id, rows)."""
    root = tmp_path_factory.mktemp("many-readers")
    raw = root / "train.jsonl"
    raw.write_text("".join(
        '{"messages": [{"role": "user", "content": "What is %d plus %d?"}, '
        '{"role": "assistant", "content": "%s"}]}\n' % (i, i, f"{i} plus {i} is {2 * i}. " * 20)
        for i in range(ROWS)))
    with grpc.insecure_channel(server) as channel:
        stub = pb_grpc.DataprepServiceStub(channel)
        started = stub.PrepareDataset(pb.PrepareDatasetRequest(arguments=pb.PrepareArguments(
            dataset=[str(raw)], output_dir=str(root / "out"), shard_rows=64)), timeout=30).preparation
        *_, last = stub.WatchPreparation(pb.WatchPreparationRequest(id=started.id), timeout=120)
    assert last.preparation.state == pb.PREPARATION_STATE_SUCCEEDED, last.preparation.error
    rows = []
    for i in range(ROWS // 64):
        rows += pa.ipc.open_file(pa.memory_map(str(root / "out" / f"shard-{i:05d}.arrow"))).read_all().to_pylist()
    return root / "out", started.id, rows


def test_64_readers_get_their_rows_while_health_and_unary_rpcs_answer(server, prepared):
    dataset_dir, preparation_id, rows = prepared
    refused_before = refused("ReadShards"), refused("WatchPreparation")
    readers = []  # (epoch, channel, stream, batches so far)
    try:
        for epoch in range(EPOCHS):
            for rank in range(RANKS):
                channel = grpc.insecure_channel(server, options=SLOW_READER)
                stream = pb_grpc.DataprepServiceStub(channel).ReadShards(pb.ReadShardsRequest(
                    dataset_dir=str(dataset_dir), rank=rank, world_size=RANKS, max_batch_rows=1, shuffle=True,
                    seed=7, epoch=epoch), timeout=120)
                readers.append((epoch, channel, stream, [next(stream)]))
        time.sleep(0.3)  # still held after a pause: the server threads wait on the readers, not done
        assert streams_open("ReadShards") == 64
        # 64 streams share the 4 shards' tables: at most one dataset in memory, not 16 (a shard each)
        dataset_bytes = sum(pa.ipc.open_file(pa.memory_map(str(path))).read_all().nbytes
                            for path in dataset_dir.glob("shard-*.arrow"))
        in_memory = REGISTRY.get_sample_value("tuneforge_dataprep_shards_in_memory_bytes")
        print(f"64 streams hold {in_memory / 1024:.0f} KiB of shards; the dataset is {dataset_bytes / 1024:.0f} KiB")
        assert 0 < in_memory <= dataset_bytes

        with grpc.insecure_channel(server) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.DataprepServiceStub(channel)
            latencies = []
            for _ in range(10):
                started = time.perf_counter()
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
                latencies.append(time.perf_counter() - started)
                assert status == health_pb2.HealthCheckResponse.SERVING
            started = time.perf_counter()
            got = stub.GetPreparation(pb.GetPreparationRequest(id=preparation_id), timeout=10).preparation
            described = stub.DescribeDataset(pb.DescribeDatasetRequest(dataset_dir=str(dataset_dir)), timeout=10)
            unary = time.perf_counter() - started
            assert got.state == pb.PREPARATION_STATE_SUCCEEDED
            assert (described.task, described.complete, described.rows) == ("sft", True, ROWS)
            print(f"under 64 streams: Health/Check max {max(latencies) * 1e3:.1f} ms, "
                  f"GetPreparation + DescribeDataset {unary * 1e3:.1f} ms")
            assert max(latencies) < 2 and unary < 2

            for method, request in (("ReadShards", pb.ReadShardsRequest(dataset_dir=str(dataset_dir))),
                                    ("WatchPreparation", pb.WatchPreparationRequest(id=preparation_id))):
                started = time.perf_counter()
                with pytest.raises(grpc.RpcError) as caught:
                    next(getattr(stub, method)(request, timeout=10))
                assert time.perf_counter() - started < 2  # refused at once, not queued
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert caught.value.details() == f"{method}: {REFUSAL}"
        assert (refused("ReadShards"), refused("WatchPreparation")) == (refused_before[0] + 1, refused_before[1] + 1)

        for _epoch, _channel, stream, batches in readers:
            batches.extend(stream)
    finally:
        for _epoch, channel, stream, _batches in readers:
            stream.cancel()
            channel.close()

    def key(row):
        return tuple(row["input_ids"])

    for epoch in range(EPOCHS):
        served = [row for e, _c, _s, batches in readers if e == epoch
                  for batch in batches for row in from_ipc_stream(batch.arrow_ipc).to_pylist()]
        assert sorted(served, key=key) == sorted(rows, key=key)  # the 32 ranks together: every row once
    deadline = time.monotonic() + 5
    while streams_open("ReadShards") != 0:
        assert time.monotonic() < deadline, f"{streams_open('ReadShards')} ReadShards slots still taken"
        time.sleep(0.05)
    # the slots came back: the product's reader reads the whole dataset
    assert sum(batch.num_rows for batch, _ in client.read_batches(server, str(dataset_dir), timeout=60)) == ROWS


def test_the_default_serves_two_epochs_of_32_ranks_with_room_and_bad_sizes_are_named():
    config = parse(DataprepServerConfig, [])
    assert (config.max_streams, config.unary_threads) == (128, 16)
    with pytest.raises(Problems) as caught:
        parse(DataprepServerConfig, ["--max_streams", "0", "--unary_threads", "-1", "--max_concurrent", "0"])
    assert caught.value.problems == ["max_streams: expected a positive number; got 0",
                                     "unary_threads: expected a positive number; got -1",
                                     "max_concurrent: expected a positive number; got 0"]


def test_readers_share_a_verified_shard_until_its_file_changes(server, tmp_path, write_jsonl, conversation):
    data = write_jsonl("train.jsonl", [conversation(i) for i in range(10)])
    out = tmp_path / "prepared"
    manifest = prepare_in_process(PrepareConfig(dataset=[str(data)], output_dir=str(out), shard_rows=5))
    first = manifest["shards"][0]
    held = SHARED.read(out, first["file"], first["sha256"], manifest.get("columns"))
    assert SHARED.read(out, first["file"], first["sha256"], manifest.get("columns")) is held
    assert [row for batch, _ in client.read_batches(server, str(out)) for row in batch.to_pylist()][:5] == \
        held.to_pylist()

    shard = out / first["file"]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # the same size, in place: only the content and mtime change
    shard.write_bytes(bytes(raw))
    with pytest.raises(FailedPrecondition, match=f"{shard}: sha256 .* differs from the manifest's"):
        list(client.read_batches(server, str(out)))

    del held
    gc.collect()
    assert REGISTRY.get_sample_value("tuneforge_dataprep_shards_in_memory_bytes") == 0  # nobody reads: freed
