#!/usr/bin/env python3
"""torch tensors through ckptfmt against torch.save and safetensors.torch, and training checkpoints.

The state is peerbench's (../shared/tools/peerbench.py ``make_state``), as torch tensors. Peers are
interleaved within each repetition, libraries are imported before any clock starts, every page of a
loaded state is touched (``peerbench.touch``), and the figures are medians with ratios taken within
this one run. Runs in one process (RSS figures come from bench_core.py's child processes).

    python benchmarks/bench_torch.py --case gpt2 --scale 1.0 --runs 5
    python benchmarks/bench_torch.py --case small --runs 5
    python benchmarks/bench_torch.py --training          # save_checkpoint vs torch.save, file size
    python benchmarks/bench_torch.py --cuda              # loads onto the GPU (needs one)

Targets checked (issue 3 and 4): save no slower than safetensors.torch.save_file; zero-copy mmap
load >= 1.0x safetensors.torch.load_file; eager load >= 2x torch.load; training checkpoint file
within 1% of the tensor bytes plus alignment; on a GPU: load >= 80% of the pinned host->device
copy bandwidth and >= 1.5x safetensors (device="cuda").
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the vendored peerbench.py

import peerbench  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import ckptfmt  # noqa: E402
import ckptfmt.torch  # noqa: E402


def _touch(state: dict[str, Any]) -> int:
    return sum(peerbench.touch(v.cpu() if v.is_cuda else v) for v in state.values())


def _timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn`` takes, after flushing dirty pages so that no call pays for an earlier one's writeback."""
    gc.collect()
    os.sync()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _table(title: str, results: dict[str, list[float]], nbytes: int, base: str) -> dict[str, float]:
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n#### {title}\n")
    print("| what | median s | best s | GB/s | ratio (its time / " + base + ") |")
    print("|---|---|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {med[k]:.4f} | {min(v):.4f} | {nbytes / med[k] / 1e9:.2f} | {med[k] / med[base]:.2f} |")
    return med


def _targets(rows: list[tuple[str, float, str, bool]]) -> None:
    print("\n| target | measured | threshold | result |\n|---|---|---|---|")
    for name, value, threshold, ok in rows:
        print(f"| {name} | {value:.3f} | {threshold} | {'PASS' if ok else 'FAIL'} |")


def cpu(args: argparse.Namespace) -> None:
    state = {k: torch.from_numpy(v) for k, v in peerbench.make_state(args.case, args.scale).items()}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    d = args.dir
    os.makedirs(d, exist_ok=True)
    paths = {"ckptfmt": os.path.join(d, "t.ckpt"), "torch": os.path.join(d, "t.pt"), "st": os.path.join(d, "t.st")}
    saves: dict[str, list[float]] = {"ckptfmt.torch.save": [], "torch.save": [], "safetensors.torch.save_file": []}
    loads: dict[str, list[float]] = {
        "ckptfmt.torch.load (mmap, verify)": [], "ckptfmt.torch.load (mmap, no verify)": [],
        "ckptfmt.torch.load (mmap=False)": [], "safetensors.torch.load_file": [],
        "torch.load(weights_only)": [], "torch.load(mmap=True)": []}
    for _ in range(args.runs):
        saves["ckptfmt.torch.save"].append(_timed(lambda: ckptfmt.torch.save(paths["ckptfmt"], state, durable=False)))
        saves["torch.save"].append(_timed(lambda: torch.save(state, paths["torch"])))
        saves["safetensors.torch.save_file"].append(_timed(lambda: save_file(state, paths["st"])))
        for name, fn in (
            ("ckptfmt.torch.load (mmap, verify)", lambda: _touch(ckptfmt.torch.load(paths["ckptfmt"]))),
            ("ckptfmt.torch.load (mmap, no verify)",
             lambda: _touch(ckptfmt.torch.load(paths["ckptfmt"], verify=False))),
            ("ckptfmt.torch.load (mmap=False)", lambda: _touch(ckptfmt.torch.load(paths["ckptfmt"], mmap=False))),
            ("safetensors.torch.load_file", lambda: _touch(load_file(paths["st"]))),
            ("torch.load(weights_only)", lambda: _touch(torch.load(paths["torch"], weights_only=True))),
            ("torch.load(mmap=True)", lambda: _touch(torch.load(paths["torch"], weights_only=True, mmap=True))),
        ):
            loads[name].append(_timed(fn))
    print(f"### torch CPU: case={args.case} scale={args.scale} runs={args.runs} state={nbytes / 1e6:.0f} MB "
          f"in {len(state)} tensors")
    s = _table("Save (page cache, no fsync)", saves, nbytes, "ckptfmt.torch.save")
    m = _table("Load, every page touched", loads, nbytes, "ckptfmt.torch.load (mmap, verify)")
    _targets([
        ("save time / safetensors", s["ckptfmt.torch.save"] / s["safetensors.torch.save_file"], "<= 1",
         s["ckptfmt.torch.save"] <= s["safetensors.torch.save_file"]),
        ("mmap load (no verify) speed vs safetensors", m["safetensors.torch.load_file"]
         / m["ckptfmt.torch.load (mmap, no verify)"], ">= 1.0",
         m["safetensors.torch.load_file"] >= m["ckptfmt.torch.load (mmap, no verify)"]),
        ("eager load speed vs torch.load", m["torch.load(weights_only)"] / m["ckptfmt.torch.load (mmap=False)"],
         ">= 2.0", m["torch.load(weights_only)"] >= 2 * m["ckptfmt.torch.load (mmap=False)"]),
    ])


