"""Issue 19's small things, each as a user meets it: ``render --out`` file modes, ``inspect`` on a terminal,
``make help``, the load-test plot's last second and legend, and progress output that is not a terminal's.

Runtime: about 5 s (three short ``quickdraw`` processes, one plot).
"""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quickdraw_cmd() -> list[str]:
    return [sys.executable, "-m", "quickdraw"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_render_out_has_the_mode_a_new_file_gets(sample: Path, tmp_path: Path) -> None:
    """mkstemp's 0600 was kept by the rename: ``render --out`` now honours the umask, as ``open()`` would."""
    out = tmp_path / "cat.npy"
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        proc = subprocess.run([*quickdraw_cmd(), "render", str(sample / "simplified" / "cat.ndjson"), "--limit", "3",
                               "--out", str(out)], env=env(), capture_output=True, text=True, umask=umask)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert out.stat().st_mode & 0o777 == mode, oct(out.stat().st_mode)


def run_on_terminal(argv: list[str], columns: int = 80) -> bytes:
    """What a terminal of ``columns`` columns receives from ``argv`` (stdout and stderr), byte for byte.

    The child is started by ``subprocess`` on a pseudo-terminal's slave side, not by ``pty.fork()``: a fork that
    runs Python in the child (``pty.fork``, ``preexec_fn``) can abort there while earlier tests' gRPC threads are
    alive (CI saw ``epoll_wait error: Bad file descriptor``, exit -6), and ``subprocess`` runs none.
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))  # tqdm draws nothing at 0
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env(), start_new_session=True)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every holder of the slave side has closed it
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, out
    return out


def test_inspect_on_a_terminal_leaves_no_progress_bar_behind(sample: Path) -> None:
    """A bar drawn and cleared at once left "<name>:" wherever the terminal's output was kept as text; a file
    read in under a second now draws none, so the terminal receives exactly the summary."""
    raw = run_on_terminal([*quickdraw_cmd(), "inspect", str(sample / "raw" / "ant.ndjson")])
    text = raw.decode().replace("\r\n", "\n")
    assert "\r" not in text and "ant.ndjson:" not in text, raw
    lines = text.splitlines()
    assert lines[0].endswith("raw/ant.ndjson") and [line.split()[0] for line in lines[1:]] == [
        "format", "count", "recognized", "mean_points", "classes"]  # fmt: skip


def test_make_help_is_aligned() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make on this machine")
    out = subprocess.run([make, "-s", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("  make ")]
    assert len(rows) >= 10 and any(" reliability " in r for r in rows)
    columns = set()
    for row in rows:
        target = row.split()[1]
        rest = row[len("  make ") + len(target) :]
        columns.add(len("  make ") + len(target) + len(rest) - len(rest.lstrip()))
        assert rest.startswith("  "), row  # at least two spaces between a target and its description
    assert len(columns) == 1, out


def timeline_run(duration_s: float) -> dict[str, Any]:
    seconds = int(duration_s) + 1
    return {
        "mode": "closed", "concurrency": 4, "offered_rate": None, "throughput_calls_per_s": 100.0,
        "duration_s": duration_s, "p50_ms": 2.0, "p90_ms": 3.0, "p99_ms": 5.0, "p99.9_ms": 8.0,
        # a steady 100 calls/s; the last (partial) second holds only the calls of the part the run covered
        "timeline": [{"t_s": float(i), "calls": 100 if i < int(duration_s) else round(100 * (duration_s - i)),
                      "errors": 0, "p50_ms": 2.0, "p99_ms": 5.0} for i in range(seconds)],
    }  # fmt: skip


def test_the_plot_shows_no_drop_at_the_end_and_names_p50(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loadtest.report import call_rates

    assert [r for _, r in call_rates(timeline_run(5.7))] == pytest.approx([100.0] * 6)  # 0.7 s: as a rate
    assert [t for t, _ in call_rates(timeline_run(5.2))] == [0.0, 1.0, 2.0, 3.0, 4.0]  # 0.2 s: left out
    assert call_rates({**timeline_run(3.0), "timeline": timeline_run(4.0)["timeline"]})[-1][0] == 2.0  # after the end

    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the plot or tf extra)")
    import matplotlib.figure

    from loadtest import report

    seen: list[tuple[list[str], list[list[float]]]] = []
    save = matplotlib.figure.Figure.savefig

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        for ax in self.axes:
            legend = ax.get_legend()
            seen.append(([t.get_text() for t in legend.get_texts()] if legend else [],
                         [list(line.get_ydata()) for line in ax.get_lines()]))  # fmt: skip
        return save(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    written = report.plot(tmp_path, [timeline_run(5.7)], 10.0, "test")
    assert [p.name for p in written] == ["latency-vs-throughput.png", "latency-over-time.png"]
    over_time, calls = seen[-2], seen[-1]
    assert "p50, 4 callers" in over_time[0] and "p99, 4 callers" in over_time[0]
    assert min(calls[1][0]) == pytest.approx(100.0)  # no drop to 0 (or to 70) at the end


def test_soak_progress_does_not_flood_a_log() -> None:
    """Off a terminal, ``make soak`` writes a plain line a minute instead of a bar redrawn for every update."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import soak
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    now = [0.0]
    log = io.StringIO()
    progress = soak.Progress(600, stream=log, clock=lambda: now[0])
    assert not progress.interactive
    for i in range(2000):  # as many updates as the soak that flooded a CI log
        now[0] = i * 0.3
        progress.update(f"{i} calls, errors 0")
    progress.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 8 <= len(lines) <= 10, lines  # one a minute over 600 s
    assert lines[0].startswith("soak: 60/600 s, ")
