"""Other languages: ``make stubs`` generates Go and TypeScript stubs, and the Go and TypeScript examples of
docs/clients.md, built on them, classify against a live gateway and print what the page shows.

What runs depends on the machine, and each part skips naming what is missing: the stubs need grpcio-tools (dev
extra) and at least one plugin (protoc-gen-go and protoc-gen-go-grpc from the system; protoc-gen-es and buf
from npm, which ``scripts/stubs.py`` installs under build/npm when npm can reach its registry); the Go example
needs ``go`` and grpc-go in GOPATH mode (Debian's golang-google-grpc-dev under /usr/share/gocode); the
TypeScript example needs node and the npm packages. Everything is written under build/ (ignored by git).

Runtime: about 10 s once built; the first run builds the Go example (~20 s) and may run npm install (~15 s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import SHIPPED_MODEL, RunningGateway
from readme_blocks import Block, blocks, shape

from service.backends import find_versions
from service.client import QuickDrawClient

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "build" / "stubs"
NODE_MODULES = ROOT / "build" / "npm" / "node_modules"
GO_FILES = ("go/quickdraw/v1/classifier.pb.go", "go/quickdraw/v1/classifier_grpc.pb.go")
TS_FILES = ("ts/quickdraw/v1/classifier_pb.ts", "ts/google/rpc/status_pb.ts")
#: Where Debian's golang-*-dev packages put Go sources (GOPATH mode).
SYSTEM_GOPATH = Path("/usr/share/gocode")
SQUARE = [[[10, 200, 200, 10, 10], [10, 10, 200, 200, 10]]]

pytestmark = pytest.mark.skipif(not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL}")


def example(lang: str) -> Block:
    [block] = [b for b in blocks() if b.lang == lang]
    return block


def stubs(*args: str) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (the dev extra)")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "stubs.py"), *args], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def generated() -> set[str]:
    """``make stubs``'s own run through buf (it installs buf and the TypeScript plugin from npm when it can), then
    ``scripts/stubs.py --protoc`` with the same plugins; the files both wrote."""
    through_buf = stubs()
    wrote = {str(p.relative_to(STUBS)) for p in STUBS.rglob("*") if p.is_file() and p.suffix in (".go", ".ts")}
    through_protoc = stubs("--protoc")
    assert through_protoc.returncode in (0, 1), through_protoc.stderr
    wrote_protoc = {str(p.relative_to(STUBS)) for p in STUBS.rglob("*") if p.is_file() and p.suffix in (".go", ".ts")}
    if through_buf.returncode != 0 and not wrote_protoc:
        pytest.skip(f"no stub could be generated here: {through_buf.stderr.strip()[-500:]}")
    assert through_buf.returncode == 0, through_buf.stderr
    assert wrote == wrote_protoc, (wrote, wrote_protoc)  # protoc and buf run the same plugins
    skipped = [line for line in through_buf.stderr.splitlines() if "skipped" in line]
    print(f"\nstubs: {sorted(wrote)}; skipped: {skipped}")
    return wrote


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningGateway]:
    with RunningGateway() as gw:
        yield gw


def expected_top(gw: RunningGateway) -> list[str]:
    with QuickDrawClient(gw.target) as client:
        [result] = client.classify([SQUARE], raw=True)
    return [f"{label} {score:.2f}" for label, score in result.top]


def check_output(out: str, gw: RunningGateway) -> None:
    shown = example("ts").output
    assert shown is not None, "docs/clients.md shows no output under the TypeScript example"
    assert shape(shown).fullmatch(out), f"--- shown\n{shown}\n--- got\n{out}"
    labels = [line.rsplit(" ", 1)[0] for line in out.splitlines()]
    assert labels == [line.rsplit(" ", 1)[0] for line in expected_top(gw)]  # the labels the Python client gets


def test_go_example(generated: set[str], gateway: RunningGateway, tmp_path: Path) -> None:
    if not set(GO_FILES) <= generated:
        pytest.skip("protoc-gen-go or protoc-gen-go-grpc is not installed (apt-get install protoc-gen-go "
                    "protoc-gen-go-grpc)")
    go = shutil.which("go")
    if go is None:
        pytest.skip("no go toolchain (apt-get install golang-go golang-google-grpc-dev)")
    if not (SYSTEM_GOPATH / "src" / "google.golang.org" / "grpc").is_dir():
        pytest.skip(f"grpc-go is not under {SYSTEM_GOPATH} for a GOPATH build (apt-get install golang-google-grpc-dev)")
    if (SYSTEM_GOPATH / "src" / "github.com" / "golang" / "protobuf" / "proto" / "table_marshal.go").exists():
        pytest.skip("github.com/golang/protobuf 1.3 is in the GOPATH; grpc-go then cannot marshal APIv2 stubs "
                    "(apt-get install golang-github-golang-protobuf-1-5-dev)")
    gopath = STUBS / "gopath"
    package = gopath / "src" / "quickdraw" / "v1"
    shutil.rmtree(gopath, ignore_errors=True)
    package.mkdir(parents=True)
    for name in GO_FILES:
        shutil.copy(STUBS / name, package)
    main = gopath / "src" / "example"
    main.mkdir()
    (main / "main.go").write_text(example("go").code.replace("localhost:50051", gateway.target))
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{gopath}:{SYSTEM_GOPATH}", "GOFLAGS": "",
           "GOCACHE": str(ROOT / "build" / "gocache")}  # fmt: skip
    built = subprocess.run([go, "build", "-o", str(tmp_path / "example"), "."], cwd=main, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert built.returncode == 0, built.stderr
    ran = subprocess.run([str(tmp_path / "example")], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    check_output(ran.stdout, gateway)


def test_typescript_example(generated: set[str], gateway: RunningGateway, tmp_path: Path) -> None:
    if not set(TS_FILES) <= generated:
        pytest.skip("protoc-gen-es is not installed (scripts/stubs.py installs it with npm, which failed or is absent)")
    node = shutil.which("node")
    tsc = NODE_MODULES / "typescript" / "bin" / "tsc"
    if node is None or not tsc.exists() or not (NODE_MODULES / "@connectrpc" / "connect-node").is_dir():
        pytest.skip("node or the example's npm packages (typescript, @connectrpc/connect-node) are missing")
    shutil.copytree(STUBS / "ts", tmp_path, dirs_exist_ok=True)
    (tmp_path / "node_modules").symlink_to(NODE_MODULES)
    (tmp_path / "example.ts").write_text(example("ts").code.replace("localhost:50051", gateway.target))
    (tmp_path / "tsconfig.json").write_text(
        '{"compilerOptions": {"target": "es2022", "module": "node16", "moduleResolution": "node16", "strict": true, '
        '"outDir": "out", "skipLibCheck": true, "types": ["node"]}, "files": ["example.ts"]}'
    )
    built = subprocess.run([node, str(tsc), "-p", "."], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr  # type-checked against the generated stubs
    ran = subprocess.run([node, "out/example.js"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    check_output(ran.stdout, gateway)
