"""Generate Python code for every ``.proto`` under ``protos/``, reproducibly (``make protos``).

``protos/quickdraw/v1/x.proto`` becomes ``quickdraw/v1/x_pb2.py`` (plus ``_pb2_grpc.py`` and ``.pyi``),
a path that mirrors the proto package. The output depends only on the .proto files and the pinned
grpcio-tools version, so a test can regenerate into a temporary directory and compare for drift.

The vendored TF Serving protos under ``protos/third_party/tfserving/`` get no Python code: they compile to one
serialized ``FileDescriptorSet`` with their imports, ``service/tfs/tfserving.binpb``, which ``service.tfs`` loads
into a private descriptor pool (TensorFlow's own copies of the same names may share the process). The vendored
Open Inference Protocol (KServe v2) proto under ``protos/third_party/kserve/`` compiles the same way, to
``service/oip/oip.binpb`` (``service.oip``'s private pool: tritonclient and the kserve SDK register the same
``inference.*`` names in the default pool).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Vendored protos, under protos/: compiled to descriptor sets, not to Python modules.
THIRD_PARTY = "third_party"
#: The vendored TF Serving API (and what it imports), and the descriptor set it compiles to.
TFSERVING_PROTOS = ROOT / "protos" / THIRD_PARTY / "tfserving"
TFSERVING_SET = Path("service") / "tfs" / "tfserving.binpb"
#: The (trimmed) TF Serving service files; ``--include_imports`` adds everything they import.
TFSERVING_ROOTS = (
    "tensorflow_serving/apis/model_service.proto",
    "tensorflow_serving/apis/prediction_service.proto",
)

#: The vendored Open Inference Protocol (package ``inference``), and the descriptor set it compiles to.
OIP_PROTOS = ROOT / "protos" / THIRD_PARTY / "kserve"
OIP_SET = Path("service") / "oip" / "oip.binpb"
OIP_ROOTS = ("open_inference_grpc.proto",)


def proto_files(proto_root: Path) -> list[Path]:
    """Every .proto under ``proto_root`` but the vendored ``third_party/``, sorted for a stable order."""
    return sorted(p for p in proto_root.rglob("*.proto") if THIRD_PARTY not in p.relative_to(proto_root).parts)


def generate_descriptor_set(
    out_dir: Path, proto_root: Path = TFSERVING_PROTOS, target: Path = TFSERVING_SET,
    roots: tuple[str, ...] = TFSERVING_ROOTS,
) -> Path:
    """Compile vendored protos (by default TF Serving's, into ``out_dir/service/tfs/tfserving.binpb``); returns the
    path written.

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


def generate(out_dir: Path, proto_root: Path = ROOT / "protos") -> list[Path]:
    """Compile every proto into ``out_dir``; returns the files written. Raises on protoc errors."""
    from grpc_tools import protoc

    files = proto_files(proto_root)
    if not files:
        return []
    include = str(resources.files("grpc_tools") / "_proto")
    # google/rpc/*.proto ship with googleapis-common-protos, whose Python modules we import at run time.
    from google.rpc import status_pb2

    googleapis = str(Path(status_pb2.__file__).resolve().parents[2])
    args = [
        "protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={include}",
        f"--proto_path={googleapis}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(f.relative_to(proto_root)) for f in files),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = []
    for f in files:
        stem = f.relative_to(proto_root).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            p = out_dir / f"{stem}{suffix}"
            if p.exists():
                written.append(p)
        # Make every generated directory an importable package.
        pkg = (out_dir / stem).parent
        while pkg != out_dir and out_dir in pkg.parents:
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
