"""Generated protobuf code is reproducible: ``make protos`` output matches what is committed.

The generator runs in its own interpreter: grpc_tools' embedded protoc must not share a process with the
protobuf runtime that TensorFlow and gRPC have already loaded in the test session (it can crash there).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_generated_code_has_no_drift(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    expected = {
        p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    }
    assert expected, proc.stdout
    committed = {
        p.relative_to(ROOT)
        for p in ROOT.glob("quickdraw/**/*")
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    }
    assert committed == expected, "run `make protos` and commit the result"
    for rel in expected:
        assert (ROOT / rel).read_text() == (tmp_path / rel).read_text(), f"{rel} is stale: run `make protos`"
