#!/usr/bin/env python3
"""Conversion of a torch.save file: ckptfmt.convert vs torch.load + safetensors.torch.save_file.

The source is peerbench.py's make_state('gpt2', scale) (GPT-2-small shapes + Adam moments, float32,
~1.5 GB at scale 1.0), as torch tensors, torch.save'd once. Each method then runs in a fresh child
process (so its peak RSS is its own), --runs times, round robin, after an os.sync() (so that no
run pays for the previous one's writeback); the table gives medians.

    python benchmarks/bench_convert.py [--scale 1.0] [--runs 3] [--dir /tmp/bench-convert] [--keep]

Methods:
  ckptfmt            ckptfmt.convert.convert(src, dst): torch.load(weights_only, mmap) + streaming
                     ckptfmt.save (xxh3 checksums, fsync of file and directory)
  safetensors        torch.load(src, weights_only=True) (into memory) + safetensors.torch.save_file
  safetensors+fsync  the same plus os.fsync of the output (ckptfmt's durability)
  safetensors-mmap   torch.load(src, weights_only=True, mmap=True) + save_file (+ fsync)

Figures per method: wall seconds of the whole conversion (load + write), MB/s (tensor bytes / s,
MB = 10^6 B), peak RSS (VmHWM: includes file pages mapped by mmap, which the kernel can drop) and
peak anonymous RSS growth (RssAnon sampled every 2 ms: the memory that cannot be dropped), relative
to the child's RSS after importing torch. The page cache is warm (the source was just written or
read by the previous run): these are CPU/memory-bound figures, not disk-bound ones.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

TOOLS = os.environ.get("PEERBENCH_DIR", os.path.dirname(os.path.abspath(__file__)))  # vendored peerbench.py

CHILD = r"""
import json, os, sys, threading, time
method, src, dst = sys.argv[1:4]

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0

import torch
if method == "ckptfmt":
    import ckptfmt.convert, ckptfmt.backends.torch
else:
    import safetensors.torch
base_anon = status("RssAnon")
base_rss = status("VmRSS")
peak = [base_anon]
done = threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.002)
th = threading.Thread(target=watch, daemon=True)
th.start()
t0 = time.perf_counter()
if method == "ckptfmt":
    report = ckptfmt.convert.convert(src, dst)
    nbytes = report.bytes
else:
    state = torch.load(src, weights_only=True, mmap=method.startswith("safetensors-mmap"))
    nbytes = sum(t.nbytes for t in state.values())
    safetensors.torch.save_file(state, dst)
    if method != "safetensors":
        fd = os.open(dst, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
seconds = time.perf_counter() - t0
done.set()
th.join()
peak[0] = max(peak[0], status("RssAnon"))
print(json.dumps({"seconds": seconds, "bytes": nbytes, "peak_rss": status("VmHWM"), "base_rss": base_rss,
                  "anon_growth": peak[0] - base_anon, "out_size": os.path.getsize(dst)}))
"""

METHODS = ("ckptfmt", "safetensors", "safetensors+fsync", "safetensors-mmap")


def make_source(path: str, scale: float) -> int:
    sys.path.insert(0, TOOLS)
    import peerbench
    import torch

    state = {k: torch.from_numpy(v) for k, v in peerbench.make_state("gpt2", scale).items()}
    torch.save(state, path)
    return sum(t.nbytes for t in state.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/bench-convert")
    ap.add_argument("--keep", action="store_true", help="keep the source and outputs")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    src = os.path.join(args.dir, "gpt2.pt")
    t0 = time.perf_counter()
    nbytes = make_source(src, args.scale)
    print(f"source: {src}, {os.path.getsize(src) / 1e9:.2f} GB file, {nbytes / 1e9:.2f} GB of tensors "
          f"(made in {time.perf_counter() - t0:.1f} s)", flush=True)
    methods = args.methods.split(",")
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for _ in range(args.runs):
        for method in methods:  # round robin, so that a noisy moment hits every method alike
            dst = os.path.join(args.dir, "out." + ("ckpt" if method == "ckptfmt" else "safetensors"))
            if os.path.exists(dst):
                os.unlink(dst)
            os.sync()  # start with no dirty pages: writeback throttling from the last run must not count
            out = subprocess.run([sys.executable, "-c", CHILD, method, src, dst], capture_output=True, text=True,
                                 check=True)
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
            os.unlink(dst)
    rows = {}
    for method in methods:
        med = {k: statistics.median(r[k] for r in runs[method]) for k in runs[method][0]}
        rows[method] = med
        best = min(r["seconds"] for r in runs[method])
        print(f"{method:<18} {med['seconds']:7.2f} s  {med['bytes'] / med['seconds'] / 1e6:6.0f} MB/s "
              f"(best {best:5.2f} s, {med['bytes'] / best / 1e6:4.0f} MB/s)  "
              f"peak RSS {med['peak_rss'] / 2**20:7.0f} MiB (after imports {med['base_rss'] / 2**20:5.0f})  "
              f"anon growth {med['anon_growth'] / 2**20:7.0f} MiB  "
              f"[runs: {', '.join('{:.2f}'.format(r['seconds']) for r in runs[method])} s]", flush=True)
    print(json.dumps({"scale": args.scale, "runs": args.runs, "tensor_bytes": nbytes, "results": rows}))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
