"""Generate Python code for every ``.proto`` under ``protos/``, reproducibly (``make protos``).

The generated code belongs to the client distribution (``clients/python``, installable without the server):
``protos/quickdraw/v1/x.proto`` becomes ``clients/python/src/quickdraw_client/v1/x_pb2.py`` (plus
``_pb2_grpc.py`` and ``.pyi``), whose imports of each other name ``quickdraw_client.v1``. The descriptors keep
their proto file names (``quickdraw/v1/x.proto``) and packages (``quickdraw.v1``), so the wire, reflection and
the other languages' stubs are unchanged. The server's ``quickdraw.v1`` is the same modules under the old
import path (``quickdraw/v1/__init__.py``): one copy of the code, one registration in the descriptor pool.
The output depends only on the .proto files and the pinned grpcio-tools version, so a test can regenerate into
a temporary directory and compare for drift.

The vendored TF Serving protos under ``protos/third_party/tfserving/`` get no Python code: they compile to one
serialized ``FileDescriptorSet`` with their imports, ``service/protos/tfs/tfserving.binpb``, which
``service.protos.tfs`` loads
into a private descriptor pool (TensorFlow's own copies of the same names may share the process). The vendored
Open Inference Protocol (KServe v2) proto under ``protos/third_party/kserve/`` compiles the same way, to
``service/protos/oip/oip.binpb`` (``service.protos.oip``'s private pool: tritonclient and the kserve SDK register the
same
``inference.*`` names in the default pool).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Vendored protos, under protos/: compiled to descriptor sets, not to Python modules.
THIRD_PARTY = "third_party"
#: The vendored TF Serving API (and what it imports), and the descriptor set it compiles to.
TFSERVING_PROTOS = ROOT / "protos" / THIRD_PARTY / "tfserving"
TFSERVING_SET = Path("service") / "protos" / "tfs" / "tfserving.binpb"
#: The (trimmed) TF Serving service files; ``--include_imports`` adds everything they import.
#: The public API's protos (proto directory -> Python package) go to the client distribution's sources; the
#: others (the server's own, e.g. quickdraw/tfserving_schema) stay in the repository at their proto path.
CLIENT_SRC = Path("clients") / "python" / "src"
PYTHON_PACKAGE_OF = {"quickdraw.v1": "quickdraw_client.v1"}
TFSERVING_ROOTS = (
    "tensorflow_serving/apis/model_service.proto",
    "tensorflow_serving/apis/prediction_service.proto",
)

#: The vendored Open Inference Protocol (package ``inference``), and the descriptor set it compiles to.
OIP_PROTOS = ROOT / "protos" / THIRD_PARTY / "kserve"
OIP_SET = Path("service") / "protos" / "oip" / "oip.binpb"
OIP_ROOTS = ("open_inference_grpc.proto",)


def proto_files(proto_root: Path) -> list[Path]:
    """Every .proto under ``proto_root`` but the vendored ``third_party/``, sorted for a stable order."""
    return sorted(p for p in proto_root.rglob("*.proto") if THIRD_PARTY not in p.relative_to(proto_root).parts)


def generate_descriptor_set(
    out_dir: Path, proto_root: Path = TFSERVING_PROTOS, target: Path = TFSERVING_SET,
    roots: tuple[str, ...] = TFSERVING_ROOTS,
) -> Path:
    """Compile vendored protos (by default TF Serving's, into ``out_dir/service/protos/tfs/tfserving.binpb``);
    returns the path written.

    A ``FileDescriptorSet`` of the root files and all their imports (google/protobuf ones included), in
    dependency order, without source info: the bytes depend only on the .proto files and protoc's version.
    """
    from grpc_tools import protoc

    out = out_dir / target
    out.parent.mkdir(parents=True, exist_ok=True)
    include = str(resources.files("grpc_tools") / "_proto")
    args = [
        "protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={include}",
        "--include_imports",
        f"--descriptor_set_out={out}",
        *roots,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return out


def _destination(out_dir: Path, proto_rel: Path) -> Path:
    """Where the code of ``proto_rel`` goes, without suffix: ``quickdraw/v1/x.proto`` ->
    ``out_dir/clients/python/src/quickdraw_client/v1/x``; any other proto mirrors its path under ``out_dir``."""
    package = ".".join(proto_rel.parent.parts)
    if package in PYTHON_PACKAGE_OF:
        return out_dir / CLIENT_SRC / Path(*PYTHON_PACKAGE_OF[package].split(".")) / proto_rel.stem
    return out_dir / proto_rel.with_suffix("")


def _rename_imports(text: str) -> str:
    """Point the generated imports of the public API's modules (``from quickdraw_client.v1 import``) at their
    package."""
    pattern = re.compile(r"^(from|import) (" + "|".join(map(re.escape, PYTHON_PACKAGE_OF)) + r")\b", re.MULTILINE)
    return pattern.sub(lambda m: f"{m.group(1)} {PYTHON_PACKAGE_OF[m.group(2)]}", text)


def generate(out_dir: Path, proto_root: Path = ROOT / "protos") -> list[Path]:
    """Compile every proto (see :func:`_destination` for where each goes); returns the files written. Raises on
    protoc errors."""
    from grpc_tools import protoc

    files = proto_files(proto_root)
    if not files:
        return []
    include = str(resources.files("grpc_tools") / "_proto")
    # google/rpc/*.proto ship with googleapis-common-protos, whose Python modules we import at run time.
    from google.rpc import status_pb2

    googleapis = str(Path(status_pb2.__file__).resolve().parents[2])
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"--proto_path={proto_root}",
            f"--proto_path={include}",
            f"--proto_path={googleapis}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(f.relative_to(proto_root)) for f in files),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        for f in files:
            rel = f.relative_to(proto_root)
            target = _destination(out_dir, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
                generated = Path(tmp) / f"{rel.with_suffix('')}{suffix}"
                if generated.exists():
                    p = target.with_name(target.name + suffix)
                    p.write_text(_rename_imports(generated.read_text()))
                    written.append(p)
            # Make every generated directory an importable package.
            root = out_dir / CLIENT_SRC if (out_dir / CLIENT_SRC) in target.parents else out_dir
            pkg = target.parent
            while pkg != root and root in pkg.parents:
                init = pkg / "__init__.py"
                if not init.exists():
                    init.write_text('"""Generated from protos/ by `make protos`; do not edit."""\n')
                pkg = pkg.parent
    return written


def main() -> int:
    """Regenerate into the repository (or ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args()
    written = generate(args.out)
    written.append(generate_descriptor_set(args.out))
    written.append(generate_descriptor_set(args.out, OIP_PROTOS, OIP_SET, OIP_ROOTS))
    for p in written:
        print(f"generated {p.relative_to(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
