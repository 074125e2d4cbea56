"""The HTTP edge without an engine: --api_key (401 in OpenAI's shape through the
official client; /health and /metrics stay open), the one table from typed
errors to HTTP statuses, and request metrics. A real FastAPI app with serving's
middlewares and error handlers, driven in-process by Starlette's TestClient."""

from __future__ import annotations

import openai
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.serving.api import errors
from services.serving.api.auth import ApiKeyMiddleware
from services.serving.api.observe import RequestMetricsMiddleware, endpoint_of

KEY = "s3cret-key"
RAISES = {"invalid": InvalidArgument("bad value", field="temperature"), "missing": NotFound("no such thing"),
          "precondition": FailedPrecondition("wrong state"), "busy": ResourceExhausted("queue full"),
          "draining": Unavailable("shutting down")}


def app_with(api_key: str | None) -> FastAPI:
    app = FastAPI()
    errors.install(app)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "base", "object": "model", "created": 0, "owned_by": "tuneforge"}]}

    @app.get("/v1/raise/{kind}")
    def fail(kind: str):
        raise RAISES[kind]

    @app.get("/v1/bug")
    def bug():
        raise RuntimeError("our bug")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(RequestMetricsMiddleware)
    return app


@pytest.fixture(scope="module")
def http() -> TestClient:
    return TestClient(app_with(KEY), raise_server_exceptions=False)


def client(http: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


@pytest.mark.parametrize("key", ["wrong", KEY + "x", KEY[:-1]])
def test_a_wrong_key_is_401_in_openai_shape(http, key):
    with pytest.raises(openai.AuthenticationError) as info:
        client(http, key).models.list()
    assert info.value.status_code == 401
    body = info.value.response.json()
    assert body["error"]["type"] == "AuthenticationError"
    assert body["error"]["code"] == 401
    assert "API key" in body["error"]["message"]


def test_a_missing_key_is_401():
    response = TestClient(app_with(KEY)).get("/v1/models")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "AuthenticationError"


def test_the_right_key_passes_and_probes_stay_open(http):
    assert [m.id for m in client(http, KEY).models.list().data] == ["base"]
    assert http.get("/health").status_code == 200
    assert http.get("/v1/models", headers={"Authorization": "Basic " + KEY}).status_code == 401


def test_without_api_key_nothing_is_guarded():
    assert TestClient(app_with(None)).get("/v1/models").status_code == 200


@pytest.mark.parametrize("kind, status, error_type, param", [
    ("invalid", 400, "BadRequestError", "temperature"),
    ("missing", 404, "NotFoundError", None),
    ("precondition", 400, "BadRequestError", None),
    ("busy", 429, "RateLimitError", None),
    ("draining", 503, "ServiceUnavailableError", None),
])
def test_typed_errors_map_to_http_statuses(http, kind, status, error_type, param):
    response = http.get(f"/v1/raise/{kind}", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status
    assert response.json() == {"error": {"message": RAISES[kind].message, "type": error_type, "param": param,
                                         "code": status}}


def test_our_bugs_are_500_without_a_traceback_and_unknown_routes_404(http):
    bug = http.get("/v1/bug", headers={"Authorization": f"Bearer {KEY}"})
    assert bug.status_code == 500
    assert bug.json()["error"]["type"] == "InternalServerError"
    assert "Traceback" not in bug.text and "our bug" not in bug.text
    lost = http.get("/nowhere")
    assert lost.status_code == 404 and lost.json()["error"]["type"] == "NotFoundError"


def test_request_metrics_label_bounded_endpoints():
    from prometheus_client import REGISTRY

    def count(endpoint, code):
        return REGISTRY.get_sample_value("tuneforge_serving_http_requests_total",
                                         {"endpoint": endpoint, "code": code}) or 0.0

    before = count("/v1/models", "401"), count("other", "404")
    http = TestClient(app_with(KEY))
    http.get("/v1/models")
    http.get("/v1/anything/else/123", headers={"Authorization": f"Bearer {KEY}"})
    assert (count("/v1/models", "401"), count("other", "404")) == (before[0] + 1, before[1] + 1)
    assert endpoint_of("/v1/models/some/adapter") == "/v1/models"
    assert endpoint_of("/v1/chat/completions") == "/v1/chat/completions"
    assert endpoint_of("/v1/chat/completionsX") == "other"
