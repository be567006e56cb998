"""service.runtime.lograte: the first line of a kind at once, then at most one per interval, carrying the count
skipped."""

from __future__ import annotations

import logging

import pytest

from service.runtime.lograte import LogRate


def test_one_line_per_interval_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    rate = LogRate(logging.getLogger("lograte-test"), interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="lograte-test"):
        logged = [rate.log("accept", "accept failed: %s", "EMFILE") for _ in range(14_000)]
        now[0] = 10.0
        logged.append(rate.log("accept", "accept failed: %s", "EMFILE"))
        logged.append(rate.log("other", "another kind"))
    assert logged.count(True) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "accept failed: EMFILE"
    assert lines[1] == "accept failed: EMFILE (13999 more since the last such line, 10 s ago or more)"
    assert lines[2] == "another kind"
