"""Peak memory of opening hostile metadata (issue 9, issue 11 §1): each case runs in a fresh process.

Usage: ``python benchmarks/bench_reader_memory.py [case ...]``; prints peak RSS growth over the
baseline of a process that imported ckptfmt, and how the open ended (``TRACED=1`` adds
tracemalloc's peak, which sees allocations below that baseline, at some cost in time). Cases: ``nested`` (32 MiB of
metadata under 64 nested tuples), ``empty_arrays`` (10 MB of empty msgpack arrays), ``nones``
(``ckptfmt inspect`` of 10**7 None leaves).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import msgpack

_CHILD = r"""
import resource, sys, time, io, contextlib, tracemalloc
import ckptfmt
from ckptfmt import _cli
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[3] == "traced":
    tracemalloc.start()
t = time.perf_counter()
try:
    if sys.argv[2] == "inspect":
        with contextlib.redirect_stdout(io.StringIO()) as out:
            _cli.main(["inspect", sys.argv[1]])
        outcome = f"ok, {len(out.getvalue())} chars printed"
    else:
        ckptfmt.open(sys.argv[1]).close()
        outcome = "opened"
except Exception as e:
    outcome = f"{type(e).__name__}: {str(e)[-90:]}"
elapsed = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
traced = f", {tracemalloc.get_traced_memory()[1] / 2**20:.0f} MiB traced peak" if tracemalloc.is_tracing() else ""
print(f"{peak / 1024:.0f} MiB RSS peak growth (over {base / 1024:.0f} MiB){traced}, {elapsed:.2f} s, {outcome}")
"""


def _file(path: str, tree_bytes: bytes) -> None:
    """A file with no tensors whose tree is ``tree_bytes`` (raw msgpack), checksums right."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "conformance"))
    from make_corrupt import build_file

    with open(path, "wb") as f:
        f.write(build_file(tree_raw=tree_bytes))


def nested(path: str) -> None:
    node = msgpack.packb(b"x" * (32 << 20), use_bin_type=True)
    for _ in range(63):
        node = msgpack.packb(msgpack.ExtType(2, b"\x91" + node))
    _file(path, node)


def empty_arrays(path: str) -> None:
    n = 10_000_000
    _file(path, b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n)


def nones(path: str) -> None:
    n = 10_000_000
    _file(path, b"\xdd" + n.to_bytes(4, "big") + b"\xc0" * n)


CASES = {"nested": (nested, "open"), "empty_arrays": (empty_arrays, "open"), "nones": (nones, "inspect")}


def main(argv: list[str]) -> None:
    for name in argv or list(CASES):
        make, how = CASES[name]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, f"{name}.ckpt")
            make(path)
            start = time.perf_counter()
            traced = "traced" if os.environ.get("TRACED") else "rss"
            out = subprocess.run([sys.executable, "-c", _CHILD, path, how, traced], capture_output=True, text=True,
                                 timeout=600)
            print(f"{name:13} {os.path.getsize(path) / 2**20:6.1f} MiB file: {(out.stdout or out.stderr).strip()}"
                  f" (wall {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
