# Vendored from ../shared/tools/peerbench.py (the project's peer baseline) so that the benchmarks run
# from a clone. Keep it in step with that file (verbatim below, hence no lint); bench_*.py import it from here.
# ruff: noqa
#!/usr/bin/env python3
"""Peer baseline for checkpoint save/load on one machine.

Measures, on the same synthetic state and in one run, what a checkpoint library must beat:
torch.save / torch.load, safetensors, numpy .npz and h5py, plus the machine's own limits
(memcpy, sequential file write, page-cache read, xxh3 hashing).

Each measurement runs in a fresh child process so its peak RSS is its own. Figures are medians.

    python peerbench.py --case gpt2 --scale 1.0 --runs 3
    python peerbench.py --case small --runs 3
    python peerbench.py --limits

Cases:
  gpt2   GPT-2-small shapes (~124M float32 parameters) plus Adam moments (exp_avg, exp_avg_sq)
         → ~1.5 GB at scale 1.0; --scale shrinks every dimension's row count.
  small  20,000 tensors of 256..1024 float32 elements (1–4 KB each).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)


def make_state(case: str, scale: float):
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    if case == "gpt2":
        d, v, n_layer = 768, int(50257 * scale) or 1, 12
        shapes = {"wte": (v, d), "wpe": (int(1024 * scale) or 1, d)}
        for i in range(n_layer):
            p = f"h.{i}."
            shapes.update({
                p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
                p + "attn.c_attn.weight": (int(d * scale) or 1, 3 * d), p + "attn.c_attn.bias": (3 * d,),
                p + "attn.c_proj.weight": (int(d * scale) or 1, d), p + "attn.c_proj.bias": (d,),
                p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (int(d * scale) or 1, 4 * d), p + "mlp.c_fc.bias": (4 * d,),
                p + "mlp.c_proj.weight": (int(4 * d * scale) or 1, d), p + "mlp.c_proj.bias": (d,),
            })
        shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
        for name, shp in shapes.items():
            w = rng.standard_normal(shp, dtype=np.float32)
            out["model." + name] = w
            out["optim.exp_avg." + name] = w * 0.1
            out["optim.exp_avg_sq." + name] = w * w
    elif case == "small":
        for i in range(20000):
            out[f"t{i}"] = rng.standard_normal(256 + (i % 4) * 256, dtype=np.float32)
    else:
        raise SystemExit(f"unknown case {case}")
    return out


def nbytes(state) -> int:
    return sum(a.nbytes for a in state.values())


# ---------------------------------------------------------------- peers (run in a child process)

def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def peer_save(peer: str, state, path: str, durable: bool):
    import numpy as np

    if peer == "torch":
        import torch
        t = {k: torch.from_numpy(v) for k, v in state.items()}
        t0 = time.perf_counter()
        torch.save(t, path)
    elif peer == "safetensors":
        import torch
        from safetensors.torch import save_file
        t = {k: torch.from_numpy(v) for k, v in state.items()}
        t0 = time.perf_counter()
        save_file(t, path)
    elif peer == "numpy":
        t0 = time.perf_counter()
        np.savez(path, **state)
        path = path if path.endswith(".npz") else path + ".npz"
    elif peer == "h5py":
        import h5py
        t0 = time.perf_counter()
        with h5py.File(path, "w") as f:
            for k, v in state.items():
                f.create_dataset(k, data=v)
    else:
        raise SystemExit(peer)
    if durable:
        _fsync(path)
    return time.perf_counter() - t0, os.path.getsize(path)


def touch(a) -> int:
    """Read one byte of every 4 KiB page of an array (numpy or torch), so lazy loads pay for the data."""
    import numpy as np

    if hasattr(a, "numpy"):
        a = a.numpy()
    b = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return int(b[::4096].sum()) if b.size else 0


def peer_load(peer: str, path: str):
    """Load everything and keep it, touching every page so lazy (mmap-backed) loaders pay their way.

    Libraries are imported before the clock starts: import time is not load time.
    """
    import numpy as np

    if peer.startswith("torch") or peer.startswith("safetensors"):
        import torch  # noqa: F401
        from safetensors import safe_open
        from safetensors.torch import load_file
    if peer == "h5py":
        import h5py
    t0 = time.perf_counter()
    if peer == "torch":
        d = torch.load(path, weights_only=True)
    elif peer == "torch-mmap":
        d = torch.load(path, weights_only=True, mmap=True)
    elif peer == "safetensors":
        d = load_file(path)
    elif peer == "safetensors-lazy-one":
        with safe_open(path, "np") as f:
            k = next(iter(f.keys()))
            d = {k: f.get_tensor(k)}
    elif peer == "numpy":
        with np.load(path) as z:
            d = {k: z[k] for k in z.files}
    elif peer == "h5py":
        with h5py.File(path, "r") as f:
            d = {k: f[k][...] for k in f}
    else:
        raise SystemExit(peer)
    total = sum(touch(v) for v in d.values())
    return time.perf_counter() - t0, total


def child(args):
    state = make_state(args.case, args.scale) if args.op == "save" else None
    if args.op == "save":
        secs, size = peer_save(args.peer, state, args.path, args.durable)
        res = {"secs": secs, "size": size, "bytes": nbytes(state)}
    else:
        secs, _ = peer_load(args.peer, args.path)
        res = {"secs": secs}
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def run_child(*argv) -> dict:
    out = subprocess.run([sys.executable, HERE, "--child", *argv], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def base_rss(case, scale) -> float:
    code = ("import resource,sys; sys.path.insert(0, %r); import peerbench as p; "
            "s=p.make_state(%r,%r); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"
            % (os.path.dirname(HERE), case, scale))
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


# ---------------------------------------------------------------- limits

def limits(size_mb: int, d: str):
    import numpy as np
    import xxhash

    n = size_mb << 20
    a = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8)
    b = np.empty_like(a)
    res = {}

    def best(f, reps=3):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    res["memcpy GB/s"] = n / best(lambda: np.copyto(b, a)) / 1e9
    path = os.path.join(d, "limit.bin")
    mv = memoryview(a)

    def write(sync):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for off in range(0, n, 64 << 20):
            os.write(fd, mv[off:off + (64 << 20)])
        if sync:
            os.fsync(fd)
        os.close(fd)

    res["write page-cache GB/s"] = n / best(lambda: write(False)) / 1e9
    res["write+fsync GB/s"] = n / best(lambda: write(True)) / 1e9

    def read():
        with open(path, "rb", buffering=0) as f:
            f.readinto(b)

    res["read page-cache GB/s"] = n / best(read) / 1e9
    res["xxh3_64 GB/s"] = n / best(lambda: xxhash.xxh3_64_intdigest(a)) / 1e9
    res["xxh3_128 GB/s"] = n / best(lambda: xxhash.xxh3_128_intdigest(a)) / 1e9
    os.unlink(path)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="gpt2", choices=["gpt2", "small"])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/peerbench-data")
    ap.add_argument("--peers", default="torch,safetensors,numpy,h5py")
    ap.add_argument("--limits", action="store_true", help="measure the machine's limits instead")
    ap.add_argument("--limit-mb", type=int, default=1024)
    ap.add_argument("--json", action="store_true")
    # child-process arguments
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--op", help=argparse.SUPPRESS)
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--durable", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    os.makedirs(args.dir, exist_ok=True)
    if args.limits:
        res = limits(args.limit_mb, args.dir)
        print(json.dumps(res) if args.json else "\n".join(f"| {k} | {v:.2f} |" for k, v in res.items()))
        return
    base = base_rss(args.case, args.scale)
    rows = []
    for peer in args.peers.split(","):
        path = os.path.join(args.dir, f"{args.case}.{peer}")
        if peer == "numpy":
            path += ".npz"
        common = ["--case", args.case, "--scale", str(args.scale), "--peer", peer, "--path", path]
        saves = [run_child("--op", "save", *common) for _ in range(args.runs + 1)][1:]
        durable = [run_child("--op", "save", "--durable", *common) for _ in range(args.runs)]
        loads = [run_child("--op", "load", *common) for _ in range(args.runs + 1)][1:]
        extra = []
        if peer == "torch":
            extra = [("torch-mmap", [run_child("--op", "load", *common[:-3], "torch-mmap", "--path", path)
                                     for _ in range(args.runs)])]
        if peer == "safetensors":
            extra = [("safetensors-lazy-one", [run_child("--op", "load", *common[:-3], "safetensors-lazy-one",
                                                         "--path", path) for _ in range(args.runs)])]
        size = saves[0]["size"]
        data = saves[0]["bytes"]
        med = lambda xs, k="secs": statistics.median(x[k] for x in xs)  # noqa: E731
        rows.append({
            "peer": peer, "save_s": med(saves), "save_durable_s": med(durable), "load_s": med(loads),
            "save_GBps": data / med(saves) / 1e9, "load_GBps": data / med(loads) / 1e9,
            "file_MB": size / 1e6, "save_peak_rss_MB": med(saves, "peak_rss_mb"),
            "load_peak_rss_MB": med(loads, "peak_rss_mb"), "state_MB": data / 1e6, "base_rss_MB": base,
        })
        for name, res in extra:
            rows.append({"peer": name, "load_s": med(res), "load_GBps": data / med(res) / 1e9,
                         "load_peak_rss_MB": med(res, "peak_rss_mb")})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"case={args.case} scale={args.scale} runs={args.runs} state={rows[0]['state_MB']:.0f} MB "
          f"(process with state only: {base:.0f} MB RSS)")
    print("| peer | save s | save+fsync s | load s | save GB/s | load GB/s | file MB | save peak RSS MB | load peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    f = lambda r, k, fmt="{:.3f}": fmt.format(r[k]) if k in r else "—"  # noqa: E731
    for r in rows:
        print(f"| {r['peer']} | {f(r,'save_s')} | {f(r,'save_durable_s')} | {f(r,'load_s')} | {f(r,'save_GBps','{:.2f}')} | "
              f"{f(r,'load_GBps','{:.2f}')} | {f(r,'file_MB','{:.0f}')} | {f(r,'save_peak_rss_MB','{:.0f}')} | "
              f"{f(r,'load_peak_rss_MB','{:.0f}')} |")


if __name__ == "__main__":
    main()
