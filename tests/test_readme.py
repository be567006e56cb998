"""The examples of README.md and of the docs pages run: every ``sh`` and ``python`` block, in order
(``readme_blocks.pages``), against a live ``quickdraw serve``.

The gateway is a real ``quickdraw serve`` process (embedded backend, the shipped model) on free ports; its ready
banner's example is run as printed. The blocks run in a scratch directory laid out like a fresh clone after
``make``: ``.venv`` (this interpreter's virtualenv) and ``../shared/quickdraw`` (the sample), so the README's
relative paths work and what the examples write (``cat.npy``, ``doodle.png``) lands there (run from a checkout,
they land in its root, where .gitignore names them). Shell blocks run
with ``bash -e``; Python blocks with this interpreter; this checkout comes first on PYTHONPATH. The one
rewrite: the default ports (``localhost:50051``, ``localhost:8080``, and ``classify`` without ``--target``)
become the test gateway's. Each block's output must have the shape of the output block the page shows under
it (``readme_blocks.shape``). Blocks marked ``<!-- not run: why -->`` are counted and their reasons printed.

Runtime: about 40-50 s on two cores (the gateway's start and TensorFlow's import in two blocks take most).
``QUICKDRAW_README_PRINT=1`` prints each block's real output (to regenerate the pages').
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults import free_port
from harness import SHIPPED_MODEL
from readme_blocks import NOT_RUN_PAGES, README, Block, blocks, pages, shape

from service.backends import find_versions

ROOT = Path(__file__).resolve().parents[1]
RUN_LANGS = ("sh", "python")
BLOCK_TIMEOUT_S = 120
PRINT = os.environ.get("QUICKDRAW_README_PRINT") == "1"

pytestmark = pytest.mark.skipif(not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL}")


#: How many examples ran from README.md alone before the docs pages existed; they all run from the pages now.
RUN_BEFORE_THE_DOCS = 9


def test_every_example_is_run_or_says_why_not() -> None:
    found = [b for b in blocks() if b.lang in RUN_LANGS]
    run = [b for b in found if b.not_run is None]
    skipped = [b for b in found if b.not_run is not None]
    print(f"\n{len(pages())} pages: {len(found)} sh/python blocks, {len(run)} run, {len(skipped)} not run:")
    for b in skipped:
        print(f"  {b.where} ({b.lang}): {b.not_run}")
    for name, why in NOT_RUN_PAGES.items():
        print(f"  docs/{name}: not run: {why}")
    assert len(run) >= RUN_BEFORE_THE_DOCS, "runnable examples went missing"
    assert any(b.path == README for b in run), "README.md's own examples went missing"
    assert all(b.output is None or b.not_run is None for b in found), "an output under a block that is not run"
    langs = {b.lang for b in blocks()}
    # go and ts: tests/test_stubs.py; yaml: a manifest (tests/test_deploy.py validates the repository's own)
    assert langs <= {*RUN_LANGS, "go", "ts", "yaml"}, f"blocks in a language no test runs: {langs}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, sample: Path) -> Path:
    """A scratch "clone": ``clone/.venv`` -> this virtualenv, ``shared/quickdraw`` -> the sample."""
    base = tmp_path_factory.mktemp("readme")
    (base / "shared").mkdir()
    (base / "shared" / "quickdraw").symlink_to(sample)
    clone = base / "clone"
    clone.mkdir()
    (clone / ".venv").symlink_to(Path(sys.prefix))
    return clone


def env() -> dict[str, str]:
    out = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "clients" / "python" / "src")]  # this checkout's server and client code
    out["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [out.get("PYTHONPATH")])])
    out["PYTHONUNBUFFERED"] = "1"
    return out


@pytest.fixture(scope="module")
def served(workdir: Path) -> Iterator[tuple[int, int, str]]:
    """``.venv/bin/quickdraw serve`` on free ports, started as ``make run`` starts it: (gRPC, HTTP, its banner)."""
    grpc_port, http_port = free_port(), free_port()
    cmd = [".venv/bin/quickdraw", "serve", "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
           "--http-port", str(http_port), "--model-dir", str(SHIPPED_MODEL), "--no-warmup"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=workdir, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 120
    try:
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "try: " in line:
                break
        banner = "".join(lines)
        assert "try: " in banner, banner
        yield grpc_port, http_port, banner
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def localise(code: str, grpc_port: int, http_port: int) -> str:
    """The README's default ports as the test gateway's."""
    code = code.replace("localhost:50051", f"localhost:{grpc_port}").replace("localhost:8080", f"localhost:{http_port}")
    return re.sub(r"(quickdraw classify)(?! --target)", rf"\1 --target localhost:{grpc_port}", code)


def run_block(block: Block, cwd: Path, grpc_port: int, http_port: int) -> str:
    code = localise(block.code, grpc_port, http_port)
    cmd = ["bash", "-e", "-o", "pipefail", "-c", code] if block.lang == "sh" else [sys.executable, "-c", code]
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    where = f"{block.where} ({block.lang})"
    assert proc.returncode == 0, f"{where} failed ({proc.returncode}):\n{code}\n--- stdout\n{proc.stdout}\n" \
                                 f"--- stderr\n{proc.stderr[-3000:]}"  # fmt: skip
    return proc.stdout


def test_the_banner_example_works_as_printed(served: tuple[int, int, str], workdir: Path) -> None:
    _, http_port, banner = served
    for route in ("/metrics", "/v1/classify", "/openapi.json", "/v2"):  # where everything is, as the pages show it
        assert f"localhost:{http_port}{route}" in banner or f"127.0.0.1:{http_port}{route}" in banner, banner
    command = banner.split("try: ", 1)[1].strip()
    # make run: .venv/bin is not on PATH, and the banner says so; with it on PATH (an activated venv), plain quickdraw
    found = shutil.which("quickdraw")
    on_path = found is not None and os.path.samefile(found, Path(sys.prefix, "bin", "quickdraw"))
    want = "quickdraw classify --target " if on_path else ".venv/bin/quickdraw classify --target "
    assert command.startswith(want), command
    proc = subprocess.run(command, shell=True, cwd=workdir, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.match(r"cat\.ndjson:1 +cat \d\.\d\d", proc.stdout), proc.stdout


def test_the_examples_run_and_print_what_the_pages_show(served: tuple[int, int, str], workdir: Path) -> None:
    grpc_port, http_port, _ = served
    ran = 0
    for block in blocks():
        if block.lang not in RUN_LANGS or block.not_run is not None:
            continue
        t0 = time.monotonic()
        out = run_block(block, workdir, grpc_port, http_port)
        ran += 1
        if PRINT:  # regenerating: show every output, check none
            print(f"\n=== {block.where} ({time.monotonic() - t0:.1f} s)\n{out}", end="")
            continue
        if block.output is not None:
            pattern = shape(localise(block.output, grpc_port, http_port))
            assert pattern.fullmatch(out), (f"{block.where}: the output does not have the shape shown\n"
                                            f"--- shown\n{block.output}\n--- got\n{out}")  # fmt: skip
    assert ran >= RUN_BEFORE_THE_DOCS


def test_the_banner_the_pages_show_is_the_real_one(served: tuple[int, int, str]) -> None:
    grpc_port, http_port, banner = served
    fence = re.compile(r"^```\n(quickdraw gateway ready:.*?)^```", re.M | re.S)
    shown = [(page, m.group(1)) for page in pages() for m in fence.finditer(page.read_text())]
    assert shown, "no page shows the ready banner any more"
    real = banner[banner.index("quickdraw gateway ready:") :].replace("127.0.0.1", "localhost")
    real = real.replace("gRPC on localhost:", "gRPC on 0.0.0.0:")  # the test binds 127.0.0.1; make run all addresses
    for page, text in shown:
        pattern = shape(localise(text, grpc_port, http_port))
        assert pattern.fullmatch(real), f"{page.name}: the banner shown\n{text}\n--- is not the real one\n{real}"