def training(args: argparse.Namespace) -> None:
    """save_checkpoint of a model + AdamW state vs torch.save of the same dict; file-size overhead."""
    state = peerbench.make_state("gpt2", args.scale)
    model = torch.nn.Module()
    for i, v in enumerate(v for k, v in state.items() if k.startswith("model.")):
        model.register_parameter(f"p{i}", torch.nn.Parameter(torch.from_numpy(v)))
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        opt.state[p] = {"step": torch.tensor(10.0), "exp_avg": p.detach() * 0.1, "exp_avg_sq": p.detach() ** 2}
    d = args.dir
    os.makedirs(d, exist_ok=True)
    a, b = os.path.join(d, "train.ckpt"), os.path.join(d, "train.pt")
    times: dict[str, list[float]] = {"ckptfmt.torch.save_checkpoint": [], "torch.save(same dict)": []}
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    for _ in range(args.runs):
        times["ckptfmt.torch.save_checkpoint"].append(_timed(lambda: ckptfmt.torch.save_checkpoint(
            a, model, opt, step=10, epoch=0, loss=1.0, durable=False)))
        times["torch.save(same dict)"].append(_timed(lambda: torch.save(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 10, "epoch": 0, "loss": 1.0}, b)))
    print(f"### training checkpoint: gpt2 scale={args.scale}, model + AdamW, {tensor_bytes / 1e6:.0f} MB of tensors")
    med = _table("save_checkpoint vs torch.save", times, tensor_bytes, "ckptfmt.torch.save_checkpoint")
    with ckptfmt.open(a) as ck:
        n = len(ck)
        align = ck.header.alignment
    size = os.path.getsize(a)
    padding_bound = n * align
    overhead = (size - tensor_bytes - padding_bound) / tensor_bytes
    print(f"\nfile {size / 1e6:.2f} MB for {tensor_bytes / 1e6:.2f} MB of tensors in {n} blobs; torch.save file "
          f"{os.path.getsize(b) / 1e6:.2f} MB; beyond alignment padding (< {padding_bound / 1e6:.2f} MB): "
          f"{100 * max(overhead, 0):.3f}%")
    _targets([("file overhead beyond alignment", max(overhead, 0.0), "<= 0.01", overhead <= 0.01),
              ("save_checkpoint time / torch.save", med["ckptfmt.torch.save_checkpoint"]
               / med["torch.save(same dict)"], "(info)", True)])


def cuda(args: argparse.Namespace) -> None:
    """Load onto the GPU: ckptfmt vs safetensors(device=cuda) vs torch.load(map_location=cuda), and the limit."""
    if not torch.cuda.is_available():
        raise SystemExit("--cuda needs a CUDA GPU")
    state = {k: torch.from_numpy(v) for k, v in peerbench.make_state(args.case, args.scale).items()}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    d = args.dir
    os.makedirs(d, exist_ok=True)
    a, b, c = os.path.join(d, "g.ckpt"), os.path.join(d, "g.st"), os.path.join(d, "g.pt")
    ckptfmt.torch.save(a, state, durable=False)
    save_file(state, b)
    torch.save(state, c)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def limit() -> None:
        dev.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()

    def run(fn: Callable[[], Any]) -> Callable[[], None]:
        def go() -> None:
            out = fn()
            torch.cuda.synchronize()
            del out

        return go

    times: dict[str, list[float]] = {"ckptfmt (verify)": [], "ckptfmt (no verify)": [],
                                     "safetensors load_file(device=cuda)": [],
                                     "torch.load(map_location=cuda)": [], "LIMIT pinned host->device copy": []}
    for _ in range(args.runs):
        times["ckptfmt (verify)"].append(_timed(run(lambda: ckptfmt.torch.load(a, device="cuda"))))
        times["ckptfmt (no verify)"].append(_timed(run(lambda: ckptfmt.torch.load(a, device="cuda", verify=False))))
        times["safetensors load_file(device=cuda)"].append(_timed(run(lambda: load_file(b, device="cuda"))))
        times["torch.load(map_location=cuda)"].append(_timed(run(
            lambda: torch.load(c, map_location="cuda", weights_only=True))))
        times["LIMIT pinned host->device copy"].append(_timed(limit))
    print(f"### load to GPU ({torch.cuda.get_device_name()}): case={args.case} scale={args.scale}, "
          f"{nbytes / 1e6:.0f} MB, page cache")
    m = _table("Load onto cuda:0", times, nbytes, "ckptfmt (verify)")
    _targets([
        ("fraction of the pinned-copy limit", m["LIMIT pinned host->device copy"] / m["ckptfmt (verify)"], ">= 0.8",
         m["LIMIT pinned host->device copy"] >= 0.8 * m["ckptfmt (verify)"]),
        ("speed vs safetensors", m["safetensors load_file(device=cuda)"] / m["ckptfmt (verify)"], ">= 1.5",
         m["safetensors load_file(device=cuda)"] >= 1.5 * m["ckptfmt (verify)"]),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="gpt2", choices=["gpt2", "small"])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/ckptfmt-bench-torch")
    ap.add_argument("--training", action="store_true")
    ap.add_argument("--cuda", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.training:
        training(args)
    elif args.cuda:
        cuda(args)
    else:
        cpu(args)


if __name__ == "__main__":
    main()
