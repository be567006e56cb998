"""The docs cannot drift from what they describe: generated pages are current, every "test bound" a page states is
the constant its test asserts with, RELIABILITY.md's table is what its committed tallies give (and names the faults
the fault tests save), README.md stays short and its links resolve, and ``quickdraw serve --help`` stays short while
every setting stays an option. (Broken links between the pages fail ``mkdocs build --strict`` in ``make test``.)

Runtime: about 2 s (two ``quickdraw serve --help`` processes; no gateway, no TensorFlow).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_docs  # noqa: E402
import reliability_report  # noqa: E402

#: ``the test bound: **50 ms** (`tests/test_attacks_grpc.py` `REFUSAL_BOUND_S`)``
BOUND = re.compile(r"test bound: \*\*([\d.]+) (ms|s|MiB|KiB)\*\*\s+\(`(tests/[\w/]+\.py)`\s+`([A-Z_]+)`\)")
TO_DOC_UNIT = {("S", "ms"): 1000.0, ("S", "s"): 1.0, ("MS", "ms"): 1.0, ("MIB", "MiB"): 1.0, ("KIB", "KiB"): 1.0}
#: The bounds the pages must keep stating (a page that drops one loses the check).
STATED = {"HEALTH_BOUND_S", "RSS_BOUND_MIB", "CPU_BOUND_S", "REFUSAL_BOUND_S", "PER_STREAM_BOUND_KIB"}
README_MAX_LINES = 200
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "RELIABILITY.md", *sorted((ROOT / "docs").rglob("*.md"))]


def module_constant(path: Path, name: str) -> float:
    """A module-level ``NAME = number`` of a test file, read without importing it."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return float(ast.literal_eval(node.value))
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple):  # A, B = 1, 2
            names = [t.id for t in node.targets[0].elts if isinstance(t, ast.Name)]
            if name in names:
                return float(ast.literal_eval(node.value)[names.index(name)])
    raise AssertionError(f"{path.relative_to(ROOT)} has no module-level {name}")


@pytest.mark.parametrize("page", ["configuration", "metrics"])
def test_generated_reference_pages_are_current(page: str) -> None:
    path = {"configuration": gen_docs.CONFIGURATION, "metrics": gen_docs.METRICS}[page]
    want = getattr(gen_docs, page)()
    assert path.read_text() == want, f"{path.relative_to(ROOT)} is stale: run python scripts/gen_docs.py"


def test_every_setting_and_metric_has_its_row() -> None:
    from service.core.metrics import Metrics
    from service.settings import Settings

    config = gen_docs.CONFIGURATION.read_text()
    missing = [n for n in Settings.model_fields if f"`QUICKDRAW_{n.upper()}`" not in config]
    assert not missing, missing
    names = {f.name for f in Metrics().registry.collect() if f.name.startswith("quickdraw_")}
    metrics = gen_docs.METRICS.read_text()
    assert names and all(f"`{n}" in metrics for n in names), sorted(n for n in names if f"`{n}" not in metrics)


def test_every_stated_test_bound_is_the_tests_constant() -> None:
    found: dict[str, list[str]] = {}
    for page in doc_pages():
        for value, unit, test_file, name in BOUND.findall(page.read_text()):
            suffix = name.rsplit("_", 1)[1]
            factor = TO_DOC_UNIT.get((suffix, unit))
            assert factor is not None, f"{page.name}: {name} is stated in {unit}"
            actual = module_constant(ROOT / test_file, name) * factor
            assert float(value) == pytest.approx(actual), (
                f"{page.relative_to(ROOT)} states {name} = {value} {unit}; {test_file} asserts with {actual:g} {unit}"
            )
            found.setdefault(name, []).append(page.name)
    assert set(found) >= STATED, f"no page states these test bounds any more: {sorted(STATED - set(found))}"


def test_reliability_table_is_what_the_committed_tallies_give() -> None:
    assert reliability_report.main(["--check"]) == 0, "RELIABILITY.md is stale: see scripts/reliability_report.py"


