"""A SIGKILLed gateway leaves no process behind (service/runtime/lifetime.py): its forkserver, resource tracker and
every
worker (image decode, stroke render, JSON parse) are gone within 5 s, as in a node that OOM-kills it."""

from __future__ import annotations

import os
import signal
import time

import pytest
from faults import Gateway
from harness import SHIPPED_MODEL
from procs import alive, descendants

from service.backends import find_versions

pytestmark = pytest.mark.skipif(not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL}")


def test_sigkill_of_the_gateway_leaves_no_child_alive_after_5_s() -> None:
    gw = Gateway("--image-decode-workers", "2", "--stroke-render-workers", "2", "--json-parse-workers", "2")
    try:
        children = descendants(gw.pid)
        kinds = " ".join(children.values())
        print(f"\ngateway {gw.pid}: {len(children)} descendants before SIGKILL")
        # forkserver, resource tracker, and the workers of three pools
        assert "forkserver" in kinds and "resource_tracker" in kinds and len(children) >= 8, children
    finally:
        os.kill(gw.pid, signal.SIGKILL)
        gw.proc.wait(30)
    end = time.monotonic() + 5.0
    left = [p for p in children if alive(p)]
    while left and time.monotonic() < end:
        time.sleep(0.05)
        left = [p for p in children if alive(p)]
    took = 5.0 - (end - time.monotonic())
    print(f"after SIGKILL: {len(left)} of {len(children)} alive at {took:.2f} s")
    for p in left:  # don't leave them for the next test
        os.kill(p, signal.SIGKILL)
    assert not left, {p: children[p] for p in left}
