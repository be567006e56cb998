"""Triton's statistics extension: what the inference calls through the OIP doors did, per model version.

``inference_count`` drawings answered, ``execution_count`` calls answered, success and fail counts with their
total nanoseconds, and the three phases of a successful call: ``compute_input`` (checks, decoding, rendering),
``compute_infer`` (the gateway's batcher queue and the backend: not separable per call, so ``queue`` stays 0) and
``compute_output`` (building the answer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Duration:
    """Triton's StatisticDuration: how many, and their total nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        """One more, that took ``ns``."""
        self.count += 1
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        """As Triton's JSON writes it."""
        return {"count": self.count, "ns": self.ns}


#: The phases of InferStatistics, in Triton's order.
PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


@dataclass
class VersionStatistics:
    """What one model version answered through this surface (Triton's ModelStatistics)."""

    last_inference_ms: int = 0  # wall clock, ms since the epoch, of the last call answered
    inference_count: int = 0  # drawings answered OK
    execution_count: int = 0  # calls answered OK
    phases: dict[str, Duration] = field(default_factory=lambda: {p: Duration() for p in PHASES})
    #: batch size -> (compute_input, compute_infer, compute_output) of the calls of that many drawings
    batches: dict[int, tuple[Duration, Duration, Duration]] = field(default_factory=dict)

    def as_dict(self, name: str, version: str) -> dict[str, Any]:
        """Triton's ModelStatistics as JSON (also what the gRPC side parses into its message)."""
        return {
            "name": name, "version": version, "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {p: d.as_dict() for p, d in self.phases.items()},
            "batch_stats": [{"batch_size": n, "compute_input": i.as_dict(), "compute_infer": f.as_dict(),
                             "compute_output": o.as_dict()} for n, (i, f, o) in sorted(self.batches.items())],
        }  # fmt: skip


class Statistics:
    """Per-version counts of the inference calls this surface answered (one event loop: no locking)."""

    def __init__(self) -> None:
        self.versions: dict[int, VersionStatistics] = {}

    def of(self, version: int) -> VersionStatistics:
        """The statistics of ``version`` (zeros until it answers)."""
        st = self.versions.get(version)
        if st is None:  # not setdefault: its default would be built (with its nine Durations) on every call
            st = self.versions[version] = VersionStatistics()
        return st

    def succeeded(
        self, version: int, drawings: int, total_ns: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """A call of ``drawings`` answered OK by ``version``, with the time of each phase."""
        st = self.of(version)
        st.last_inference_ms = time.time_ns() // 1_000_000
        st.inference_count += drawings
        st.execution_count += 1
        phases = st.phases
        batch = st.batches.get(drawings)
        if batch is None:
            batch = st.batches[drawings] = (Duration(), Duration(), Duration())
        # Duration.add written out: ten method calls per answered call otherwise
        for d, ns in ((phases["success"], total_ns), (phases["compute_input"], input_ns), (batch[0], input_ns),
                      (phases["compute_infer"], infer_ns), (batch[1], infer_ns),
                      (phases["compute_output"], output_ns), (batch[2], output_ns)):  # fmt: skip
            d.count += 1
            d.ns += ns

    def failed(self, version: int, total_ns: int) -> None:
        """A call for ``version`` that ended in an error."""
        self.of(version).phases["fail"].add(total_ns)