def test_reliability_rows_name_the_faults_the_tests_save() -> None:
    """Each ``tally.save("fault", ...)`` string of tests/test_reliability.py is a row of the committed tallies: a
    renamed fault shows in RELIABILITY.md at once, not only after the next ``make reliability``."""
    saved = set()
    for node in ast.walk(ast.parse((ROOT / "tests" / "test_reliability.py").read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "save":
            saved.add(ast.literal_eval(node.args[0]))
    data = json.loads(reliability_report.DATA.read_text())
    assert {r["fault"] for r in data["rows"]} == saved
    assert all("stand-in" in f for f in saved if "TF Serving" in f), "a TF Serving row that hides the stand-in"


def test_readme_is_short_and_its_links_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < README_MAX_LINES
    for target in LINK.findall(text):
        if "://" in target:
            continue
        assert (ROOT / target).exists(), f"README.md links to {target}, which is not there"


def serve_help(*flags: str) -> str:
    return subprocess.run([sys.executable, "-m", "quickdraw", "serve", *flags], capture_output=True, text=True,
                          cwd=ROOT, check=True, timeout=120).stdout  # fmt: skip


def test_serve_help_is_short_and_help_all_lists_every_option() -> None:
    from service.settings import Settings

    short, full = serve_help("--help"), serve_help("--help-all")
    assert len(short.splitlines()) < 200 and "--help-all" in short and "configuration" in short
    options = [f"--{n.replace('_', '-')}" for n, i in Settings.model_fields.items()
               if not (i.json_schema_extra or {}).get("env_only")]  # type: ignore[union-attr]  # fmt: skip
    absent = [o for o in options if not re.search(rf"{o}[\s,=\]]", full)]
    assert not absent, f"--help-all misses {absent}"
    assert len(full.splitlines()) > len(short.splitlines())


def reliability_row(name: str) -> dict:
    data = json.loads(reliability_report.DATA.read_text())
    return next(r for r in data["rows"] if r["name"] == name)


#: Figures a page quotes from RELIABILITY.md's tallies: (page, the sentence's pattern, the row, its keys in order).
RELIABILITY_QUOTES = [
    ("docs/tfserving.md", r"admitted calls' p99 was (\d+) ms against (\d+) ms at half load", "overload-5x",
     ("p99_admitted_ms", "p99_normal_ms")),
    ("docs/limits.md", r"got ([\d,]+) accepted, then stuck; gateway RSS \+([\d.]+) MiB", "unread-stream",
     ("stream_messages_accepted", "rss_growth_mib")),
]  # fmt: skip
#: Figures a page quotes from BENCHMARKS.md (hand-written from `make bench` runs): each must be there as quoted.
BENCHMARK_QUOTES = {
    "docs/tfserving.md": ["620 vs 268 calls/s", "**2.32x**", "5.07 vs 4.72 ms", "| images/s | 394 |", "**2.12x**",
                          "1,260 images/s", "266 at batch 1", "**98%**", "**2.34x**"],
}  # fmt: skip


@pytest.mark.parametrize(("page", "pattern", "row", "keys"), RELIABILITY_QUOTES)
def test_figures_quoted_from_reliability_are_its_tallies(page: str, pattern: str, row: str, keys: tuple) -> None:
    text = " ".join((ROOT / page).read_text().split())
    m = re.search(pattern, text)
    assert m, f"{page} no longer quotes {row} as {pattern!r}: update the pattern here or the page"
    tally = reliability_row(row)
    quoted = [float(g.replace(",", "")) for g in m.groups()]
    actual = [float(tally[k]) for k in keys]
    assert quoted == actual, f"{page} quotes {quoted}; the tallies say {actual}"


@pytest.mark.parametrize("page", sorted(BENCHMARK_QUOTES))
def test_figures_quoted_from_benchmarks_are_there(page: str) -> None:
    bench = (ROOT / "BENCHMARKS.md").read_text()
    missing = [q for q in BENCHMARK_QUOTES[page] if q not in bench]
    assert not missing, f"{page} quotes figures BENCHMARKS.md no longer has: {missing}"
