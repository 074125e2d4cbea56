"""GRPO on 2 CPU processes (gloo), launched as the trainer service launches a job, under DDP and
DeepSpeed ZeRO-2 (LoRA): with transformers generation the 2 processes generate the same
completions, log the same rewards and the same losses as one process with the same global batch.

Same global batch: 8 completions a step, 4 per prompt: one process x micro-batch 8 reads 2
prompts a rollout; 2 ranks x micro-batch 4 read one each (row j of an epoch's order goes to rank
j % 2, so the step's prompts are the same). Each rank generates its prompts' whole groups (seeded
by prompt, not by rank); --scale_rewards batch all-reduces the step's reward statistics, so the
advantages are the one process's. Tolerances as test_distributed_rlhf.py: the loss within 1e-5
absolute, the gradient norm within 5e-4 relative; the rewards, lengths and completions exactly.
Measured here: max |loss diff| 3.7e-9 under both, grad norm 5.8e-7 (DDP) and 5.0e-7 (ZeRO-2)
relative; about 40 s each at load 6 on 2 cores (ZeRO-2 once took 130 s at heavier load).
"""

from __future__ import annotations

import json
import time

import pytest

from libs.dataset import client as dataprep_client
from services.dataprep.config import PrepareConfig
from services.trainer import training
from services.trainer.config import GrpoConfig, TrainConfig
from tests.services.trainer.launching import finish, logged, run_worker

STEPS = 5
LOSS_TOLERANCE = 1e-5
GRAD_NORM_TOLERANCE = 5e-4
PROMPTS = ["who are you?", "What is your name?", "Introduce yourself.", "Who made you?", "Tell me a story.",
           "What can you do?"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts(dataprep_address, default_model, tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("grpo-dist")
    raw = root / "prompts.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in PROMPTS))
    manifest = dataprep_client.prepare(dataprep_address, PrepareConfig(
        model=str(default_model), dataset=[str(raw)], output_dir=str(root / "prepared"), task="prompt"))
    assert manifest["rows_out"] == len(PROMPTS)
    plugin = root / "short.py"
    plugin.write_text("def short(completions, **kwargs):\n    return [-len(text) / 10 for text in completions]\n")
    return str(root / "prepared"), str(plugin)


def job(prompts, dataprep_address, output_dir, **overrides) -> TrainConfig:
    dataset, plugin = prompts
    values = dict(dataset=dataset, dataprep_address=dataprep_address, output_dir=str(output_dir), rlhf_type="grpo",
                  max_steps=STEPS, save_steps=STEPS, per_device_train_batch_size=8, lora_dropout=0.0,
                  learning_rate=2e-3, seed=7, ddp_timeout=120,
                  grpo=GrpoConfig(num_generations=4, max_completion_length=8, reward_funcs=["short"],
                                  external_plugins=[plugin], scale_rewards="batch", log_completions=True))
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def single(prompts, dataprep_address, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    training.train(job(prompts, dataprep_address, out), lambda *a, **k: None)
    return out


def completions(run_dir) -> list[tuple]:
    return [(c["step"], c["prompt"], c["completion"], c["reward"])
            for c in map(json.loads, (run_dir / "completions.jsonl").read_text().splitlines())]


@pytest.mark.slow
@pytest.mark.parametrize("backend", [{}, {"deepspeed": "zero2"}], ids=["ddp", "zero2"])
def test_two_processes_match_one(backend, single, prompts, dataprep_address, tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    code, events, err = finish(run_worker(job(prompts, dataprep_address, out, nproc_per_node=2,
                                              per_device_train_batch_size=4, **backend), tmp_path))
    assert code == 0, err[-3000:]
    seconds = time.monotonic() - started
    assert completions(out) == completions(single)  # the same prompts, completions and rewards, in the same order
    assert logged(out, "reward") == logged(single, "reward")
    assert logged(out, "completions/mean_length") == logged(single, "completions/mean_length")
    losses, expected = logged(out, "loss"), logged(single, "loss")
    assert len(losses) == STEPS
    loss_diff = max(abs(a - b) for a, b in zip(losses, expected))
    norms = max(abs(a - b) / b for a, b in zip(logged(out, "grad_norm"), logged(single, "grad_norm")))
    print(f"grpo {backend or 'ddp'}: {seconds:.1f} s; over {STEPS} steps max |loss - single-process loss| = "
          f"{loss_diff:.2e}, grad norm relative {norms:.2e}")
    assert loss_diff <= LOSS_TOLERANCE and norms <= GRAD_NORM_TOLERANCE
    assert len(set(logged(out, "reward"))) > 1  # the rewards differ between steps: something was compared
