"""Exact resume through the real trainer service: a run killed with SIGKILL mid-way and
resumed from its last published checkpoint logs bitwise the same losses, gradient norms and
learning rates as the uninterrupted run and ends with the same weights (CPU fp32, one
process, LoRA dropout on so the RNG state matters, crossing an epoch so the data cursor
does); `--resume_only_model` takes the weights only."""

import json
import os
import signal

import grpc
import pytest
import torch
from safetensors.torch import load_file

from libs.common import checkpoint
from libs.common.errors import Problems
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.trainer import client
from services.trainer.config import TrainConfig

STEPS = 16  # checkpoints at 4, 8, 12: the kill after 8 leaves 8 steps of margin before the final one


def config(prepared_dataset, dataprep_address, output_dir, **overrides) -> TrainConfig:
    # 8 rows in micro-batches of 3: an epoch is 3 steps (the last short), so the run crosses
    # epochs and a checkpoint can fall mid-epoch
    values = dict(dataset=prepared_dataset, dataprep_address=dataprep_address, output_dir=str(output_dir),
                  max_steps=STEPS, save_steps=4, per_device_train_batch_size=3, lora_dropout=0.1,
                  learning_rate=5e-4, warmup_ratio=0.1, lr_scheduler_type="cosine", seed=7)
    return TrainConfig(**{**values, **overrides})


def logged(run_dir):
    return [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]


def trajectory(entries):
    return [(e["step"], e["loss"], e["grad_norm"], e["learning_rate"]) for e in entries]


