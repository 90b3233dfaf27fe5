#!/usr/bin/env python3
"""ckptfmt as DCP's storage layer vs DCP's own FileSystemWriter/Reader: same state, same ranks, one run.

Spawns W ranks (torch.multiprocessing, gloo on 127.0.0.1). Every rank builds the gpt2-like state of
``../shared/tools/peerbench.py`` as DTensors sharded on dim 0 (``dcpbench._build_state``), then, with a
barrier before every timed call and the two peers interleaved (the order alternates per run):

  save     dcp.save(checkpoint_id=dir)  vs  ckptfmt.distributed.save(state, dir)          (fsync on, checksums on)
  load     dcp.load(checkpoint_id=dir)  vs  ckptfmt.distributed.load(target, dir)         (target pre-allocated)
  stall    dcp.async_save default stager vs ckptfmt.distributed.async_save (buffers reused)   time to return
  reshard  S ranks save both, D ranks load both (dcp.load vs ckptfmt.distributed.load): time and bytes
           read (/proc/self/io rchar of the call for both; ckptfmt also: its Reader's count in one more
           untimed dcp.load) against the bytes the targets need
  gc       seconds spent in the garbage collector during each DCP call (gc.callbacks); ckptfmt's
           convenience calls switch automatic collection off for their duration

Each figure is the max over ranks of one call; the table gives medians over runs and the median of
the per-run paired ratios DCP time / ckptfmt time (> 1: ckptfmt faster).

    python benchmarks/bench_dcp.py --worlds 1,2,4 --reshard 2:3 --scale 0.1 --runs 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.join(HERE, "..", "..", "shared", "tools")


def _gc_timer() -> list[float]:
    """Install a gc callback adding each collection's duration to the returned one-element list."""
    acc = [0.0]
    start = [0.0]

    def cb(phase: str, info: dict) -> None:
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            acc[0] += time.perf_counter() - start[0]

    gc.callbacks.append(cb)
    return acc


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def rank_main(rank: int, cfg: dict) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    sys.path.insert(0, cfg["tools"])
    import dcpbench

    import ckptfmt.distributed as cd

    torch.set_num_threads(1)
    world = cfg["world"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    gct = _gc_timer()
    res: dict = {"rank": rank}
    root = cfg["root"]
    bcfg = {"peerbench": os.path.join(cfg["tools"], "peerbench.py"), "scale": cfg["scale"]}

    def timed(fn) -> tuple[float, float, int]:
        dist.barrier()
        g0, r0, t0 = gct[0], _rchar(), time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        g, r = gct[0] - g0, _rchar() - r0
        dist.barrier()
        return t, g, r

    def rec(name: str, v: tuple[float, float, int]) -> None:
        res.setdefault(name, []).append(v)

    def fresh(p: str) -> None:
        if rank == 0:
            shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    if cfg["mode"] in ("full", "save_src"):
        state, res["logical"] = dcpbench._build_state(bcfg, mesh, world)
        res["local"] = sum(v.to_local().nbytes for v in state.values())
    if cfg["mode"] == "full":
        opts = cd.SaveOptions(compression=cfg["compression"])
        peers = {"dcp": lambda p: dcp.save(state, checkpoint_id=p),
                 "ckptfmt": lambda p: cd.save(state, p, options=opts)}
        for i in range(cfg["warmup"] + cfg["runs"]):
            order = ["dcp", "ckptfmt"] if i % 2 == 0 else ["ckptfmt", "dcp"]
            for name in order:
                p = os.path.join(root, f"{name}_{i}")
                fresh(p)
                m = timed(lambda name=name, p=p: peers[name](p))
                if i >= cfg["warmup"]:
                    rec(f"save_{name}", m)
                if i < cfg["warmup"] + cfg["runs"] - 1:
                    fresh(p)
        last = cfg["warmup"] + cfg["runs"] - 1
        target = dcpbench._zeros_like_state(state, mesh)
        dcp.load(target, checkpoint_id=os.path.join(root, f"dcp_{last}"))
        ok_dcp = dcpbench._check(target, bcfg, state)
        for v in target.values():
            v.to_local().zero_()
        cd.load(target, os.path.join(root, f"ckptfmt_{last}"))
        res["check_ok"] = ok_dcp and dcpbench._check(target, bcfg, state)
        lpeers = {"dcp": lambda: dcp.load(target, checkpoint_id=os.path.join(root, f"dcp_{last}")),
                  "ckptfmt": lambda: cd.load(target, os.path.join(root, f"ckptfmt_{last}"))}
        for i in range(cfg["warmup"] + cfg["runs"]):
            for name in (["dcp", "ckptfmt"] if i % 2 == 0 else ["ckptfmt", "dcp"]):
                m = timed(lpeers[name])
                if i >= cfg["warmup"]:
                    rec(f"load_{name}", m)
        stager = cd.ReusingStager()
        peak: dict[str, int] = {"dcp": 0, "ckptfmt": 0}  # per peer: peak RSS growth during one call + its save
        for i in range(cfg["warmup"] + cfg["runs"]):
            for name in (["dcp", "ckptfmt"] if i % 2 == 0 else ["ckptfmt", "dcp"]):
                p = os.path.join(root, f"async_{name}_{i}")
                fresh(p)
                gc.collect()
                sampler = _PeakRss()
                base_rss = sampler.peak
                box: list = []
                if name == "dcp":
                    m = timed(lambda box=box, p=p: box.append(dcp.async_save(state, checkpoint_id=p)))
                    fut = box[0]
                    getattr(fut, "upload_completion", fut).result()
                else:
                    m = timed(lambda box=box, p=p: box.append(cd.async_save(state, p, stager=stager)))
                    box[0].result()
                peak[name] = max(peak[name], sampler.stop() - base_rss)
                dist.barrier()
                if i >= cfg["warmup"]:
                    rec(f"stall_{name}", m)
                fresh(p)
        res["stager_allocations"] = stager.allocations
        res["async_peak_extra"] = peak
    elif cfg["mode"] == "save_src":
        dcp.save(state, checkpoint_id=os.path.join(root, "dcp"))
        cd.save(state, os.path.join(root, "ckptfmt"), options=cd.SaveOptions(compression=cfg["compression"]))
    elif cfg["mode"] == "reshard":
        target = dcpbench._empty_target(bcfg, mesh)
        res["needed"] = sum(v.to_local().nbytes for v in target.values())
        lpeers = {"dcp": lambda: dcp.load(target, checkpoint_id=os.path.join(root, "dcp")),
                  "ckptfmt": lambda: cd.load(target, os.path.join(root, "ckptfmt"))}
        for i in range(cfg["warmup"] + cfg["runs"]):
            for name in (["dcp", "ckptfmt"] if i % 2 == 0 else ["ckptfmt", "dcp"]):
                m = timed(lpeers[name])
                if i >= cfg["warmup"]:
                    rec(f"reshard_{name}", m)
        # the exact count of an untimed load through the Reader (rchar also counts the index read)
        r = cd.Reader(os.path.join(root, "ckptfmt"))
        dcp.load(target, storage_reader=r, planner=cd.LoadPlanner())
        res["ckptfmt_bytes_read"] = r.bytes_read
        res["check_ok"] = dcpbench._check(target, bcfg)
    gathered = [None] * world
    dist.all_gather_object(gathered, res)
    if rank == 0:
        with open(cfg["out"], "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


def launch(cfg: dict) -> list:
    import torch.multiprocessing as mp

    sys.path.insert(0, cfg["tools"])
    import dcpbench

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    fd, cfg["out"] = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cfg["port"] = dcpbench._free_port()
    try:
        mp.spawn(rank_main, args=(cfg,), nprocs=cfg["world"], join=True)
        with open(cfg["out"]) as f:
            return json.load(f)
    finally:
        os.unlink(cfg["out"])


def _rss() -> int:
    """This process's resident set, in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class _PeakRss:
    """Samples this process's RSS every 2 ms on a thread until :meth:`stop`, which returns the peak."""

    def __init__(self) -> None:
        import threading

        self.peak = _rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, _rss())


def _phase(ranks: list, name: str) -> dict:
    """Per run: max over ranks of (time, gc time); summed rchar."""
    n = len(ranks[0][name])
    t = [max(r[name][i][0] for r in ranks) for i in range(n)]
    g = [max(r[name][i][1] for r in ranks) for i in range(n)]
    io = [sum(r[name][i][2] for r in ranks) for i in range(n)]
    return {"t": t, "gc": g, "rchar": io}


def _row(label: str, ranks: list, phase: str, extra: str = "") -> str:
    d, c = _phase(ranks, f"{phase}_dcp"), _phase(ranks, f"{phase}_ckptfmt")
    ratios = [a / b for a, b in zip(d["t"], c["t"], strict=True)]
    return (f"| {label} | {statistics.median(d['t']):.3f} | {statistics.median(c['t']):.3f} | "
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{statistics.median(d['gc']):.3f} | {statistics.median(c['gc']):.3f} |{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--reshard", default="2:3")
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dir", default="/tmp/ckptfmt-bench-dcp")
    ap.add_argument("--tools", default=TOOLS, help="folder of dcpbench.py and peerbench.py")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--compression", default=None, help="ckptfmt's compression level (fast, balanced, maximum); "
                                                         "bytes read then count stored (compressed) bytes")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.tools, "dcpbench.py")):
        sys.exit(f"needs dcpbench.py and peerbench.py in {args.tools} (--tools)")
    base = {"scale": args.scale, "runs": args.runs, "warmup": args.warmup, "tools": os.path.abspath(args.tools),
            "compression": args.compression}
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    lines = ["| case | DCP s | ckptfmt s | DCP/ckptfmt (min-max) | DCP gc s | ckptfmt gc s | notes |",
             "|---|---|---|---|---|---|---|"]
    raw: dict = {}
    for w in [int(x) for x in args.worlds.split(",") if x]:
        root = os.path.join(args.dir, f"w{w}")
        os.makedirs(root, exist_ok=True)
        ranks = launch(dict(base, world=w, mode="full", root=root))
        shutil.rmtree(root, ignore_errors=True)
        raw[f"w{w}"] = ranks
        ok = "" if all(r["check_ok"] for r in ranks) else " **CHECK FAILED**"
        mb = ranks[0]["logical"] / 1e6
        lines.append(_row(f"save W={w} ({mb:.0f} MB)", ranks, "save", f"{ok} |"))
        lines.append(_row(f"load W={w}", ranks, "load", f"{ok} |"))
        lines.append(_row(f"async_save stall W={w}", ranks, "stall",
                          f" ckptfmt stager allocated {ranks[0]['stager_allocations']}x over "
                          f"{args.runs + args.warmup} saves (its copy is held between saves); peak RSS growth "
                          f"during one async save, per rank (max over ranks and saves) "
                          f"DCP {max(r['async_peak_extra']['dcp'] for r in ranks) / 1e6:.0f} MB, ckptfmt "
                          f"{max(r['async_peak_extra']['ckptfmt'] for r in ranks) / 1e6:.0f} MB, local shard "
                          f"{max(r['local'] for r in ranks) / 1e6:.0f} MB |"))
        print(f"# done W={w}", file=sys.stderr, flush=True)
    for spec in [x for x in args.reshard.split(",") if x]:
        s, d = (int(x) for x in spec.split(":"))
        root = os.path.join(args.dir, f"reshard{s}to{d}")
        os.makedirs(root, exist_ok=True)
        launch(dict(base, world=s, mode="save_src", root=root))
        ranks = launch(dict(base, world=d, mode="reshard", root=root))
        shutil.rmtree(root, ignore_errors=True)
        raw[f"reshard{s}to{d}"] = ranks
        needed = sum(r["needed"] for r in ranks)
        ours = sum(r["ckptfmt_bytes_read"] for r in ranks)
        dcp_read = statistics.median(_phase(ranks, "reshard_dcp")["rchar"])
        ours_rchar = statistics.median(_phase(ranks, "reshard_ckptfmt")["rchar"])
        ok = "" if all(r["check_ok"] for r in ranks) else " **CHECK FAILED**"
        lines.append(_row(f"reshard {s}->{d}", ranks, "reshard",
                          f" bytes read / needed: ckptfmt {ours / needed:.3f} (Reader count; "
                          f"{ours_rchar / needed:.3f} rchar), DCP {dcp_read / needed:.2f} (rchar){ok} |"))
        print(f"# done reshard {s}->{d}", file=sys.stderr, flush=True)
    import torch

    print(f"bench_dcp: torch {torch.__version__}, gpt2 scale {args.scale}, {args.runs} runs after {args.warmup} "
          f"warm-up, DTensor Shard(0), gloo, fsync on, checksums on; {os.cpu_count()} CPUs; loadavg before "
          f"{load0[0]:.1f}, after {os.getloadavg()[0]:.1f}; total {time.perf_counter() - t_all:.0f}s")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "raw": raw}, f)


if __name__ == "__main__":
    main()
