"""Every limit is documented in one place: docs/limits.md's table has a row for each limit-like setting.

A setting is limit-like when its name says so (``max_*``, ``*timeout*``, ``*grace*``). Each such setting must
have a row naming it in the table's setting column, with its default; and every setting the table names must
exist, so the table cannot go stale in either direction.
"""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from service.settings import Settings

LIMIT_LIKE = re.compile(r"(^|_)max_|timeout|grace")
SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")
LIMITS_PAGE = ROOT / "docs" / "limits.md"


def limits_table() -> dict[str, str]:
    """The rows of docs/limits.md's table, keyed by each setting named in their setting column."""
    text = LIMITS_PAGE.read_text()
    section = ("\n" + text).split("\n# Limits\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("limit", "---"):
            for name in SETTING.findall(cells[1]):
                rows.setdefault(name, line)  # its own row comes first; later ones derive from it
    return rows


def limit_settings() -> list[str]:
    return [name for name in Settings.model_fields if LIMIT_LIKE.search(name)]


def test_limits_table_exists_and_names_the_request_limits() -> None:
    rows = limits_table()
    assert {"max_message_bytes", "max_drawings_per_request", "max_points", "max_image_pixels"} <= set(rows)


def test_every_limit_like_setting_has_a_row() -> None:
    missing = [name for name in limit_settings() if name not in limits_table()]
    assert not missing, f"add a row for each to the table in docs/limits.md (setting, default, error): {missing}"


@pytest.mark.parametrize("name", limit_settings())
def test_each_row_gives_the_settings_default(name: str) -> None:
    row = limits_table().get(name)
    if row is None:
        pytest.skip(f"{name} has no row (test_every_limit_like_setting_has_a_row says so)")
    default = Settings.model_fields[name].default
    shown = {str(default)}
    if isinstance(default, float):
        shown = {f"{default:g}"} | ({str(int(default))} if default.is_integer() else set())
    cell = row.split("|")[3]
    assert any(re.search(rf"(?<![\d.]){re.escape(s)}(?![\d.])", cell) for s in shown), (
        f"the Limits row of {name} should show its default ({' or '.join(sorted(shown))}): {row}"
    )


def test_every_setting_in_the_table_exists() -> None:
    stale = [name for name in limits_table() if name not in Settings.model_fields and not name.isupper()]
    assert not stale, f"the Limits table names settings that do not exist: {stale}"
