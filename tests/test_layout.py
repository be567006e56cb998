"""Layout promises: the drawing library pulls in no TensorFlow or gRPC; every module says what it is for; the
import contracts of pyproject.toml's ``[tool.importlinter]`` hold; no import cycle, in the packages or in scripts/.

The import checks read this checkout's files (``PYTHONPATH``: the checkout and its clients/python/src first),
whatever the virtualenv's editable installs point at. An import inside a function or under ``TYPE_CHECKING``
counts like any other.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

from conftest import CLIENT_SRC, ROOT

PACKAGES = ["doodle", "quickdraw", "trainer", "service", "loadtest", "scripts", "benchmarks", "tests"]
#: The packages whose modules must not import each other in a circle (service/ keeps its own contracts).
ACYCLIC = ["doodle", "trainer", "quickdraw", "quickdraw_client", "loadtest"]
#: Folders of plain files that import each other by bare name (``import rehearsal``), through sys.path.
SCRIPT_DIRS = ["scripts", "tests"]


def checkout_env() -> dict[str, str]:
    """The environment for a child that must import this checkout's packages, not the venv's installed copies."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(CLIENT_SRC)])}


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


def test_import_contracts_hold() -> None:
    """``lint-imports`` (``make lint``) keeps every contract of ``[tool.importlinter]``."""
    lint = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    out = subprocess.run([sys.executable, "-c", lint, "--no-cache", "--no-logo"], capture_output=True, text=True,
                         cwd=ROOT, env=checkout_env(), timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 broken." in out.stdout, out.stdout


def test_no_module_imports_itself_in_a_circle() -> None:
    """No cycle of imports between the modules of ``ACYCLIC``, a package's ``__init__`` and its own modules
    included (the acyclic_siblings contract compares siblings only)."""
    code = textwrap.dedent(
        f"""
        import grimp
        packages = {ACYCLIC!r}
        graph = grimp.build_graph(*packages, cache_dir=None)
        ours = lambda m: m.split(".")[0] in packages
        for importer in sorted(filter(ours, graph.modules)):
            for imported in sorted(filter(ours, graph.find_modules_directly_imported_by(importer))):
                back = graph.find_shortest_chain(importer=imported, imported=importer)
                if back:
                    print(" -> ".join((importer, *back)))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                         check=True, timeout=60)  # fmt: skip
    assert out.stdout == "", f"import cycles:\n{out.stdout}"


def bare_imports() -> dict[str, set[str]]:
    """For each file of ``SCRIPT_DIRS``, the other files of those folders it imports, anywhere in it."""
    files = {p.stem: p for d in SCRIPT_DIRS for p in sorted((ROOT / d).glob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def test_scripts_import_each_other_without_a_circle() -> None:
    """scripts/ is no package, so import-linter cannot see it: the same promise, from the files' own imports."""
    graph = bare_imports()
    assert {"rehearsal_topology", "rehearsal_autoscaling"} <= graph["rehearsal_batching"]  # the graph sees them
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == []
