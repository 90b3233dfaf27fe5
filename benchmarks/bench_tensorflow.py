#!/usr/bin/env python3
"""TensorFlow checkpoint conversion: the CRC-32C check's throughput and whole conversions.

    python benchmarks/bench_tensorflow.py crc [--mib 64] [--runs 5]
    python benchmarks/bench_tensorflow.py convert PREFIX [--runs 3] [--dir /tmp/bench-tf]

``crc``: CRC-32C over random bytes with ckptfmt's numpy lanes, with google-crc32c (C, when installed)
and, as a yardstick, zlib's CRC-32 (a different polynomial, the fastest CRC in the standard library);
interleaved runs, medians, ratios against zlib in the same run.

``convert``: ``ckptfmt.convert`` of an existing checkpoint (make one with TensorFlow, e.g.
``tf.train.Checkpoint(model=m).write(PREFIX)``), in three child processes per run: CRC-32C checked
with the library in use, checked with numpy forced, and not checked (``read_tensorflow(verify=False)``
plus ``ckptfmt.save``). Wall seconds and MB/s of tensor bytes (10^6 B), warm page cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import zlib

import numpy as np

CHILD = r"""
import os, sys, time
mode, src, dst = sys.argv[1:4]
import ckptfmt, ckptfmt.convert
from ckptfmt.convert import _crc32c
if mode == "numpy":
    _crc32c._FAST = None
t = time.perf_counter()
if mode == "unchecked":
    from ckptfmt.convert._tensorflow import read_tensorflow
    tree, meta = read_tensorflow(src, verify=False)
    ckptfmt.save(dst, tree, metadata=meta)
    nbytes = sum(getattr(v, "nbytes", 0) for v in tree.values())
else:
    nbytes = ckptfmt.convert(src, dst).bytes
print(time.perf_counter() - t, nbytes, _crc32c.implementation())
"""


def bench_crc(mib: int, runs: int) -> None:
    from ckptfmt.convert._crc32c import crc32c

    try:
        import google_crc32c
    except ImportError:
        google_crc32c = None
    data = np.random.default_rng(0).integers(0, 256, mib << 20, dtype=np.uint8)
    raw = data.tobytes()
    methods = {"zlib.crc32 (CRC-32, yardstick)": lambda: zlib.crc32(raw),
               "ckptfmt numpy CRC-32C": lambda: crc32c(data, use_library=False)}
    if google_crc32c is not None:
        methods["google-crc32c (C) CRC-32C"] = lambda: google_crc32c.value(raw)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(runs):
        for name, fn in methods.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["zlib.crc32 (CRC-32, yardstick)"])
    print(f"{mib} MiB random bytes, {runs} interleaved runs, load {os.getloadavg()[0]:.1f}")
    print("| method | median s | MB/s | time vs zlib |\n|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {(mib << 20) / med / 1e6:.0f} | {med / base:.2f}x |")


def bench_convert(src: str, runs: int, work: str) -> None:
    os.makedirs(work, exist_ok=True)
    modes = ("library", "numpy", "unchecked")
    times: dict[str, list[float]] = {m: [] for m in modes}
    impl: dict[str, str] = {}
    nbytes = 0
    for _ in range(runs):
        for mode in modes:
            dst = os.path.join(work, f"{mode}.ckpt")
            out = subprocess.run([sys.executable, "-c", CHILD, mode, src, dst], check=True, capture_output=True,
                                 text=True, cwd=work).stdout.split()
            times[mode].append(float(out[0]))
            nbytes = int(out[1])
            impl[mode] = out[2]
            os.remove(dst)
    print(f"{src}: {nbytes / 1e6:.1f} MB of tensors, {runs} interleaved runs, load {os.getloadavg()[0]:.1f}")
    print("| mode | CRC-32C by | median s | MB/s |\n|---|---|---|---|")
    for mode in modes:
        med = statistics.median(times[mode])
        by = "not checked" if mode == "unchecked" else impl[mode]
        print(f"| {mode} | {by} | {med:.2f} | {nbytes / med / 1e6:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("crc")
    c.add_argument("--mib", type=int, default=64)
    c.add_argument("--runs", type=int, default=5)
    v = sub.add_parser("convert")
    v.add_argument("prefix")
    v.add_argument("--runs", type=int, default=3)
    v.add_argument("--dir", default="/tmp/bench-tf")
    args = ap.parse_args()
    if args.cmd == "crc":
        bench_crc(args.mib, args.runs)
    else:
        bench_convert(args.prefix, args.runs, args.dir)


if __name__ == "__main__":
    main()
