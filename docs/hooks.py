"""MkDocs hook: pages and images that live outside docs/ join the site under their own names.

RELIABILITY.md, BENCHMARKS.md and deploy/README.md are written (in part) by the runs that measure them
(scripts/reliability_report.py, scripts/rehearsal.py), so they stay where those scripts write; the site shows them
as reliability.md, benchmarks.md and deploy.md, with the images they and docs/model.md show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]

#: site path -> repository path
EXTERNAL = {
    "reliability.md": "RELIABILITY.md",
    "benchmarks.md": "BENCHMARKS.md",
    "deploy.md": "deploy/README.md",
    "hpa-rehearsal.png": "deploy/hpa-rehearsal.png",
    "img/confusion.png": "models/quickdraw/1/evaluation/confusion.png",
    "img/reliability.png": "models/quickdraw/1/evaluation/reliability.png",
}


def on_files(files: Files, config: Any) -> Files:
    """Add each external file under its site path (a missing one is an error: a link to it would rot)."""
    for uri, path in EXTERNAL.items():
        source = ROOT / path
        if not source.is_file():
            raise FileNotFoundError(f"docs/hooks.py: {path} is missing")
        files.append(File.generated(config, uri, abs_src_path=str(source)))
    return files
