"""The DataprepService over real gRPC on 127.0.0.1 (real stubs, real Arrow files),
and the client library the trainer reads with."""

import json

import grpc
import pyarrow as pa
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY, generate_latest

from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from protos.tuneforge.dataprep.v1 import dataprep_pb2 as pb
from protos.tuneforge.dataprep.v1 import dataprep_pb2_grpc as pb_grpc
from libs.dataset import client, split
from libs.dataset.split import Holdout
from libs.dataset.client import Cursor
from services.dataprep.config import PrepareConfig
from services.dataprep.pipeline import prepare as prepare_in_process


@pytest.fixture
def stub(dataprep_server):
    address, _servicer = dataprep_server
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.DataprepServiceStub(channel)


@pytest.fixture
def dataset(tmp_path, write_jsonl, conversation):
    """A prepared dataset of 23 rows in shards of 5, 5, 5, 5, 3; returns (dir, rows in order)."""
    data = write_jsonl("train.jsonl", [conversation(i) for i in range(23)])
    out = tmp_path / "prepared"
    prepare_in_process(PrepareConfig(dataset=[str(data)], output_dir=str(out), shard_rows=5))
    rows = []
    for i in range(5):
        rows += pa.ipc.open_file(pa.memory_map(str(out / f"shard-{i:05d}.arrow"))).read_all().to_pylist()
    assert len(rows) == 23
    return out, rows


def test_health_check_reports_serving(dataprep_server):
    address, _ = dataprep_server
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tuneforge.dataprep.v1.DataprepService"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_watch_reaches_succeeded_with_the_manifest(stub, tmp_path, write_jsonl, conversation):
    data = write_jsonl("train.jsonl", [conversation(i) for i in range(250)] + ["not json"])
    started = stub.PrepareDataset(pb.PrepareDatasetRequest(arguments=pb.PrepareArguments(
        dataset=[str(data)], output_dir=str(tmp_path / "out"), shard_rows=100)), timeout=10).preparation
    assert started.id and started.state == pb.PREPARATION_STATE_PENDING

    updates = [r.preparation for r in stub.WatchPreparation(pb.WatchPreparationRequest(id=started.id), timeout=60)]

    final = updates[-1]
    assert final.state == pb.PREPARATION_STATE_SUCCEEDED
    assert all(u.state not in (pb.PREPARATION_STATE_SUCCEEDED, pb.PREPARATION_STATE_FAILED) for u in updates[:-1])
    assert pb.PREPARATION_STATE_RUNNING in [u.state for u in updates]
    rows_in = [u.rows_in for u in updates]
    assert rows_in == sorted(rows_in) and len(set(rows_in)) > 1  # progress was streamed, never backwards
    manifest = json.loads(final.manifest_json)
    assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (final.rows_in, final.rows_out, final.rows_rejected) == (251, 250, 1)
    assert (manifest["rows_out"], manifest["rows_rejected"], len(manifest["shards"])) == (250, 1, 3)
    assert final.shards_written == 3 and final.tokens == manifest["tokens"]
    assert final.output_dir == str(tmp_path / "out")
    got = stub.GetPreparation(pb.GetPreparationRequest(id=started.id), timeout=5).preparation
    assert got == final


def test_client_prepare_returns_the_manifest_and_reports_progress(dataprep_server, tmp_path, write_jsonl,
                                                                  conversation):
    address, _ = dataprep_server
    data = write_jsonl("train.jsonl", [conversation(i) for i in range(3)])
    progress = []
    manifest = client.prepare(address, PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out")),
                              on_progress=progress.append)
    assert manifest["rows_out"] == 3 and manifest["args"]["output_dir"] == str(tmp_path / "out")
    assert progress[-1].rows_out == 3


def test_client_prepare_raises_not_found_naming_the_missing_file(dataprep_server, tmp_path):
    address, _ = dataprep_server
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(NotFound, match=str(missing)):
        client.prepare(address, PrepareConfig(dataset=[str(missing)], output_dir=str(tmp_path / "out")))
    with pytest.raises(InvalidArgument, match="dataset: at least one"):
        client.prepare(address, PrepareConfig(dataset=[], output_dir=str(tmp_path / "out")))


def test_failure_in_the_preparation_thread_surfaces_as_its_typed_error(dataprep_server, tmp_path, write_jsonl,
                                                                       conversation):
    address, _ = dataprep_server
    data = write_jsonl("train.jsonl", [conversation(0)])
    with pytest.raises(NotFound) as error:
        client.prepare(address, PrepareConfig(model=str(tmp_path / "no-model"), dataset=[str(data)],
                                              output_dir=str(tmp_path / "out")))
    assert "no-model" in str(error.value)


