"""Assembles the HTTP app: the endpoint routers, OpenAI error bodies, API-key
authentication, request metrics, (optionally) Prometheus /metrics, and the OpenAPI
schema at /openapi.json (what the HTTP fuzzer generates requests from)."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.responses import Response

from services.serving.api import errors, openapi
from services.serving.api.auth import GUARDED, ApiKeyMiddleware
from services.serving.api.chat_completions.router import router as chat_completions
from services.serving.api.chat_completions.schema import ChatCompletionChunk
from services.serving.api.completions.router import router as completions
from services.serving.api.completions.schema import Completion
from services.serving.api.health.router import router as health
from services.serving.api.models.router import router as models
from services.serving.api.observe import RequestMetricsMiddleware
from services.serving.api.state import ServingState
from services.serving.api.tokenize.router import router as tokenize
from services.serving.api.version.router import router as version


def build_app(state: ServingState, api_key: str | None = None, serve_metrics: bool = True) -> FastAPI:
    app = FastAPI(title="TuneForge serving", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.serving = state
    errors.install(app)
    openapi.install(app, streams={"/v1/chat/completions": ChatCompletionChunk, "/v1/completions": Completion},
                    bearer_prefix=GUARDED if api_key else None)
    for router in (models, chat_completions, completions, tokenize, version, health):
        app.include_router(router)
    if serve_metrics:
        # A plain route, not a mounted app: a mount answers /metrics with a redirect to /metrics/.
        @app.get("/metrics", include_in_schema=False)
        def prometheus_metrics() -> Response:
            return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    # Added last, so it runs first: 401s are counted too.
    app.add_middleware(RequestMetricsMiddleware)
    return app

