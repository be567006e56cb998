"""Slow clients against a real gateway process: what idle open ClassifyStream calls cost it (issue "Hostile and
slow clients"; the unread stream is a fault test in tests/test_reliability.py). Figures are printed (``-s``)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from attack_probe import AttackedGateway, measured
from harness import SHIPPED_MODEL

from service.backends import find_versions

pytestmark = pytest.mark.skipif(not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL}")
#: Idle streams opened (the default max_open_streams), over connections of 100 streams each (the default cap).
IDLE_STREAMS, PER_CONNECTION = 1000, 100
#: What one idle stream may cost the gateway.
PER_STREAM_BOUND_KIB = 48.0


def test_a_thousand_idle_streams_cost_little_memory_each() -> None:
    gw = AttackedGateway("--model-dir", str(SHIPPED_MODEL), "--no-warmup")
    try:

        async def main() -> tuple[int, float]:
            channels = [grpc.aio.insecure_channel(gw.target, options=[("grpc.channel_id", i)])
                        for i in range(IDLE_STREAMS // PER_CONNECTION)]  # fmt: skip
            never = asyncio.Event()

            async def nothing():  # type: ignore[no-untyped-def]
                await never.wait()
                yield b""

            calls = [ch.stream_stream("/quickdraw.v1.Classifier/ClassifyStream", request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)(nothing(), timeout=60)
                     for ch in channels for _ in range(PER_CONNECTION)]  # fmt: skip
            await asyncio.sleep(3.0)
            rss = gw.rss_mib()
            open_ = sum(not c.done() for c in calls)
            for c in calls:
                c.cancel()
            for ch in channels:
                await ch.close()
            return open_, rss

        with measured(gw, f"{IDLE_STREAMS} idle streams", IDLE_STREAMS) as cost:
            opened, rss_open = asyncio.run(main())
        per_stream_kib = (rss_open - cost.rss_before_mib) * 1024 / max(1, opened)
        print(f"[slow] {opened} idle streams open: RSS {cost.rss_before_mib:.0f} -> {rss_open:.0f} MiB, "
              f"{per_stream_kib:.1f} KiB per stream; health worst {cost.health_worst_s * 1000:.1f} ms")
        assert opened == IDLE_STREAMS
        assert per_stream_kib < PER_STREAM_BOUND_KIB
        assert not cost.health_failures
    finally:
        gw.kill()
