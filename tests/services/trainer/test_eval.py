"""Eval and the run directory through the real trainer service: --split_dataset_ratio holds
rows out (ceil(n r), never trained on), --val_dataset evaluates another prepared dataset, eval
loss lands in logging.jsonl, --save_total_limit keeps the newest N plus the best by eval loss,
and the run directory has loss-curve PNGs and TensorBoard events with every logged number."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from libs.common import checkpoint
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.trainer import checkpointing, client
from cli.train import ProgressBar
from services.trainer.config import TrainConfig

LOGGED_KEYS = {"step", "loss", "learning_rate", "grad_norm", "tokens", "tokens_per_second", "data_wait_seconds"}


def logged(run_dir):
    return [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]


def run(trainer, output_dir, on_event=None, **values) -> pb.Job:
    job = client.wait(trainer.address, client.submit(trainer.address, TrainConfig(output_dir=str(output_dir), **values)),
                      on_event=on_event)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    return job


@pytest.mark.slow
def test_split_eval_logging_images_and_tensorboard(trainer, prepared_dataset, dataprep_address, tmp_path,
                                                   capsys):
    run_dir = tmp_path / "run"
    # 8 rows, 2 held out: 6 train rows in micro-batches of 2 -> 3 steps an epoch, 2 epochs
    watched, bar = [], ProgressBar("sft")

    def on_event(event):
        watched.append(event)
        bar(event)

    run(trainer, run_dir, on_event=on_event, dataset=prepared_dataset, dataprep_address=dataprep_address,
        split_dataset_ratio=0.25, num_train_epochs=2, per_device_train_batch_size=2, eval_steps=2, save_steps=2,
        learning_rate=3e-3, lora_dropout=0.0)
    bar.close()
    entries = logged(run_dir)
    train = [e for e in entries if "loss" in e]
    evals = [e for e in entries if "eval_loss" in e]
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5, 6]
    assert all(LOGGED_KEYS <= e.keys() for e in train)
    assert sum(e["tokens"] for e in train) > 0 and all(e["data_wait_seconds"] >= 0 for e in train)
    assert [e["step"] for e in evals] == [2, 4, 6] and all(e["eval_rows"] == 2 for e in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # training on the 6 rows helps the 2 alike ones
    # WatchJob streams each eval as it happens, and the CLI's progress bar prints it
    streamed = [e.eval for e in watched if e.WhichOneof("event") == "eval"]
    assert [(e.step, e.eval_loss, e.eval_trained_tokens, e.eval_rows) for e in streamed] == [
        (e["step"], e["eval_loss"], e["eval_trained_tokens"], e["eval_rows"]) for e in evals]
    assert "step 6: eval_loss" in capsys.readouterr().err

    for image in ("train_loss.png", "eval_loss.png"):
        assert (run_dir / "images" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(run_dir / "runs"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
            "train/data_wait_seconds", "eval/loss"} <= set(scalars)
    points = events.Scalars("eval/loss")
    assert [s.step for s in points] == [e["step"] for e in evals]
    assert [s.value for s in points] == pytest.approx([e["eval_loss"] for e in evals], rel=1e-6)


@pytest.mark.slow
def test_val_dataset_and_save_total_limit_keeps_newest_and_best(trainer, prepared_dataset, dataprep_address,
                                                                 tmp_path):
    run_dir = tmp_path / "run"
    # a learning rate this high makes the eval loss jump about: the best need not be the newest
    # (test_prune_keeps_the_best_even_when_old pins that case down)
    run(trainer, run_dir, dataset=prepared_dataset, dataprep_address=dataprep_address, val_dataset=prepared_dataset,
        max_steps=5, save_steps=1, save_total_limit=2, learning_rate=0.3, lora_dropout=0.0,
        per_device_train_batch_size=4)
    evals = {e["step"]: e["eval_loss"] for e in logged(run_dir) if "eval_loss" in e}
    assert sorted(evals) == list(range(1, 6))
    best = min(evals, key=evals.get)
    kept = [checkpoint.step_of(p) for p in checkpoint.checkpoints(run_dir)]
    assert kept == sorted({best, 4, 5}), (kept, evals)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no half-removed leftovers
    for step in kept:
        checkpoint.verify(run_dir / f"checkpoint-{step}")


def test_prune_keeps_the_best_even_when_old(tmp_path):
    class Model:
        def save_pretrained(self, directory):
            (directory / "adapter_model.safetensors").write_bytes(b"w")

    run_dir = checkpointing.RunDir(tmp_path / "run", {"save_total_limit": 1})
    for step, eval_loss in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5)):
        run_dir.log({"step": step, "eval_loss": eval_loss})
        run_dir.publish(step, Model(), {"step": step})
    run_dir.close()
    assert [p.name for p in checkpoint.checkpoints(run_dir.path)] == ["checkpoint-2", "checkpoint-4"]
