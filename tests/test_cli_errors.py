"""A newcomer's first hour, from the command line: one-line errors, a quiet start, no TensorFlow where none is needed.

Every check runs ``python -m quickdraw`` as a user would, in a subprocess, from a directory that is not the
project (the default model directory must still be found). Each error case asserts exactly one line on stderr
and a non-zero exit code; ``--debug`` turns the line into a traceback. The served gateway (embedded backend,
TF_CPP_MIN_LOG_LEVEL not set, as after ``make run``) must print no TensorFlow C++ line, and ``quickdraw loadtest
--api quickdraw`` against it must load no TensorFlow module. About 25 s (most of it the gateway's start).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import CLIENT_SRC, ROOT

from service.security.tls import BindError, bind_grpc
from service.settings import Settings

#: What TensorFlow's C++ logging looks like (absl's prefix, and the lines of a CPU machine's start-up).
TF_NOISE = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|oneDNN|cuda|cuInit|cpu_feature_guard",
                      re.IGNORECASE | re.MULTILINE)


def cli_env() -> dict[str, str]:
    """The environment of a user's shell: this checkout importable, no TensorFlow log level, no debug switch."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "QUICKDRAW_DEBUG")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(CLIENT_SRC)])
    return env


def quickdraw(*args: str, cwd: Path, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m quickdraw ARGS`` from ``cwd``."""
    return subprocess.run([sys.executable, "-m", "quickdraw", *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout_s)  # fmt: skip


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command printed on stderr (asserting there is exactly one, and no traceback)."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0, done
    assert len(lines) == 1, f"expected one line, got:\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something listens on (the "other server")."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("option", ["--grpc-port", "--http-port"])
def test_port_in_use_is_one_line(option: str, listening: int, tmp_path: Path) -> None:
    other = "--http-port" if option == "--grpc-port" else "--grpc-port"
    done = quickdraw("serve", "--host", "127.0.0.1", option, str(listening), other, "0", cwd=tmp_path)
    line = one_error_line(done)
    assert line == f"quickdraw serve: error: port {listening} is in use: stop the other server or pass {option}"


def test_grpc_bind_failure_names_the_port(listening: int) -> None:
    """The same message when the port is taken between the check and the bind (App.start's own bind)."""
    import asyncio

    async def bind() -> None:  # a grpc.aio server belongs to a running event loop, as in App.start
        server = grpc.aio.server()
        bind_grpc(server, Settings(host="127.0.0.1", grpc_port=listening))

    with pytest.raises(BindError, match=rf"^port {listening} is in use: stop the other server or pass --grpc-port$"):
        asyncio.run(bind())


def test_missing_model_dir_is_one_line(tmp_path: Path) -> None:
    done = quickdraw("serve", "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--model-dir",
                     "models/quickdraw", cwd=tmp_path)  # fmt: skip
    line = one_error_line(done)
    assert line.startswith(f"quickdraw serve: error: --model-dir models/quickdraw: no such directory (relative to "
                           f"{tmp_path})"), line  # fmt: skip
    assert "pass --model-dir PATH" in line
    assert done.returncode == 2


@pytest.mark.parametrize("command", ["classify", "predict"])
def test_missing_input_file_is_one_line(command: str, tmp_path: Path) -> None:
    done = quickdraw(command, "doodle.png", cwd=tmp_path)
    assert one_error_line(done) == f"quickdraw {command}: error: doodle.png: no such file (relative to {tmp_path})"
    assert done.returncode == 2


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = quickdraw("classify", "doodle.png", "--debug", cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback (most recent call last)" in done.stderr
    assert "doodle.png: no such file" in done.stderr


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``quickdraw serve`` as after ``make run`` (embedded backend, default model directory), but started from
    another directory and on free ports: (its gRPC target, the process, still running)."""
    pytest.importorskip("tensorflow", reason="the embedded backend needs the tf extra")
    cwd = tmp_path_factory.mktemp("elsewhere")
    proc = subprocess.Popen([sys.executable, "-m", "quickdraw", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
                             "--http-port", "0"], cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    end = time.monotonic() + 120
    target = None
    while time.monotonic() < end and (line := proc.stdout.readline()):
        if m := re.search(r"ready: gRPC on 127\.0\.0\.1:(\d+)", line):
            target = f"127.0.0.1:{m.group(1)}"
            break
    if target is None:
        proc.kill()
        pytest.fail(f"quickdraw serve did not start:\n{proc.communicate(timeout=30)}")
    try:
        yield target, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_loadtest_imports_no_tensorflow(served: tuple[str, subprocess.Popen[str]], tmp_path: Path) -> None:
    import numpy as np

    target, _ = served
    rows = np.zeros((4, 784), np.uint8)
    rows[:, 300:320] = 255
    np.save(tmp_path / "drawings.npy", rows)
    args = ["loadtest", "--api", "quickdraw", "--target", target, "--data", str(tmp_path / "drawings.npy"),
            "--concurrency", "2", "--count", "20", "--warmup-s", "0", "--no-progress"]  # fmt: skip
    code = (
        "import sys\n"
        "from quickdraw.cli import main\n"
        f"rc = main({args!r})\n"
        "heavy = ('tensorflow', 'tensorflow_serving', 'keras', 'tf_keras')\n"
        "tf = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print('tensorflow modules:', len(tf), tf[:3], file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensorflow modules: 0 []" in done.stderr, done.stderr[-3000:]


def test_serve_prints_no_tensorflow_lines(served: tuple[str, subprocess.Popen[str]]) -> None:
    from quickdraw_client import QuickDrawClient

    target, proc = served
    with QuickDrawClient(target) as client:  # a call: the model has run, every device initialised
        [result] = client.classify([[[[0, 100, 200], [0, 200, 0]]]])  # a caret, as strokes
    assert result.top and result.model_version == 1
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    noise = TF_NOISE.findall(out + err)
    assert not noise, f"TensorFlow C++ lines in the output of quickdraw serve:\n{err[-3000:]}"
    assert "serving quickdraw versions" in err  # the gateway's own INFO lines are still there
