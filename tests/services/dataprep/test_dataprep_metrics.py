"""The dataprep metrics page after a packed preparation and a read over real gRPC:
packing efficiency, bytes served, RPC latency, and `promtool check metrics` passing.
Also: packing/num_proc travel over gRPC and a reused cache is reported by the operation."""

import shutil
import subprocess

import pytest
from prometheus_client import REGISTRY, generate_latest

from libs.dataset import client
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
