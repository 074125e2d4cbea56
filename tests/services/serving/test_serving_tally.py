"""A request's Tally without an engine: every token after the first is one inter-token
observation under its model's label, whatever the deltas carry, and a model unloaded while
its request still streams never gets its series back."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY

from services.serving import metrics
from services.serving.admission import Admission
from services.serving.api.generation import Tally


def _count(name: str, model: str) -> float | None:
    return REGISTRY.get_sample_value(f"tuneforge_serving_{name}_count", {"adapter": model})


def test_every_token_after_the_first_is_one_inter_token_observation():
    metrics.MODELS.add("tally-counted")
    tally = Tally("tally-counted", time.perf_counter(), Admission(limit=4).admit())
    for delta in ([7, 8, 9], [10], [], [11, 12]):  # the first delta may bring several tokens
        tally.add(delta)
    tally.record()
    assert _count("time_to_first_token_seconds", "tally-counted") == 1
    assert _count("inter_token_latency_seconds", "tally-counted") == 5
    assert REGISTRY.get_sample_value("tuneforge_serving_generated_tokens_total",
                                     {"adapter": "tally-counted"}) == 6
    metrics.MODELS.remove("tally-counted")


def test_a_model_unloaded_mid_request_gets_no_series_back():
    metrics.MODELS.add("tally-unloaded")
    tally = Tally("tally-unloaded", time.perf_counter(), Admission(limit=4).admit())
    tally.add([1])
    tally.add([2])
    assert _count("inter_token_latency_seconds", "tally-unloaded") == 1
    metrics.MODELS.remove("tally-unloaded")
    tally.add([3, 4])
    tally.record()
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "request_latency_seconds"):
        assert _count(name, "tally-unloaded") is None
    assert REGISTRY.get_sample_value("tuneforge_serving_generated_tokens_total", {"adapter": "tally-unloaded"}) is None
