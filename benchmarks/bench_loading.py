"""Loading the 29 sample classes for training: our memory-mapped batches against the seed's loader.

The seed's loader (kept here, and only here, for comparison) ``np.load``-ed each class file whole and
grew one float64 array with ``np.concatenate`` class by class, which copies everything loaded so far
on every class: O(n^2) time, and 8 bytes a pixel. Ours maps the files and gathers shuffled uint8
batches. Each runs in a fresh interpreter; we report wall time, peak RSS (VmHWM, which counts the
kernel-droppable pages of a mapping too) and peak anonymous memory (RssAnon), and their ratios.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SAMPLE = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", "../shared/quickdraw"))

COMMON = """
import json, sys, time
from pathlib import Path
import numpy as np

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(x.split()[1]) for x in fh if x.startswith(key + ":")) / 1024

peak_anon = 0.0
def sample_memory():
    global peak_anon
    peak_anon = max(peak_anon, status("RssAnon"))

base_anon = status("RssAnon")
files = sorted(Path(sys.argv[1], "numpy_bitmap").glob("*.npy"))
t0 = time.perf_counter()
"""

SEED = COMMON + """
x = np.empty([0, 784])
y = np.empty([0])
for idx, f in enumerate(files):
    data = np.load(f)
    labels = np.full(data.shape[0], idx)
    x = np.concatenate((x, data), axis=0)
    y = np.append(y, labels)
    sample_memory()
rows = len(x)
checksum = float(x.sum())
"""

OURS = COMMON + """
from trainer.data import BitmapData, Split, SplitSpec
data = BitmapData.from_dir(sys.argv[1], spec=SplitSpec(val_fraction=0.0001, test_fraction=0.0001))
rows = 0
checksum = 0.0
for split in Split:
    for xb, yb in data.batches(split, 512, shuffle=True, seed=0):
        rows += len(xb)
        checksum += float(xb.sum(dtype=np.int64))
        sample_memory()
"""

TAIL = """
elapsed = time.perf_counter() - t0
sample_memory()
print(json.dumps({"s": elapsed, "rows": rows, "checksum": checksum, "hwm_mib": status("VmHWM"),
                  "anon_mib": peak_anon - base_anon}))
"""


def _run(code: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", code + TAIL, str(SAMPLE)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def run() -> list[str]:
    """Measure both loaders and return the ratio lines."""
    seed = _run(SEED)
    ours = _run(OURS)
    assert seed["rows"] == ours["rows"], (seed["rows"], ours["rows"])
    assert abs(seed["checksum"] - ours["checksum"]) < 1e-6 * seed["checksum"]
    for name, r in (("seed (concatenate, float64)", seed), ("ours (memory-mapped batches)", ours)):
        print(f"  {name:<30} {r['s']:7.2f} s  peak RSS {r['hwm_mib']:7.1f} MiB  peak RssAnon +{r['anon_mib']:7.1f} MiB"
              f"  ({int(r['rows'])} drawings)")
    return [
        f"loading: seed / ours time            = {seed['s'] / ours['s']:.2f}x",
        f"loading: seed / ours peak RSS        = {seed['hwm_mib'] / ours['hwm_mib']:.2f}x",
        f"loading: seed / ours peak RssAnon    = {seed['anon_mib'] / max(ours['anon_mib'], 0.1):.1f}x",
    ]
