"""Admission control without an engine: serving's real HTTP app with a real adapter
registry and a bound on requests in flight; over it, both completion endpoints
answer 429 in OpenAI's shape (the openai client's RateLimitError), and capacity
comes back when a request ends. Requests never reach the engine here."""

from __future__ import annotations

import openai
import pytest
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from libs.common.errors import ResourceExhausted
from services.serving.adapters import AdapterRegistry
from services.serving.admission import Admission
from services.serving.api.app import build_app
from services.serving.api.state import ServingState


@pytest.fixture()
def full(tmp_path):
    admission = Admission(limit=1)
    registry = AdapterRegistry(None, tmp_path, "base-429", max_lora_rank=16)
    state = ServingState(engine=None, registry=registry, base_name="base-429", model_dir=tmp_path,
                         admission=admission)
    http = TestClient(build_app(state), raise_server_exceptions=False)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http, max_retries=0)
    ticket = admission.admit()  # the one request the server has room for
    return admission, ticket, client


def _errors_429() -> float:
    return REGISTRY.get_sample_value("tuneforge_serving_request_errors_total",
                                     {"adapter": "base-429", "code": "429"}) or 0.0


def test_over_capacity_is_429_in_openai_shape_on_both_endpoints(full):
    admission, ticket, client = full
    errors_before = _errors_429()
    with pytest.raises(openai.RateLimitError) as chat:
        client.chat.completions.create(model="base-429", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as text:
        client.completions.create(model="base-429", prompt="hi", stream=True)
    for info in (chat, text):
        error = info.value.response.json()["error"]
        assert info.value.status_code == 429
        assert error["type"] == "RateLimitError" and error["code"] == 429
        assert "over capacity" in error["message"]
    assert admission.in_flight == 1  # refused requests hold nothing
    assert _errors_429() == errors_before + 2
    # An unknown model is 404 before admission: it tells the client something it can fix.
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")


def test_capacity_returns_when_a_request_ends(full):
    admission, ticket, _ = full
    with pytest.raises(ResourceExhausted):
        admission.admit()
    ticket.release()
    ticket.release()  # idempotent: a double release does not free a second slot
    assert admission.in_flight == 0
    second = admission.admit()
    with pytest.raises(ResourceExhausted):
        admission.admit()
    second.release()
