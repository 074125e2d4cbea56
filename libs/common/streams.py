"""Stream slots: how many long-lived streaming RPCs one sync gRPC server runs at once,
and the RESOURCE_EXHAUSTED refusal of one more.

grpcio's sync server runs every RPC on a thread of its pool, a streaming RPC for its
whole life: a training rank's ReadShards for an epoch, serving's WatchCheckpoints for as
long as it follows the trainer. When the pool is full grpcio queues new calls in the
executor, silently and without bound (grpc/grpc#7052), so streams could starve unary
RPCs and Health/Check. `libs.common.server.create_server` therefore sizes the pool as
`max_streams + unary_threads` and lets streams take at most `max_streams` of its threads:
the stream past that fails at once, naming the limit and the flag that raises it, and
`unary_threads` threads always remain for unary RPCs and health checks.

A handler marked `experimental_non_blocking` (grpc.health.v1 Health/Watch) returns its
thread at once and sends from callbacks: it takes no slot.
"""

from __future__ import annotations

import threading

import grpc
from google.protobuf import descriptor_pool

from libs.common.metrics import RpcMetrics


def streaming_methods(service_names) -> list[str]:
    """The methods of these services (full names, in the default descriptor pool) that stream responses."""
    pool = descriptor_pool.Default()
    return [method.name for name in service_names
            for method in pool.FindServiceByName(name).methods if method.server_streaming]


class StreamSlots:
    """A counter of the streams running on one server, bounded by `limit`."""

    def __init__(self, limit: int, service: str, flag: str, metrics: RpcMetrics):
        self.limit = limit
        self.service = service
        self.flag = flag
        self.metrics = metrics
        self._lock = threading.Lock()
        self._used = 0
        metrics.streams_limit.set(limit)

    def declare(self, methods) -> None:
        """Every series exists from the start (at 0), so rates and alerts see it before the first stream."""
        for method in methods:
            self.metrics.streams_open.labels(method=method)
            self.metrics.streams_refused.labels(method=method)

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def take(self, method: str) -> "Slot | None":
        """A slot for one stream of `method`, or None (counted as refused) when all are taken."""
        with self._lock:
            if self._used >= self.limit:
                self.metrics.streams_refused.labels(method=method).inc()
                return None
            self._used += 1
        self.metrics.streams_open.labels(method=method).inc()
        return Slot(self, method)

    def _give_back(self, method: str) -> None:
        with self._lock:
            self._used -= 1
        self.metrics.streams_open.labels(method=method).dec()

    def refusal(self, method: str) -> str:
        return (f"{method}: all {self.limit} stream slots of this {self.service} server are taken "
                f"({self.flag} {self.limit}); retry when a stream ends, or run the server with a "
                f"larger {self.flag}")


class Slot:
    """One stream's slot; `release` is idempotent (the handler's end and the RPC's end both call it)."""

    def __init__(self, slots: StreamSlots, method: str):
        self._slots = slots
        self._method = method
        self._held = True
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._slots._give_back(self._method)


class StreamLimitInterceptor(grpc.ServerInterceptor):
    """Gives each blocking server- or bidi-streaming handler a slot before it runs."""

    def __init__(self, slots: StreamSlots):
        self.slots = slots

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        behavior = handler.unary_stream or handler.stream_stream
        if behavior is None or getattr(behavior, "experimental_non_blocking", False):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        slots = self.slots

        # Runs on the pool thread that will serve the stream: a slot is taken only by a
        # stream that really starts, so a call cancelled while queued cannot leak one.
        def limited(request_or_iterator, context):
            slot = slots.take(method)
            if slot is None:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, slots.refusal(method))
            # The generator's `finally` runs when grpcio drops it; the RPC's end callback
            # returns the slot even if something holds the generator alive.
            if not context.add_callback(slot.release):
                slot.release()
                return
            try:
                yield from behavior(request_or_iterator, context)
            finally:
                slot.release()

        wrap = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return wrap(limited, handler.request_deserializer, handler.response_serializer)
