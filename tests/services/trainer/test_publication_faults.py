"""Faults during a checkpoint publication, on real training jobs (the default model, LoRA,
reading the self-cognition rows from the real dataprep gRPC service):

- the disk fills while checkpoint-4 is written (a file-size limit, RLIMIT_FSIZE, put on the
  training process when it starts publishing): the job fails with RESOURCE_EXHAUSTED naming
  the checkpoint, nothing of it is left, and checkpoint-2 verifies and resumes to the end;
- the trainer service gets SIGKILL while checkpoint-4 is half-built: its training process
  dies with it, the half-built directory is hidden from every reader, and a restarted
  service resumes from checkpoint-2, clearing it.

"During" is made exact by the test-only fault points (libs.common.faults): the training
process stops itself (SIGSTOP) there and reports its pid."""

from __future__ import annotations

import json
import os
import pathlib
import resource
import signal
import threading
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from cli.main import report as cli_report
from cli.stack import Stack
from libs.common import checkpoint, faults
from libs.common.errors import status_code
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.trainer import client
from services.trainer.config import TrainConfig

pytestmark = pytest.mark.slow

STEPS = 6  # checkpoints at 2, 4 and 6; the fault is at the second publication


def config(prepared_dataset, dataprep_address, output_dir, **overrides) -> TrainConfig:
    values = dict(dataset=prepared_dataset, dataprep_address=dataprep_address, output_dir=str(output_dir),
                  max_steps=STEPS, save_steps=2, per_device_train_batch_size=3, learning_rate=5e-4, seed=7)
    return TrainConfig(**{**values, **overrides})


def within(seconds: float, fn, *args):
    """fn(*args), failing the test if it has not returned after `seconds`."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} did not return within {seconds:.0f} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def process_state(pid: int) -> str | None:
    """The state letter of a process (R, S, T stopped, Z zombie, ...); None once it is gone."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def wait_until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {seconds:.0f} s"
        time.sleep(0.1)


@pytest.fixture
def stopped():
    """stopped(report, point) -> the pid of the process that reached `point` and stopped itself
    there; one left behind by a failing test is killed afterwards."""
    pids: list[int] = []

    def wait(report: pathlib.Path, point: str) -> int:
        pid = stopped_at_fault(report, point)
        pids.append(pid)
        return pid

    yield wait
    for pid in pids:
        if process_state(pid) not in (None, "Z"):
            os.kill(pid, signal.SIGKILL)


def stopped_at_fault(report: pathlib.Path, point: str, seconds: float = 240) -> int:
    wait_until(lambda: report.is_file() and report.read_text().endswith("\n"), seconds, f"no process reached {point}")
    (line,) = report.read_text().splitlines()
    hit = json.loads(line)
    assert hit["point"] == point
    wait_until(lambda: process_state(hit["pid"]) == "T", 30, f"process {hit['pid']} did not stop at {point}")
    return hit["pid"]


def hidden(run: pathlib.Path) -> list[str]:
    return sorted(p.name for p in run.rglob(".*"))


