"""Bearer keys on gRPC, as OpenAI clients send them over HTTP: a server interceptor that
refuses calls without `authorization: Bearer KEY` metadata (UNAUTHENTICATED), and the
client interceptor that adds it. Health checking and reflection stay open, so probes and
grpcurl's listing work without the key."""

from __future__ import annotations

import hmac
from typing import Iterable

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

HEADER = "authorization"
# Services every caller may use: load balancers and orchestrators probe health without secrets.
OPEN_SERVICES = frozenset({health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME,
                           "grpc.reflection.v1.ServerReflection"})


def service_of(method: str) -> str:
    """`/pkg.Service/Method` -> `pkg.Service`."""
    return method.lstrip("/").partition("/")[0]


def _presented(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    for name, value in metadata or ():
        if name == HEADER:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            return token.strip().encode() if scheme.lower() == "bearer" else b""
    return None


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the refused method's own kind that aborts before reading the request."""

    def abort(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(abort, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class BearerKeyInterceptor(grpc.ServerInterceptor):
    """Admits a call to a protected service only with one of `keys` as its bearer token
    (compared in constant time); every other service of the server stays open.
    `protected` None protects every service but health and reflection."""

    def __init__(self, keys: Iterable[str], protected: Iterable[str] | None = None, flag: str = "--api_key"):
        self.keys = [key.encode() for key in keys if key]
        if not self.keys:
            raise ValueError("BearerKeyInterceptor needs at least one key")
        self.protected = None if protected is None else frozenset(protected)
        self.flag = flag

    def _guards(self, method: str) -> bool:
        service = service_of(method)
        if self.protected is None:
            return service not in OPEN_SERVICES
        return service in self.protected

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not self._guards(handler_call_details.method):
            return handler
        token = _presented(handler_call_details.invocation_metadata)
        if token is None:
            return _refusal(handler, f"{HEADER}: missing; this server requires `{HEADER}: Bearer KEY` metadata "
                                     f"with the key given to its {self.flag}")
        if not any(hmac.compare_digest(token, key) for key in self.keys):
            return _refusal(handler, f"{HEADER}: the bearer key is not this server's {self.flag}")
        return handler


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


def _with_key(details, key: str):
    return _ClientCallDetails(details, [*(details.metadata or ()), (HEADER, f"Bearer {key}")])


class BearerKeyClient(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer KEY` to every call of a sync channel."""

    def __init__(self, key: str):
        self.key = key

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_key(details, self.key), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_key(details, self.key), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(_with_key(details, self.key), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(_with_key(details, self.key), requests)
