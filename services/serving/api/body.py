"""Reading a request body: a JSON object sent as application/json, parsed strictly (UTF-8, no
NaN or Infinity, no duplicate keys, no lone surrogates, bounded size and nesting: RFC 8259's
interoperable subset, I-JSON), else a 4xx in OpenAI's shape that says what is wrong and where.

Python's json module takes more than that (NaN, `1e400` as infinity, the last of duplicate keys,
"\\ud800"), and what it takes the tokenizer or the JSON encoder of the answer then fails on: a 500."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

# Far above any request the engine could serve (a full context is a few MB of text); a body this
# large is refused before it is read, instead of costing memory and a minute of tokenizing.
MAX_BODY_BYTES = 32 * 1024 * 1024
# A client that stops sending in the middle of its body (slowloris) holds a connection and a
# task; after this many seconds without a byte of it, it gets a 408 and the connection closes.
BODY_IDLE_TIMEOUT = 30.0
# OpenAI's bodies nest a handful of levels (a tool's JSON schema a few more); the limit keeps
# every later walk over the body (validation, the chat template) far from Python's recursion limit.
MAX_DEPTH = 64

# No parameter takes a number this long (seeds are 64-bit, token ids and lengths smaller).
MAX_DIGITS = 100

_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


class BodyError(HTTPException):
    """A body that is not a JSON object this server can read (rendered by errors._http)."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.param = param


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _number(text: str) -> float | int:
    """A JSON number with a fraction or exponent. Infinite (`1e400`) is refused; an integral one
    (`2.0`, `1e3`) is an integer, as JSON Schema counts it: `"n": 2.0` is two choices."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return int(value) if value.is_integer() else value


def _integer(text: str) -> int:
    # Python's own limit (4300 digits) fails with a message about sys.set_int_max_str_digits.
    if len(text) > MAX_DIGITS:
        raise ValueError(f"the number {text[:20]}... has {len(text)} digits; at most {MAX_DIGITS} are accepted")
    return int(text)


def _object(pairs: list[tuple[str, Any]]) -> dict:
    found: dict = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"duplicate key {json.dumps(key)} in an object")
        found[key] = value
    return found


def _place(path: list) -> str:
    return ".".join(str(p) for p in path)


def check_shape(value: Any) -> None:
    """Walks the parsed body (iteratively: it may be deep): bounded nesting, no lone surrogates
    in keys or strings. BodyError naming the place."""
    stack: list[tuple[Any, list]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise BodyError(400, f"the request body nests deeper than {MAX_DEPTH} levels (at "
                                 f"{_place(path[:3])}...)", _place(path[:1]) or None)
        if isinstance(item, str):
            if match := _SURROGATE.search(item):
                raise BodyError(400, f"{_place(path) or 'body'}: contains the lone surrogate "
                                     f"\\u{ord(match.group()):04x} at character {match.start()}; strings "
                                     "must be valid Unicode", _place(path) or None)
        elif isinstance(item, dict):
            for key, child in item.items():
                if match := _SURROGATE.search(key):
                    raise BodyError(400, f"{_place(path) or 'body'}: a key contains the lone surrogate "
                                         f"\\u{ord(match.group()):04x}; keys must be valid Unicode",
                                    _place(path) or None)
                stack.append((child, [*path, key]))
        elif isinstance(item, list):
            stack.extend((child, [*path, index]) for index, child in enumerate(item))


def parse(raw: bytes) -> dict:
    """The body as a dict, or BodyError (400) saying why not."""
    if not raw.strip():
        raise BodyError(400, "the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(400, f"the request body is not valid UTF-8: byte {exc.start} "
                             f"(0x{raw[exc.start]:02x}) {exc.reason}") from exc
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_number, parse_int=_integer,
                           object_pairs_hook=_object)
    except json.JSONDecodeError as exc:
        raise BodyError(400, f"the request body is not valid JSON: {exc.msg} (character {exc.pos})") from exc
    except RecursionError as exc:
        raise BodyError(400, f"the request body nests deeper than {MAX_DEPTH} levels") from exc
    except ValueError as exc:  # our hooks, and Python's limit on the digits of an integer
        raise BodyError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise BodyError(400, f"the request body must be a JSON object; got {_JSON_TYPES[type(value)]}")
    check_shape(value)
    return value


class JsonRequest(Request):
    """A Request whose body is bounded in size and in the wait for each of its parts, and whose
    `json()` is `parse`."""

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            declared = self.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                raise BodyError(413, f"the request body is {declared} bytes; at most {MAX_BODY_BYTES} are accepted")
            chunks, size, stream = [], 0, self.stream()
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(stream, None), BODY_IDLE_TIMEOUT)
                except TimeoutError:
                    # The rest of the body may still come: the connection cannot carry another request.
                    raise BodyError(408, f"no part of the request body arrived for {BODY_IDLE_TIMEOUT:g} s "
                                         f"({size} bytes came before)", headers={"Connection": "close"}) from None
                except ClientDisconnect:  # nobody reads the answer; it is counted, not logged as our bug
                    raise BodyError(400, f"the client went away after {size} bytes of the body") from None
                if chunk is None:
                    break
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise BodyError(413, f"the request body is over {MAX_BODY_BYTES} bytes, the most accepted")
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse(await self.body())
        return self._json


class JsonRoute(APIRoute):
    """Routes whose body is a JSON object: anything else sent as the body is a 415 (not JSON)
    or a 400 (`parse`) before FastAPI's validation sees it."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            request = JsonRequest(request.scope, request.receive)
            content_type = request.headers.get("content-type")
            if not is_json(content_type):
                raise BodyError(415, "the request body must be JSON, sent with `Content-Type: application/json`; "
                                     f"got {f'`{content_type}`' if content_type else 'no Content-Type'}")
            await request.json()
            return await handler(request)

        return handle
