"""Shared fixtures: where the Quick, Draw! sample data is, and small helpers over it."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The client distribution's sources (quickdraw_client: the generated quickdraw.v1 code, the client), first on
#: the path like the checkout itself, so that tests use this checkout's copy whatever the venv installed.
CLIENT_SRC = ROOT / "clients" / "python" / "src"
if str(CLIENT_SRC) not in sys.path:
    sys.path.insert(0, str(CLIENT_SRC))


def sample_dir() -> Path:
    """``QUICKDRAW_SAMPLE_DIR``, by default ``../shared/quickdraw`` beside the repository."""
    return Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", ROOT.parent / "shared" / "quickdraw")).resolve()


@pytest.fixture(scope="session")
def sample() -> Path:
    """The sample data directory; tests that need it skip, saying why, when it is absent."""
    d = sample_dir()
    if not (d / "numpy_bitmap").is_dir():
        pytest.skip(f"Quick, Draw! sample data not found at {d} (set QUICKDRAW_SAMPLE_DIR)")
    return d


@pytest.fixture(scope="session")
def paired_classes(sample: Path) -> list[str]:
    """Classes that have both a numpy_bitmap file and a simplified file (29 in the sample)."""
    names = sorted(p.stem for p in (sample / "numpy_bitmap").glob("*.npy"))
    return [n for n in names if (sample / "simplified" / f"{n}.ndjson").exists()]


@pytest.fixture(scope="session")
def known_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model base directory whose version 1 is the shipped model plus ``known_score`` (its max softmax
    probability) and a model card with ``known_models.THRESHOLD`` (tests/known_models.py; ~15 s to build)."""
    from known_models import THRESHOLD, model_with_known_score, need_shipped_model

    need_shipped_model()
    base = tmp_path_factory.mktemp("known") / "quickdraw"
    model_with_known_score(base / "1", THRESHOLD)
    return base


@pytest.fixture(scope="session")
def old_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model base directory whose version 1 is the shipped model as exported before issue 18: no
    ``known_score``, no out-of-class entry in its card (tests/known_models.py; ~15 s to build)."""
    from known_models import model_without_known_score, need_shipped_model

    need_shipped_model()
    base = tmp_path_factory.mktemp("old") / "quickdraw"
    model_without_known_score(base / "1")
    return base


#: Processes the suite started that were still alive at its end (filled by ``no_process_outlives_the_suite``).
_SURVIVORS: dict[int, str] = {}


def _own_machinery() -> set[int]:
    """This pytest process's own multiprocessing helpers (forkserver, resource tracker): they end with it."""
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker

    pids = {getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None),
            getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)}  # fmt: skip
    return {p for p in pids if p is not None}


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite() -> Iterator[None]:
    """pytest adopts every orphan of the processes the tests start (it is their subreaper, so a leaked forkserver
    or worker cannot escape to PID 1); at the end no child may be alive but pytest's own multiprocessing helpers.
    Any survivor is named, killed, and fails the run."""
    from procs import children

    from service.runtime.lifetime import become_subreaper

    become_subreaper()
    yield
    deadline = time.monotonic() + 5.0  # a gateway killed by the last test may still be ending its workers
    while (left := {p: c for p, c in children(os.getpid()).items() if p not in _own_machinery()}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    _SURVIVORS.update(left)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, "processes started by the suite outlived it (killed now): " + "; ".join(
        f"{p} {c}" for p, c in left.items()
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move everything the test modules imported (TensorFlow's objects among them: about 392,000) out of the
    collector's sight, as the gateway does at start: a full collection of them took about 145 ms, a pause that a
    test timing the gateway from this process would count."""
    gc.collect()
    gc.freeze()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many processes the suite left alive (0, or the fixture above has failed the run and named them)."""
    terminalreporter.write_line(f"processes started by the suite and alive at its end: {len(_SURVIVORS)}")