def test_cancel_ends_a_preparation_cancelled_without_a_manifest(stub, tmp_path, write_jsonl, conversation):
    data = write_jsonl("train.jsonl", [conversation(i) for i in range(20000)])
    started = stub.PrepareDataset(pb.PrepareDatasetRequest(arguments=pb.PrepareArguments(
        dataset=[str(data)], output_dir=str(tmp_path / "out"))), timeout=10).preparation
    for response in stub.WatchPreparation(pb.WatchPreparationRequest(id=started.id), timeout=60):
        if response.preparation.rows_in > 0:
            stub.CancelPreparation(pb.CancelPreparationRequest(id=started.id), timeout=5)
        last = response.preparation
    assert last.state == pb.PREPARATION_STATE_CANCELLED
    assert last.error_code == grpc.StatusCode.CANCELLED.value[0]
    assert not (tmp_path / "out" / "manifest.json").exists()
    # cancelling a finished preparation is a no-op that returns its state
    again = stub.CancelPreparation(pb.CancelPreparationRequest(id=started.id), timeout=5).preparation
    assert again.state == pb.PREPARATION_STATE_CANCELLED


def test_unknown_preparation_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.GetPreparation(pb.GetPreparationRequest(id="nope"), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_two_ranks_partition_the_rows_exactly(dataprep_server, dataset):
    address, _ = dataprep_server
    out, rows = dataset
    by_rank = {}
    for rank in (0, 1):
        got = []
        for batch, _cursor in client.read_batches(address, str(out), rank=rank, world_size=2, max_batch_rows=2):
            assert batch.num_rows <= 2
            got += batch.to_pylist()
        by_rank[rank] = got
    assert by_rank[0] == rows[0::2] and by_rank[1] == rows[1::2]
    assert len(by_rank[0]) + len(by_rank[1]) == len(rows)  # disjoint, and together all rows


def test_resuming_from_a_cursor_continues_exactly_where_it_left_off(dataprep_server, dataset):
    address, _ = dataprep_server
    out, rows = dataset
    full = [(b.to_pylist(), c) for b, c in client.read_batches(address, str(out), rank=1, world_size=3,
                                                                max_batch_rows=1)]
    assert [r for rows_, _ in full for r in rows_] == rows[1::3]
    for k in (0, 2, len(full) - 2):
        resumed = [r for b, _ in client.read_batches(address, str(out), rank=1, world_size=3,
                                                     start=full[k][1], max_batch_rows=1)
                   for r in b.to_pylist()]
        assert resumed == [r for rows_, _ in full[k + 1:] for r in rows_]
    assert list(client.read_batches(address, str(out), rank=1, world_size=3, start=full[-1][1])) == []


def test_row_ids_name_each_row_whatever_the_order_rank_or_resume(dataprep_server, dataset):
    """A row's id is its index in the dataset (shards in manifest order): the trainer keys what it
    keeps per row (an eval split, precomputed reference log-probs) on it, not on read order."""
    address, _ = dataprep_server
    out, rows = dataset  # 23 rows in shards of 5

    def read(rank=0, world_size=1, **args):
        return [(int(i), r) for b, _, ids in client.read_batches_with_ids(address, str(out), rank=rank,
                                                                           world_size=world_size, max_batch_rows=2,
                                                                           **args)
                for i, r in zip(ids, b.to_pylist())]

    assert [i for i, _ in read()] == list(range(23)) and [r for _, r in read()] == rows
    for args in ({}, {"shuffle": True, "seed": 7}, {"shuffle": True, "seed": 7, "epoch": 3}):
        dealt = read(0, 3, **args) + read(1, 3, **args) + read(2, 3, **args)
        assert sorted(i for i, _ in dealt) == list(range(23)), args  # each row once, across ranks
        assert all(rows[i] == r for i, r in dealt), args  # and the id names that very row
    after = client.read_batches_with_ids(address, str(out), rank=1, world_size=2, start=client.Cursor(2, 1),
                                         shuffle=True, seed=7)
    assert all(rows[int(i)] == r for b, _, ids in after for i, r in zip(ids, b.to_pylist()))


def test_a_split_serves_one_side_by_row_id_whatever_the_order_epoch_or_rank(dataprep_server, dataset):
    """--split_dataset_ratio's rows: the held-out side is the same rows in every order, epoch and
    number of ranks; the split comes before dealing, so the ranks' counts follow from the side's."""
    address, _ = dataprep_server
    out, rows = dataset  # 23 rows in shards of 5
    held = [i for i in range(23) if split.held_out(i, 0.25)]
    assert len(held) == 6  # ceil(23 x 0.25)

    def read(rank, world_size, side, start=None, **args):
        return [(int(i), r, c) for b, c, ids in client.read_batches_with_ids(
            address, str(out), rank=rank, world_size=world_size, start=start, max_batch_rows=2, holdout=side,
            **args) for i, r in zip(ids, b.to_pylist())]

    for args in ({}, {"shuffle": True, "seed": 7}, {"shuffle": True, "seed": 7, "epoch": 1}):
        for side in (Holdout(0.25, True), Holdout(0.25, False)):
            for world_size in (1, 2):
                dealt = [read(rank, world_size, side, **args) for rank in range(world_size)]
                assert sorted(i for d in dealt for i, _, _ in d) == [i for i in range(23) if (i in held) == side.held_out]
                assert all(rows[i] == r for d in dealt for i, r, _ in d)  # each id names its very row
                assert [len(d) for d in dealt] == [split.rank_rows(side.rows(23), rank, world_size)
                                                   for rank in range(world_size)]
            alone = [i for i, _, _ in read(0, 1, side, **args)]
            assert [i for i, _, _ in read(1, 2, side, **args)] == alone[1::2]  # dealt after the split
        train = read(1, 2, Holdout(0.25, False), **args)
        for k in (0, 3, len(train) - 2):
            cursor = train[k][2]
            rest = train[max(j for j, (_, _, c) in enumerate(train) if c == cursor) + 1:]
            assert read(1, 2, Holdout(0.25, False), start=cursor, **args) == rest
    with pytest.raises(InvalidArgument, match=r"holdout: its ratio must be in \(0, 1\); got 1.0"):
        read(0, 1, Holdout(1.0, True))


def test_shuffled_reads_are_seeded_per_epoch_disjoint_across_ranks_and_resumable(dataprep_server, dataset):
    address, _ = dataprep_server
    out, rows = dataset  # 23 rows in shards of 5

    def read(rank, world_size=2, **args):
        return [r for b, _ in client.read_batches(address, str(out), rank=rank, world_size=world_size,
                                                  max_batch_rows=2, shuffle=True, **args) for r in b.to_pylist()]

    key = lambda r: r["input_ids"]  # noqa: E731
    epoch0 = [read(0, seed=7), read(1, seed=7)]
    assert sorted(epoch0[0] + epoch0[1], key=key) == sorted(rows, key=key)  # every row once, across ranks
    assert [read(0, seed=7), read(1, seed=7)] == epoch0  # the same seed and epoch: the same order
    served = [r for pair in zip(epoch0[0], epoch0[1] + [None]) for r in pair if r is not None]
    assert served != rows  # shuffled ...
    assert read(0, world_size=1, seed=7) == served  # ... into one order that the ranks deal from
    assert read(0, world_size=1, seed=7, epoch=1) not in (served, rows)  # another epoch, another order
    assert read(0, world_size=1, seed=8) != served
    full = [(b.to_pylist(), c) for b, c in client.read_batches(address, str(out), rank=1, world_size=3,
                                                                max_batch_rows=1, shuffle=True, seed=7)]
    for k in (0, 3, len(full) - 2):
        resumed = [r for b, _ in client.read_batches(address, str(out), rank=1, world_size=3, start=full[k][1],
                                                     max_batch_rows=1, shuffle=True, seed=7)
                   for r in b.to_pylist()]
        assert resumed == [r for rows_, _ in full[k + 1:] for r in rows_]


def test_read_shards_responses_are_arrow_ipc_streams_with_cursor_and_shard(stub, dataset):
    out, rows = dataset
    responses = list(stub.ReadShards(pb.ReadShardsRequest(dataset_dir=str(out)), timeout=10))
    assert [(r.shard, r.num_rows, r.next.shard_index, r.next.row) for r in responses] == [
        ("shard-00000.arrow", 5, 1, 0), ("shard-00001.arrow", 5, 2, 0), ("shard-00002.arrow", 5, 3, 0),
        ("shard-00003.arrow", 5, 4, 0), ("shard-00004.arrow", 3, 5, 0)]
    reader = pa.ipc.open_stream(responses[0].arrow_ipc)
    assert reader.schema.names == ["input_ids", "labels", "length"]
    assert reader.read_all().to_pylist() == rows[:5]


def test_missing_dataset_dir_is_not_found_and_incomplete_is_failed_precondition(dataprep_server, dataset, tmp_path):
    address, _ = dataprep_server
    with pytest.raises(NotFound, match="no such dataset directory"):
        list(client.read_batches(address, str(tmp_path / "nowhere")))
    out, _ = dataset
    (out / "manifest.json").unlink()
    with pytest.raises(FailedPrecondition, match="has not completed"):
        list(client.read_batches(address, str(out)))


def test_a_shard_that_changed_after_preparation_is_refused(dataprep_server, dataset):
    address, _ = dataprep_server
    out, rows = dataset
    shard = out / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    batches = client.read_batches(address, str(out), max_batch_rows=5)
    first, _ = next(batches)  # shard 0 is intact and served
    assert first.to_pylist() == rows[:5]
    with pytest.raises(FailedPrecondition, match="sha256"):
        next(batches)


def test_bad_read_arguments_are_invalid_argument(dataprep_server, dataset):
    address, _ = dataprep_server
    out, _ = dataset
    with pytest.raises(InvalidArgument, match="rank"):
        list(client.read_batches(address, str(out), rank=2, world_size=2))
    with pytest.raises(InvalidArgument, match="start"):
        list(client.read_batches(address, str(out), start=Cursor(9, 0)))


def test_same_output_dir_cannot_be_prepared_twice_at_once(stub, tmp_path, write_jsonl, conversation):
    data = write_jsonl("train.jsonl", [conversation(i) for i in range(5000)])
    arguments = pb.PrepareArguments(dataset=[str(data)], output_dir=str(tmp_path / "out"))
    first = stub.PrepareDataset(pb.PrepareDatasetRequest(arguments=arguments), timeout=10).preparation
    try:
        with pytest.raises(grpc.RpcError) as error:
            stub.PrepareDataset(pb.PrepareDatasetRequest(arguments=arguments), timeout=10)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert first.id in error.value.details()
    finally:
        stub.CancelPreparation(pb.CancelPreparationRequest(id=first.id), timeout=5)
        for _ in stub.WatchPreparation(pb.WatchPreparationRequest(id=first.id), timeout=60):
            pass


def test_metrics_count_rows_rejects_and_shards_served(dataprep_server, tmp_path, write_jsonl, conversation):
    address, _ = dataprep_server

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {
        "rows": value("tuneforge_dataprep_rows_processed_total"),
        "bad": value("tuneforge_dataprep_rows_rejected_total", reason="invalid_json"),
        "ok": value("tuneforge_dataprep_preparations_total", state="succeeded"),
        "served": value("tuneforge_dataprep_shards_served_total"),
    }
    data = write_jsonl("train.jsonl", [conversation(1), "nope", conversation(2)])
    manifest = client.prepare(address, PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out"),
                                                     shard_rows=1))
    list(client.read_batches(address, str(tmp_path / "out")))
    assert value("tuneforge_dataprep_rows_processed_total") - before["rows"] == 3
    assert value("tuneforge_dataprep_rows_rejected_total", reason="invalid_json") - before["bad"] == 1
    assert value("tuneforge_dataprep_preparations_total", state="succeeded") - before["ok"] == 1
    assert value("tuneforge_dataprep_shards_served_total") - before["served"] == len(manifest["shards"]) == 2
    page = generate_latest(REGISTRY).decode()
    assert 'tuneforge_dataprep_rows_rejected_total{reason="invalid_json"}' in page
    assert "# TYPE tuneforge_dataprep_tokens_total counter" in page


def test_format_and_mask_arguments_travel_over_grpc(dataprep_server, tmp_path, write_jsonl):
    address, _ = dataprep_server
    data = write_jsonl("qa.jsonl", [{"q": "hi", "a": "yo"}, {"q": "hi", "a": "yo"}, {"q": "hi", "a": "yo"}])
    config = PrepareConfig(dataset=[f"{data}#2"], output_dir=str(tmp_path / "out"), loss_scale="all",
                           columns='{"q": "query", "a": "response"}', truncation_strategy="left", max_length=10,
                           data_seed=7)
    remote = client.prepare(address, config)
    local = prepare_in_process(PrepareConfig(**{**config.__dict__, "output_dir": str(tmp_path / "local")}))
    assert remote["args"] == {**local["args"], "output_dir": str(tmp_path / "out")}
    assert (remote["rows_in"], remote["rows_out"], remote["tokens"], remote["trained_tokens"]) == (2, 2, 20, 20)
    assert [s["sha256"] for s in remote["shards"]] == [s["sha256"] for s in local["shards"]]
