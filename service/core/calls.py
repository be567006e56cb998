"""What every door does around a call, in one place: count it in flight, time it by method and code, and turn any
exception into a ``ServiceError`` (a cancelled call is CANCELLED, anything unexpected INTERNAL, logged once).

A door wraps each call (a unary call, a stream message, an HTTP request) in :class:`Observed`, and maps the
``ServiceError`` to its transport: a gRPC status with details, or the HTTP status and JSON body derived from it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from service.core.errors import Cancelled, ServiceError
from service.core.metrics import Metrics

log = logging.getLogger(__name__)

#: How close to its deadline a cancelled call counts as having run out of time, not as cancelled by its client.
DEADLINE_SLACK_S = 0.005


def service_error(exc: BaseException) -> ServiceError:
    """Any exception as a ServiceError: itself, CANCELLED, or INTERNAL (logged, details not leaked)."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return Cancelled("the call was cancelled")
    log.exception("unexpected error", exc_info=exc)
    return ServiceError(f"internal error: {type(exc).__name__}")


class Observed:
    """One call (a unary call or a stream message): counted in flight, its latency recorded by method and code.

    A call cancelled at or after its deadline (``deadline_s``, monotonic; gRPC cancels the handler when the
    deadline passes) is recorded as DEADLINE_EXCEEDED; one cancelled before it, by its client, as CANCELLED.
    """

    def __init__(self, metrics: Metrics, method: str, deadline_s: float | None = None) -> None:
        self._metrics = metrics
        self._method = method
        self.code = "OK"
        self.fault = ""
        self.deadline_s = deadline_s

    def fail(self, error: ServiceError) -> None:
        """Record the call as answered with ``error`` (its code, and whose fault it was)."""
        self.code = error.code.name
        self.fault = error.fault

    def __enter__(self) -> Observed:
        self._t0 = time.perf_counter()
        self._metrics.calls_in_flight += 1
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            expired = self.deadline_s is not None and time.monotonic() >= self.deadline_s - DEADLINE_SLACK_S
            self.code, self.fault = ("DEADLINE_EXCEEDED" if expired else "CANCELLED"), "client"
        m = self._metrics
        m.calls_in_flight -= 1
        m.child(m.request_latency, self._method, self.code).observe(time.perf_counter() - self._t0)
        if self.code != "OK":
            m.child(m.errors, self._method, self.code, self.fault or "server").inc()
