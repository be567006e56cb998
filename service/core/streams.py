"""One cap on open streams for every streaming door: ClassifyStream (quickdraw.v1) and ModelStreamInfer (OIP).

gRPC's ``max_concurrent_rpcs`` counts every call, health checks included: were streams of any door uncapped, a
client holding thousands of idle streams would leave grpc.health.v1 Check and OIP's ServerLive refused with
RESOURCE_EXHAUSTED, and Kubernetes would restart a healthy pod. So every streaming door takes a slot from the one
``StreamSlots`` the composition root makes (``service.app``), and ``max_open_streams`` stays below
``max_concurrent_rpcs`` (``Settings`` checks it): health and unary calls always have room, whichever doors the
streams came in by. A new streaming door gets the cap by taking the same object.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service.core.errors import ResourceExhausted


class StreamSlots:
    """The streams open now, every door's together, and the most that may be."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def refusal(self, method: str) -> ResourceExhausted | None:
        """The error for a new ``method`` stream when every slot is taken, else None."""
        if self.open < self.limit:
            return None
        return ResourceExhausted(
            f"{self.open} streams are open (ClassifyStream and ModelStreamInfer together), the limit of "
            f"max_open_streams={self.limit}; {method} refused: close idle streams, or retry later"
        )

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold one slot while the block runs (the caller checked :meth:`refusal` first, on the same loop)."""
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1
