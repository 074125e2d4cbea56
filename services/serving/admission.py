"""Admission control: a bound on completion requests in flight (running or queued in
the engine); over it, new requests get RESOURCE_EXHAUSTED (HTTP 429) at once
instead of queueing without limit. Also keeps the queue-depth gauges."""

from __future__ import annotations

from libs.common.errors import ResourceExhausted
from services.serving import metrics


class Ticket:
    """One admitted request. `started()` when its first token arrives (it leaves the
    queue); `release()` exactly once when it ends (idempotent)."""

    def __init__(self, admission: "Admission"):
        self._admission = admission
        self._queued = True
        self._released = False

    def started(self) -> None:
        if self._queued:
            self._queued = False
            metrics.QUEUE_DEPTH.dec()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.started()
        self._admission.in_flight -= 1
        metrics.IN_FLIGHT.dec()


class Admission:
    """Lives on the event loop (no locks): admit and release run there."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        metrics.MAX_IN_FLIGHT.set(limit)

    def admit(self) -> Ticket:
        if self.in_flight >= self.limit:
            raise ResourceExhausted(
                f"The server is over capacity: {self.in_flight} requests are in flight (limit "
                f"{self.limit}). Retry after a short wait.")
        self.in_flight += 1
        metrics.IN_FLIGHT.inc()
        metrics.QUEUE_DEPTH.inc()
        return Ticket(self)
