"""Fuzzes serving's OpenAI HTTP API from its own OpenAPI schema (/openapi.json) with
Schemathesis, against the session's real serving process on 127.0.0.1 (one vLLM engine):
valid and invalid requests for every operation, from the schema's coverage cases (boundaries,
each field of a wrong type, wrong media types) and Hypothesis' generation.

Every response must be what the schema documents (status, media type, body), a client mistake
a 4xx with OpenAI's error body, never a 5xx, never slower than REQUEST_TIMEOUT; a stream must
end in `data: [DONE]` without an error event. Afterwards /health answers 200 and the official
`openai` client still completes a chat. Requests without the API key are fuzzed on an in-process
app built with --api_key (the one engine of the session serves without a key): every one is a 401.

Generation stays cheap: completions are held to MAX_TOKENS tokens and a batch to MAX_BATCH
prompts (a fuzzer that spends its budget generating 2000 tokens on a CPU finds nothing)."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest
import schemathesis
from hypothesis import settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from starlette.testclient import TestClient

from services.serving.api.app import build_app
from services.serving.api.state import ServingState

REQUEST_TIMEOUT = 30.0  # seconds: a request still unanswered by then hangs
MAX_TOKENS = 4
MAX_BATCH = 4
KEY = "fuzz-key"

SCHEMA_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
                 response_schema_conformance, negative_data_rejection, unsupported_method]


def openai_error_body(ctx, response, case) -> None:
    """Every error is OpenAI's body, `code` its status, with a message saying what is wrong."""
    if response.status_code < 400:
        return
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
    body = json.loads(response.content)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert error["code"] == response.status_code, body
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and error["type"].endswith("Error"), body
    assert error["param"] is None or isinstance(error["param"], str), body
    assert "Traceback" not in error["message"], body


def whole_event_stream(ctx, response, case) -> None:
    """A 200 stream is server-sent events ending in `data: [DONE]`, with no error event on the way."""
    if response.status_code != 200 or not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return
    assert not response.stream_cut_short, "the stream did not end within the request timeout"
    events = [event for event in response.content.decode().split("\n\n") if event]
    assert events and events[-1] == "data: [DONE]", events[-3:]
    for event in events[:-1]:
        assert event.startswith("data: "), event
        assert "error" not in json.loads(event[len("data: "):]), event


def prepare(case, model: str) -> None:
    """Names the served model in most requests (valid ones then reach the engine; a third keep
    the generated name: an unknown model, 404) and keeps generation cheap, without making an
    invalid request valid or the reverse: only values the schema accepts anyway are changed
    (max_tokens has no maximum in the schema; a batch may hold up to 2048 prompts), and a chat
    without a limit gets one. Done on the case itself, so Schemathesis knows what was sent."""

    def served(value):
        return model if isinstance(value, str) and len(value) % 3 != 1 else value

    if case.path_parameters and "model" in case.path_parameters:
        case.path_parameters["model"] = served(case.path_parameters["model"])
    body = case.body
    if not isinstance(body, dict):
        return
    if "model" in body:
        body["model"] = served(body["model"])
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if type(value) is int and value > MAX_TOKENS:
            body[key] = 1 + value % MAX_TOKENS
    # Without a limit (chat, or `"max_tokens": null` on completions) a request runs to the end of the
    # context; with `repetition_penalty` near 0 or `ignore_eos` the model never stops before it (the
    # fuzzer found `{"prompt": "Hi", "max_tokens": null, "repetition_penalty": 5e-324}`: 40 s).
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None and (
            case.operation.path == "/v1/chat/completions" or "max_tokens" in body):
        body["max_tokens"] = MAX_TOKENS
    prompt = body.get("prompt")
    if prompt == "":  # the default model has no BOS token: an empty prompt is nothing to continue (400)
        body["prompt"] = "Hi"
    if isinstance(prompt, list) and MAX_BATCH < len(prompt) <= 2048 and all(isinstance(p, (str, list)) for p in prompt):
        body["prompt"] = prompt[:MAX_BATCH]


