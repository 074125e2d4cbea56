"""Per-adapter Prometheus metrics of the running serving process (label `adapter`:
the base model and the adapters loaded now, gone on unload), queue gauges, and
vLLM's engine statistics under `tuneforge_serving_engine_*`, build info, and the page passing
`promtool check metrics`."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess
import time
import urllib.request

import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from libs.common.metrics import revision
from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(serving) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serving.http}/v1", api_key="unused", max_retries=0)


def page(serving) -> str:
    with urllib.request.urlopen(f"{serving.http}/metrics", timeout=10) as response:
        return response.read().decode()


def samples(serving) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value."""
    found = {}
    for family in text_string_to_metric_families(page(serving)):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def settled(serving, seconds: float = 30.0) -> dict[tuple, float]:
    """Samples once no request is in flight: a request an earlier test left behind (an
    abandoned stream) records its tokens when it closes, which must not land in a delta."""
    deadline = time.monotonic() + seconds
    found = samples(serving)
    while value(found, "tuneforge_serving_in_flight_requests") and time.monotonic() < deadline:
        time.sleep(0.1)
        found = samples(serving)
    return found


def test_per_adapter_series_count_each_model_and_vanish_on_unload(serving, client, make_lora):
    path = make_lora("metered", rank=8, seed=11)
    with grpc.insecure_channel(serving.grpc) as channel:
        admin = serving_pb2_grpc.AdapterServiceStub(channel)
        admin.LoadAdapter(serving_pb2.LoadAdapterRequest(name="metered", path=str(path)), timeout=60)
        before = settled(serving)
        base = client.completions.create(model=serving.base_name, prompt="Hi", max_tokens=5, temperature=0)
        adapter = [client.completions.create(model="metered", prompt="Hi there", max_tokens=6, temperature=0)
                   for _ in range(2)]
        list(client.chat.completions.create(model="metered", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, stream=True))
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="metered", prompt="x " * 5000, max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="never-loaded", prompt="Hi")
        after = settled(serving)

        def delta(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        assert delta("tuneforge_serving_requests_total", adapter=serving.base_name) == 1
        assert delta("tuneforge_serving_requests_total", adapter="metered") == 4
        assert delta("tuneforge_serving_prompt_tokens_total", adapter=serving.base_name) == base.usage.prompt_tokens
        assert delta("tuneforge_serving_generated_tokens_total", adapter=serving.base_name) == \
            base.usage.completion_tokens
        assert delta("tuneforge_serving_generated_tokens_total", adapter="metered") >= sum(
            r.usage.completion_tokens for r in adapter) + 1
        assert delta("tuneforge_serving_request_errors_total", adapter="metered", code="400") == 1
        # Three answered requests on the adapter; the refused one produced no token.
        assert delta("tuneforge_serving_time_to_first_token_seconds_count", adapter="metered") == 3
        assert delta("tuneforge_serving_request_latency_seconds_count", adapter="metered") == 4
        # every token after an answered request's first is one inter-token observation (whatever the
        # deltas carried: under load the first may bring several)
        assert delta("tuneforge_serving_inter_token_latency_seconds_count", adapter="metered") == \
            delta("tuneforge_serving_generated_tokens_total", adapter="metered") - 3
        assert value(after, "tuneforge_serving_queue_depth_requests") == 0
        assert value(after, "tuneforge_serving_in_flight_requests") == 0
        # An unknown model never becomes a label value.
        assert not any(dict(labels).get("adapter") == "never-loaded" for _, labels in after)

        admin.UnloadAdapter(serving_pb2.UnloadAdapterRequest(name="metered"), timeout=30)
    gone = samples(serving)
    assert not any(dict(labels).get("adapter") == "metered" for _, labels in gone)
    assert value(gone, "tuneforge_serving_requests_total", adapter=serving.base_name) >= 1


def test_metrics_page_with_adapter_series_passes_promtool(serving, client):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    client.completions.create(model=serving.base_name, prompt="Hi", max_tokens=3)
    text = page(serving)
    assert "tuneforge_serving_inter_token_latency_seconds_bucket" in text
    lint = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


def test_engine_statistics_are_exported_under_tuneforge_names(serving, client):
    before = settled(serving)
    answer = client.completions.create(model=serving.base_name, prompt="Hello there", max_tokens=5)
    after = settled(serving)
    generated = value(after, "tuneforge_serving_engine_generation_tokens_total") - value(
        before, "tuneforge_serving_engine_generation_tokens_total")
    assert generated == answer.usage.completion_tokens
    prompt = value(after, "tuneforge_serving_engine_prompt_tokens_total") - value(
        before, "tuneforge_serving_engine_prompt_tokens_total")
    assert prompt == answer.usage.prompt_tokens
    assert value(after, "tuneforge_serving_engine_prefix_cache_queries_total") >= prompt
    # the last batch finished the request: nothing runs or waits, the cache holds at most a prefix
    assert value(after, "tuneforge_serving_engine_running_requests") == 0
    assert value(after, "tuneforge_serving_engine_waiting_requests") == 0
    assert 0 <= value(after, "tuneforge_serving_engine_kv_cache_usage_ratio") < 1
    assert ("tuneforge_serving_engine_preemptions_total", ()) in after
    assert value(after, "tuneforge_serving_max_in_flight_requests") >= 1
    assert value(after, "tuneforge_build_info", python=platform.python_version(), revision=revision(),
                 torch=importlib.metadata.version("torch"), version=importlib.metadata.version("tuneforge")) == 1
    assert ("process_resident_memory_bytes", ()) in after
    assert "vllm:" not in page(serving)  # vLLM's own logger, with promlint-failing names, never ran
