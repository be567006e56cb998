"""The fenced examples of README.md and of the docs pages, as tests/test_readme.py and tests/test_stubs.py run them.

The pages are README.md, then docs/'s pages in the order of mkdocs.yml's nav (:func:`pages`), less the pages in
``NOT_RUN_PAGES``, each with its reason. A block is a fence with a language (```` ```sh ````,
```` ```python ````, ```` ```go ````, ```` ```ts ````). An ``<!-- not run: why -->`` comment on the line just
above a block marks it as one the tests cannot run. A fence with no language right after a block (only blank
lines between) is that block's output, and :func:`shape` turns it into a pattern: numbers may differ, ``...``
stands for anything, the rest must match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: Pages whose examples are not run, and why (tests/test_readme.py prints them).
NOT_RUN_PAGES = {
    "runbooks.md": "on-call steps against a cluster (kubectl, Prometheus); nothing to run against a local gateway",
}
_FENCE = re.compile(r"^```(\w*)\s*$")
_NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.+?)\s*-->\s*$")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


@dataclass
class Block:
    """One fenced example: where it starts, its language, its code, why it is not run (None: it is run), and the
    output shown under it (None: none)."""

    line: int
    lang: str
    code: str
    not_run: str | None = None
    output: str | None = None
    path: Path = README

    @property
    def where(self) -> str:
        """``docs/quickstart.md line 12``."""
        return f"{self.path.relative_to(ROOT)} line {self.line}"


def _nav_files(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [f for v in nav.values() for f in _nav_files(v)]
    if isinstance(nav, list):
        return [f for v in nav for f in _nav_files(v)]
    return []


def pages() -> list[Path]:
    """README.md, then every page of mkdocs.yml's nav that lives under docs/ (not the generated reference pages
    or those of ``NOT_RUN_PAGES``), in nav order; then any page under docs/ the nav forgot (mkdocs --strict fails
    on those too)."""
    import yaml

    nav = _nav_files(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    listed = [DOCS / f for f in nav if (DOCS / f).is_file()]
    rest = sorted(set(DOCS.rglob("*.md")) - set(listed))
    return [README] + [p for p in listed + rest if p.name not in NOT_RUN_PAGES and p.parent.name != "reference"]


def blocks(path: Path | None = None) -> list[Block]:
    """Every fenced block with a language of ``path`` (default: of every page, in :func:`pages`'s order), in
    document order, with its marker and its output block."""
    if path is None:
        return [b for page in pages() for b in blocks(page)]
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    last_end = -10
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        body = "\n".join(lines[start + 1 : j])
        lang = m.group(1)
        between = lines[last_end + 1 : start] if out else []
        if lang:
            marker = _NOT_RUN.match(lines[start - 1]) if start > 0 else None
            out.append(Block(start + 1, lang, body, marker.group(1) if marker else None, path=path))
            last_end = j
        elif out and last_end >= 0 and all(not b.strip() for b in between) and out[-1].output is None:
            out[-1].output = body
        i = j + 1
    return out


def shape(expected: str) -> re.Pattern[str]:
    """A pattern for the output a block shows: each number matches any number, ``...`` anything, and runs
    of spaces any run of spaces; everything else (labels, names, punctuation) as written."""
    parts = []
    for line in expected.strip("\n").splitlines():
        pieces = []
        for k, chunk in enumerate(line.split("...")):
            escaped = []
            pos = 0
            for m in _NUMBER.finditer(chunk):
                escaped.append(re.escape(chunk[pos : m.start()]))
                escaped.append(_NUMBER.pattern)
                pos = m.end()
            escaped.append(re.escape(chunk[pos:]))
            pieces.append(("" if k == 0 else ".*?") + "".join(escaped))
        parts.append(re.sub(r"(\\ )+", r" +", "".join(pieces)).rstrip())
    return re.compile(r"\s*\n".join(parts) + r"\s*", re.DOTALL)
