"""The trainer's job history is bounded: finished jobs beyond --keep_finished_jobs (oldest
first) and those finished more than --finished_job_retention seconds ago are forgotten, with
their publications at the front of the checkpoint feed; their run directories stay. Two real
one-step jobs on a JobManager whose clock the test moves."""

import pathlib

import pytest

from libs.common import checkpoint
from libs.common.errors import NotFound
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.trainer.config import TrainConfig
from services.trainer.jobs import JobManager


def _wait(jobs: JobManager, job_id: str) -> pb.Job:
    for _ in jobs.watch(job_id):
        pass
    return jobs.get(job_id)


@pytest.mark.slow
def test_finished_jobs_are_forgotten_by_count_and_age_their_run_directories_stay(
        prepared_dataset, dataprep_address, tmp_path):
    now = [1000.0]
    jobs = JobManager(max_concurrent_jobs=1, torch_threads=1, keep_finished_jobs=1, finished_job_retention=60,
                      clock=lambda: now[0])
    try:
        ids = []
        for name in ("first", "second"):
            job = jobs.submit(TrainConfig(output_dir=str(tmp_path / name), dataset=prepared_dataset,
                                          dataprep_address=dataprep_address, max_steps=1, adapter_name=name))
            ids.append(job.id)
            assert _wait(jobs, job.id).state == pb.JOB_STATE_SUCCEEDED
            now[0] += 1
        # keep_finished_jobs=1: the first job is forgotten once the second finished
        assert [job.id for job in jobs.list_jobs()] == [ids[1]]
        with pytest.raises(NotFound, match=r"no job .* \(finished jobs are forgotten beyond --keep_finished_jobs"):
            jobs.get(ids[0])
        feed = jobs.watch_checkpoints(is_active=lambda: False)  # the replay, then the end
        assert [(c.job_id, c.adapter_name, c.final) for c in feed] == [(ids[1], "second", True)]
        # the run directories stay
        assert [checkpoint.step_of(p) for p in checkpoint.checkpoints(tmp_path / "first")] == [1]
        now[0] += 59
        assert [job.id for job in jobs.list_jobs()] == [ids[1]]  # 59 s after it finished: remembered
        now[0] += 2
        assert jobs.list_jobs() == []
        assert pathlib.Path(tmp_path / "second" / "checkpoint-1").is_dir()
        # the second job's publication left the feed with it
        assert list(jobs.watch_checkpoints(is_active=lambda: False)) == []
    finally:
        jobs.shutdown()
