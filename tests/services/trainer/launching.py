"""Starting a training job's process the way the trainer service does (services.trainer.worker,
which launches torchrun for several processes) and reading what it reported, for the tests
that train on several processes."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from libs.common import config as cfg

ROOT = pathlib.Path(__file__).resolve().parents[3]


def run_worker(config, where: pathlib.Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts the job's training process exactly as the trainer service does."""
    path = where / f"job-{config.node_rank}.json"
    cfg.save_json(config, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **(env or {})}
    env.pop("RANK", None)
    return subprocess.Popen([sys.executable, "-m", "services.trainer.worker", "--config", str(path)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, list[dict], str]:
    """Waits for the training process (under Bazel's 300 s, so that a hang fails with its stderr)."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"the training process did not end in {timeout:.0f} s; its stderr ends:\n{err[-4000:]}")
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return process.returncode, events, err


def logged(run_dir: pathlib.Path, key: str) -> list[float]:
    """`key` of every logging.jsonl entry that has it (training steps: loss, grad_norm; evals: eval_loss)."""
    entries = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    return [entry[key] for entry in entries if key in entry]
