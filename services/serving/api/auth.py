"""API-key authentication for /v1: `Authorization: Bearer KEY`, else 401 in OpenAI's shape."""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from services.serving.api.errors import error_body

GUARDED = "/v1"


class ApiKeyMiddleware:
    """Pure ASGI, so streamed responses pass through untouched. /health and /metrics
    stay open for probes and scrapers, as in vLLM."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        # Compare digests in constant time: the key's length and prefix do not leak.
        self._digest = hashlib.sha256(api_key.encode()).digest()

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    return hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), self._digest)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope.get("method") == "OPTIONS"
                or not scope["path"].startswith(GUARDED) or self._authorized(scope)):
            await self.app(scope, receive, send)
            return
        body = json.dumps(error_body(401, "Incorrect or missing API key: pass `Authorization: Bearer <api_key>`.")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
