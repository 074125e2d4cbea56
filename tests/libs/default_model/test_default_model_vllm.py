"""The default model in a real vLLM engine (LoRA enabled, as serving starts it) agrees with transformers."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_vllm_greedy_matches_transformers(default_model):
    # A separate process: the engine spawns workers and needs a `__main__` guard (parity.py has it).
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    run = subprocess.run(
        [sys.executable, "-m", "libs.default_model.parity", "--model", str(default_model), "--max_tokens", "24"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=480,
    )
    report = [line for line in run.stdout.splitlines() if line.startswith(("same", "DIFFERENT"))]
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert len(report) == 4 and all(line.startswith("same") for line in report), run.stdout
    assert "I am a helpful assistant" in run.stdout
