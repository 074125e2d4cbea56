"""Prometheus metrics shared by every service: the /metrics HTTP endpoint,
`tuneforge_build_info`, per-RPC request counters and latencies, and the stream slots in use
and refused (`tuneforge_<service>_grpc_...`). Process metrics (`process_*`, `python_*`) come
from prometheus_client's default collectors on the default registry."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import pathlib
import platform
import subprocess
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, REGISTRY, start_http_server

# Images set it (they carry no .git); a checkout asks git.
REVISION_ENV = "TUNEFORGE_REVISION"


def serve_metrics(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> tuple[object, int]:
    """Starts the /metrics endpoint in a daemon thread. Returns (http server, bound port). Every
    page says which build serves it (tuneforge_build_info), whatever else the process registers."""
    build_info(registry)
    httpd, _thread = start_http_server(port, addr=host, registry=registry)
    return httpd, httpd.server_port


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def revision() -> str:
    """The source revision this code runs from: $TUNEFORGE_REVISION, else the checkout's git HEAD, else
    "unknown"."""
    if os.environ.get(REVISION_ENV):
        return os.environ[REVISION_ENV]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pathlib.Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


@functools.cache
def build_info(registry: CollectorRegistry = REGISTRY) -> Info:
    """Registers `tuneforge_build_info{version,revision,python,torch}` (value 1) once per registry.
    torch's version is read from its distribution metadata: dataprep does not import torch."""
    info = Info("tuneforge_build", "The running TuneForge build: version, source revision, Python and torch versions.",
                registry=registry)
    info.info({"version": _version("tuneforge"), "revision": revision(), "python": platform.python_version(),
               "torch": _version("torch")})
    return info


class RpcMetrics:
    """Counts and times every RPC of one service, labelled by method and status code.
    One instance per (service, registry): servers created again in the same
    process (tests) share it instead of registering the names twice."""

    _instances: dict[tuple[str, int], "RpcMetrics"] = {}

    def __new__(cls, service: str, registry: CollectorRegistry = REGISTRY):
        key = (service, id(registry))
        if key not in cls._instances:
            instance = super().__new__(cls)
            instance._init(service, registry)
            cls._instances[key] = instance
        return cls._instances[key]

    def _init(self, service: str, registry: CollectorRegistry) -> None:
        build_info(registry)
        self.requests = Counter(
            f"tuneforge_{service}_grpc_requests",
            "gRPC requests handled, by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            f"tuneforge_{service}_grpc_request_duration_seconds",
            "Time from a gRPC request's arrival to its last response message.",
            ["method"],
            registry=registry,
        )
        # Stream slots (libs.common.streams): labels are the service's streaming methods.
        self.streams_open = Gauge(
            f"tuneforge_{service}_grpc_streams_open",
            "Streaming RPCs running now, each holding a server thread (at most --max_streams), by method.",
            ["method"],
            registry=registry,
        )
        self.streams_refused = Counter(
            f"tuneforge_{service}_grpc_streams_refused",
            "Streaming RPCs refused with RESOURCE_EXHAUSTED because every stream slot was taken, by method.",
            ["method"],
            registry=registry,
        )
        self.streams_limit = Gauge(
            f"tuneforge_{service}_grpc_streams_limit",
            "Streaming RPCs this server runs at once (--max_streams).",
            registry=registry,
        )

    def observe(self, method: str, code: grpc.StatusCode, started: float) -> None:
        self.requests.labels(method=method, code=code.name).inc()
        self.duration.labels(method=method).observe(time.perf_counter() - started)


def _final_code(context, exc: BaseException | None) -> grpc.StatusCode:
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN if exc else grpc.StatusCode.OK


class MetricsInterceptor(grpc.ServerInterceptor):
    """Wraps unary and server-streaming handlers of a sync server."""

    def __init__(self, metrics: RpcMetrics):
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if getattr(handler.unary_stream, "experimental_non_blocking", False):
            # Health/Watch sends from callbacks and returns its thread at once; a wrapper
            # without the mark would make grpcio run it blocking, a pool thread per watcher.
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metrics = self.metrics

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request, context):
                started, exc = time.perf_counter(), None
                try:
                    return inner(request, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    metrics.observe(method, _final_code(context, exc), started)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def stream(request, context):
                started, exc = time.perf_counter(), None
                try:
                    yield from inner_stream(request, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    metrics.observe(method, _final_code(context, exc), started)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer)
        return handler
