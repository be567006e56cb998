"""The ``quickdraw`` console script: render and inspect, run as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from doodle.formats import read_ndjson, write_binary


def quickdraw(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("quickdraw", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "quickdraw"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, check=check)


def test_help_lists_commands() -> None:
    out = quickdraw("--help").stdout
    assert "render" in out and "inspect" in out
    assert "--limit" in quickdraw("render", "--help").stdout



def test_the_client_script_runs_the_server_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """quickdraw-client's ``quickdraw`` finds the server's through the installed packages' metadata (it imports no
    server module): here the server package is installed; metadata left by a removed one counts as no server."""
    import importlib.metadata

    import quickdraw.cli
    from quickdraw_client import cli as client_cli

    assert client_cli.full_cli() is quickdraw.cli.main
    gone = importlib.metadata.EntryPoint("quickdraw", "quickdraw_removed.cli:main", "console_scripts")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: [gone])
    assert client_cli.full_cli() is None

def test_render_matches_numpy_bitmap(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "cat.npy"
    quickdraw("render", str(sample / "simplified" / "cat.ndjson"), "--limit", "25", "--out", str(out))
    ours = np.load(out)
    ref = np.load(sample / "numpy_bitmap" / "cat.npy", mmap_mode="r")[:25]
    assert ours.shape == (25, 784) and ours.dtype == np.uint8
    corr = np.mean([np.corrcoef(a.astype(float), b.astype(float))[0, 1] for a, b in zip(ours, ref, strict=True)])
    print(f"\ncat: mean correlation {corr:.4f}")
    assert corr >= 0.98


def test_render_raw_and_binary(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "ant.npy"
    quickdraw("render", str(sample / "raw" / "ant.ndjson"), "--out", str(out))
    assert np.load(out).shape == (38, 784)
    binfile = tmp_path / "cat.bin"
    write_binary(binfile, read_ndjson(sample / "simplified" / "cat.ndjson"))
    quickdraw("render", str(binfile), "--out", str(tmp_path / "b.npy"), "--limit", "5")
    assert np.load(tmp_path / "b.npy").shape == (5, 784)


def test_render_malformed_names_line_and_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "cat.ndjson"
    bad.write_text('{"drawing": [[[0, 5], [0, 5]]]}\n{"drawing": 3}\n')
    out = tmp_path / "o.npy"
    proc = quickdraw("render", str(bad), "--out", str(out), check=False)
    assert proc.returncode == 2
    assert "cat.ndjson: line 2" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".render-*"))


def test_inspect(sample: Path) -> None:
    proc = quickdraw("inspect", "--json", str(sample / "numpy_bitmap" / "alarm clock.npy"),
                     str(sample / "simplified" / "monkey.ndjson"), str(sample / "raw" / "ant.ndjson"))
    infos = [json.loads(line) for line in proc.stdout.splitlines()]
    assert infos[0]["format"] == "numpy_bitmap" and infos[0]["classes"] == {"alarm clock": 3200}
    assert infos[1]["format"] == "simplified" and infos[1]["count"] == 1000
    assert infos[2]["format"] == "raw" and infos[2]["classes"] == {"ant": 38}
    text = quickdraw("inspect", str(sample / "simplified" / "cat.ndjson")).stdout
    assert "simplified" in text and "cat (25)" in text


@pytest.mark.parametrize("name", ["nope.txt"])
def test_inspect_unknown_extension(tmp_path: Path, name: str) -> None:
    f = tmp_path / name
    f.write_text("x")
    proc = quickdraw("inspect", str(f), check=False)
    assert proc.returncode == 2 and "unknown extension" in proc.stderr
