"""The client distribution alone: ``pip install clients/python`` into a fresh virtualenv, no TensorFlow, and
``quickdraw classify`` plus a short asyncio script against a running gateway.

The install is what a backend team does (a copy of clients/python, from the package index; pip's cache makes a
repeat take seconds). Printed: install time and ``du -sm`` of the virtualenv (issue 19: well under a minute, under
150 MB). ``quickdraw classify`` from the client must print the same lines as the server package's, and the
asyncio client's unary and stream answers must agree. About 40 s: venv + install ~15 s, the gateway ~10 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLIENT_SRC, ROOT
from faults import Gateway
from test_slim import OFFLINE

pytestmark = pytest.mark.slow

#: What installing the client brings, at most: quickdraw-client, grpcio, grpcio-status, protobuf,
#: googleapis-common-protos, numpy, typing-extensions, and the venv's own pip and setuptools (9), plus 3 to spare.
#: The install time is printed, not bounded: it is the package index's and the network's, not the client's
#: (a bound of 60 s was one a slow mirror could fail).
MAX_DISTRIBUTIONS = 12
VENV_UNDER_MB = 150
#: Distributions that must not come with the client.
HEAVY = {"tensorflow", "tensorflow-cpu", "tensorflow-serving-api", "keras", "tensorboard", "quickdraw-service",
         "pillow", "aiohttp", "pydantic"}  # fmt: skip


def venv_env() -> dict[str, str]:
    """A user's environment: nothing of this checkout on the path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QUICKDRAW_DEBUG")}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with only quickdraw-client installed."""
    tmp = tmp_path_factory.mktemp("client")
    src = tmp / "python"
    shutil.copytree(ROOT / "clients" / "python", src,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build"))  # fmt: skip
    venv = tmp / "venv"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                           "--disable-pip-version-check", str(src)], capture_output=True, text=True, timeout=600,
                          env=venv_env())  # fmt: skip
    if done.returncode != 0 and any(s in done.stderr for s in OFFLINE):
        pytest.skip(f"pip reaches no package index from here: {done.stderr.strip().splitlines()[-1][:300]}")
    assert done.returncode == 0, f"pip install clients/python failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    took = time.monotonic() - started
    du = subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True, check=True)
    size_mb = int(du.stdout.split()[0])
    dists = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(' '.join(sorted(d.metadata['Name'].lower() "
         "for d in m.distributions())))"],
        capture_output=True, text=True, check=True, timeout=60, cwd=tmp, env=venv_env(),
    ).stdout.split()  # fmt: skip
    print(f"\nclient venv: created and installed in {took:.1f} s; du -sm {size_mb} MB; {len(dists)} distributions: "
          f"{' '.join(dists)}")  # fmt: skip
    assert "quickdraw-client" in dists
    heavy = HEAVY & {d.replace("_", "-") for d in dists}
    assert not heavy, f"installing the client brought {sorted(heavy)}"
    assert len(dists) <= MAX_DISTRIBUTIONS, f"the client brought {len(dists)} distributions: {dists}"
    assert size_mb < VENV_UNDER_MB, f"the client's virtualenv is {size_mb} MB (limit {VENV_UNDER_MB} MB)"
    return venv


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    """``quickdraw serve`` (the server package, main virtualenv) on free ports."""
    pytest.importorskip("tensorflow", reason="the embedded backend needs the tf extra")
    gw = Gateway()
    try:
        yield gw
    finally:
        gw.kill()


def test_quickdraw_classify_from_the_client_alone(client_venv: Path, gateway: Gateway, sample: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    files = [str(sample / "simplified" / "cat.ndjson"), str(sample / "numpy_bitmap" / "cat.npy")]
    args = ["classify", "--target", gateway.target, "--limit", "5", *files]
    client = subprocess.run([str(client_venv / "bin" / "quickdraw"), *args], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=venv_env())  # fmt: skip
    assert client.returncode == 0, client.stderr[-3000:]
    print(client.stdout)
    lines = client.stdout.strip().splitlines()
    assert len(lines) == 10, client.stdout
    assert lines[0].startswith("cat.ndjson:1  ") and lines[5].startswith("cat.npy[0]  ")
    assert sum(line.split()[1] == "cat" for line in lines) >= 7, client.stdout  # the model knows its cats
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(CLIENT_SRC)])}
    server = subprocess.run([sys.executable, "-m", "quickdraw", *args], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env=env)  # fmt: skip
    assert server.returncode == 0, server.stderr[-3000:]
    assert client.stdout == server.stdout, "the client's and the server package's `quickdraw classify` differ"
    # The client's own one-line errors, with no server package to delegate to.
    missing = subprocess.run([str(client_venv / "bin" / "quickdraw"), "classify", "doodle.png"], capture_output=True,
                             text=True, timeout=60, cwd=tmp_path, env=venv_env())  # fmt: skip
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"quickdraw classify: error: doodle.png: no such file (relative to {tmp_path})"


ASYNC_SCRIPT = """\
import asyncio, json, sys
import numpy as np
from quickdraw_client import AsyncQuickDrawClient

async def main(target: str, ndjson: str, npy: str) -> None:
    strokes = [json.loads(line)["drawing"] for line in open(ndjson)][:4]
    bitmaps = list(np.load(npy, mmap_mode="r")[:4].reshape(-1, 28, 28))
    drawings = [*strokes, *bitmaps]
    async with AsyncQuickDrawClient(target, timeout_s=30) as client:
        unary = [r.top[0][0] for r in await client.classify(drawings, top_k=3)]
        streamed = {}
        async for item in client.classify_stream(drawings):
            streamed[next(i for i, d in enumerate(drawings) if d is item.drawing)] = item.result.top[0][0]
        info = await client.model_info()
    print(json.dumps({"unary": unary, "stream": [streamed[i] for i in range(len(drawings))],
                      "model": info.name, "modules": sorted(m for m in sys.modules if m.startswith("tensorflow"))}))

asyncio.run(main(*sys.argv[1:]))
"""


def test_asyncio_script_from_the_client_alone(client_venv: Path, gateway: Gateway, sample: Path,
                                              tmp_path: Path) -> None:  # fmt: skip
    script = tmp_path / "classify_async.py"
    script.write_text(textwrap.dedent(ASYNC_SCRIPT))
    done = subprocess.run([str(client_venv / "bin" / "python"), str(script), gateway.target,
                           str(sample / "simplified" / "cat.ndjson"), str(sample / "numpy_bitmap" / "cat.npy")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=venv_env())  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    print(out)
    assert out["stream"] == out["unary"], "the stream and the unary call disagree"
    assert out["unary"].count("cat") >= 6, out
    assert out["model"] == "quickdraw"
    assert out["modules"] == []
