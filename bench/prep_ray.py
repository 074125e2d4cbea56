"""Rows/s of `tuneforge prepare --engine ray` against the local engine at the same core
count: Ray on one node of 1 CPU vs --num_proc 1, Ray on two nodes of 1 CPU each (two
`ray start` processes on this machine, a real cluster on loopback) vs --num_proc 2. Same
synthetic multi-turn rows as bench/dataprep_throughput.py, end to end (read, tokenize,
mask, write shards and manifest) into fresh output directories; checks the shards are the
same bytes. Ray's fixed cost (start-up or connection, Dataset planning) is measured apart
on a small input and stated.

    PYTHONPATH=$PWD .venv/bin/python bench/prep_ray.py [--rows 8000] [--repeats 1]

Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from bench.dataprep_throughput import synthetic_rows
from services.dataprep.config import PrepareConfig
from services.dataprep.pipeline import prepare

RAY = str(pathlib.Path(sys.executable).with_name("ray"))


class Cluster:
    """`nodes` Ray nodes of 1 CPU on loopback, each a `ray start --block` process group of ours."""

    def __init__(self, nodes: int):
        self.temp = tempfile.mkdtemp(prefix="tfrayb")
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--block", "--disable-usage-stats"]
        self.processes = [subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                                            f"--temp-dir={self.temp}", *common], env=self.env,
                                           start_new_session=True, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)]
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            time.sleep(0.5)
        for _ in range(nodes - 1):
            self.processes.append(subprocess.Popen([RAY, "start", f"--address={self.address}", *common],
                                                   env=self.env, start_new_session=True,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        os.environ["RAY_AUTH_MODE"] = "disabled"
        import ray

        ray.init(address=self.address, log_to_driver=False)
        while sum(node["Alive"] for node in ray.nodes()) < nodes:
            time.sleep(0.5)
        ray.shutdown()

    def stop(self) -> None:
        for process in reversed(self.processes):
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


def timed(data: pathlib.Path, out: pathlib.Path, **args) -> tuple[float, dict]:
    start = time.perf_counter()
    manifest = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(out), shard_rows=1000, max_length=4096,
                                     **args))
    return time.perf_counter() - start, manifest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=1)
    options = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="prep_ray"))
    data, small = work / "train.jsonl", work / "small.jsonl"
    rows = synthetic_rows(options.rows)
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    small.write_text("".join(json.dumps(row) + "\n" for row in rows[:300]))  # 256 read ahead by the driver, one chunk on Ray
    runs = 0

    def run(data_file, **args) -> tuple[float, dict]:
        nonlocal runs
        runs += 1
        return timed(data_file, work / f"out{runs}", **args)

    def medians(data_file, local_args: dict, ray_args: dict) -> tuple[float, dict, float, dict]:
        """The local and the Ray engine on the same file, alternating which goes first each repeat."""
        local_times, ray_times, local, ours = [], [], None, None
        for repeat in range(options.repeats):
            for engine in (("local", "ray") if repeat % 2 == 0 else ("ray", "local")):
                if engine == "local":
                    seconds, local = run(data_file, **local_args)
                    local_times.append(seconds)
                else:
                    seconds, ours = run(data_file, **ray_args)
                    ray_times.append(seconds)
        return statistics.median(local_times), local, statistics.median(ray_times), ours

    print(f"{options.rows} rows, {os.cpu_count()} CPUs; seconds end to end, median of {options.repeats} "
          "(the engines alternate which goes first)")
    print("case, baseline, ours, baseline_rows_per_s, ours_rows_per_s, ratio, ray_fixed_cost_s")
    for nodes in (1, 2):
        cluster = Cluster(nodes)
        try:
            ray_args = {"engine": "ray", "ray_address": cluster.address}
            small_local_s, _, fixed_s, _ = medians(small, {"num_proc": nodes}, ray_args)
            local_s, local, ray_s, ours = medians(data, {"num_proc": nodes}, ray_args)
        finally:
            cluster.stop()
        assert [s["sha256"] for s in ours["shards"]] == [s["sha256"] for s in local["shards"]]
        print(f"{nodes} node(s) x 1 CPU, local --num_proc {nodes}, ray, {options.rows / local_s:.0f}, "
              f"{options.rows / ray_s:.0f}, {local_s / ray_s:.2f}, {fixed_s - small_local_s:.1f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
