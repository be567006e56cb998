"""Installs that fit the job: ``make run`` installs what serving needs, ``make test`` adds the dev extra on top.

The Makefile's own recipes are read with ``make -n`` (nothing is run) against a scratch virtualenv path, and the
packages the run step brings are resolved from the project's metadata through the distributions installed in this
environment (every requirement, transitively, with its markers): none of the dev extra's packages may be among
them. Runtime: well under a second per test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PIP_INSTALL = re.compile(r"-m pip install .*?-e '\.\[([a-z,]+)\]'")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


def dry_run(target: str, venv: Path) -> list[str]:
    """The commands ``make TARGET`` would run with ``VENV=venv``, without running them."""
    out = subprocess.run(["make", "--no-print-directory", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60)  # fmt: skip
    return out.stdout.splitlines()


def installed_extras(lines: list[str]) -> list[set[str]]:
    """The extras of the project named by each ``pip install`` line, in order."""
    return [set(m.group(1).split(",")) for line in lines if (m := PIP_INSTALL.search(line))]


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def closure(requirements: list[str]) -> set[str]:
    """Every distribution these requirements pull in, transitively, as installed here (markers evaluated)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(Requirement(str(sub).split(";")[0]))
    return seen


def test_make_run_installs_the_serving_extras_and_the_client_only(tmp_path: Path) -> None:
    lines = dry_run("run", tmp_path / "venv")
    assert installed_extras(lines) == [{"tf"}], lines
    assert any("-e ./clients/python" in line for line in lines), lines
    assert lines[-1].startswith(f"{tmp_path / 'venv'}/bin/quickdraw serve"), lines


def test_make_test_after_make_run_adds_only_the_dev_extra(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    fresh = dry_run("test", venv)
    assert installed_extras(fresh) == [{"tf"}, {"tf", "dev"}], fresh  # a fresh machine: both steps
    run_stamp = next(line.split()[-1] for line in fresh if "touch" in line and ".installed-run-" in line)
    Path(run_stamp).parent.mkdir(parents=True)
    Path(run_stamp).touch()  # as `make run` leaves it
    after_run = dry_run("test", venv)
    assert installed_extras(after_run) == [{"tf", "dev"}], after_run
    assert not any("--upgrade pip" in line for line in after_run), after_run


def test_pip_is_quiet_only_when_not_in_a_terminal(tmp_path: Path) -> None:
    installs = [line for line in dry_run("run", tmp_path / "venv") if "-m pip install" in line]
    assert installs and all("$(test -t 1 || echo --quiet)" in line for line in installs), installs
    shown = subprocess.run(["bash", "-c", "echo x $(test -t 1 || echo --quiet)"], capture_output=True, text=True)
    assert shown.stdout.split() == ["x", "--quiet"]  # stdout is a pipe here, as in CI


def test_the_serving_install_pulls_in_no_dev_only_package() -> None:
    proj = project()
    extras = proj["optional-dependencies"]
    run = closure([*proj["dependencies"], *(r for e in ("tf",) for r in extras[e])])
    if "tensorflow" not in run or "quickdraw-client" not in run:
        pytest.skip("this environment lacks the tf extra or the client, so its closure cannot be resolved here")
    dev_only = {canonicalize_name(Requirement(r).name) for r in extras["dev"]}
    assert {"pytest", "ruff", "playwright", "hypothesis", "tritonclient", "kubernetes-validate"} <= dev_only
    assert not run & dev_only, f"make run would install dev packages: {sorted(run & dev_only)}"
