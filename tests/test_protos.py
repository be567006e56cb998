"""Generated protobuf code is reproducible: ``make protos`` output matches what is committed.

That covers the Python modules generated from ``protos/`` and the TF Serving descriptor set compiled from the
vendored ``protos/third_party/tfserving/`` (``service/protos/tfs/tfserving.binpb``).

The generator runs in its own interpreter: grpc_tools' embedded protoc must not share a process with the
protobuf runtime that TensorFlow and gRPC have already loaded in the test session (it can crash there).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``make protos`` into a temporary directory, once: (that directory, the generator's stdout)."""
    out = tmp_path_factory.mktemp("protos")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_generated_code_has_no_drift(generated: tuple[Path, str]) -> None:
    tmp_path, stdout = generated
    expected = {
        p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    }
    assert expected, stdout
    committed = {
        p.relative_to(ROOT)
        for pattern in ("quickdraw/**/*", "clients/python/src/**/*")
        for p in ROOT.glob(pattern)
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    }
    assert committed == expected, "run `make protos` and commit the result"
    for rel in expected:
        assert (ROOT / rel).read_text() == (tmp_path / rel).read_text(), f"{rel} is stale: run `make protos`"


def test_tfserving_descriptor_set_has_no_drift(generated: tuple[Path, str]) -> None:
    tmp_path, _ = generated
    rel = Path("service") / "protos" / "tfs" / "tfserving.binpb"
    assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), f"{rel} is stale: run `make protos`"
    # the vendored protos make no Python modules: they must not shadow or clash with tensorflow_serving's
    assert not list(tmp_path.rglob("tensorflow*")), "protos/third_party/ must not be compiled to Python"
