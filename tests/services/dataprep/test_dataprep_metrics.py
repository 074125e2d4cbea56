"""The dataprep metrics page after a packed preparation and a read over real gRPC:
packing efficiency, bytes served, RPC latency, and `promtool check metrics` passing.
Also: packing/num_proc travel over gRPC and a reused cache is reported by the operation; a
running preparation's own row gauges (label preparation) go when it ends."""

import shutil
import subprocess
import time

import grpc
import pytest
from prometheus_client import REGISTRY, generate_latest

from libs.dataset import client
from protos.tuneforge.dataprep.v1 import dataprep_pb2 as pb
from protos.tuneforge.dataprep.v1 import dataprep_pb2_grpc as pb_grpc
from services.dataprep.config import PrepareConfig


def value(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_packed_preparation_and_read_show_on_the_metrics_page(dataprep_server, tmp_path, write_jsonl, conversation):
    address, _ = dataprep_server
    data = write_jsonl("train.jsonl", [conversation(i) for i in range(30)] + ["nope"])
    config = PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out"), packing=True, max_length=128,
                           num_proc=2, shard_rows=2)
    served, reads = value("tuneforge_dataprep_served_bytes_total"), value(
        "tuneforge_dataprep_grpc_request_duration_seconds_count", method="ReadShards")
    progress = []
    manifest = client.prepare(address, config, on_progress=progress.append)
    assert manifest["args"]["packing"] and manifest["args"]["num_proc"] == 2
    assert manifest["packing"]["samples"] == 30 and manifest["packing"]["efficiency"] > 0.8
    assert value("tuneforge_dataprep_packing_efficiency_ratio") == manifest["packing"]["efficiency"]
    assert not any(p.reused for p in progress)

    batches = [batch for batch, _ in client.read_batches(address, str(tmp_path / "out"))]
    assert sum(b.num_rows for b in batches) == manifest["packing"]["bins"]
    assert set(batches[0].schema.names) == {"input_ids", "labels", "position_ids", "seq_lens", "length"}
    assert value("tuneforge_dataprep_served_bytes_total") - served > sum(b.nbytes for b in batches) * 0.9
    assert value("tuneforge_dataprep_grpc_request_duration_seconds_count", method="ReadShards") - reads == 1

    progress.clear()
    again = client.prepare(address, config, on_progress=progress.append)
    assert again == manifest and progress[-1].reused  # the operation says the cache was reused

    page = generate_latest(REGISTRY).decode()
    for name in ("tuneforge_dataprep_packing_efficiency_ratio", "tuneforge_dataprep_served_bytes_total",
                 'tuneforge_dataprep_rows_rejected_total{reason="too_long"}', "tuneforge_dataprep_tokens_total",
                 'tuneforge_dataprep_grpc_request_duration_seconds_bucket{le="0.005",method="ReadShards"}'):
        assert name in page
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    lint = subprocess.run([promtool, "check", "metrics"], input=page.encode(), capture_output=True, timeout=30)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


def test_a_running_preparation_has_its_own_row_gauges_removed_when_it_ends(dataprep_server, gated, tmp_path,
                                                                            write_jsonl, conversation):
    address, _ = dataprep_server
    gate, _ = gated
    rows = [conversation(0), "nope", conversation(2), conversation(3), conversation(4), conversation(5)]
    data = write_jsonl("train.jsonl", rows)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.DataprepServiceStub(channel)
        operation_id = stub.PrepareDataset(pb.PrepareDatasetRequest(arguments=pb.PrepareArguments(
            dataset=[str(data)], output_dir=str(tmp_path / "out"), shard_rows=2)), timeout=10).preparation.id
        labels = {"preparation": operation_id}
        deadline = time.monotonic() + 60
        # held before line 5: lines 1 to 4 read, line 2 rejected
        while value("tuneforge_dataprep_preparation_rows_read", **labels) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert value("tuneforge_dataprep_preparation_rows_read", **labels) == 4
        assert value("tuneforge_dataprep_preparation_rows_rejected", **labels) == 1
        gate.set()
        while (stub.GetPreparation(pb.GetPreparationRequest(id=operation_id), timeout=5).preparation.state
               != pb.PREPARATION_STATE_SUCCEEDED) and time.monotonic() < deadline:
            time.sleep(0.05)
    # the preparation's thread removes them as it ends, just after publishing the state
    while REGISTRY.get_sample_value("tuneforge_dataprep_preparation_rows_read", labels) is not None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert REGISTRY.get_sample_value("tuneforge_dataprep_preparation_rows_read", labels) is None
    assert REGISTRY.get_sample_value("tuneforge_dataprep_preparation_rows_rejected", labels) is None
