"""Exact resume on packed streaming data: a run over packed rows (prepared with --packing
--streaming by the real dataprep service; the trainer reads every dataset as a stream over
ReadShards and resumes from the saved stream cursor, nothing re-read and skipped) killed with SIGKILL after a checkpoint and resumed from it logs bitwise the
same losses, gradient norms and learning rates as the uninterrupted run (CPU fp32, one
process, dropout on, crossing an epoch)."""

import json
import os
import signal

import pytest
from safetensors.torch import load_file

from libs.common import checkpoint
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from libs.dataset import client as dataprep_client
from services.dataprep.config import PrepareConfig
from services.trainer import client
from services.trainer.config import TrainConfig

STEPS = 6
ANSWERS = ["Yes.", "I am Ada.", "I am Ada, an assistant.", "Bo made me, a long time ago, in a lab far away.",
           "No.", "Ada is my name and I help with questions.", "Hi!", "I am an assistant.", "Maybe.", "Bo."]


@pytest.fixture(scope="module")
def packed_dataset(dataprep_address, default_model, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("packed")
    raw = root / "rows.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                                    {"role": "assistant", "content": answer}]}) + "\n"
                           for i, answer in enumerate(ANSWERS)))
    manifest = dataprep_client.prepare(dataprep_address, PrepareConfig(
        model=str(default_model), dataset=[str(raw)], output_dir=str(root / "prepared"), packing=True, max_length=80,
        streaming=True))
    assert manifest["packing"]["samples"] == len(ANSWERS) and manifest["packing"]["bins"] < len(ANSWERS)
    return str(root / "prepared")


def logged(run_dir):
    return [(e["step"], e["loss"], e["grad_norm"], e["learning_rate"])
            for e in map(json.loads, (run_dir / "logging.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_a_killed_packed_run_resumes_exactly(trainer, packed_dataset, dataprep_address, tmp_path):
    def config(output_dir, **overrides):
        return TrainConfig(dataset=packed_dataset, dataprep_address=dataprep_address, output_dir=str(output_dir),
                         max_steps=STEPS, save_steps=2, per_device_train_batch_size=2, lora_dropout=0.1,
                         learning_rate=1e-3, seed=5, **overrides)

    reference = tmp_path / "reference"
    job = client.wait(trainer.address, client.submit(trainer.address, config(reference)))
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error

    killed = tmp_path / "killed"
    job_id = client.submit(trainer.address, config(killed))
    for event in client.watch(trainer.address, job_id):
        if event.WhichOneof("event") == "checkpoint" and event.checkpoint.step == 2:
            os.kill(trainer.jobs.process_id(job_id), signal.SIGKILL)
            break
    with pytest.raises(client.JobFailed, match="SIGKILL"):
        client.wait(trainer.address, job_id)
    last = checkpoint.checkpoints(killed)[-1]
    assert checkpoint.step_of(last) < STEPS

    job = client.wait(trainer.address, client.submit(trainer.address, config(killed, resume_from_checkpoint=str(last))))
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert logged(killed) == logged(reference)  # bitwise: == on floats
    final = [load_file(run / f"checkpoint-{STEPS}" / "adapter_model.safetensors") for run in (reference, killed)]
    assert final[0].keys() == final[1].keys()
    assert all(final[0][k].equal(final[1][k]) for k in final[0])
