"""A ~150 MB numpy_bitmap file opens and iterates with under 100 MB of anonymous memory above baseline."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from doodle.formats import open_bitmaps

TARGET_BYTES = 150 * 1024 * 1024

PROBE = textwrap.dedent(
    """
    import json, sys
    from doodle.formats import read_bitmaps

    def rss_anon_kib():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        raise RuntimeError("no RssAnon")

    base = rss_anon_kib()
    peak = base
    total = 0
    n = 0
    for b in read_bitmaps(sys.argv[1]):
        total += int(b.pixels[14, 14])
        n += 1
        if n % 5000 == 0:
            peak = max(peak, rss_anon_kib())
    peak = max(peak, rss_anon_kib())
    print(json.dumps({"rows": n, "base_kib": base, "peak_kib": peak, "checksum": total}))
    """
)


def test_large_bitmap_file_streams_in_bounded_memory(sample: Path, tmp_path: Path) -> None:
    src = open_bitmaps(sample / "numpy_bitmap" / "cat.npy")
    n_rows = TARGET_BYTES // 784
    path = tmp_path / "big.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n_rows, 784))
    for start in range(0, n_rows, len(src)):
        stop = min(n_rows, start + len(src))
        out[start:stop] = src[: stop - start]
    out.flush()
    expected = int(out[:, 14 * 28 + 14].astype(np.int64).sum())
    del out
    assert path.stat().st_size > 150_000_000

    proc = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    growth_mib = (result["peak_kib"] - result["base_kib"]) / 1024
    print(f"\n{path.stat().st_size / 1e6:.0f} MB, {result['rows']} rows: RssAnon peak grew {growth_mib:.1f} MiB")
    assert result["rows"] == n_rows
    assert result["checksum"] == expected
    assert growth_mib < 100
