"""Counts and times every HTTP request by endpoint and status (streams until their last byte)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.serving import metrics

# Label values stay bounded: known endpoints by name, everything else as "other".
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def endpoint_of(path: str) -> str:
    for endpoint in ENDPOINTS:
        if path == endpoint or path.startswith(endpoint + "/"):
            return endpoint
    return "other"


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = endpoint_of(scope["path"])
        started = time.perf_counter()
        status = 500  # what the client sees if the app dies before answering

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            metrics.HTTP_REQUESTS.labels(endpoint=endpoint, code=str(status)).inc()
            metrics.HTTP_DURATION.labels(endpoint=endpoint).observe(time.perf_counter() - started)
