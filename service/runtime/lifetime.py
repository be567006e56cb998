"""Processes die with the gateway that started them, even when it is SIGKILLed.

The gateway's worker processes (image decode, stroke render, JSON parse) are forked by multiprocessing's
``forkserver``, which the gateway starts, beside a ``resource_tracker``. When the gateway is killed with SIGKILL
(an OOM kill, ``kill -9``, a node lost outside a container) nothing of Python's runs in it, so:

- each worker asks the kernel for SIGKILL when its parent, the forkserver, ends (``PR_SET_PDEATHSIG``);
- the forkserver, which runs no code of ours but its preloaded modules, watches the gateway's process with a
  pidfd (a poll of its parent on kernels without one) and exits when it is gone
  (:mod:`service.runtime.forkserver_preload`); a parent-death signal would not do there, because the kernel sends it
  when the *thread* that forked the forkserver ends, and that is one of the gateway's short-lived threads;
- the resource tracker exits by itself once every process holding its pipe is gone.

So a SIGKILLed gateway leaves nothing behind (tests/test_lifetime.py), and neither does a test suite
(tests/conftest.py makes pytest the subreaper of everything it starts and names any survivor). Linux only:
elsewhere these are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
#: How often the forkserver looks at its parent where the kernel has no pidfd (Linux < 5.3).
PARENT_POLL_S = 0.5


def _prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``; False where there is no such call (not Linux) or it failed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent ends (a worker's first call).

    If the parent ended before the request took effect (the worker was started as the gateway died), exit now."""
    parent = os.getppid()
    if _prctl(PR_SET_PDEATHSIG, int(sig)) and os.getppid() != parent:
        os._exit(0)


def become_subreaper() -> bool:
    """Adopt this process's orphaned descendants (``PR_SET_CHILD_SUBREAPER``), so none escapes to PID 1."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def exit_when_parent_exits() -> threading.Thread:
    """Watch this process's parent from a daemon thread and ``os._exit(0)`` when it is gone (the forkserver's
    guard: its own children then get their parent-death signal)."""
    parent = os.getppid()

    def watch() -> None:
        fd = -1
        with contextlib.suppress(OSError, AttributeError):
            fd = os.pidfd_open(parent)
        if fd >= 0:
            select.select([fd], [], [])
        else:
            while os.getppid() == parent:
                time.sleep(PARENT_POLL_S)
        os._exit(0)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread
