"""The trainer service's Prometheus metrics (`tuneforge_trainer_...`), fed from the events
its training processes report. Labels are bounded: no job ids."""

from __future__ import annotations

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
LOSS = Gauge("tuneforge_trainer_loss", "Training loss of the last logged step.")
LEARNING_RATE = Gauge("tuneforge_trainer_learning_rate", "Learning rate of the last logged step.")
EVAL_LOSS = Gauge("tuneforge_trainer_eval_loss", "Eval loss (per trained token) of the last evaluation.")
CHECKPOINTS = Counter("tuneforge_trainer_checkpoints_published", "Checkpoints published.")
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
