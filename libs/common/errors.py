"""Typed errors raised inside services, and the one table mapping them to gRPC codes.

Every edge (gRPC, HTTP, CLI) turns these into its own form; nothing else
decides a status code.
"""

from __future__ import annotations

import errno as errnos
import functools
import inspect
import os

import grpc


class TuneForgeError(Exception):
    """A problem the caller can act on. `field` names the argument or data place."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(TuneForgeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TuneForgeError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(TuneForgeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(TuneForgeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DiskFull(ResourceExhausted):
    """Writing `path` failed for want of room: the file system is full (ENOSPC), a disk quota
    is spent (EDQUOT), or the file would pass a size limit (EFBIG: the file system's, or the
    process's RLIMIT_FSIZE). Raised where the write happens (libs.common.disk.writing)."""

    def __init__(self, path, errno: int, field: str | None = None, context: str = ""):
        message = f"no space to write {path}: {os.strerror(errno)} ({errnos.errorcode.get(errno, errno)})"
        super().__init__(message + (f"; {context}" if context else ""), field=field)
        self.path = str(path)
        self.errno = errno


class Unavailable(TuneForgeError):
    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(TuneForgeError):
    code = grpc.StatusCode.CANCELLED


class Unauthenticated(TuneForgeError):
    """A call without the key the server requires (libs.common.auth), or with a wrong one."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Problems(InvalidArgument):
    """Several invalid arguments, reported at once."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def status_code(exc: BaseException) -> grpc.StatusCode:
    return exc.code if isinstance(exc, TuneForgeError) else grpc.StatusCode.INTERNAL


# The status message travels percent-encoded in the grpc-message trailer, and a client drops a
# trailer block above 16 KiB (refusing some from 8 KiB): the call then fails RESOURCE_EXHAUSTED
# "Stream removed" instead of the real code and field. An error echoing a huge argument back
# would lose itself, so the message is cut to fit well below that.
MAX_DETAILS_BYTES = 4096


def details(exc: TuneForgeError, limit: int = MAX_DETAILS_BYTES) -> str:
    """The status message of `exc`: "field: message", cut so its encoded size stays under `limit`."""
    text = str(exc)
    if _encoded_size(text) <= limit:
        return text
    suffix = " ... ({} more characters)"
    budget = limit - len(suffix) - 12
    kept, used = [], 0
    for char in text:
        size = _encoded_size(char)
        if used + size > budget:
            break
        kept.append(char)
        used += size
    return "".join(kept) + suffix.format(len(text) - len(kept))


def _encoded_size(text: str) -> int:
    # grpc-message percent-encodes every byte outside printable ASCII, and '%' itself
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in text.encode("utf-8", "surrogatepass"))


def grpc_errors(method):
    """Decorates a servicer method (sync, async, or streaming) so that a TuneForgeError
    aborts the RPC with its status code and message instead of surfacing as UNKNOWN."""

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def agen(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except TuneForgeError as exc:
                await context.abort(exc.code, details(exc))

        return agen
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def coro(self, request, context):
            try:
                return await method(self, request, context)
            except TuneForgeError as exc:
                await context.abort(exc.code, details(exc))

        return coro
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def gen(self, request, context):
            try:
                yield from method(self, request, context)
            except TuneForgeError as exc:
                context.abort(exc.code, details(exc))

        return gen

    @functools.wraps(method)
    def plain(self, request, context):
        try:
            return method(self, request, context)
        except TuneForgeError as exc:
            context.abort(exc.code, details(exc))

    return plain


# gRPC status code -> the typed error a client raises for it (the inverse of `code`).
_BY_STATUS: dict[grpc.StatusCode, type[TuneForgeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def code_from_number(number: int) -> grpc.StatusCode:
    """The status code of a google.rpc.Code number (UNKNOWN for one that is none)."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def from_status(code: grpc.StatusCode | int, message: str) -> TuneForgeError:
    """The typed error for a status code (enum or google.rpc.Code number)."""
    if isinstance(code, int):
        code = code_from_number(code)
    return _BY_STATUS.get(code, TuneForgeError)(message)


def from_rpc_error(error: grpc.RpcError, service: str, address: str) -> TuneForgeError:
    """Turns a failed call into its typed error; unreachable peers are named."""
    code, details = error.code(), error.details() or error.code().name
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        details = f"{service} service at {address}: {details}"
    return from_status(code, details)
