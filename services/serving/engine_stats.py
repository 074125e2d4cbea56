"""vLLM's engine statistics as TuneForge metrics: a stat logger that the engine calls with its
scheduler's and each output batch's stats, writing them to the `tuneforge_serving_engine_*`
metrics. Imports vLLM: load it only where the engine starts."""

from __future__ import annotations

from vllm.v1.metrics.loggers import PrometheusStatLogger

from services.serving import metrics


class EngineStatLogger(PrometheusStatLogger):
    """Takes the place of vLLM's Prometheus logger. vLLM 0.32's StatLoggerManager adds its own
    PrometheusStatLogger unless a custom logger is one (an isinstance check), and that one
    registers a few hundred `vllm:` series on the default registry (colon names fail promlint)
    and observes dozens of histograms per engine step. So this subclasses it without running
    its __init__ and overrides every method the manager calls: nothing of vLLM's runs, nothing
    `vllm:` is registered (tested: the serving page has no `vllm:` line and passes promtool)."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None):  # noqa: super() on purpose not called
        self.engine_indexes = engine_indexes or [0]

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if scheduler_stats is not None:
            metrics.ENGINE_RUNNING.set(scheduler_stats.num_running_reqs)
            metrics.ENGINE_WAITING.set(scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs)
            metrics.ENGINE_KV_CACHE_USAGE.set(scheduler_stats.kv_cache_usage)
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:
                metrics.ENGINE_PREFIX_CACHE_QUERIES.inc(prefix.queries)
                metrics.ENGINE_PREFIX_CACHE_HITS.inc(prefix.hits)
        if iteration_stats is not None:
            metrics.ENGINE_PREEMPTIONS.inc(iteration_stats.num_preempted_reqs)
            metrics.ENGINE_PROMPT_TOKENS.inc(iteration_stats.prompt_token_stats.total)
            metrics.ENGINE_GENERATION_TOKENS.inc(iteration_stats.num_generation_tokens)

    def record_admission_rejection(self, reason: str) -> None:
        pass  # serving admits requests itself (services.serving.admission counts its 429s)

    def record_sleep_state(self, sleep: int = 0, level: int = 0):
        pass

    def log_engine_initialized(self):
        pass

    def log_metrics_info(self, type, config_obj):
        pass

    def log(self):
        pass
