"""Shared fixtures: where the Quick, Draw! sample data is, and small helpers over it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sample_dir() -> Path:
    """``QUICKDRAW_SAMPLE_DIR``, by default ``../shared/quickdraw`` beside the repository."""
    return Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", ROOT.parent / "shared" / "quickdraw")).resolve()


@pytest.fixture(scope="session")
def sample() -> Path:
    """The sample data directory; tests that need it skip, saying why, when it is absent."""
    d = sample_dir()
    if not (d / "numpy_bitmap").is_dir():
        pytest.skip(f"Quick, Draw! sample data not found at {d} (set QUICKDRAW_SAMPLE_DIR)")
    return d


@pytest.fixture(scope="session")
def paired_classes(sample: Path) -> list[str]:
    """Classes that have both a numpy_bitmap file and a simplified file (29 in the sample)."""
    names = sorted(p.stem for p in (sample / "numpy_bitmap").glob("*.npy"))
    return [n for n in names if (sample / "simplified" / f"{n}.ndjson").exists()]
