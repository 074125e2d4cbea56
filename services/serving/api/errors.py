"""Errors at the HTTP edge: the one table from typed errors to HTTP statuses, and
OpenAI's error body `{"error": {"message", "type", "param", "code"}}` (vLLM's
shape: `type` is the openai client's exception class, `code` the HTTP status)."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from libs.common import logs
from libs.common.errors import TuneForgeError

LOG = logging.getLogger("tuneforge.serving.http")

STATUS_OF_CODE: dict[grpc.StatusCode, HTTPStatus] = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.FAILED_PRECONDITION: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.OUT_OF_RANGE: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    grpc.StatusCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: HTTPStatus.CONFLICT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
}

# The openai client raises one exception class per status; its name is the error type.
TYPE_OF_STATUS: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error body, as every 4xx and 5xx of this server carries it."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


# What each route documents for its failures (OpenAPI), all in OpenAI's body: a client mistake
# is a 4xx (400 bad input, 401 without the API key, 404 unknown model, 408 body stalled, 413 body
# too large, 415 not JSON, 429 over capacity); 503 while draining or after the engine died.
ERROR_RESPONSES: dict[int | str, dict] = {
    "4XX": {"model": ErrorResponse, "description": "A client mistake, in OpenAI's error body"},
    503: {"model": ErrorResponse, "description": "Draining, or the inference engine has stopped"},
}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    error_type = TYPE_OF_STATUS.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def status_of(exc: TuneForgeError) -> int:
    return STATUS_OF_CODE.get(exc.code, HTTPStatus.INTERNAL_SERVER_ERROR).value


def body_of(exc: TuneForgeError) -> dict:
    return error_body(status_of(exc), exc.message, exc.field)


def sse_error(exc: TuneForgeError) -> str:
    """A failure after a stream has started: the error body as one more event."""
    return f"data: {json.dumps(body_of(exc))}\n\n"


def sse_unexpected(exc: Exception, path: str) -> str:
    """Our own bug after a stream has started: logged with its traceback, sent as a 500 error event."""
    logs.log(LOG, logging.ERROR, "unhandled error in a stream", path=path, error=repr(exc))
    LOG.error("unhandled error in a stream on %s", path, exc_info=exc)
    return f"data: {json.dumps(error_body(500, 'internal server error; see the server log'))}\n\n"


# pydantic names the member of a union an error came from (`content.str`, `content.list[TextPart]`,
# `stop.constrained-str`); clients know fields, not our types.
_UNION_MEMBERS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p != "body" and not (
        isinstance(p, str) and (p in _UNION_MEMBERS or "[" in p or p.startswith("constrained-")))]
    return ".".join(parts) or None


async def _typed(request: Request, exc: TuneForgeError) -> JSONResponse:
    return JSONResponse(body_of(exc), status_code=status_of(exc))


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        # loc is ("body", character offset): a place in the text, not a field
        error = errors[0]
        offset = error.get("loc", ("body", None))[-1]
        detail = (error.get("ctx") or {}).get("error") or error.get("msg", "")
        return error_response(400, f"the request body is not valid JSON: {detail} (character {offset})", None)
    # Report every problem at once, each with its place (`messages.0.role: ...`), bounded in size.
    parts = []
    for error in errors[:10]:
        place = _param(tuple(error.get("loc", ())))
        # pydantic prefixes messages of our own validators with "Value error, ".
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        part = f"{place}: {message}" if place else message
        if part not in parts:
            parts.append(part)
    if len(errors) > 10:
        parts.append(f"... and {len(errors) - 10} more")
    first = _param(tuple(errors[0].get("loc", ()))) if errors else None
    return error_response(400, "; ".join(parts) or "invalid request", first)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(exc.status_code, str(exc.detail), getattr(exc, "param", None)),
                        status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logs.log(LOG, logging.ERROR, "unhandled error", path=request.url.path, error=repr(exc))
    LOG.exception("unhandled error on %s", request.url.path)
    return error_response(500, "internal server error; see the server log")


def install(app: FastAPI) -> None:
    app.add_exception_handler(TuneForgeError, _typed)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
