"""Log lines at a bounded rate: the first of a kind at once, then at most one per interval with a count.

Attackers choose how often some events happen (refused connections, accept() failing for want of file
descriptors); logging each one would let them fill the disk and the log pipeline (asyncio once logged
``accept() out of system resource`` 14,000 times a second, 85 MB in 40 s).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class LogRate:
    """``log(key, message, *args)``: emitted when ``interval_s`` has passed since the last line of that key,
    with the number of events suppressed in between appended."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._logger, self._interval_s, self._level, self._clock = logger, interval_s, level, clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, key: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless a line of ``key`` was logged within the interval; True if logged."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            skipped = self._suppressed.pop(key, 0)
        suffix = f" ({skipped} more since the last such line, {self._interval_s:g} s ago or more)" if skipped else ""
        self._logger.log(self._level, message + suffix, *args)
        return True
