"""``make stubs``: Go and TypeScript client stubs for ``protos/quickdraw/v1`` under ``build/stubs/`` (not committed).

1. grpcio-tools' protoc compiles the API, with its imports and comments, into a descriptor image,
   ``build/stubs/quickdraw.binpb`` (``google/rpc/status.proto`` comes from googleapis-common-protos, installed
   with grpcio-status: nothing is fetched).
2. ``buf lint`` checks the API against ``buf.yaml``, and ``buf generate`` runs the plugins of ``buf.gen.yaml``
   on the image: Go (protoc-gen-go, protoc-gen-go-grpc) into ``build/stubs/go/quickdraw/v1/``, TypeScript
   (protoc-gen-es) into ``build/stubs/ts/quickdraw/v1/``.

buf and protoc-gen-es come from npm (pinned below) into ``build/npm/`` when npm is there and they are not; the Go
plugins come from the system (``apt-get install protoc-gen-go protoc-gen-go-grpc``, or ``go install``). A plugin
that is missing is skipped and named; with no buf at all, the same plugins run through grpcio-tools' protoc
(``--protoc``, the commands docs/clients.md shows). Exits 0 when every available plugin generated its files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "stubs"
NPM_PREFIX = ROOT / "build" / "npm"
#: npm packages `make stubs` installs when missing (pinned: the generated code depends on the versions).
NPM_PACKAGES = ("@bufbuild/buf@1.75.0", "@bufbuild/protoc-gen-es@2.17.0")
#: What docs/clients.md's TypeScript example needs besides the stubs (installed with them; tests/test_stubs.py runs it).
NPM_EXAMPLE_PACKAGES = ("@bufbuild/protobuf@2.17.0", "@connectrpc/connect@2.3.0", "@connectrpc/connect-node@2.3.0",
                        "@types/node@20", "typescript@5.9.3")
PROTO = "quickdraw/v1/classifier.proto"
#: How long npm may take to install the packages (a registry that does not answer fails, not hangs).
NPM_TIMEOUT_S = 300
IMAGE = OUT / "quickdraw.binpb"
#: The one import of the API that is not a well-known type (TypeScript needs its code too).
STATUS_PROTO = "google/rpc/status.proto"


def include_dirs() -> list[str]:
    """protoc's include path: our protos, googleapis-common-protos' (google/rpc), grpcio-tools' (google/protobuf)."""
    import google.rpc

    googleapis = Path(next(iter(google.rpc.__path__))).parents[1]
    return [str(ROOT / "protos"), str(googleapis), str(resources.files("grpc_tools") / "_proto")]


def protoc(*args: str) -> None:
    """Run grpcio-tools' protoc; raise on failure."""
    from grpc_tools import protoc as grpc_protoc

    argv = ["protoc", *(f"-I{d}" for d in include_dirs()), *args]
    if grpc_protoc.main(argv) != 0:
        raise SystemExit(f"stubs: protoc failed: {' '.join(argv)}")


def tool(name: str) -> str | None:
    """A tool on PATH, or under build/npm/node_modules/.bin."""
    local = NPM_PREFIX / "node_modules" / ".bin" / name
    return shutil.which(name) or (str(local) if local.exists() else None)


def _npm_missing(packages: tuple[str, ...]) -> list[str]:
    return [p for p in packages if not (NPM_PREFIX / "node_modules" / p.rsplit("@", 1)[0] / "package.json").exists()]


def npm_install() -> None:
    """Install buf, protoc-gen-es and the TypeScript example's packages under build/npm when npm is there and any
    is missing."""
    packages = NPM_PACKAGES + NPM_EXAMPLE_PACKAGES
    if not _npm_missing(packages):
        return
    npm = shutil.which("npm")
    if npm is None:
        print("stubs: no npm: buf and protoc-gen-es cannot be installed here", file=sys.stderr)
        return
    try:  # a registry that cannot be reached is found out in seconds, not after npm's retries
        subprocess.run([npm, "ping", "--fetch-retries=0", "--fetch-timeout=10000"], check=True, capture_output=True,
                       timeout=30)  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        print("stubs: the npm registry does not answer: buf and protoc-gen-es cannot be installed", file=sys.stderr)
        return
    NPM_PREFIX.mkdir(parents=True, exist_ok=True)
    print(f"stubs: npm install {' '.join(packages)} (into build/npm)", flush=True)
    try:
        subprocess.run([npm, "install", "--prefix", str(NPM_PREFIX), "--no-audit", "--no-fund", "--loglevel=error",
                        *packages], check=True, timeout=NPM_TIMEOUT_S)  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:  # no registry here: go on without
        print(f"stubs: npm install failed ({exc}): going on without what it would have installed", file=sys.stderr)


def plugins() -> tuple[list[dict[str, str]], list[str]]:
    """buf.gen.yaml's plugins whose binary is here (with ``local`` made absolute), and the names of the others."""
    import yaml

    template = yaml.safe_load((ROOT / "buf.gen.yaml").read_text())
    found, missing = [], []
    for plugin in template["plugins"]:
        name = plugin["local"]
        path = tool(Path(name).name) if "/" in name else shutil.which(name)
        if path is None:
            missing.append(Path(name).name)
            continue
        found.append({**plugin, "local": path, "out": str(ROOT / plugin["out"])})
    return found, missing


def generate(use_protoc: bool) -> int:
    """Build the image, lint, generate; returns the exit code."""
    if use_protoc is False:
        npm_install()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    protoc("--include_imports", "--include_source_info", f"--descriptor_set_out={IMAGE}", PROTO)
    found, missing = plugins()
    for name in missing:
        print(f"stubs: {name} is not installed: skipped (see buf.gen.yaml for how to install it)", file=sys.stderr)
    buf = None if use_protoc else tool("buf")
    if buf is not None:
        subprocess.run([buf, "lint", str(IMAGE), "--path", "quickdraw/v1", "--config", str(ROOT / "buf.yaml")],
                       check=True, cwd=ROOT)  # fmt: skip
        if found:
            template = json.dumps({"version": "v2", "plugins": found})
            subprocess.run([buf, "generate", str(IMAGE), "--path", "quickdraw/v1", "--template", template],
                           check=True, cwd=ROOT)  # fmt: skip
    else:
        if not use_protoc:
            print("stubs: no buf: running the plugins through grpcio-tools' protoc", file=sys.stderr)
        for plugin in found:
            name = Path(plugin["local"]).name.removeprefix("protoc-gen-")
            Path(plugin["out"]).mkdir(parents=True, exist_ok=True)
            imports = [STATUS_PROTO] if plugin.get("include_imports") else []
            protoc(f"--plugin=protoc-gen-{name}={plugin['local']}", f"--{name}_out={plugin['out']}",
                   f"--{name}_opt={plugin['opt']}", PROTO, *imports)  # fmt: skip
    for path in sorted(p for p in OUT.rglob("*") if p.is_file() and p != IMAGE):
        print(f"stubs: wrote {path.relative_to(ROOT)}")
    return 0 if found else 1


def main() -> int:
    """Generate the stubs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protoc", action="store_true", help="run the plugins through grpcio-tools' protoc, not buf")
    args = p.parse_args()
    os.chdir(ROOT)
    return generate(args.protoc)


if __name__ == "__main__":
    sys.exit(main())
