"""The trainer service's Prometheus metrics (`tuneforge_trainer_...`), fed from the events
its training processes report. Totals carry no job; the per-job gauges and counters carry a
`job_id` label and are removed when the job ends (`JobSeries`), so cardinality stays bounded by
the jobs running. The label is not `job`: Prometheus gives every scraped series `job` (the
scrape job) and would rename ours `exported_job`."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

STEPS = Counter("tuneforge_trainer_steps", "Optimizer steps taken, all jobs.")
TOKENS = Counter("tuneforge_trainer_tokens", "Input tokens (padding excluded) trained on, all jobs.")
TRAINED_TOKENS = Counter("tuneforge_trainer_trained_tokens", "Tokens with a label (loss computed), all jobs.")
STEP_DURATION = Histogram(
    "tuneforge_trainer_step_duration_seconds", "Wall time of one optimizer step, data wait included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
DATA_WAIT = Histogram(
    "tuneforge_trainer_data_wait_seconds", "Time one optimizer step waited for its rows from dataprep.",
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
CHECKPOINTS = Counter("tuneforge_trainer_checkpoints_published", "Checkpoints published.")
PUBLICATION_FAILURES = Counter(
    "tuneforge_trainer_checkpoint_publication_failures",
    "Checkpoint publications that failed (the job fails with them; earlier checkpoints stay).")
PUBLICATION_DURATION = Histogram(
    "tuneforge_trainer_checkpoint_publication_duration_seconds",
    "Time to build, fsync and rename one checkpoint into place.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
# Online methods (grpo, ...): where each step's time went, and the weight syncs to the generator.
PHASES = ("generation", "reward", "reference", "old_logps", "sync", "train")
PHASE_SECONDS = Counter(
    "tuneforge_trainer_phase_seconds",
    "Seconds the online methods' steps spent per phase (generation, reward, reference, old_logps, sync, train), "
    "all jobs: rate() over all phases is the time split.", ["phase"])
WEIGHT_SYNC_DURATION = Histogram(
    "tuneforge_trainer_weight_sync_duration_seconds",
    "Time to push the policy's weights to its generator (a vLLM engine, the serving service) before a rollout.",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
JOBS = Gauge("tuneforge_trainer_jobs", "Jobs known to this server, by state.", ["state"])
JOBS_FINISHED = Counter("tuneforge_trainer_jobs_finished",
                        "Jobs that ended, by final state (succeeded, failed, cancelled).", ["state"])
for _state in ("succeeded", "failed", "cancelled"):
    JOBS_FINISHED.labels(state=_state)

# -- per job (label job_id; removed when the job ends) ------------------------------------------

LOSS = Gauge("tuneforge_trainer_loss", "Training loss of the job's last logged step.", ["job_id"])
LEARNING_RATE = Gauge("tuneforge_trainer_learning_rate", "Learning rate of the job's last logged step.", ["job_id"])
EVAL_LOSS = Gauge("tuneforge_trainer_eval_loss", "Eval loss (per trained token) of the job's last evaluation.",
                  ["job_id"])
TOKENS_PER_SECOND = Gauge("tuneforge_trainer_tokens_per_second",
                          "Input tokens per second of the job's last optimizer step (its wall time, data wait "
                          "included).", ["job_id"])
JOB_STEP = Gauge("tuneforge_trainer_job_step", "The job's last optimizer step.", ["job_id"])
JOB_TOTAL_STEPS = Gauge("tuneforge_trainer_job_total_steps", "Optimizer steps the job will take.", ["job_id"])
JOB_LAST_PROGRESS = Gauge(
    "tuneforge_trainer_job_last_progress_timestamp_seconds",
    "Unix time of the job's last optimizer step (or of its start, before the first): a stall shows as its age.",
    ["job_id"])
JOB_CHECKPOINTS = Counter("tuneforge_trainer_job_checkpoints_published", "Checkpoints the job published.",
                          ["job_id"])
# The online methods' time split, per job (the phases are a fixed list: bounded labels).
JOB_PHASES = PHASES
JOB_PHASE_SECONDS = Counter(
    "tuneforge_trainer_job_phase_seconds",
    "Seconds the job's online steps spent per phase (generation, reward, reference, old_logps, sync, train).",
    ["job_id", "phase"])
_PER_JOB = (LOSS, LEARNING_RATE, EVAL_LOSS, TOKENS_PER_SECOND, JOB_STEP, JOB_TOTAL_STEPS, JOB_LAST_PROGRESS,
            JOB_CHECKPOINTS)


class JobSeries:
    """One job's series: set while it runs, all removed by `remove` when it ends."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self._phases: set[str] = set()

    def started(self, total_steps: int, step: int) -> None:
        JOB_TOTAL_STEPS.labels(job_id=self.job_id).set(total_steps)
        JOB_STEP.labels(job_id=self.job_id).set(step)
        JOB_LAST_PROGRESS.labels(job_id=self.job_id).set(time.time())
        JOB_CHECKPOINTS.labels(job_id=self.job_id)

    def progress(self, step: int, tokens: int, seconds: float, phase_seconds: dict | None = None) -> None:
        JOB_STEP.labels(job_id=self.job_id).set(step)
        JOB_LAST_PROGRESS.labels(job_id=self.job_id).set(time.time())
        if seconds > 0:
            TOKENS_PER_SECOND.labels(job_id=self.job_id).set(tokens / seconds)
        for phase, value in (phase_seconds or {}).items():
            if phase in JOB_PHASES:
                self._phases.add(phase)
                JOB_PHASE_SECONDS.labels(job_id=self.job_id, phase=phase).inc(value)

    def logged(self, loss: float, learning_rate: float) -> None:
        LOSS.labels(job_id=self.job_id).set(loss)
        LEARNING_RATE.labels(job_id=self.job_id).set(learning_rate)

    def evaluated(self, eval_loss: float) -> None:
        EVAL_LOSS.labels(job_id=self.job_id).set(eval_loss)

    def published(self) -> None:
        JOB_CHECKPOINTS.labels(job_id=self.job_id).inc()

    def remove(self) -> None:
        for metric in _PER_JOB:
            try:
                metric.remove(self.job_id)
            except KeyError:  # the job never set this one
                pass
        for phase in self._phases:
            JOB_PHASE_SECONDS.remove(self.job_id, phase)
        self._phases.clear()

