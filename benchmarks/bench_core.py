#!/usr/bin/env python3
"""Benchmark harness for ckptfmt's core save/load against its peers and the machine's limits.

Reuses the peer cases and measurement method of peerbench.py (vendored in this directory from
../shared/tools/peerbench.py): the same synthetic state (``make_state``), the same ``touch`` (one byte read per 4 KiB
page, so lazy loaders pay for the data), one fresh child process per measurement (so each peak RSS
is its own; libraries are imported before the clock starts) and the same limits (``limits``).

What is new here: peers are INTERLEAVED within each repetition (rep 1: ckptfmt, torch,
safetensors, numpy, h5py, raw limit; rep 2: the same ...) so machine noise hits all of them alike,
ratios are taken against peers measured in the same run, and the performance targets of ckptfmt
are checked and printed PASS/FAIL. Targets live here, never in the unit tests.

    python benchmarks/bench_core.py --case gpt2 --scale 1.0 --runs 5
    python benchmarks/bench_core.py --case small --runs 5
    python benchmarks/bench_core.py --many --runs 5
    python benchmarks/bench_core.py --case small --profile        # where ckptfmt's time goes
    python benchmarks/bench_core.py --case gpt2 --scale 0.25 --runs 3 --json out.json

Phases of one repetition (each line one child process):
  save     ckptfmt.save(durable=False) | torch.save | safetensors.torch.save_file | np.savez |
           h5py | raw: the same bytes (concatenated before the clock) with os.write in 64 MiB chunks
  durable  the same, ckptfmt.save(durable=True) (fsync file + directory), peers + fsync of the file,
           raw write + fsync
  load     every page touched: ckptfmt.load(mmap=True, verify=False) | (mmap=True, verify=True) |
           (mmap=False) [verify=True, the default] | (mmap=False, verify=False) | safetensors
           load_file | torch.load(weights_only=True) | torch.load(mmap=True) | np.load | h5py |
           raw: read the ckptfmt file into one fresh buffer
  one      open + read one tensor (the state's first key, the same for both):
           ckptfmt.open(p).get(key) | safetensors safe_open(p, "np").get_tensor(key)
Each save target file is deleted (and os.sync() run) before the child starts, so every save writes a
fresh file with no dirty pages of an earlier measurement still being written back; loads read from
the page cache (the files were just written), as peerbench does.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
TOOLS = os.path.dirname(HERE)  # the vendored peerbench.py lives beside this file


def _peerbench():
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    try:
        import peerbench
    except ImportError as e:
        raise SystemExit(f"bench_core.py needs peerbench.py (make_state, touch, limits, peer_save, peer_load); "
                         f"expected it at {os.path.join(TOOLS, 'peerbench.py')} (vendored in benchmarks/ of "
                         f"the repository {REPO}): {e}") from None
    return peerbench


SAVE_PEERS = ["ckptfmt", "torch", "safetensors", "numpy", "h5py", "raw"]
LOAD_PEERS = ["ckptfmt-mmap", "ckptfmt-mmap-verify", "ckptfmt-eager", "ckptfmt-eager-noverify",
              "safetensors", "torch", "torch-mmap", "numpy", "h5py", "raw-read"]
ONE_PEERS = ["ckptfmt", "safetensors"]
LABEL = {
    ("save", "ckptfmt"): "ckptfmt.save(durable=False)",
    ("durable", "ckptfmt"): "ckptfmt.save(durable=True)",
    ("save", "torch"): "torch.save", ("durable", "torch"): "torch.save + fsync",
    ("save", "safetensors"): "safetensors save_file", ("durable", "safetensors"): "safetensors save_file + fsync",
    ("save", "numpy"): "np.savez", ("durable", "numpy"): "np.savez + fsync",
    ("save", "h5py"): "h5py", ("durable", "h5py"): "h5py + fsync",
    ("save", "raw"): "LIMIT raw os.write 64 MiB", ("durable", "raw"): "LIMIT raw os.write + fsync",
    ("load", "ckptfmt-mmap"): "ckptfmt.load(mmap=True, verify=False)",
    ("load", "ckptfmt-mmap-verify"): "ckptfmt.load(mmap=True, verify=True)",
    ("load", "ckptfmt-eager"): "ckptfmt.load(mmap=False) [verify=True]",
    ("load", "ckptfmt-eager-noverify"): "ckptfmt.load(mmap=False, verify=False)",
    ("load", "safetensors"): "safetensors load_file",
    ("load", "torch"): "torch.load(weights_only=True)",
    ("load", "torch-mmap"): "torch.load(weights_only=True, mmap=True)",
    ("load", "numpy"): "np.load (.npz)", ("load", "h5py"): "h5py",
    ("load", "raw-read"): "LIMIT raw read into one buffer",
    ("one", "ckptfmt"): "ckptfmt.open(p).get(key)",
    ("one", "safetensors"): "safetensors safe_open(p).get_tensor(key)",
}
#: which file a load peer reads
LOAD_FILE = {"ckptfmt-mmap": "ckptfmt", "ckptfmt-mmap-verify": "ckptfmt", "ckptfmt-eager": "ckptfmt",
             "ckptfmt-eager-noverify": "ckptfmt", "raw-read": "ckptfmt", "safetensors": "safetensors",
             "torch": "torch", "torch-mmap": "torch", "numpy": "numpy", "h5py": "h5py"}
MiB = 1 << 20


def file_for(d: str, case: str, peer: str) -> str:
    return os.path.join(d, f"{case}.{peer}" + (".npz" if peer == "numpy" else ""))


# ====================================================================== child side

def _maxrss_mb() -> float:
    """This process's peak RSS: VmHWM, not ru_maxrss, which after fork+exec can report the parent's peak."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith(field + ":"):
                    return int(ln.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM (Linux clear_refs 5) so that the next peak read is the peak of what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _prewarm(nbytes: int) -> None:
    """Touch and free ``nbytes`` of anonymous memory, so the measurement that follows gets warm pages.

    On VMs with free page reporting (virtio-balloon), memory left free for ~2 s is handed back to the
    host and the next first touch of it costs a host fault per page: measured here at 0.2-0.5 GB/s
    against 3-5 GB/s for pages freed a moment ago. Every save allocates page cache and every eager
    load allocates arrays, so without this the figures measure the hypervisor more than the library,
    and differently for each peer depending on what ran before. Peak RSS is reset after it.
    """
    import numpy as np

    if nbytes > 0:
        a = np.ones(nbytes, np.uint8)
        del a


def _imports(peer: str) -> None:
    """Import what a peer needs, before any clock starts."""
    import numpy  # noqa: F401
    if peer.startswith("ckptfmt") or peer in ("raw", "raw-read"):
        import ckptfmt  # noqa: F401
    if peer.startswith("torch") or peer.startswith("safetensors"):
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
    if peer == "h5py":
        import h5py  # noqa: F401


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def child_save(pb, a: dict) -> dict:
    import numpy as np

    peer, path, durable = a["peer"], a["path"], a["durable"]
    _imports(peer)
    state = pb.make_state(a["case"], a["scale"])
    data = pb.nbytes(state)
    old_size = os.path.getsize(path) if os.path.exists(path) else data
    if peer == "raw":
        buf = np.concatenate([v.reshape(-1).view(np.uint8) for v in state.values()])
        del state
    pre_peak = _status_mb("VmHWM")
    if not a.get("overwrite"):
        _unlink(path)
    if a.get("prewarm", True):
        _prewarm(max(old_size, data) + 64 * MiB)
    pre_rss = _status_mb("VmRSS")
    reset = _reset_peak()
    if peer == "ckptfmt":
        import ckptfmt
        t0 = time.perf_counter()
        ckptfmt.save(path, state, durable=durable)
        secs = time.perf_counter() - t0
    elif peer == "raw":
        mv, n, chunk = memoryview(buf), buf.nbytes, 64 * MiB
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for off in range(0, n, chunk):
            os.write(fd, mv[off:off + chunk])
        if durable:
            os.fsync(fd)
        os.close(fd)
        secs = time.perf_counter() - t0
    else:
        secs, _ = pb.peer_save(peer, state, path, durable)
    out = {"secs": secs, "size": os.path.getsize(path), "bytes": data}
    if reset and pre_rss is not None:
        # the save's own peak over the RSS it started from: the most direct "extra memory" figure
        during = _status_mb("VmHWM")
        out.update(rss_before_mb=pre_rss, peak_during_mb=during, extra_during_mb=during - pre_rss,
                   peak_rss_mb=max(pre_peak, during))
    return out


def child_load(pb, a: dict) -> dict:
    import numpy as np

    peer, path = a["peer"], a["path"]
    _imports(peer)
    pre_peak = _status_mb("VmHWM")
    if a.get("prewarm", True):
        _prewarm(os.path.getsize(path) + 64 * MiB)
    reset = _reset_peak()
    if peer.startswith("ckptfmt"):
        import ckptfmt
        mmap = "mmap" in peer
        verify = peer.endswith("-verify") if mmap else not peer.endswith("-noverify")
        t0 = time.perf_counter()
        d = ckptfmt.load(path, mmap=mmap, verify=verify)
        total = sum(pb.touch(v) for v in d.values())
        secs = time.perf_counter() - t0
    elif peer == "raw-read":
        t0 = time.perf_counter()
        size = os.path.getsize(path)
        buf = np.empty(size, np.uint8)
        with open(path, "rb", buffering=0) as f:
            got = f.readinto(buf)
        assert got == size, (got, size)
        total = pb.touch(buf)
        secs = time.perf_counter() - t0
    else:
        secs, total = pb.peer_load(peer, path)
    out = {"secs": secs, "checksum_of_touch": int(total)}
    if reset and pre_peak is not None:
        out["peak_rss_mb"] = max(pre_peak, _status_mb("VmHWM"))
    return out


def child_one(pb, a: dict) -> dict:
    peer, path, key = a["peer"], a["path"], a["key"]
    _imports(peer)
    if peer == "ckptfmt":
        import ckptfmt
        t0 = time.perf_counter()
        with ckptfmt.open(path) as c:
            arr = c.get(key)
            total = pb.touch(arr)
        secs = time.perf_counter() - t0
    else:
        from safetensors import safe_open
        t0 = time.perf_counter()
        with safe_open(path, "np") as f:
            arr = f.get_tensor(key)
            total = pb.touch(arr)
        secs = time.perf_counter() - t0
    return {"secs": secs, "nbytes": int(arr.nbytes), "checksum_of_touch": int(total)}


def child_base(pb, a: dict) -> dict:
    """RSS of a process that imported the peer's libraries and only built the state."""
    _imports(a["peer"])
    state = pb.make_state(a["case"], a["scale"])
    out = {"bytes": pb.nbytes(state), "tensors": len(state), "first_key": next(iter(state))}
    if "ckptfmt" in sys.modules:
        out["ckptfmt_file"] = sys.modules["ckptfmt"].__file__
    return out


def _many_state(n: int, kind: str = "arrays"):
    """``n`` tensors of 1..8 float32 (4..32 bytes) each.

    kind "arrays": every tensor owns its memory (what a real state dict holds); kind "views": every
    tensor is a slice of one shared buffer, which ckptfmt (spec 4.7) stores as one blob plus n views.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    pool = rng.standard_normal(8 * n, dtype=np.float32)
    if kind == "views":
        return {f"t{i}": pool[8 * i: 8 * i + 1 + (i % 8)] for i in range(n)}
    return {f"t{i}": pool[8 * i: 8 * i + 1 + (i % 8)].copy() for i in range(n)}


def child_many(pb, a: dict) -> dict:
    import ckptfmt

    op, path = a["op"], a["path"]
    if op == "many-make":
        state = _many_state(a["count"], a.get("kind", "arrays"))
        t0 = time.perf_counter()
        ckptfmt.save(path, state, alignment=64, durable=False)
        return {"secs": time.perf_counter() - t0, "size": os.path.getsize(path), "count": len(state)}
    key = f"t{a['count'] - 1}"
    t0 = time.perf_counter()
    if op == "many-open":
        c = ckptfmt.open(path)
        n = len(c)
    elif op == "many-open-get":
        with ckptfmt.open(path) as c:
            n = int(pb.touch(c.get(key)))
    elif op == "many-load":
        d = ckptfmt.load(path, mmap=True, verify=True)
        n = len(d)
    else:
        raise SystemExit(op)
    secs = time.perf_counter() - t0
    return {"secs": secs, "n": n}


def child_limits(pb, a: dict) -> dict:
    return pb.limits(a["mb"], a["dir"])


def child(spec: str) -> None:
    a = json.loads(spec)
    pb = _peerbench()
    op = a["op"]
    fn = {"save": child_save, "load": child_load, "one": child_one, "base": child_base,
          "limits": child_limits}.get(op, child_many)
    res = fn(pb, a)
    res.setdefault("peak_rss_mb", _maxrss_mb())
    print(json.dumps(res))


# ====================================================================== parent side

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
QUIET = {"wait": 0.0, "cores": 0.5}  # --quiet-wait, --quiet-cores


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, steal) jiffies of the whole machine, from /proc/stat; (0, 0) where unavailable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return user + nice + system + irq + softirq, steal


def _own_cpu() -> float:
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _others_cores(window: float = 0.5) -> float:
    b0, c0, t0 = _cpu_jiffies()[0], _own_cpu(), time.perf_counter()
    time.sleep(window)
    return max(0.0, ((_cpu_jiffies()[0] - b0) / _HZ - (_own_cpu() - c0)) / (time.perf_counter() - t0))


def run_child(spec: dict, timeout: float, sync: bool) -> dict:
    """One measurement in a fresh process; also records how busy the rest of the machine was meanwhile."""
    if sync:
        os.sync()
    waited = 0.0
    if QUIET["wait"] > 0:
        t0 = time.perf_counter()
        while _others_cores() > QUIET["cores"] and time.perf_counter() - t0 < QUIET["wait"]:
            pass
        waited = time.perf_counter() - t0
    (b0, s0), c0, t0 = _cpu_jiffies(), _own_cpu(), time.perf_counter()
    p = subprocess.run([sys.executable, HERE, "--child", json.dumps(spec)], capture_output=True, text=True,
                       timeout=timeout, env=child_env())
    (b1, s1), c1, wall = _cpu_jiffies(), _own_cpu(), time.perf_counter() - t0
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {p.returncode}: " + " | ".join(tail)}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    # over the child's whole life (state build included, not only the clock): a noise indicator
    out["others_cores"] = round(max(0.0, ((b1 - b0) / _HZ - (c1 - c0)) / wall), 3)
    out["steal_cores"] = round((s1 - s0) / _HZ / wall, 3)
    if QUIET["wait"] > 0:
        out["quiet_waited_s"] = round(waited, 2)
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


SRC_DIRS = (("ckptfmt", "ckptfmt"), ("backends", os.path.join("ckptfmt", "backends")))  # pyproject package-dir
PIN: dict = {}  # set by pin_source(): the snapshot every child imports ckptfmt from


def src_hash(root: str, snapshot: bool = False) -> str:
    """sha256 (12 hex) of ckptfmt's Python sources: what was measured, exactly.

    ``root`` is the repository (ckptfmt/ and backends/ beside each other) or, with ``snapshot``, a
    copy laid out as installed (backends/ inside ckptfmt/); both hash the same for the same sources.
    """
    import hashlib

    files = {}
    for sub, to in ((("ckptfmt", "ckptfmt"),) if snapshot else SRC_DIRS):
        base = os.path.join(root, sub)
        for r, dirs, names in os.walk(base):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            for fn in names:
                if fn.endswith(".py") or fn == "py.typed":
                    rel = os.path.join(to, os.path.relpath(os.path.join(r, fn), base))
                    files[rel] = os.path.join(r, fn)
    h = hashlib.sha256()
    for rel in sorted(files):
        with open(files[rel], "rb") as f:
            h.update(rel.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:12]


def pin_source(d: str) -> None:
    """Snapshot ckptfmt's sources and make every child import that copy (PYTHONPATH beats the editable finder).

    Others edit ckptfmt/ while benchmarks run; without this, one run could measure several versions.
    """
    h = src_hash(REPO)
    dest = os.path.join(d, f"src-{h}")
    if not os.path.isdir(dest):
        tmp = dest + f".tmp{os.getpid()}"
        for sub, to in SRC_DIRS:
            shutil.copytree(os.path.join(REPO, sub), os.path.join(tmp, to),
                            ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        if src_hash(tmp, snapshot=True) != h:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit("ckptfmt/ changed while being copied; run again")
        os.replace(tmp, dest)
    PIN.update(hash=h, dir=dest)


def child_env() -> dict | None:
    if not PIN:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = PIN["dir"] + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def machine_info() -> dict:
    info = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
        info["loadavg_start"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass
    from importlib import metadata  # not importing the libraries: the parent stays small (see _maxrss_mb)

    vers = {}
    for m in ("numpy", "torch", "safetensors", "h5py", "msgpack", "xxhash", "ckptfmt"):
        try:
            vers[m] = metadata.version(m)
        except Exception:
            vers[m] = "?"
    info["versions"] = vers
    try:
        info["git_head"] = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                          text=True).stdout.strip()
        info["ckptfmt_dirty"] = bool(subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "ckptfmt"],
                                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        pass
    info["live_src_sha256"] = src_hash(REPO)
    if PIN:
        info["pinned_src_sha256"], info["pinned_src_dir"] = PIN["hash"], PIN["dir"]
    return info


def med(xs):
    return statistics.median(xs) if xs else None


def summarize(records: list[dict], phase: str, peer: str):
    rs = [r for r in records if r["phase"] == phase and r["peer"] == peer and not r["warmup"] and "secs" in r]
    if not rs:
        return None
    ts = [r["secs"] for r in rs]
    return {"phase": phase, "peer": peer, "label": LABEL.get((phase, peer), peer), "n": len(ts),
            "median_s": med(ts), "best_s": min(ts), "worst_s": max(ts), "all_s": ts,
            "peak_rss_mb": med([r["peak_rss_mb"] for r in rs]),
            "extra_during_mb": med([r["extra_during_mb"] for r in rs if "extra_during_mb" in r]),
            "extra_during_max_mb": max([r["extra_during_mb"] for r in rs if "extra_during_mb" in r], default=None),
            "size": rs[0].get("size"), "nbytes": rs[0].get("nbytes"),
            "others_cores": med([r["others_cores"] for r in rs if "others_cores" in r]),
            "others_cores_max": max([r["others_cores"] for r in rs if "others_cores" in r], default=None),
            "errors": [r["error"] for r in records if r["phase"] == phase and r["peer"] == peer and "error" in r]}


def paired_ratio(records, phase, num_peer, den_peer, num_phase=None):
    """Median over reps of time(num)/time(den), each rep's pair measured a minute apart at most."""
    def by_rep(ph, p):
        return {r["rep"]: r["secs"] for r in records if r["phase"] == ph and r["peer"] == p
                and not r["warmup"] and "secs" in r}
    a, b = by_rep(num_phase or phase, num_peer), by_rep(phase, den_peer)
    rs = [a[k] / b[k] for k in a if k in b and b[k] > 0]
    return (med(rs), min(rs), max(rs)) if rs else None


# ---------------------------------------------------------------- targets

def targets(case: str, S: dict) -> list[dict]:
    """Each target: name, applies (to this case), value, threshold, pass. Ratios use medians of one run."""
    out = []

    def t(phase, peer):
        s = S.get((phase, peer))
        return s["median_s"] if s else None

    def add(name, applies, value, op, thr, unit="×", how=""):
        ok = None if value is None else (value >= thr if op == ">=" else value <= thr)
        out.append({"target": name, "applies": applies, "value": value, "op": op, "threshold": thr,
                    "unit": unit, "pass": ok, "how": how})

    def ratio(x, y):
        return None if x is None or y is None or y == 0 else x / y

    big, small = case == "gpt2", case == "small"
    add("save ≥ 90% of raw sequential-write bandwidth", big, ratio(t("save", "raw"), t("save", "ckptfmt")),
        ">=", 0.9, how="t(raw os.write) / t(ckptfmt.save durable=False)")
    add("save time ≤ safetensors", big, ratio(t("save", "ckptfmt"), t("save", "safetensors")), "<=", 1.0,
        how="t(ckptfmt.save) / t(safetensors save_file)")
    add("durable save ≥ 90% of write+fsync", big, ratio(t("durable", "raw"), t("durable", "ckptfmt")),
        ">=", 0.9, how="t(raw write+fsync) / t(ckptfmt.save durable=True)")
    add("mmap load, verify=False ≥ 1.0× safetensors", big,
        ratio(t("load", "safetensors"), t("load", "ckptfmt-mmap")), ">=", 1.0,
        how="t(safetensors load_file) / t(ckptfmt.load mmap verify=False)")
    add("mmap load, verify=True ≥ 0.5× safetensors", big,
        ratio(t("load", "safetensors"), t("load", "ckptfmt-mmap-verify")), ">=", 0.5,
        how="t(safetensors load_file) / t(ckptfmt.load mmap verify=True)")
    add("eager load (mmap=False) ≥ 2× torch.load", big, ratio(t("load", "torch"), t("load", "ckptfmt-eager")),
        ">=", 2.0, how="t(torch.load) / t(ckptfmt.load mmap=False, verify=True)")
    add("eager load (mmap=False) ≥ 0.9× raw readinto", big, ratio(t("load", "raw-read"), t("load", "ckptfmt-eager")),
        ">=", 0.9, how="t(readinto of the file into one fresh buffer) / t(ckptfmt.load mmap=False, verify=True)")
    add("eager load, verify=False ≥ 0.9× raw readinto", False,
        ratio(t("load", "raw-read"), t("load", "ckptfmt-eager-noverify")), ">=", 0.9,
        how="t(readinto of the file into one fresh buffer) / t(ckptfmt.load mmap=False, verify=False)")
    add("small: save ≥ 5× safetensors", small, ratio(t("save", "safetensors"), t("save", "ckptfmt")), ">=", 5.0,
        how="t(safetensors save_file) / t(ckptfmt.save durable=False)")
    add("small: load ≥ 3× safetensors (default load: mmap, verify=True)", small,
        ratio(t("load", "safetensors"), t("load", "ckptfmt-mmap-verify")), ">=", 3.0,
        how="t(safetensors load_file) / t(ckptfmt.load())")
    for peer, what in (("ckptfmt-mmap", "mmap, verify=False"), ("ckptfmt-eager", "mmap=False, verify=True")):
        add(f"small: load ≥ 3× safetensors ({what})", False, ratio(t("load", "safetensors"), t("load", peer)),
            ">=", 3.0, how=f"t(safetensors load_file) / t(ckptfmt.load {what})")
    one = t("one", "ckptfmt")
    add("open + read one tensor ≤ 10 ms", small, None if one is None else one * 1e3, "<=", 10.0, unit=" ms",
        how="median of ckptfmt.open(p).get(first key) + touch")
    for phase in ("save", "durable"):
        s, b = S.get((phase, "ckptfmt")), S.get(("base", "ckptfmt"))
        extra = None if not s or not b else s["peak_rss_mb"] - b["peak_rss_mb"]
        add(f"peak RSS of {'durable ' if phase == 'durable' else ''}save ≤ state + 32 MiB", True, extra, "<=",
            32.0, unit=" MiB", how="median peak RSS of the save child − RSS of a child that imported ckptfmt "
                                   "and built the state")
        add(f"peak RSS of {'durable ' if phase == 'durable' else ''}save ≤ state + 32 MiB (direct)", True,
            s.get("extra_during_max_mb") if s else None, "<=", 32.0, unit=" MiB",
            how="worst over reps of VmHWM during the save (reset just before) − VmRSS just before it")
    return out


def many_targets(S: dict, count: int) -> list[dict]:
    s = S.get(("many", "many-open"))
    v = s["median_s"] if s else None
    return [{"target": f"1M-tensor open ≤ 1 s (this file: {count:,} tensors)", "applies": count >= 1_000_000,
             "value": v, "op": "<=", "threshold": 1.0,
             "unit": " s", "pass": None if v is None else v <= 1.0, "how": "median of ckptfmt.open(path)"}]


# ---------------------------------------------------------------- printing

def fmt(x, f="{:.3f}"):
    return "—" if x is None else f.format(x)


def load_str(s: dict) -> str:
    return f"{fmt(s.get('others_cores'), '{:.2f}')}/{fmt(s.get('others_cores_max'), '{:.2f}')}"


def status(tg) -> str:
    if tg["pass"] is None:
        return "no data"
    word = "PASS" if tg["pass"] else "FAIL"
    return word if tg["applies"] else f"(info: {word.lower()})"


def print_targets(tgs):
    print("| target | measured | threshold | result | how |")
    print("|---|---|---|---|---|")
    for tg in tgs:
        unit = tg["unit"]
        v = fmt(tg["value"], "{:.3f}" if unit == "×" else "{:.2f}")
        print(f"| {tg['target']} | {v}{unit if tg['value'] is not None else ''} | {tg['op']} {tg['threshold']:g}{unit} "
              f"| {status(tg)} | {tg['how']} |")


def print_tables(res: dict) -> None:
    S = {(s["phase"], s["peer"]): s for s in res["summary"]}
    state_b = res["state_bytes"]
    print(f"### case={res['case']} scale={res['scale']} runs={res['runs']} (+{res['warmup']} warm-up) "
          f"state={state_b / 1e6:.1f} MB in {res['tensors']} tensors"
          + ("; saves OVERWRITE the previous file" if res.get("overwrite") else "; saves write a fresh file")
          + ("" if res.get("prewarm", True) else "; no prewarm"))
    print()
    print("Base RSS (child that imported the peer's libraries and built the state): "
          + ", ".join(f"{p} {S[('base', p)]['peak_rss_mb']:.0f} MB" for p in SAVE_PEERS[:-1] if ("base", p) in S)
          + f"; peerbench.base_rss (numpy only): {res.get('peerbench_base_rss_mb', 0):.0f} MB")
    print()
    for phase, peers, ref, title in (
            ("save", SAVE_PEERS, "ckptfmt", "Save (page cache, no fsync)"),
            ("durable", SAVE_PEERS, "ckptfmt", "Durable save (fsync)"),
            ("load", LOAD_PEERS, "ckptfmt-mmap-verify", "Load, every 4 KiB page touched (warm page cache)"),
            ("one", ONE_PEERS, "ckptfmt", "Open + read one tensor (+ touch)")):
        rows = [S[(phase, p)] for p in peers if (phase, p) in S]
        if not rows:
            continue
        rs = S.get((phase, ref))
        print(f"#### {title}")
        print()
        if phase == "one":
            print(f"key: {res.get('one_key')!r}, {rows[0].get('nbytes') or 0} bytes")
            print()
        print(f"ratio = peer median time / {LABEL.get((phase, ref))} median time (> 1: ckptfmt faster); "
              "paired = median over reps of the same ratio within each rep [min..max]; other load = CPU cores "
              "busy outside this benchmark while the child ran (of 2 on the reference machine)")
        print()
        hdr = ("| peer | median s | best s | GB/s (median) | ratio vs ckptfmt | paired ratio [min..max] | "
               "other load, cores (median/max) | peak RSS MB |")
        if phase in ("save", "durable"):
            hdr += " peak − base RSS MB | peak during − RSS before MB | file MB |"
        print(hdr)
        print("|" + "---|" * (hdr.count("|") - 1))
        for s in rows:
            gbps = state_b / s["median_s"] / 1e9 if phase != "one" else None
            r = s["median_s"] / rs["median_s"] if rs else None
            pr = paired_ratio(res["records"], phase, s["peer"], ref)
            prs = "—" if pr is None else f"{pr[0]:.2f} [{pr[1]:.2f}..{pr[2]:.2f}]"
            line = (f"| {s['label']} | {s['median_s']:.4f} | {s['best_s']:.4f} | {fmt(gbps, '{:.2f}')} | "
                    f"{fmt(r, '{:.2f}')} | {prs} | {load_str(s)} | "
                    f"{s['peak_rss_mb']:.0f} |")
            if phase in ("save", "durable"):
                b = S.get(("base", s["peer"]))
                extra = s["peak_rss_mb"] - b["peak_rss_mb"] if b else None
                line += (f" {fmt(extra, '{:.1f}')} | {fmt(s.get('extra_during_mb'), '{:.1f}')} | "
                         f"{fmt((s.get('size') or 0) / 1e6, '{:.1f}')} |")
            print(line)
        errs = {p: S[(phase, p)]["errors"] for p in peers if (phase, p) in S and S[(phase, p)]["errors"]}
        for p, e in errs.items():
            print(f"\nerrors for {p}: {e[:2]}")
        print()
    if res.get("limits"):
        print(f"#### Machine limits (peerbench.limits, {res['limits_mb']} MiB, medians of 3, measured once before "
              "the reps)")
        print()
        print("| limit | GB/s |")
        print("|---|---|")
        for k, v in res["limits"].items():
            if k.endswith("GB/s"):
                print(f"| {k} | {v:.2f} |")
        lim = res["limits"]
        if "others_cores" in lim:
            print(f"\n(other load while measuring limits: {lim['others_cores']:.2f} cores; no prewarm here, so "
                  "the page-cache write figure includes first-touch host faults: see README)")
        print()
    print("#### Targets")
    print()
    print_targets(res["targets"])
    print()


def print_many(res: dict) -> None:
    S = {(s["phase"], s["peer"]): s for s in res["summary"]}
    mk = S.get(("make", "many-make"))
    kind = ("each its own array" if res.get("many_kind", "arrays") == "arrays"
            else "all VIEWS of one shared buffer")
    print(f"### --many: {res['count']:,} tiny tensors (1..8 float32 each, {kind}), alignment=64, "
          f"file {fmt((mk or {}).get('size', 0) / 1e6, '{:.1f}')} MB; runs={res['runs']} (+{res['warmup']} warm-up)")
    print()
    print("| operation | median s | best s | worst s | peak RSS MB | other load, cores (median/max) |")
    print("|---|---|---|---|---|---|")
    for key, label in ((("make", "many-make"), "ckptfmt.save(alignment=64, durable=False) (once)"),
                       (("many", "many-open"), "ckptfmt.open(path) (metadata only)"),
                       (("many", "many-open-get"), "ckptfmt.open(path).get(last key) + touch"),
                       (("many", "many-load"), f"ckptfmt.load(path) (mmap, verify=True), all {res['count']:,}")):
        s = S.get(key)
        if s:
            print(f"| {label} | {s['median_s']:.3f} | {s['best_s']:.3f} | {s['worst_s']:.3f} | "
                  f"{s['peak_rss_mb']:.0f} | {load_str(s)} |")
        elif key[0] == "many" and any(r["peer"] == key[1] for r in res["records"]):
            errs = [r["error"] for r in res["records"] if r["peer"] == key[1] and "error" in r]
            print(f"| {label} | failed: {errs[:1]} | | | |")
    print()
    print_targets(res["targets"])
    print()


# ---------------------------------------------------------------- drivers

def run_case(args) -> dict:
    pb = _peerbench()
    d = os.path.join(args.dir, f"{args.case}-{args.scale:g}")
    os.makedirs(d, exist_ok=True)
    info = run_child({"op": "base", "peer": "ckptfmt", "case": args.case, "scale": args.scale}, args.timeout, False)
    if "error" in info:
        raise SystemExit(f"building the state failed: {info['error']}")
    state_bytes, tensors, first_key = info["bytes"], info["tensors"], info["first_key"]
    log(f"children import ckptfmt from {info.get('ckptfmt_file')}")
    save_peers = [p for p in SAVE_PEERS if p in args.peers or p in ("ckptfmt", "raw")]
    load_peers = [p for p in LOAD_PEERS if p.startswith("ckptfmt") or p == "raw-read"
                  or LOAD_FILE[p] in save_peers]
    one_peers = [p for p in ONE_PEERS if p in save_peers]
    common = {"case": args.case, "scale": args.scale}
    res = {"kind": "case", "case": args.case, "scale": args.scale, "runs": args.runs, "warmup": args.warmup,
           "overwrite": args.overwrite, "prewarm": not args.no_prewarm, "phases": args.phases,
           "state_bytes": state_bytes, "tensors": tensors, "one_key": first_key, "records": [],
           "started": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
           "argv": sys.argv, "ckptfmt_file": info.get("ckptfmt_file")}
    T = args.timeout
    if not args.no_limits:
        res["limits_mb"] = max(64, min(1024, state_bytes // MiB))
        log(f"limits ({res['limits_mb']} MiB)")
        res["limits"] = run_child({"op": "limits", "mb": res["limits_mb"], "dir": d}, T, True)
    log("base RSS")
    res["peerbench_base_rss_mb"] = pb.base_rss(args.case, args.scale)  # ru_maxrss: may include this parent's peak
    for p in save_peers[:-1]:
        r = run_child({"op": "base", "peer": p, **common}, T, False)
        res["records"].append({"phase": "base", "peer": p, "rep": 0, "warmup": False, "secs": 0.0, **r})
    t_start = time.perf_counter()
    for rep in range(args.warmup + args.runs):
        warm = rep < args.warmup
        log(f"rep {rep + 1}/{args.warmup + args.runs}{' (warm-up)' if warm else ''}")
        common["prewarm"] = not args.no_prewarm
        common["overwrite"] = args.overwrite
        plan = [("save", p, {"op": "save", "peer": p, "durable": False, "path": file_for(d, args.case, p)})
                for p in save_peers]
        plan += [("durable", p, {"op": "save", "peer": p, "durable": True, "path": file_for(d, args.case, p)})
                 for p in save_peers]
        plan += [("load", p, {"op": "load", "peer": p, "path": file_for(d, args.case, LOAD_FILE[p])})
                 for p in load_peers]
        plan += [("one", p, {"op": "one", "peer": p, "key": first_key, "path": file_for(d, args.case, p)})
                 for p in one_peers]
        plan = [x for x in plan if x[0] in args.phases]
        for phase, peer, spec in plan:
            r = run_child({**spec, **common}, T, not args.no_sync)
            res["records"].append({"phase": phase, "peer": peer, "rep": rep, "warmup": warm, **r})
            msg = f"{r['secs']:.4f} s  rss {r['peak_rss_mb']:.0f} MB" if "secs" in r else r["error"]
            log(f"  {phase:8s} {peer:24s} {msg}")
        if args.budget and time.perf_counter() - t_start > args.budget and rep + 1 < args.warmup + args.runs:
            log(f"time budget of {args.budget} s spent after rep {rep + 1}: stopping")
            res["stopped_early_after_rep"] = rep + 1
            break
    res["summary"] = [s for s in (summarize(res["records"], ph, p)
                                  for ph, ps in (("base", save_peers), ("save", save_peers),
                                                 ("durable", save_peers), ("load", load_peers), ("one", one_peers))
                                  for p in ps) if s]
    S = {(s["phase"], s["peer"]): s for s in res["summary"]}
    res["targets"] = targets(args.case, S)
    res["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)
    return res


def run_many(args) -> dict:
    d = os.path.join(args.dir, "many")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"many-{args.many_kind}-{args.many_count}.ckpt")
    res = {"kind": "many", "count": args.many_count, "many_kind": args.many_kind, "runs": args.runs,
           "warmup": args.warmup, "records": [], "started": _dt.datetime.now().isoformat(timespec="seconds"),
           "machine": machine_info(), "argv": sys.argv}
    T = args.timeout
    log(f"making {args.many_count:,}-tensor file")
    r = run_child({"op": "many-make", "path": path, "count": args.many_count, "kind": args.many_kind}, T, True)
    if "error" in r:
        raise SystemExit(f"making the file failed: {r['error']}")
    res["records"].append({"phase": "make", "peer": "many-make", "rep": 0, "warmup": False, **r})
    log(f"  {r}")
    for rep in range(args.warmup + args.runs):
        warm = rep < args.warmup
        for op in args.many_ops:
            r = run_child({"op": op, "path": path, "count": args.many_count}, T, False)
            res["records"].append({"phase": "many", "peer": op, "rep": rep, "warmup": warm, **r})
            log(f"  rep {rep + 1} {op:14s} {r.get('secs', r.get('error'))}")
    res["summary"] = [s for s in (summarize(res["records"], "make", "many-make"),
                                  *(summarize(res["records"], "many", p)
                                    for p in ("many-open", "many-open-get", "many-load"))) if s]
    res["targets"] = many_targets({(s["phase"], s["peer"]): s for s in res["summary"]}, args.many_count)
    res["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)
    return res


# ---------------------------------------------------------------- profile

def run_profile(args) -> None:
    """Stage timings (perf_counter) and cProfile of ckptfmt save and load, in one process.

    Stages are timed by wrapping, in this process only, whichever of ckptfmt's internal functions
    exist (plan/_collect, Writer.write_blobs, Writer.finish, Checkpoint._open/_prefault/read_rows,
    _reader._rebuild): no library code is changed, and a refactor only drops a stage from the table.
    The figures of record are the ones of the interleaved benchmark.
    """
    import cProfile
    import io
    import pstats

    import ckptfmt
    from ckptfmt import _api, _reader, _writer

    pb = _peerbench()
    print(f"ckptfmt imported from {ckptfmt.__file__}\n")
    d = os.path.join(args.dir, "profile")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{args.case}.ckpt")
    state = pb.make_state(args.case, args.scale)
    nb = pb.nbytes(state)
    print(f"### profile: case={args.case} scale={args.scale} state={nb / 1e6:.1f} MB, {len(state)} tensors\n")
    reps = max(1, args.runs)

    acc: dict[str, float] = {}
    originals = []

    def wrap(owner, name, stage):
        fn = getattr(owner, name, None)
        if fn is None:
            return

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[stage] = acc.get(stage, 0.0) + time.perf_counter() - t0

        originals.append((owner, name, fn))
        setattr(owner, name, timed)

    for name in ("plan", "_collect"):
        wrap(_api, name, "plan/collect (walk tree, find arrays, encode)")
    wrap(_writer.Writer, "write_blobs", "write_blobs (copy small, hash, write)")
    wrap(_writer.Writer, "finish", "finish (tensor table, msgpack metadata, footer)")
    wrap(_reader.Checkpoint, "_open", "open (header, footer, metadata parse + validate)")
    wrap(_reader.Checkpoint, "_prefault", "prefault (madvise POPULATE_READ)")
    wrap(_reader.Checkpoint, "read_rows", "read_rows (views or reads + xxh3)")
    wrap(_reader, "_rebuild", "rebuild tree (+ per-tensor convert)")

    def staged(fn, rest):
        acc.clear()
        t0 = time.perf_counter()
        out = fn()
        total = time.perf_counter() - t0
        st = dict(acc)
        st[rest] = total - sum(acc.values())
        if out is not None:
            t0 = time.perf_counter()
            sum(pb.touch(v) for v in out.values())
            st["touch every page (the benchmark's cost, not ckptfmt's)"] = time.perf_counter() - t0
        return st

    def staged_save(checksum=True):
        _unlink(path)  # as in the benchmark: a fresh file (see "replacing an existing file" below)
        return staged(lambda: ckptfmt.save(path, state, durable=False, checksum=checksum),
                      "rest (atomic commit: temp scan, open, close, rename; API glue)")

    def staged_load(mmap, verify):
        return staged(lambda: ckptfmt.load(path, mmap=mmap, verify=verify), "rest (os.open, mmap, API glue)")

    def show(title, runs):
        keys = list(dict.fromkeys(k for r in runs for k in r))
        tot = [sum(r.values()) for r in runs]
        print(f"#### {title} — stage medians over {len(runs)} runs (total median {med(tot):.4f} s)\n")
        print("| stage | median s | share |")
        print("|---|---|---|")
        for k in keys:
            m = med([r.get(k, 0.0) for r in runs])
            print(f"| {k} | {m:.4f} | {100 * m / med(tot):.0f}% |")
        print()

    ckptfmt.save(path, state, durable=False)  # warm-up
    show("save (checksum=True)", [staged_save(True) for _ in range(reps)])
    show("save (checksum=False, to price the hashing)", [staged_save(False) for _ in range(reps)])
    t, t_over = [0.0] * reps, [0.0] * reps
    for i in range(reps):
        _unlink(path)
        t0 = time.perf_counter()
        ckptfmt.save(path, state, durable=False)
        t[i] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ckptfmt.save(path, state, durable=False)  # over the file just written
        t_over[i] = time.perf_counter() - t0
    print(f"plain ckptfmt.save(durable=False) in-process, fresh path: median {med(t):.4f} s "
          f"({nb / med(t) / 1e9:.2f} GB/s); replacing an existing file of the same size: median {med(t_over):.4f} s "
          "(the rename over it frees the old file and, on ext4 with auto_da_alloc, starts writeback of the new "
          "one; the benchmark deletes targets before the clock for every peer)\n")
    for mmap, verify in ((True, False), (True, True), (False, True), (False, False)):
        show(f"load(mmap={mmap}, verify={verify})", [staged_load(mmap, verify) for _ in range(reps)])

    for owner, name, fn in originals:  # cProfile sees ckptfmt's own functions, unwrapped
        setattr(owner, name, fn)

    def prof(title, fn, n=25):
        p = cProfile.Profile()
        p.enable()
        fn()
        p.disable()
        s = io.StringIO()
        ps = pstats.Stats(p, stream=s).strip_dirs().sort_stats("tottime")
        ps.print_stats(n)
        print(f"#### cProfile: {title} (sorted by tottime; main thread only)\n\n```")
        lines = s.getvalue().splitlines()
        start = next((i for i, ln in enumerate(lines) if "ncalls" in ln), 0)
        hdr = [ln for ln in lines[:start] if "function calls" in ln]
        print("\n".join(hdr + lines[start:start + n + 1]))
        print("```\n")

    _unlink(path)
    prof("ckptfmt.save(durable=False), fresh path", lambda: ckptfmt.save(path, state, durable=False))
    prof("ckptfmt.load(mmap=True, verify=True) + touch",
         lambda: [pb.touch(v) for v in ckptfmt.load(path, mmap=True, verify=True).values()])
    prof("ckptfmt.load(mmap=False) + touch",
         lambda: [pb.touch(v) for v in ckptfmt.load(path, mmap=False).values()])
    prof("ckptfmt.open(path)", lambda: ckptfmt.open(path).close())
    key = next(iter(state))

    def open_get():
        with ckptfmt.open(path) as c:
            pb.touch(c.get(key))

    prof(f"ckptfmt.open(path).get({key!r}) + touch", open_get)
    # the same in a fresh process, staged, as the benchmark's "one" row sees it
    code = (f"import sys, time; sys.path.insert(0, {TOOLS!r}); import peerbench as pb; import ckptfmt\n"
            f"t0 = time.perf_counter(); c = ckptfmt.open({path!r}); t1 = time.perf_counter()\n"
            f"a = c.get({key!r}); t2 = time.perf_counter(); pb.touch(a); t3 = time.perf_counter()\n"
            f"b = c.get({key!r}); t4 = time.perf_counter()\n"
            "print(f'| {1e3*(t1-t0):.2f} | {1e3*(t2-t1):.2f} | {1e3*(t3-t2):.2f} | {1e3*(t4-t3):.2f} |')")
    print(f"#### open + get({key!r}) in fresh processes (ms)\n")
    print("| open | first get | touch | second get |")
    print("|---|---|---|---|")
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr.strip().splitlines()[-1])
    print()
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="gpt2", choices=["gpt2", "small"])
    ap.add_argument("--scale", type=float, default=1.0, help="gpt2 only: shrink every dimension's rows")
    ap.add_argument("--runs", type=int, default=5, help="timed repetitions (each interleaves all peers)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    ap.add_argument("--peers", default="torch,safetensors,numpy,h5py",
                    help="peers besides ckptfmt and the raw limit (comma-separated)")
    ap.add_argument("--many", action="store_true", help="run the many-tiny-tensors case instead")
    ap.add_argument("--many-count", type=int, default=1_000_000)
    ap.add_argument("--many-kind", choices=["arrays", "views"], default="arrays",
                    help="--many: independent arrays (default) or slices of one buffer (stored as views)")
    ap.add_argument("--many-ops", default="many-open,many-open-get,many-load",
                    help="--many: which timed operations (comma-separated)")
    ap.add_argument("--profile", action="store_true", help="stage timings + cProfile of ckptfmt save/load")
    ap.add_argument("--dir", default="/tmp/ckptfmt-bench", help="where the files go (default /tmp/ckptfmt-bench)")
    ap.add_argument("--keep", action="store_true", help="keep the files written")
    ap.add_argument("--no-sync", action="store_true", help="skip os.sync() before each measurement")
    ap.add_argument("--no-limits", action="store_true", help="skip peerbench.limits()")
    ap.add_argument("--no-prewarm", action="store_true",
                    help="do not touch+free the output size of memory before each save/load (see _prewarm)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per child process")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                    help="before each measurement wait up to S seconds for the rest of the machine to go quiet")
    ap.add_argument("--quiet-cores", type=float, default=0.5,
                    help="'quiet': fewer than this many cores busy outside the benchmark (default 0.5)")
    ap.add_argument("--budget", type=float, default=0, help="stop after the rep that passes this many seconds")
    ap.add_argument("--json", metavar="PATH", help="also write every figure and record as JSON")
    ap.add_argument("--phases", default="save,durable,load,one",
                    help="which phases to run (loads read the files the save phases wrote, or left with --keep)")
    ap.add_argument("--overwrite", action="store_true",
                    help="save over the previous measurement's file instead of deleting it first (what replacing "
                         "a checkpoint costs: freeing the old file, ext4 auto_da_alloc writeback)")
    ap.add_argument("--no-pin", action="store_true",
                    help="import ckptfmt from the live tree instead of a snapshot taken at the start")
    ap.add_argument("--src-snapshot", metavar="DIR",
                    help="import ckptfmt from this earlier snapshot (DIR/ckptfmt), e.g. to measure several cases "
                         "on one version")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    if args.profile_child:
        args.peers = []
        return run_profile(args)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    args.many_ops = [p.strip() for p in args.many_ops.split(",") if p.strip()]
    QUIET.update(wait=args.quiet_wait, cores=args.quiet_cores)
    _peerbench()  # fail early, with the path, if it is missing
    os.makedirs(args.dir, exist_ok=True)
    if args.src_snapshot:
        snap = os.path.abspath(args.src_snapshot)
        if not os.path.isfile(os.path.join(snap, "ckptfmt", "__init__.py")):
            raise SystemExit(f"--src-snapshot {snap}: no ckptfmt/__init__.py there")
        PIN.update(hash=src_hash(snap, snapshot=True), dir=snap)
        log(f"measuring ckptfmt sources {PIN['hash']} (given snapshot {snap})")
    elif not args.no_pin:
        pin_source(args.dir)
        log(f"measuring ckptfmt sources {PIN['hash']} (snapshot in {PIN['dir']})")
    if args.profile:
        # in a child, so that it imports the pinned snapshot too
        argv = [a for a in sys.argv[1:] if a != "--profile"]
        raise SystemExit(subprocess.run([sys.executable, HERE, "--profile-child", *argv], env=child_env()).returncode)
    res = run_many(args) if args.many else run_case(args)
    res["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    m = res["machine"]
    m["live_src_sha256_end"] = src_hash(REPO)
    dirty = " (ckptfmt/ dirty)" if m.get("ckptfmt_dirty") else ""
    changed = (f" (live tree changed during the run: {m['live_src_sha256_end']})"
               if m["live_src_sha256_end"] != m["live_src_sha256"] else "")
    print(f"machine: {m.get('nproc')} CPUs ({m.get('cpu')}), {m.get('mem_gib')} GiB RAM, kernel {m.get('kernel')}, "
          f"python {m.get('python')}; ckptfmt @ git {m.get('git_head')}{dirty}"
          f", measured sources {m.get('pinned_src_sha256', 'live tree ' + m['live_src_sha256'])}{changed};"
          f" load avg {' '.join(m.get('loadavg_start', []))} → {' '.join(m.get('loadavg_end', []))}")
    print()
    (print_many if args.many else print_tables)(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