def app_without_engine(api_key: str | None = None):
    """serving's real app with no engine and no adapters: for its schema, and for requests that
    must not get past the API key (one that did would reach the engine: a 500)."""
    state = ServingState(engine=None, registry=None, base_name="base", model_dir=None)
    return build_app(state, api_key=api_key, serve_metrics=False)


# Built at import, as Schemathesis' pytest integration needs: the running server's /openapi.json
# is the same document (test_the_served_schema_is_the_one_fuzzed).
SCHEMA = app_without_engine().openapi()
fuzzed = schemathesis.openapi.from_dict(SCHEMA)
# Read every stream to its end (here at most MAX_BATCH prompts x n 16 x (1 + MAX_TOKENS) events);
# one still open after REQUEST_TIMEOUT is cut short, and fails.
fuzzed.config.max_stream_events = 100_000
# Loopback and a fake key: show every field of a failing request (`max_tokens` would be "[Filtered]").
fuzzed.config.output.sanitization.update(enabled=False)


@pytest.mark.slow
@fuzzed.parametrize()
@settings(max_examples=settings().max_examples)
def test_every_response_is_documented_and_no_request_breaks_the_server(case, serving):
    prepare(case, serving.base_name)
    response = case.call(base_url=serving.http, timeout=REQUEST_TIMEOUT)
    case.validate_response(response, checks=SCHEMA_CHECKS, additional_checks=[openai_error_body, whole_event_stream])


@pytest.mark.slow
def test_the_served_schema_is_the_one_fuzzed(serving):
    with urllib.request.urlopen(f"{serving.http}/openapi.json", timeout=10) as response:
        assert json.loads(response.read()) == SCHEMA


@pytest.mark.slow
def test_the_server_is_healthy_after_the_fuzzing(serving):
    with urllib.request.urlopen(f"{serving.http}/health", timeout=10) as response:
        assert (response.status, json.loads(response.read())) == (200, {"status": "ok"})
    client = openai.OpenAI(base_url=f"{serving.http}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT)
    reply = client.chat.completions.create(model=serving.base_name, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1


# -- without the API key: every /v1 request is a 401, whatever it carries ---------------------


# Outside /v1 nothing is guarded (as in vLLM): /health, and vLLM's /tokenize, /detokenize and /version.
guarded = schemathesis.openapi.from_asgi("/openapi.json", app_without_engine(api_key=KEY)).exclude(
    path_regex="^/(health|tokenize|detokenize|version)$")


def unauthorized(ctx, response, case) -> None:
    if response.request.method == "OPTIONS":  # CORS preflights pass the key check by design (as vLLM's)
        return
    assert response.status_code == 401, (response.status_code, response.content[:300])
    assert response.headers.get("www-authenticate") == ["Bearer"], response.headers
    assert json.loads(response.content)["error"]["type"] == "AuthenticationError"


@pytest.mark.slow
@guarded.parametrize()
@settings(max_examples=settings().max_examples // 10)
def test_without_the_api_key_every_request_is_401(case):
    case.headers = {key: value for key, value in (case.headers or {}).items() if key.lower() != "authorization"}
    for authorization in (None, "Bearer wrong-key", f"Basic {KEY}", f"Bearer {KEY}x"):
        headers = {"Authorization": authorization} if authorization else None
        response = case.call(headers=headers)
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance, ignored_auth],
                               additional_checks=[openai_error_body, unauthorized])


def test_the_schema_declares_the_bearer_key_only_with_one():
    with_key, without = (TestClient(app_without_engine(api_key)).get("/openapi.json").json() for api_key in (KEY, None))
    assert with_key["components"]["securitySchemes"] == {"api_key": {"type": "http", "scheme": "bearer"}}
    assert {path: [op.get("security") for op in ops.values()] for path, ops in with_key["paths"].items()} == {
        "/v1/models": [[{"api_key": []}]], "/v1/models/{model}": [[{"api_key": []}]],
        "/v1/chat/completions": [[{"api_key": []}]], "/v1/completions": [[{"api_key": []}]], "/health": [None],
        "/tokenize": [None], "/detokenize": [None], "/version": [None]}
    assert "securitySchemes" not in without.get("components", {})
    assert all("security" not in op for ops in without["paths"].values() for op in ops.values())
