"""An asyncio event loop on a fake clock: time moves only when the loop has nothing to do but wait.

When every task is waiting and the next thing due is a timer, the loop jumps its clock to that timer at once
instead of sleeping. Tests then run in no real time, and what they measure on ``loop.time()`` is exact: a batch
that sleeps 30 ms takes exactly 0.030 s, and a call answered without any timer takes exactly 0 s. I/O and
threads still wake the loop, but the clock jumps to the next timer while a thread works: stand for a thread's
work with a plain future that the test resolves (``run_in_executor`` gives the batcher nothing else).
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """A selector that, instead of blocking up to ``timeout``, advances the loop's fake clock by it."""

    def __init__(self, advance: Callable[[float], None]) -> None:
        super().__init__()
        self._advance = advance

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Ready events now; with none and a timer due in ``timeout``, jump the clock there and return."""
        events = super().select(0)
        if events or (timeout is not None and timeout <= 0):
            return events
        if timeout is None:  # nothing scheduled: only I/O (a thread's call_soon_threadsafe) can wake the loop
            return super().select(None)
        self._advance(timeout)
        return []


class FakeClockLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` is a fake clock, starting at 1000.0, moved only by waiting."""

    def __init__(self) -> None:
        self._now = 1000.0
        super().__init__(_JumpingSelector(self._advance))

    def _advance(self, seconds: float) -> None:
        self._now += seconds

    def time(self) -> float:
        """The fake clock."""
        return self._now


def run_on_fake_clock(coro_fn: Callable[[], Coroutine[Any, Any, None]], timeout_s: float = 60.0) -> None:
    """Run ``coro_fn()`` to completion on a FakeClockLoop, failing it after ``timeout_s`` of fake time."""
    with asyncio.Runner(loop_factory=FakeClockLoop) as runner:
        runner.run(asyncio.wait_for(coro_fn(), timeout_s))


def now() -> float:
    """The running loop's clock (the fake one under ``run_on_fake_clock``)."""
    return asyncio.get_running_loop().time()
