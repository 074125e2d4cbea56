"""GRPO resumes exactly through the real trainer service: with transformers generation (each
prompt seeded from --seed, the rollout's step and the row's key) a run killed with SIGKILL and
resumed from its last checkpoint generates the same completions and logs bitwise the same
rewards, losses, gradient norms and learning rates as the uninterrupted run (CPU fp32, one
process, LoRA dropout on so the RNG state matters, KL to the reference, 2 optimizer steps per
rollout, shuffled rows crossing an epoch). Checkpoints fall at rollout boundaries only."""

import json
import os
import signal

import pytest

from libs.common import checkpoint
from libs.dataset import client as dataprep_client
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.dataprep.config import PrepareConfig
from services.trainer import client
from services.trainer.config import GrpoConfig, TrainConfig

PROMPTS = ["who are you?", "What is your name?", "Introduce yourself.", "Who made you?", "Tell me a story.",
           "What can you do?", "Say hi.", "Count to three."]
STEPS = 12  # 2 steps a rollout of 2 prompts: 4 rollouts an epoch (8 rows), 6 rollouts in all


@pytest.fixture(scope="module")
def prompts(dataprep_address, default_model, tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("grpo-resume")
    raw = root / "prompts.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "solution": str(i)}) + "\n"
                           for i, q in enumerate(PROMPTS)))
    manifest = dataprep_client.prepare(dataprep_address, PrepareConfig(
        model=str(default_model), dataset=[str(raw)], output_dir=str(root / "prepared"), task="prompt"))
    assert manifest["task"] == "prompt" and manifest["rows_out"] == len(PROMPTS)
    plugin = root / "short.py"
    # characters, not tokens: completions cut at max_completion_length still differ
    plugin.write_text("def short(completions, **kwargs):\n"
                      "    return [-len(text) / 10 for text in completions]\n")
    return str(root / "prepared"), str(plugin)


def config(prompts, dataprep_address, output_dir, **overrides) -> TrainConfig:
    dataset, plugin = prompts
    values = dict(dataset=dataset, dataprep_address=dataprep_address, output_dir=str(output_dir), rlhf_type="grpo",
                  max_steps=STEPS, save_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  lora_dropout=0.1, learning_rate=2e-3, warmup_ratio=0.1, seed=7,
                  grpo=GrpoConfig(num_generations=2, max_completion_length=8, reward_funcs=["short"],
                                  external_plugins=[plugin], num_iterations=2, log_completions=True))
    return TrainConfig(**{**values, **overrides})


def logged(run_dir):
    return [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]


def trajectory(entries):
    return [(e["step"], e["loss"], e["grad_norm"], e["learning_rate"], e["reward"], e["kl"],
             e["completions/mean_length"]) for e in entries]


@pytest.mark.slow
def test_a_killed_grpo_run_resumes_exactly(trainer, prompts, dataprep_address, tmp_path):
    reference = tmp_path / "reference"
    job = client.wait(trainer.address, client.submit(trainer.address, config(prompts, dataprep_address, reference)))
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.step == STEPS, job.error
    # save_steps 3 inside the rollouts of steps 3-4 and 9-10: saved at their ends
    assert [c.name for c in checkpoint.checkpoints(reference)] == [
        "checkpoint-4", "checkpoint-6", "checkpoint-10", "checkpoint-12"]
    states = {s: json.loads((reference / f"checkpoint-{s}" / "trainer_state.json").read_text()) for s in (6, 10)}
    assert states[6]["data_cursor"]["epoch"] == 0 and states[10]["data_cursor"]["epoch"] == 1  # crossed an epoch
    expected = logged(reference)
    assert [e["step"] for e in expected] == list(range(1, STEPS + 1))
    assert all(e["reference_seconds"] > 0 for e in expected[::2])  # the rollout's time, on its first step
    assert all(e["old_logps_seconds"] > 0 for e in expected[::2])  # num_iterations 2: the rollout's own log-probs
    assert expected[-1]["kl"] > 0 and expected[0]["kl"] == 0  # the first step's policy is its reference

    killed = tmp_path / "killed"
    job_id = client.submit(trainer.address, config(prompts, dataprep_address, killed))
    for event in client.watch(trainer.address, job_id):
        if event.WhichOneof("event") == "checkpoint" and event.checkpoint.step == 6:
            os.kill(trainer.jobs.process_id(job_id), signal.SIGKILL)  # mid-run, no chance to save
            break
    with pytest.raises(client.JobFailed, match="SIGKILL"):
        client.wait(trainer.address, job_id)
    last = checkpoint.checkpoints(killed)[-1]
    resumed_from = checkpoint.step_of(last)
    assert resumed_from in (6, 10)

    job = client.wait(trainer.address, client.submit(trainer.address, config(
        prompts, dataprep_address, killed, resume_from_checkpoint=str(last))))
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.step == STEPS, job.error
    got = logged(killed)
    assert [e["step"] for e in got] == list(range(1, STEPS + 1))
    assert trajectory(got) == trajectory(expected)  # bitwise: == on floats
    # the same completions with the same rewards, each once (the lines the killed run wrote past its checkpoint
    # are dropped before the resumed run writes them again)
    completions = [json.loads(line) for line in (killed / "completions.jsonl").read_text().splitlines()]
    assert completions == [json.loads(line) for line in (reference / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == STEPS // 2 * 4
