"""The server bootstrap every service uses: gRPC with health checking and
reflection, optional TLS (mutual with a client CA) and bearer keys, per-RPC
metrics, a thread pool sized from the config (stream slots plus threads kept for
unary RPCs), the /metrics endpoint, structured logs, a ready file for whoever
started us, and graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from libs.common import auth, channels, logs, metrics, streams, tls

LOG = logging.getLogger("tuneforge.server")


@dataclass
class ServerOptions:
    """Flags every service takes. Everything binds loopback unless told otherwise."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind the gRPC and metrics servers"})
    port: int = field(default=0, metadata={"help": "gRPC port (0 picks a free one)"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus /metrics port (0 picks a free one)"})
    grace_period: float = field(default=10.0, metadata={"help": "seconds in-flight RPCs get to finish on shutdown"})
    ready_file: str | None = field(default=None, metadata={"help": "write bound ports here (JSON) once serving"})
    log_level: str = field(default="INFO", metadata={"help": "log level", "choices": ["DEBUG", "INFO", "WARNING", "ERROR"]})
    # Threads are started on demand, so an unused slot costs nothing; a busy one costs a
    # thread and its call (46 KiB resident per held WatchCheckpoints, measured) plus what its RPC holds.
    max_streams: int = field(default=64, metadata={
        "help": "streaming RPCs served at once, each holding a server thread for its life; one more fails "
                "at once with RESOURCE_EXHAUSTED naming this flag"})
    unary_threads: int = field(default=16, metadata={
        "help": "server threads that streams never take, kept for unary RPCs and health checks (the pool is "
                "max_streams + unary_threads): a unary call waits at most for another unary call, never for a stream"})
    tls_cert: str | None = field(default=None, metadata={
        "help": "PEM certificate chain: serve gRPC over TLS (with tls_key); health and reflection too"})
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key of tls_cert"})
    tls_client_ca: str | None = field(default=None, metadata={
        "help": "PEM CA certificates: require clients to present a certificate one of them signed (mutual TLS)"})
    tls_ca: str | None = field(default=None, metadata={
        "help": "PEM CA certificates this service trusts when it calls other services over TLS "
                "(env TUNEFORGE_TLS_CA); unset: plaintext calls"})
    tls_client_cert: str | None = field(default=None, metadata={
        "help": "PEM certificate this service presents to services that require mutual TLS (env TUNEFORGE_TLS_CLIENT_CERT)"})
    tls_client_key: str | None = field(default=None, metadata={
        "help": "PEM private key of tls_client_cert (env TUNEFORGE_TLS_CLIENT_KEY)"})

    def problems(self) -> list[str]:
        return [f"{name}: expected a positive number; got {getattr(self, name)}"
                for name in ("max_streams", "unary_threads") if getattr(self, name) < 1
                ] + tls_problems(self)


def tls_problems(config) -> list[str]:
    """The TLS flags' problems of a config with the server and client TLS fields."""
    return (tls.server_problems(config.tls_cert, config.tls_key, config.tls_client_ca)
            + channels.client_problems(config.tls_ca, config.tls_client_cert, config.tls_client_key))


def configure_clients(config) -> None:
    """Outgoing channels of this process (and its children) use the config's client TLS flags."""
    channels.configure(config.tls_ca, config.tls_client_cert, config.tls_client_key)


# register(server) adds the service's servicers and returns their full names
Register = Callable[[grpc.Server], Iterable[str]]


def _standard_services(server, names: list[str], health_servicer) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)


def create_server(address: str, register: Register, service: str, max_streams: int | None = None,
                  unary_threads: int | None = None, streams_flag: str = "--max_streams",
                  tls_config: tls.ServerTLS | None = None, keys: auth.BearerKeyInterceptor | None = None,
                  ) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Builds and starts a sync gRPC server. Returns (server, bound port, health servicer).

    `max_streams` and `unary_threads` (unset: ServerOptions' defaults) size its pool;
    `streams_flag` is the flag a refused stream's message tells the operator to raise.
    `tls_config` serves TLS on the port instead of plaintext; `keys` refuses calls without
    a bearer key (UNAUTHENTICATED) to the services it protects."""
    defaults = ServerOptions()
    max_streams = defaults.max_streams if max_streams is None else max_streams
    unary_threads = defaults.unary_threads if unary_threads is None else unary_threads
    workers = max_streams + unary_threads
    rpc_metrics = metrics.RpcMetrics(service)
    slots = streams.StreamSlots(max_streams, service, streams_flag, rpc_metrics)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{service}-rpc"),
        # The metrics interceptor is outermost, so refused streams are counted by code too.
        # No `maximum_concurrent_rpcs`: it counts unary calls and streams alike, so it cannot
        # keep threads for unary calls, and it refuses a burst of short calls that would have
        # waited milliseconds (64 ranks starting at once). With streams held to max_streams
        # threads, a call waits at most for a unary call to end, never for a stream.
        # A refused key is counted like any other status, and costs no stream slot.
        interceptors=[metrics.MetricsInterceptor(rpc_metrics), *([keys] if keys else []),
                      streams.StreamLimitInterceptor(slots)],
        options=[("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)],
    )
    names = list(register(server))
    slots.declare(streams.streaming_methods(names))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    _standard_services(server, names, health_servicer)
    # Credentials are read before binding: a bad file fails naming its flag, with no port held.
    creds = tls_config.credentials() if tls_config is not None else None
    port = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    server.start()
    return server, port, health_servicer


def write_ready_file(path: str | None, **ports) -> None:
    """Atomically writes the bound ports so a parent process can find us."""
    if not path:
        return
    target = pathlib.Path(path)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **ports}))
    os.replace(tmp, target)


class ShutdownSignal:
    """Set by SIGTERM or SIGINT; services wait on it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        LOG.info("shutdown requested", extra={"fields": {"signal": signal.Signals(signum).name}})
        self.event.set()

    def wait(self) -> None:
        while not self.event.wait(0.5):
            pass


def run(service: str, options: ServerOptions, register: Register,
        on_shutdown: Callable[[], None] | None = None, extra_ports: dict | None = None) -> None:
    """Runs one service until SIGTERM/SIGINT, then drains: health flips to
    NOT_SERVING, new RPCs are refused, in-flight RPCs get `grace_period` seconds."""
    logs.setup(service, options.log_level)
    configure_clients(options)
    stop = ShutdownSignal()
    server, port, health_servicer = create_server(
        f"{options.host}:{options.port}", register, service, options.max_streams, options.unary_threads,
        tls_config=tls.server_tls(options.tls_cert, options.tls_key, options.tls_client_ca))
    _httpd, metrics_port = metrics.serve_metrics(options.host, options.metrics_port)
    write_ready_file(options.ready_file, grpc_port=port, metrics_port=metrics_port, **(extra_ports or {}))
    logs.log(LOG, logging.INFO, "serving", grpc=f"{options.host}:{port}", metrics=f"{options.host}:{metrics_port}",
             tls="mutual" if options.tls_client_ca else bool(options.tls_cert))
    stop.wait()
    health_servicer.enter_graceful_shutdown()
    if on_shutdown:
        on_shutdown()
    server.stop(options.grace_period).wait()
    logs.log(LOG, logging.INFO, "stopped")


def options_of(config) -> ServerOptions:
    """The ServerOptions part of a service config that extends ServerOptions."""
    return ServerOptions(**{f.name: getattr(config, f.name) for f in dataclasses.fields(ServerOptions)})
