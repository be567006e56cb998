"""Layout promises: the drawing library pulls in no TensorFlow or gRPC; every module says what it is for."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

from conftest import ROOT

PACKAGES = ["doodle", "quickdraw", "trainer", "service", "loadtest", "scripts", "benchmarks", "tests"]


def test_drawing_library_has_no_tensorflow_or_grpc() -> None:
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import doodle
        for m in pkgutil.walk_packages(doodle.__path__, "doodle."):
            importlib.import_module(m.name)
        bad = sorted(n for n in sys.modules if n.split(".")[0] in {"tensorflow", "grpc", "keras"})
        print(",".join(bad))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
    for path in (ROOT / "doodle").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] in {"tensorflow", "grpc", "keras"} for n in names), path


def test_every_module_has_a_docstring() -> None:
    missing = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            if not ast.get_docstring(ast.parse(path.read_text())):
                missing.append(str(path.relative_to(ROOT)))
    assert missing == []