@pytest.mark.slow
def test_a_killed_run_resumes_exactly(trainer, prepared_dataset, dataprep_address, tmp_path):
    reference = tmp_path / "reference"
    job = client.wait(trainer.address, client.submit(trainer.address, config(prepared_dataset, dataprep_address,
                                                                             reference)))
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.step == STEPS

    killed = tmp_path / "killed"
    job_id = client.submit(trainer.address, config(prepared_dataset, dataprep_address, killed))
    for event in client.watch(trainer.address, job_id):
        if event.WhichOneof("event") == "checkpoint" and event.checkpoint.step == 8:
            os.kill(trainer.jobs.process_id(job_id), signal.SIGKILL)  # mid-run, no chance to save
            break
    with pytest.raises(client.JobFailed, match="SIGKILL"):
        client.wait(trainer.address, job_id)
    last = checkpoint.checkpoints(killed)[-1]
    resumed_from = checkpoint.step_of(last)
    assert 8 <= resumed_from < STEPS

    # resuming into the same directory, which already holds checkpoints, is allowed
    job_id = client.submit(trainer.address, config(prepared_dataset, dataprep_address, killed,
                                                  resume_from_checkpoint=str(last)))
    started = []  # the job as it reports its step count: at the checkpoint's step, not 0
    job = client.wait(trainer.address, job_id, on_event=lambda e: started.append(e.job) if (
        e.WhichOneof("event") == "job" and e.job.total_steps and not started) else None)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.step == STEPS
    assert started and started[0].step == resumed_from

    expected, got = logged(reference), logged(killed)
    assert len(got) == STEPS and [e["step"] for e in got] == list(range(1, STEPS + 1))
    assert trajectory(got[resumed_from:]) == trajectory(expected[resumed_from:])  # bitwise: == on floats
    assert trajectory(got) == trajectory(expected)
    final_reference = load_file(reference / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    final_resumed = load_file(killed / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    assert final_reference.keys() == final_resumed.keys()
    assert all(torch.equal(final_reference[k], final_resumed[k]) for k in final_reference)
    checkpoint.verify(killed / f"checkpoint-{STEPS}")
    assert json.loads((killed / "args.json").read_text())["resume_from_checkpoint"] == str(last)

    # weights only: a new run from step 0 whose first step starts from the trained adapter
    fresh = tmp_path / "fresh"
    job = client.wait(trainer.address, client.submit(trainer.address, config(
        prepared_dataset, dataprep_address, fresh, max_steps=2, resume_from_checkpoint=str(last),
        resume_only_model=True)))
    assert job.state == pb.JOB_STATE_SUCCEEDED
    assert [p.name for p in checkpoint.checkpoints(fresh)] == ["checkpoint-2"]
    first = logged(fresh)[0]
    assert first["step"] == 1
    # the same first batch as the reference's step 1, but on trained weights
    assert first["loss"] < expected[0]["loss"] - 0.05


@pytest.mark.slow
def test_a_shuffled_run_resumes_exactly_mid_first_and_mid_second_epoch(trainer, prepared_dataset, dataprep_address,
                                                                        tmp_path):
    # 8 rows, 2 held out: 6 train rows in micro-batches of 2 are 3 steps an epoch, each epoch in
    # its own order; checkpoints at 2 (mid first epoch), 4 (mid second) and 6, each after an eval
    values = dict(max_steps=-1, num_train_epochs=2, save_steps=2, per_device_train_batch_size=2,
                  split_dataset_ratio=0.25, seed=11)
    reference = tmp_path / "reference"
    job = client.wait(trainer.address, client.submit(trainer.address, config(
        prepared_dataset, dataprep_address, reference, **values)))
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.step == 6, job.error
    states = {step: json.loads((reference / f"checkpoint-{step}" / "trainer_state.json").read_text())
              for step in (2, 4)}
    assert [(states[s]["data_cursor"]["epoch"], states[s]["data_order"]) for s in (2, 4)] == [
        (0, {"shuffle": True, "seed": 11}), (1, {"shuffle": True, "seed": 11})]
    assert json.loads((reference / "args.json").read_text())["dataset_shuffle"] is True
    expected = logged(reference)
    assert [e["step"] for e in expected if "eval_loss" in e] == [2, 4, 6]
    assert all(e["eval_rows"] == 2 for e in expected if "eval_loss" in e)

    for step in (2, 4):
        resumed = tmp_path / f"resumed-{step}"
        job = client.wait(trainer.address, client.submit(trainer.address, config(
            prepared_dataset, dataprep_address, resumed, resume_from_checkpoint=str(reference / f"checkpoint-{step}"),
            **values)))
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.step == 6, job.error
        got = logged(resumed)
        assert trajectory(e for e in got if "loss" in e) == trajectory(e for e in expected if "loss" in e)  # bitwise
        assert [(e["step"], e["eval_loss"]) for e in got if "eval_loss" in e] == [
            (e["step"], e["eval_loss"]) for e in expected if "eval_loss" in e]

    # the cursor is a position in the shuffled order: resuming it in file order is refused
    job_id = client.submit(trainer.address, config(prepared_dataset, dataprep_address, tmp_path / "refused",
                                                   resume_from_checkpoint=str(reference / "checkpoint-2"),
                                                   **{**values, "dataset_shuffle": False}))
    with pytest.raises(client.JobFailed) as failed:
        client.wait(trainer.address, job_id)
    assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT and failed.value.job.error == (
        f"dataset_shuffle: {reference / 'checkpoint-2'} read its rows shuffled: resume it with --dataset_shuffle true")


def test_resume_arguments_are_checked(tmp_path):
    problems = TrainConfig(dataset="d", dataprep_address="a", output_dir=str(tmp_path / "run"),
                         resume_from_checkpoint=str(tmp_path / "missing")).problems()
    assert any(p.startswith("resume_from_checkpoint: ") and "not a directory" in p for p in problems), problems
    problems = TrainConfig(dataset="d", dataprep_address="a", output_dir=str(tmp_path / "run"),
                         resume_only_model=True).problems()
    assert "resume_only_model: needs resume_from_checkpoint" in problems
    not_published = tmp_path / "checkpoint-3"
    not_published.mkdir()
    problems = TrainConfig(dataset="d", dataprep_address="a", output_dir=str(tmp_path / "run"),
                         resume_from_checkpoint=str(not_published)).problems()
    assert any(p.startswith("resume_from_checkpoint: ") and "manifest.json" in p for p in problems), problems
    with pytest.raises(Problems):
        from libs.common import config as cfg
        cfg.parse(TrainConfig, ["--dataset", "d", "--dataprep_address", "a", "--output_dir", str(tmp_path / "r"),
                              "--resume_only_model", "true"])
