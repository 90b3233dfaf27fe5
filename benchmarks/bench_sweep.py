"""Per-save cost of the temporary sweep beside many files (spec/SECURITY.md §5).

``python benchmarks/bench_sweep.py [--others 8000] [--saves 300]``: medians of 1 KiB saves
(``durable=False``) to one path in an empty directory and in one holding ``--others`` empty files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

import ckptfmt


def median_save(others: int, saves: int) -> float:
    """Median seconds of one save with ``others`` unrelated files in its directory."""
    d = tempfile.mkdtemp(prefix="ckptfmt-sweep-")
    try:
        for i in range(others):
            open(os.path.join(d, f"other-{i}.bin"), "wb").close()
        path, state = os.path.join(d, "a.ckpt"), {"w": np.arange(256, dtype=np.float32)}
        for _ in range(20):
            ckptfmt.save(path, state, durable=False)
        times = []
        for _ in range(saves):
            t = time.perf_counter()
            ckptfmt.save(path, state, durable=False)
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    """Print the two medians."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--others", type=int, default=8000)
    ap.add_argument("--saves", type=int, default=300)
    args = ap.parse_args()
    for n in (0, args.others):
        print(f"{n} other files: median {1e3 * median_save(n, args.saves):.2f} ms over {args.saves} saves")


if __name__ == "__main__":
    main()
