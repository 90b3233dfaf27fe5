#!/usr/bin/env python3
"""Save at the write limit: ckptfmt.save against raw writes of the same bytes, in one process, interleaved.

Each repetition runs, in this order: to a FRESH path (deleted, then ``os.sync()``, before the clock)
raw write | ckptfmt.save(durable=False) | raw write + fsync | ckptfmt.save(durable=True); then OVER
an existing file of the same size (written and synced before the clock) the same four. Raw writes
``os.write`` each array's own memory in order (what ckptfmt reads too); raw overwrite opens the
existing file with O_TRUNC, as a naive writer does. Ratios are raw time / ckptfmt time of the same
repetition's medians (>= 0.9 is the target). Then:

  many     20,000 small tensors (peerbench "small"): ckptfmt.save(durable=False) vs
           safetensors.numpy.save_file, interleaved; target ckptfmt >= 5x faster.
  stall    CheckpointManager.save(blocking=False) call time (the training stall) vs torch.save of
           the same state dict; target <= 10%. Reports the staging pool's bytes and the peak RSS
           growth during the background saves (bounded by the pool), and a single-thread memcpy of
           the same bytes into a pre-faulted buffer: the floor of a stall that copies every byte.

    python benchmarks/bench_save.py --scale 0.25 --runs 5
    python benchmarks/bench_save.py --scale 0.25 --runs 3 --only many
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the vendored peerbench.py

import numpy as np  # noqa: E402
import peerbench  # noqa: E402

import ckptfmt  # noqa: E402
from ckptfmt._writer import write_all  # noqa: E402


def _settle(nbytes: int = 0) -> None:
    """Let background work of the previous measurement (release of a replaced file, writeback) end,
    then touch and free ``nbytes`` of memory, so the page cache the next save fills comes from warm
    pages: on this VM (virtio-balloon free page reporting) memory left free for ~2 s costs a host fault
    per page on its next first touch, which measures the hypervisor, not the writer (see RESULTS "Noise").
    """
    for t in threading.enumerate():
        if t.name in ("ckptfmt-release", "ckptfmt-save", "ckptfmt-manager-save"):
            t.join()
    os.sync()
    if nbytes:
        warm = np.ones(nbytes, np.uint8)
        del warm


def raw_write(state: dict[str, np.ndarray], path: str, *, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for a in state.values():
            write_all(fd, a.reshape(-1).view(np.uint8).data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_write(state: dict[str, np.ndarray], d: str, runs: int) -> dict[str, list[float]]:
    cases: list[tuple[str, bool, Callable[[str], Any]]] = [
        ("raw write", False, lambda p: raw_write(state, p, fsync=False)),
        ("ckptfmt durable=False", False, lambda p: ckptfmt.save(p, state, durable=False)),
        ("raw write+fsync", False, lambda p: raw_write(state, p, fsync=True)),
        ("ckptfmt durable=True", False, lambda p: ckptfmt.save(p, state, durable=True)),
    ]
    cases += [(name + " [overwrite]", True, fn) for name, _, fn in cases]
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    nbytes = sum(a.nbytes for a in state.values())
    for rep in range(runs):
        for name, over, fn in cases:
            p = os.path.join(d, "raw.bin" if name.startswith("raw") else "ckptfmt.ckpt")
            if over:
                if not os.path.exists(p):
                    fn(p)
            elif os.path.exists(p):
                os.unlink(p)
            _settle(nbytes)
            times[name].append(_timed(lambda fn=fn, p=p: fn(p)))
        print(f"  rep {rep + 1}: " + ", ".join(f"{n} {t[-1]:.3f}" for n, t in times.items()), flush=True)
    return times


def bench_many(d: str, runs: int) -> dict[str, list[float]]:
    from safetensors.numpy import save_file

    state = peerbench.make_state("small", 1.0)
    times: dict[str, list[float]] = {"ckptfmt many-small": [], "safetensors many-small": []}
    for _ in range(runs):
        for name in times:
            p = os.path.join(d, "many.ckpt" if name.startswith("ckptfmt") else "many.safetensors")
            if os.path.exists(p):
                os.unlink(p)
            _settle(64 << 20)
            if name.startswith("ckptfmt"):
                times[name].append(_timed(lambda p=p: ckptfmt.save(p, state, durable=False)))
            else:
                times[name].append(_timed(lambda p=p: save_file(state, p)))
    return times


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def bench_stall(state: dict[str, np.ndarray], d: str, runs: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    import torch

    from ckptfmt.torch import CheckpointManager

    sd = {k: torch.from_numpy(v) for k, v in state.items()}
    pool = ckptfmt.StagingPool()
    mgr = CheckpointManager(os.path.join(d, "run"), keep_last=2)
    mgr.save(0, sd, blocking=False, staging=pool, rng=False)  # warm-up: the pool's slabs are made once
    mgr.wait()
    floor = np.empty(sum(a.nbytes for a in state.values()), np.uint8)
    floor[:] = 1  # pre-faulted, as the pool's slabs are after the warm-up; made before the RSS baseline

    def memcpy() -> None:
        at = 0
        for a in state.values():
            raw = a.reshape(-1).view(np.uint8)
            np.copyto(floor[at : at + raw.size], raw)
            at += raw.size

    _settle()
    base = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    times: dict[str, list[float]] = {"manager.save(blocking=False) stall": [], "  ... until written + indexed": [],
                                     "torch.save": [], "memcpy of the same bytes (the stall's floor)": []}
    for rep in range(runs):
        t0 = time.perf_counter()
        mgr.save(rep + 1, sd, blocking=False, staging=pool, rng=False)
        t1 = time.perf_counter()
        mgr.wait()
        t2 = time.perf_counter()
        times["manager.save(blocking=False) stall"].append(t1 - t0)
        times["  ... until written + indexed"].append(t2 - t0)
        _settle()
        p = os.path.join(d, "torch.pt")
        if os.path.exists(p):
            os.unlink(p)
        _settle()
        times["torch.save"].append(_timed(lambda p=p: torch.save(sd, p)))
        times["memcpy of the same bytes (the stall's floor)"].append(_timed(memcpy))
    mem = {"pool_capacity": pool.capacity, "pool_allocated": pool.allocated,
           "peak_rss_growth": _vm("VmHWM") - base}
    return times, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--only", choices=["write", "many", "stall"], action="append")
    args = ap.parse_args()
    only = set(args.only or ["write", "many", "stall"])
    d = tempfile.mkdtemp(prefix="ckptfmt-bench-save-", dir=args.dir)
    try:
        state = peerbench.make_state("gpt2", args.scale)
        mb = peerbench.nbytes(state) / 1e6
        print(f"# bench_save: gpt2 scale {args.scale} ({mb:.0f} MB, {len(state)} tensors), {args.runs} runs, "
              f"{os.cpu_count()} CPUs, dir {d}", flush=True)
        med: dict[str, float] = {}
        if "write" in only:
            for k, v in bench_write(state, d, args.runs).items():
                med[k] = statistics.median(v)
        if "many" in only:
            for k, v in bench_many(d, args.runs).items():
                med[k] = statistics.median(v)
        mem: dict[str, int] = {}
        if "stall" in only:
            t, mem = bench_stall(state, d, args.runs)
            for k, v in t.items():
                med[k] = statistics.median(v)
        print("\n| measurement | median s |\n|---|---|")
        for k, v in med.items():
            print(f"| {k} | {v:.3f} |")
        print("\n| target | ratio | target | result |\n|---|---|---|---|")

        def ratio(label: str, num: str, den: str, target: float, higher: bool = True) -> None:
            if num in med and den in med:
                r = med[num] / med[den]
                ok = r >= target if higher else r <= target
                print(f"| {label} | {r:.2f} | {'>=' if higher else '<='} {target} | {'PASS' if ok else 'FAIL'} |")

        for over in ("", " [overwrite]"):
            ratio(f"save vs raw write{over}", "raw write" + over, "ckptfmt durable=False" + over, 0.9)
            ratio(f"durable save vs write+fsync{over}", "raw write+fsync" + over, "ckptfmt durable=True" + over, 0.9)
        ratio("many-small: safetensors / ckptfmt", "safetensors many-small", "ckptfmt many-small", 5.0)
        ratio("stall / torch.save", "manager.save(blocking=False) stall", "torch.save", 0.10, higher=False)
        floor_name = "memcpy of the same bytes (the stall's floor)"
        if floor_name in med:  # what staging's one copy costs at best, for reading the two ratios above
            print(f"\nstall / memcpy {med['manager.save(blocking=False) stall'] / med[floor_name]:.2f}; "
                  f"memcpy / torch.save {med[floor_name] / med['torch.save']:.2f} (a single-thread copy of the state)")
        if mem:
            print(f"\nstaging pool: capacity {mem['pool_capacity'] / 2**20:.0f} MiB, allocated "
                  f"{mem['pool_allocated'] / 2**20:.0f} MiB; peak RSS growth during the timed background saves "
                  f"{mem['peak_rss_growth'] / 2**20:.0f} MiB")
    finally:
        _settle()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
