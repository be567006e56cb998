"""numpy_bitmap access: memory-mapped row iteration against reading the whole file into memory.

Each way runs in a fresh interpreter over the same sample file tiled to ~150 MB (the size of one of
Google's real files), and reports wall time and the peak growth of anonymous memory (RssAnon: private
memory the kernel cannot drop; file-backed pages of a mapping are not counted, since the kernel
reclaims them under pressure).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from doodle.formats import open_bitmaps

SAMPLE = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", "../shared/quickdraw"))

CHILD = """
import json, sys, time
import numpy as np
from doodle.formats import open_bitmaps

def rss_anon_mib():
    with open("/proc/self/status") as fh:
        return next(int(x.split()[1]) for x in fh if x.startswith("RssAnon:")) / 1024

base = peak = rss_anon_mib()
t0 = time.perf_counter()
rows = open_bitmaps(sys.argv[1]) if sys.argv[2] == "mmap" else np.load(sys.argv[1])
acc = np.zeros(784, dtype=np.int64)
for start in range(0, len(rows), 4096):
    acc += rows[start:start + 4096].sum(axis=0, dtype=np.int64)
    peak = max(peak, rss_anon_mib())
elapsed = time.perf_counter() - t0
print(json.dumps({"s": elapsed, "anon_mib": peak - base, "check": int(acc.sum())}))
"""


def _measure(path: Path, how: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), how], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def run() -> list[str]:
    """Build the tiled file, measure both ways, print and return the ratio lines."""
    src = open_bitmaps(SAMPLE / "numpy_bitmap" / "cat.npy")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.npy"
        n = 150 * 1024 * 1024 // 784
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 784))
        for s in range(0, n, len(src)):
            out[s : min(n, s + len(src))] = src[: min(n, s + len(src)) - s]
        out.flush()
        del out
        full = _measure(path, "load")
        mapped = _measure(path, "mmap")
    assert full["check"] == mapped["check"]
    for name, r in (("np.load (whole file)", full), ("memory-mapped", mapped)):
        print(f"  {name:<22} {r['s'] * 1000:8.1f} ms   peak RssAnon growth {r['anon_mib']:7.1f} MiB")
    return [
        f"bitmaps: memory-mapped / whole-file peak RssAnon growth = {mapped['anon_mib'] / full['anon_mib']:.3f}",
        f"bitmaps: memory-mapped / whole-file time     = {mapped['s'] / full['s']:.2f}",
    ]
