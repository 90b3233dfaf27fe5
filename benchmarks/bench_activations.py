#!/usr/bin/env python3
"""Peak memory and step time of a forward+backward with large activations: plain autograd, offload to
a ckptfmt spill directory under a memory budget (``ckptfmt.torch.activations``), and recompute
(``torch.utils.checkpoint``).

    python benchmarks/bench_activations.py                            # defaults below, ~1 minute on 2 cores
    python benchmarks/bench_activations.py --batch 16384 --width 1024 --depth 12 --budget-mib 64 --steps 5
    python benchmarks/bench_activations.py --modes plain,offload      # a subset

The model is ``depth`` blocks of ``Linear(width, width) -> GELU``; each block saves two
``batch x width`` float32 tensors for backward (the Linear's input and the GELU's input).

Method. Each mode runs in its own fresh child process (so allocator state and peak RSS are its own),
with ``MALLOC_MMAP_THRESHOLD_`` fixed so that glibc returns large freed blocks to the OS and RSS
follows live memory. In the child: build the model and input, run one warm-up step, then for each
measured step: ``gc.collect()``, ``malloc_trim(0)``, read VmRSS (the baseline), reset the kernel's
peak-RSS counter (``/proc/self/clear_refs`` = 5), run the step, read VmHWM. "peak RSS delta" is the
largest VmHWM - baseline over the steps: the memory the step itself needed on top of model, input and
libraries. Step time is the median. Gradients are hashed in every child; "grads = plain" compares
the hash with the plain run's (bitwise). Spill files land in ``--dir``: the page cache that holds
them is not process RSS (it is reclaimable kernel memory), which is the point of spilling to disk.
Linux only (``/proc``). Run on demand; never part of the unit tests.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

MODES = ("plain", "offload", "checkpoint", "offload+checkpoint")
MiB = 1 << 20


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    assert m is not None, field
    return int(m.group(1)) * 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    from ckptfmt.torch.activations import ActivationCheckpointManager, offload_saved_tensors

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(args.width, args.width), nn.GELU()) for _ in range(args.depth))
    x = torch.randn(args.batch, args.width)
    mode = args.child
    recompute = "checkpoint" in mode
    budget = args.budget_mib * MiB

    def forward(inp: torch.Tensor) -> torch.Tensor:
        h = inp
        for b in blocks:
            h = checkpoint(b, h, use_reentrant=False) if recompute else b(h)
        return h

    manager = ActivationCheckpointManager(memory_budget=budget, spill_dir=args.dir) if "offload" in mode else None

    def step() -> None:
        blocks.zero_grad(set_to_none=True)
        if manager is not None:
            with offload_saved_tensors(manager):
                loss = forward(x).pow(2).mean()
        else:
            loss = forward(x).pow(2).mean()
        loss.backward()

    saved = 0
    if mode == "plain":  # what autograd saves for backward, parameters and views of them excluded
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            base = t._base if t._is_view() and t._base is not None else t
            if not (base.is_leaf and base.requires_grad):
                seen[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward(x).pow(2).mean()
        saved = sum(seen.values())
        del seen
    step()  # warm-up
    deltas, times, exact = [], [], True
    for _ in range(args.steps):
        _trim()
        base = _status("VmRSS")
        exact = _reset_peak() and exact
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        deltas.append(_status("VmHWM") - base)
    digest = hashlib.sha256()
    for p in blocks.parameters():
        assert p.grad is not None
        digest.update(p.grad.numpy().tobytes())
    out: dict[str, Any] = {"mode": mode, "peak_delta": max(deltas), "time": statistics.median(times),
                           "grads": digest.hexdigest(), "exact_peak": exact, "saved": saved}
    if manager is not None:
        s = manager.memory_stats()
        n = args.steps + 1
        out.update(spilled=s.spilled_bytes / n, spills=s.spill_count / n, spill_s=s.spill_seconds / n,
                   restore_s=s.restore_seconds / n, manager_peak=s.peak_memory_used)
        manager.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--budget-mib", type=int, default=32, help="memory_budget of the offload modes (MiB)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per mode (after one warm-up)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--dir", default=None, help="spill directory (default: a fresh temporary directory)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; choose from {MODES}")
    with tempfile.TemporaryDirectory(prefix="bench-activations-") as tmp:
        args.dir = args.dir or tmp
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}
        results = {}
        for mode in modes:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--batch", str(args.batch),
                   "--width", str(args.width), "--depth", str(args.depth), "--budget-mib", str(args.budget_mib),
                   "--steps", str(args.steps), "--threads", str(args.threads), "--dir", args.dir]
            print(f"running {mode} ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    import torch

    saved = max(r["saved"] for r in results.values())
    what = f"{saved / MiB:.0f} MiB saved for backward" if saved else "saved bytes not measured (no plain run)"
    print(f"### {args.depth} x (Linear({args.width}, {args.width}) -> GELU), batch {args.batch}, float32: {what}; "
          f"offload budget {args.budget_mib} MiB\n")
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.machine()} {platform.system()}, "
          f"{args.steps} measured steps per mode after a warm-up, spill files in {args.dir}\n")
    plain = results.get("plain")
    print("| mode | peak RSS delta (MiB) | vs plain | step time (s, median) | vs plain | spilled per step (MiB) "
          "| spill s / restore s per step | grads = plain |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        rel_mem = f"{r['peak_delta'] / plain['peak_delta']:.2f}x" if plain else "-"
        rel_t = f"{r['time'] / plain['time']:.2f}x" if plain else "-"
        spill = f"{r['spilled'] / MiB:.0f} ({r['spills']:.0f} files)" if "spilled" in r else "-"
        io = f"{r['spill_s']:.2f} / {r['restore_s']:.2f}" if "spill_s" in r else "-"
        same = "-" if not plain else ("yes" if r["grads"] == plain["grads"] else "NO")
        name = {"offload": f"offload, budget {args.budget_mib} MiB (spill to disk)",
                "offload+checkpoint": f"offload ({args.budget_mib} MiB) + checkpoint",
                "checkpoint": "torch.utils.checkpoint (every block)"}.get(mode, mode)
        print(f"| {name} | {r['peak_delta'] / MiB:.0f} | {rel_mem} | {r['time']:.3f} | {rel_t} | {spill} | {io} "
              f"| {same} |")
    if not all(r["exact_peak"] for r in results.values()):
        print("\n(peak RSS could not be reset between steps here: the figures include the warm-up step)")


if __name__ == "__main__":
    main()
