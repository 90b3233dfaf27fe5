"""Peak memory and time of converting the issue-9 bombs, each in a fresh child process.

    python fuzz/measure_bombs.py [--code DIR] [--timeout S]

``--code`` runs the conversion with the ckptfmt package found in DIR (e.g. an older checkout), to
compare before and after. Prints one JSON line per bomb: the input's size, the outcome (the error's
class or "ok"), the child's wall time and its peak resident memory (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

CHILD = """
import sys, time, ckptfmt.convert
t = time.perf_counter()
try:
    ckptfmt.convert.convert(sys.argv[1], sys.argv[2])
    print("ok", ckptfmt.__file__)
except Exception as e:
    print(type(e).__name__, ckptfmt.__file__)
print(time.perf_counter() - t)
"""


def npz_bomb(path: str) -> None:
    """2 MB of deflated zeros: a 2 GiB member that is not NPY data."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("payload.npy", "w", force_zip64=True) as m:
        block = bytes(16 << 20)
        for _ in range(128):
            m.write(block)


def hdf5_bomb(path: str, depth: int = 18) -> None:
    """Group k hard-links group k+1 twice: 2^depth paths over depth+1 groups."""
    import h5py
    import numpy as np

    with h5py.File(path, "w") as f:
        groups = [f.create_group(f"g{k}") for k in range(depth + 1)]
        groups[-1]["leaf"] = np.arange(4, dtype=np.int32)
        for k in range(depth):
            groups[k]["a"] = groups[k + 1]
            groups[k]["b"] = groups[k + 1]


def measure(src: str, code: str | None, timeout: float) -> dict[str, object]:
    """Convert ``src`` in a child; its own rusage (``wait4``), killed after ``timeout`` seconds."""
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = code
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, src, src + ".ckpt"], stdout=out,
                                stderr=subprocess.DEVNULL, env=env, cwd=os.path.dirname(src))
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().strip()
    wall = time.perf_counter() - t
    lines = text.splitlines()
    if len(lines) >= 2:
        outcome, package = lines[-2].split(" ", 1)
        convert_s: float | None = round(float(lines[-1]), 2)
    else:
        outcome = f"killed after {timeout:.0f} s" if proc.returncode < 0 else f"exit {proc.returncode}"
        package, convert_s = "", None
    return {"input_bytes": os.path.getsize(src), "outcome": outcome, "convert_seconds": convert_s,
            "process_seconds": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "package": package}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", help="directory whose ckptfmt package to run")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--only", choices=("npz", "hdf5"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        for name, make in (("npz", npz_bomb), ("hdf5", hdf5_bomb)):
            if args.only and name != args.only:
                continue
            src = os.path.join(d, f"bomb.{name}" if name == "npz" else "bomb.h5")
            make(src)
            print(json.dumps({"bomb": name, "code": args.code or "this checkout",
                              **measure(src, args.code, args.timeout)}), flush=True)


if __name__ == "__main__":
    main()
