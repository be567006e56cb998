"""Generated protobuf code is reproducible: ``make protos`` output matches what is committed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import ROOT

spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
assert spec and spec.loader
gen_protos = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen_protos)


def test_generated_code_has_no_drift(tmp_path: Path) -> None:
    written = gen_protos.generate(tmp_path)
    expected = {p.relative_to(tmp_path) for p in written}
    committed = {
        p.relative_to(ROOT)
        for p in ROOT.glob("quickdraw/**/*")
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    }
    assert committed == expected, "run `make protos` and commit the result"
    for rel in expected:
        assert (ROOT / rel).read_text() == (tmp_path / rel).read_text(), f"{rel} is stale: run `make protos`"
