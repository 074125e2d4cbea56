"""Serving's Prometheus metrics (`tuneforge_serving_*`): HTTP requests, tokens, adapter loads."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Adapter loads on CPU take milliseconds to a second; a slow disk or a big adapter, seconds.
_LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

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
TIME_TO_FIRST_TOKEN = Histogram(
    "tuneforge_serving_time_to_first_token_seconds",
    "Time from a chat completion's arrival to its first generated token.",
)
PROMPT_TOKENS = Counter("tuneforge_serving_prompt_tokens", "Prompt tokens processed.")
GENERATED_TOKENS = Counter("tuneforge_serving_generated_tokens", "Completion tokens generated.")
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
ADAPTERS_READY = Gauge("tuneforge_serving_adapters_ready", "Adapters that requests can use.")
