"""Imported by the gateway's forkserver alone (first of :data:`service.preprocess.decode.PRELOAD`): it exits when the
gateway does, so a SIGKILLed gateway leaves no forkserver behind (:mod:`service.runtime.lifetime`).

The forkserver is ``python -c 'from multiprocessing.forkserver import main; ...'``, so its ``sys.argv`` is
``['-c']``; imported anywhere else (a test that imports every module, say) this module does nothing.
"""

from __future__ import annotations

import sys

from service.runtime.lifetime import exit_when_parent_exits

if sys.argv == ["-c"] and "multiprocessing.forkserver" in sys.modules:
    exit_when_parent_exits()