def assert_resumes_to_the_end(address: str, run: pathlib.Path, prepared_dataset, dataprep_address) -> None:
    last = checkpoint.checkpoints(run)[-1]
    job = within(300, client.wait, address, client.submit(address, config(
        prepared_dataset, dataprep_address, run, resume_from_checkpoint=str(last))))
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.step == STEPS
    assert [p.name for p in checkpoint.checkpoints(run)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for published in checkpoint.checkpoints(run):
        checkpoint.verify(published)
    logged = [json.loads(line)["step"] for line in (run / "logging.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1))
    assert hidden(run) == []  # no temporary file or directory anywhere in the run


def test_a_full_disk_fails_the_publication_and_the_previous_checkpoint_resumes(
        trainer, prepared_dataset, dataprep_address, tmp_path, monkeypatch, capsys, stopped):
    run, report = tmp_path / "run", tmp_path / "faults.jsonl"
    monkeypatch.setenv(faults.ENV, "trainer.publish#2=stop")  # read by the training process the job starts
    monkeypatch.setenv(faults.REPORT_ENV, str(report))
    counted = (REGISTRY.get_sample_value("tuneforge_trainer_checkpoint_publication_failures_total"),
               REGISTRY.get_sample_value("tuneforge_trainer_jobs_finished_total", {"state": "failed"}))
    job_id = client.submit(trainer.address, config(prepared_dataset, dataprep_address, run))
    worker = stopped(report, "trainer.publish")
    monkeypatch.delenv(faults.ENV)

    # Room for the loss curves and the small files, not for the adapter's weights.
    weights = (run / "checkpoint-2" / "adapter_model.safetensors").stat().st_size
    limit = weights // 2
    assert max(p.stat().st_size for p in (run / "images").iterdir()) < limit
    resource.prlimit(worker, resource.RLIMIT_FSIZE, (limit, resource.prlimit(worker, resource.RLIMIT_FSIZE)[1]))
    os.kill(worker, signal.SIGCONT)

    with pytest.raises(client.JobFailed) as failed:
        within(120, client.wait, trainer.address, job_id)
    job = failed.value.job
    assert job.error == f"output_dir: no space to write {run}/checkpoint-4: File too large (EFBIG); nothing was published"
    assert job.error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert status_code(failed.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert job.last_checkpoint == str(run / "checkpoint-2") and job.step == 4
    # what the CheckpointPublicationFailing and TrainingJobFailed alerts count
    assert (REGISTRY.get_sample_value("tuneforge_trainer_checkpoint_publication_failures_total") - counted[0],
            REGISTRY.get_sample_value("tuneforge_trainer_jobs_finished_total", {"state": "failed"}) - counted[1]) == (1, 1)
    capsys.readouterr()  # what the in-process services logged so far (JSON lines, once a test set up logging)
    cli_report("sft", failed.value)  # what `tuneforge sft` prints for it
    assert capsys.readouterr().err == f"tuneforge sft: error: job: training job {job_id} failed: {job.error}\n"

    assert checkpoint.checkpoints(run) == [run / "checkpoint-2"]
    checkpoint.verify(run / "checkpoint-2")
    assert hidden(run) == []  # the half-written checkpoint-4 is gone, and every temporary file
    assert_resumes_to_the_end(trainer.address, run, prepared_dataset, dataprep_address)


def test_a_trainer_killed_during_a_publication_leaves_nothing_to_resume_from_but_the_previous(
        prepared_dataset, dataprep_address, tmp_path, stopped):
    run, report = tmp_path / "run", tmp_path / "faults.jsonl"
    flags = ["--metrics_port", "0", "--torch_threads", "1", "--grace_period", "5"]
    with Stack(tmp_path / "logs", env={faults.ENV: "checkpoint.built#2=stop", faults.REPORT_ENV: str(report)}) as stack:
        service = stack.start("trainer", flags)
        client.submit(service.grpc_address, config(prepared_dataset, dataprep_address, run))
        worker = stopped(report, "checkpoint.built")
        os.kill(service.popen.pid, signal.SIGKILL)
        assert service.popen.wait(timeout=30) == -signal.SIGKILL
        # its training process dies with it (PR_SET_PDEATHSIG), though stopped and in its own session
        wait_until(lambda: process_state(worker) in (None, "Z"), 30, f"training process {worker} outlived its service")

    (half,) = run.glob(".tmp-checkpoint-4-*")
    assert (half / "adapter_model.safetensors").is_file() and not (half / checkpoint.MANIFEST).exists()
    assert checkpoint.checkpoints(run) == [run / "checkpoint-2"]
    assert checkpoint.resolve_adapter_dir(run) == run / "checkpoint-2"  # what serving would load
    checkpoint.verify(run / "checkpoint-2")
    problems = config(prepared_dataset, dataprep_address, run, resume_from_checkpoint=str(half)).problems()
    assert f"resume_from_checkpoint: {half} has no manifest.json" in problems

    with Stack(tmp_path / "logs-restarted") as stack:
        service = stack.start("trainer", flags)
        assert_resumes_to_the_end(service.grpc_address, run, prepared_dataset, dataprep_address)
        assert stack.stop() == {"trainer": 0}
