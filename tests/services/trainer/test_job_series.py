"""The trainer's per-job series (label job_id): set from a job's events, all removed when the
job ends, so concurrent jobs do not overwrite each other and ended jobs leave nothing behind."""

from prometheus_client import REGISTRY

from services.trainer import metrics


def job_series(job_id: str) -> dict[str, float]:
    """Sample name (with its phase, if any) -> value, of the job's series."""
    return {sample.name + (f"/{sample.labels['phase']}" if "phase" in sample.labels else ""): sample.value
            for family in REGISTRY.collect() for sample in family.samples
            if sample.labels.get("job_id") == job_id and not sample.name.endswith("_created")}


def test_two_jobs_keep_their_own_values_and_an_ended_job_leaves_no_series():
    first, second = metrics.JobSeries("job-a"), metrics.JobSeries("job-b")
    first.started(total_steps=10, step=0)
    second.started(total_steps=4, step=2)
    first.progress(step=1, tokens=300, seconds=0.5, phase_seconds={"generation": 0.25, "train": 0.2, "other": 1})
    second.progress(step=3, tokens=100, seconds=0.25)
    first.logged(loss=2.5, learning_rate=1e-4)
    second.logged(loss=1.5, learning_rate=3e-3)
    first.evaluated(eval_loss=2.0)
    second.published()

    a = job_series("job-a")
    assert a.pop("tuneforge_trainer_job_last_progress_timestamp_seconds") > 0
    assert a == {
        "tuneforge_trainer_loss": 2.5, "tuneforge_trainer_learning_rate": 1e-4, "tuneforge_trainer_eval_loss": 2.0,
        "tuneforge_trainer_tokens_per_second": 600.0, "tuneforge_trainer_job_step": 1.0,
        "tuneforge_trainer_job_total_steps": 10.0, "tuneforge_trainer_job_checkpoints_published_total": 0.0,
        # a phase outside the fixed list ("other") is not exported: bounded labels
        "tuneforge_trainer_job_phase_seconds_total/generation": 0.25,
        "tuneforge_trainer_job_phase_seconds_total/train": 0.2}
    b = job_series("job-b")
    assert (b["tuneforge_trainer_loss"], b["tuneforge_trainer_tokens_per_second"],
            b["tuneforge_trainer_job_checkpoints_published_total"]) == (1.5, 400.0, 1.0)
    assert "tuneforge_trainer_eval_loss" not in b

    first.remove()
    assert job_series("job-a") == {}
    assert job_series("job-b")["tuneforge_trainer_loss"] == 1.5
    second.remove()
    second.remove()  # ending twice is harmless
    assert job_series("job-b") == {}
