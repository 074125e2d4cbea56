"""--engine ray on a real two-node Ray cluster on loopback: a head and a second node,
each `ray start --block` processes of one CPU started by this module (and only they are
stopped: their process groups get SIGTERM, never `ray stop`, which stops every Ray
process of the user). `tuneforge prepare --engine ray --ray_address` spreads the chunks
over both nodes and writes the local engine's bytes."""

from __future__ import annotations

import collections
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from services.dataprep import pipeline
from services.dataprep.config import PrepareConfig

ROOT = pathlib.Path(__file__).resolve().parents[3]
RAY = str(pathlib.Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the group of a `ray start --block` we started: it stops the raylet, GCS
    and workers it started; SIGKILL after 10 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def cluster():
    # a short temporary directory: Ray's socket paths under it must stay below 108 bytes
    temp = tempfile.mkdtemp(prefix="tfray")
    # token authentication off: a loopback test cluster, and the nodes would need to share a token file
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--block", "--disable-usage-stats"]
    started = []
    try:
        started.append(subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                                         f"--temp-dir={temp}", *common], env=env, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 120
        while True:  # the head's GCS port accepts connections
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline and started[0].poll() is None, "the Ray head did not start"
            time.sleep(0.5)
        started.append(subprocess.Popen([RAY, "start", f"--address={address}", *common], env=env,
                                        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield address, env
    finally:
        for process in reversed(started):
            stop(process)
        shutil.rmtree(temp, ignore_errors=True)


# The driver: a process of its own, as a user's `tuneforge prepare` is (a Ray driver re-initialised in
# a process that ran a local runtime before, as pytest's would be, lost its objects' ownership).
# 16-row chunks, 2 a window: 480 rows are 30 tasks over 15 windows.
DRIVER = """
import json, sys, time
import ray
from services.dataprep import cli, pipeline, ray_engine, tasks

address, argv = sys.argv[1], sys.argv[2:]
ray.init(address=address, log_to_driver=False)
deadline = time.monotonic() + 120
while sum(node["Alive"] for node in ray.nodes()) < 2:
    assert time.monotonic() < deadline, "2 Ray nodes did not join"
    time.sleep(0.5)
ray.shutdown()
tasks.PEEK_VALID, pipeline.CHUNK_ROWS, ray_engine.WINDOW_CHUNKS_PER_CPU = 4, 16, 1
code = cli.main([*argv, "--ray_address", address])
print(json.dumps({"code": code, "workers": dict(ray_engine.LAST_RUN.chunks_by_worker)}))
"""


@pytest.mark.slow  # two Ray nodes start, a driver process connects twice: 45-90 s on the loaded 2-core box
def test_prepare_on_a_two_node_cluster_spreads_the_work_and_writes_the_local_bytes(tmp_path, cluster):
    address, env = cluster
    data = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} times {i}?" + " please" * (i % 6)},
                          {"role": "assistant", "content": f"{i} times {i} is {i * i}."}]} for i in range(480)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows) + "not json\n")
    argv = ["--dataset", str(data), "--shard_rows", "100", "--max_length", "128"]

    driver = subprocess.run([sys.executable, "-c", DRIVER, address, *argv, "--output_dir", str(tmp_path / "ray"),
                             "--engine", "ray"], env=env, capture_output=True, text=True, timeout=300)
    assert driver.returncode == 0, driver.stderr[-3000:]
    result = json.loads(driver.stdout.strip().splitlines()[-1])
    per_node = collections.Counter()
    for worker, chunks in result["workers"].items():
        per_node[worker.split(" ")[0]] += chunks
    assert result["code"] == 0 and len(per_node) == 2, result  # both nodes tokenized chunks
    assert sum(per_node.values()) == (481 - 4 + 15) // 16 and min(per_node.values()) >= 1
    local = pipeline.prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "local"), shard_rows=100,
                                           max_length=128))
    assert len(local["shards"]) == 5
    for name in [*(shard["file"] for shard in local["shards"]), "rejects.jsonl"]:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["fingerprint"] == local["fingerprint"] and manifest["rejected_by_reason"] == {"invalid_json": 1}
