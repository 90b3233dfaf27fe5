#!/usr/bin/env python3
"""Lazy access cost against the number of tensors: one tiny ``get``, and open + read one tensor.

Issue 10 targets: ``get`` of one tensor at 400,000 tensors within 2x of the same at 1,000; open +
read one tensor of 20,000 <= 10 ms. Files hold N float32 tensors of 4 elements; each figure is the
median of ``--runs`` timed calls (a warm page cache: the files were just written).

    python benchmarks/bench_blockio.py                 # N = 1000, 20000, 400000
    python benchmarks/bench_blockio.py --counts 1000 20000 --runs 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import ckptfmt


def _median_ms(fn, runs: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(median, min) in ms; the min says what the code costs on a machine that others also load."""
    fn()  # warm-up: lazily built indexes, imports
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 20_000, 400_000])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--open-runs", type=int, default=10)
    ap.add_argument("--dir", default="/tmp/ckptfmt-bench-blockio")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    rows = []
    for n in args.counts:
        path = os.path.join(args.dir, f"n{n}.ckpt")
        if not os.path.exists(path):
            ckptfmt.save(path, {f"layer{i}": np.full(4, i, np.float32) for i in range(n)}, durable=False)
        key = f"layer{n // 2}"
        with ckptfmt.open(path) as ckpt:
            get_ms = _median_ms(lambda c=ckpt, k=key: c.get(k), args.runs)

        def open_read(p: str = path, k: str = key) -> None:
            with ckptfmt.open(p) as c:
                c.get(k)

        open_ms = _median_ms(open_read, args.open_runs)
        rows.append((n, get_ms[0], open_ms[0]))
        print(f"N={n:>7}  get one tensor (open checkpoint) {get_ms[0]:8.3f} ms (min {get_ms[1]:.3f})   "
              f"open + get one {open_ms[0]:8.2f} ms (min {open_ms[1]:.2f})", flush=True)
    base = rows[0][1]
    for n, get_ms, _ in rows[1:]:
        print(f"get at N={n} / get at N={rows[0][0]}: {get_ms / base:.2f}x (target <= 2x)")
    for n, _, open_med in rows:
        if n == 20_000:
            print(f"open + read one of 20,000: median {open_med:.2f} ms (target <= 10 ms)")


if __name__ == "__main__":
    main()
