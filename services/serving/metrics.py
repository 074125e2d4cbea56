"""Serving's Prometheus metrics (`tuneforge_serving_*`): HTTP requests, per-adapter
traffic (label `adapter`, bounded by the models loaded), queue depth, adapter loads, and the
vLLM engine's own statistics (`tuneforge_serving_engine_*`, fed by services.serving.engine_stats)."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

# Adapter loads on CPU take milliseconds to a second; a slow disk or a big adapter, seconds.
_LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Per-token gaps: sub-millisecond on a GPU, tens of milliseconds on a busy CPU.
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# The parts of a hot-load: a millisecond each when all is well, seconds when one grew.
_PART_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

HTTP_REQUESTS = Counter(
    "tuneforge_serving_http_requests",
    "HTTP requests answered, by endpoint and status code.",
    ["endpoint", "code"],
)
HTTP_DURATION = Histogram(
    "tuneforge_serving_http_request_duration_seconds",
    "Time from an HTTP request's arrival to its last byte (the whole stream for SSE).",
    ["endpoint"],
)

# -- per model (the base model's served name, or an adapter's name) ---------------------------

REQUESTS = Counter(
    "tuneforge_serving_requests", "Completion requests admitted, by model (base or adapter).", ["adapter"])
REQUEST_ERRORS = Counter(
    "tuneforge_serving_request_errors",
    "Completion requests that failed after naming a served model, by model and HTTP status code.",
    ["adapter", "code"])
PROMPT_TOKENS = Counter("tuneforge_serving_prompt_tokens", "Prompt tokens processed, by model.", ["adapter"])
GENERATED_TOKENS = Counter("tuneforge_serving_generated_tokens", "Completion tokens generated, by model.", ["adapter"])
TIME_TO_FIRST_TOKEN = Histogram(
    "tuneforge_serving_time_to_first_token_seconds",
    "Time from a completion request's arrival to its first generated token, by model.",
    ["adapter"], buckets=_REQUEST_BUCKETS)
INTER_TOKEN_LATENCY = Histogram(
    "tuneforge_serving_inter_token_latency_seconds",
    "Time between consecutive generated tokens of one request, by model.",
    ["adapter"], buckets=_TOKEN_BUCKETS)
REQUEST_LATENCY = Histogram(
    "tuneforge_serving_request_latency_seconds",
    "Time from a completion request's arrival to its last token (end to end), by model.",
    ["adapter"], buckets=_REQUEST_BUCKETS)
_PER_MODEL = (REQUESTS, PROMPT_TOKENS, GENERATED_TOKENS, TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, REQUEST_LATENCY)

QUEUE_DEPTH = Gauge(
    "tuneforge_serving_queue_depth_requests",
    "Completion requests admitted and waiting for their first token (queued in the engine).")
IN_FLIGHT = Gauge(
    "tuneforge_serving_in_flight_requests",
    "Completion requests admitted and not yet finished (the bound --max_concurrent_requests applies to this).")
MAX_IN_FLIGHT = Gauge(
    "tuneforge_serving_max_in_flight_requests",
    "Completion requests admitted at most at once (--max_concurrent_requests); more get HTTP 429.")

# Bounded: one value per check of services.serving.adapters' _check_adapter.
REFUSAL_REASONS = ("integrity", "no_base_model", "base_model", "rank", "modules_to_save", "resized_vocabulary")
ADAPTER_REFUSALS = Counter(
    "tuneforge_serving_adapter_refusals",
    "Adapters refused before reaching the engine, by reason (integrity: a file's sha256 differs; no_base_model; "
    "base_model: trained on another; rank: above --max_lora_rank; modules_to_save and resized_vocabulary: "
    "servable only merged, with `tuneforge export --merge_lora true`).",
    ["reason"],
)
for _reason in REFUSAL_REASONS:
    ADAPTER_REFUSALS.labels(reason=_reason)
ADAPTER_LOADS = Counter(
    "tuneforge_serving_adapter_loads",
    "Adapter load attempts, by result (ok, refused: failed validation, failed: the engine could not load it).",
    ["result"],
)
ADAPTER_LOAD_DURATION = Histogram(
    "tuneforge_serving_adapter_load_duration_seconds",
    "Time to validate and load an adapter into the engine, until it serves requests.",
    buckets=_LOAD_BUCKETS,
)
# A trainer publication's way to traffic, part by part (docs/serving.md "Hot-loading"):
# delivery (publication -> the load starts: the event's trip and any wait behind another
# load; followed publications only), verification (the files against the manifest, the
# base model, the rank), registration (the engine's hold on the files and vLLM's add_lora),
# first_request (a one-token request on the new version before traffic switches to it).
LOAD_PARTS = ("delivery", "verification", "registration", "first_request")
ADAPTER_LOAD_PARTS = Histogram(
    "tuneforge_serving_adapter_load_part_seconds",
    "Time of each part of an adapter's (hot-)load: delivery, verification, registration, first_request.",
    ["part"], buckets=_PART_BUCKETS)
for _part in LOAD_PARTS:
    ADAPTER_LOAD_PARTS.labels(part=_part)
ADAPTERS_READY = Gauge("tuneforge_serving_adapters_ready", "Adapters that requests can use.")

# -- the vLLM engine's statistics (its scheduler's and each output batch's) ----------------------

ENGINE_RUNNING = Gauge("tuneforge_serving_engine_running_requests", "Requests the engine's scheduler is running.")
ENGINE_WAITING = Gauge("tuneforge_serving_engine_waiting_requests",
                       "Requests waiting in the engine's scheduler (deferred ones included).")
ENGINE_KV_CACHE_USAGE = Gauge("tuneforge_serving_engine_kv_cache_usage_ratio",
                              "Fraction of the engine's KV-cache blocks in use (1 = full).")
ENGINE_PREEMPTIONS = Counter("tuneforge_serving_engine_preemptions",
                             "Requests the engine preempted (KV cache full: their blocks freed, recomputed later).")
ENGINE_PROMPT_TOKENS = Counter("tuneforge_serving_engine_prompt_tokens",
                               "Prompt tokens the engine prefilled (prefix-cache hits included).")
ENGINE_GENERATION_TOKENS = Counter("tuneforge_serving_engine_generation_tokens", "Tokens the engine generated.")
ENGINE_PREFIX_CACHE_QUERIES = Counter("tuneforge_serving_engine_prefix_cache_queries",
                                      "Prompt tokens looked up in the engine's prefix cache.")
ENGINE_PREFIX_CACHE_HITS = Counter("tuneforge_serving_engine_prefix_cache_hits",
                                   "Prompt tokens found in the engine's prefix cache.")


class ModelLabels:
    """Which `adapter` label values may exist: the base model and the adapters loaded now.
    A request that outlives its adapter's unload records nothing, so an unloaded
    adapter's series, once removed, never come back."""

    def __init__(self):
        self._live: set[str] = set()
        self._codes: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self._live.add(name)

    def remove(self, name: str) -> None:
        """Forgets `name` and drops every series labelled with it."""
        with self._lock:
            if name not in self._live:
                return
            self._live.discard(name)
            for metric in _PER_MODEL:
                try:
                    metric.remove(name)
                except KeyError:  # no request ever touched this series
                    pass
            for code in self._codes.pop(name, ()):
                REQUEST_ERRORS.remove(name, code)

    def child(self, metric, name: str):
        """`metric`'s series for `name`, or None once `name` is unloaded."""
        with self._lock:
            return metric.labels(adapter=name) if name in self._live else None

    def error(self, name: str, status: int) -> None:
        with self._lock:
            if name not in self._live:
                return
            self._codes.setdefault(name, set()).add(str(status))
            REQUEST_ERRORS.labels(adapter=name, code=str(status)).inc()


MODELS = ModelLabels()