# The methods' own metrics (TRL's names, '/' written '_'), the last logged value per method: the
# names are a fixed list and the method label takes one value per --rlhf_type, so cardinality is
# bounded (services.trainer.methods: each method's `metrics` are among these, tested).
METHOD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                  "logps/rejected", "kl", "log_odds_ratio", "log_odds_chosen", "nll_loss", "accuracy",
                  # grpo's (TRL's GRPOTrainer names)
                  "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                  "completions/clipped_ratio", "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean",
                  # ppo's (TRL 0.x's PPOTrainer names) and gkd's
                  "objective/scores", "objective/kl", "objective/non_score_reward", "objective/rlhf_reward",
                  "loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg", "val/clipfrac_avg",
                  "policy/approxkl_avg", "jsd", "on_policy")
_METHOD_GAUGES = {
    name: Gauge(f"tuneforge_trainer_{name.replace('/', '_')}",
                f"Training metric {name} of the last logged step (eval_ prefixed: of the last evaluation), "
                f"by training method.", ["method"])
    for name in METHOD_METRICS + tuple(f"eval_{name}" for name in METHOD_METRICS)
}


def set_method_metrics(method: str, values) -> None:
    """Sets the gauges of the metrics a method logged (names it does not know are not exported)."""
    for name, value in values.items():
        gauge = _METHOD_GAUGES.get(name)
        if gauge is not None:
            gauge.labels(method=method).set(value)


def observe_phases(seconds: dict[str, float]) -> None:
    """Counts one online step's time split (phases other than PHASES are not exported: bounded labels)."""
    for phase, value in seconds.items():
        if phase in PHASES:
            PHASE_SECONDS.labels(phase=phase).inc(value)
    if "sync" in seconds:
        WEIGHT_SYNC_DURATION.observe(seconds["sync"])
