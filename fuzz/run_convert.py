"""Long-run fuzzing of one converter: ``python fuzz/run_convert.py TARGET [--seconds N] [--engine atheris|random]``.

TARGET is one of safetensors, npz, hdf5, dcp. The random engine (the default, and the fallback where
atheris is not installed) mutates a corpus that starts from seeds written by the real libraries,
in a child process with an address-space limit (``--memory-mb``) and a per-input alarm
(``--timeout``); it restarts the child when the HDF5 C library or anything else kills it, keeping the
input as a finding. Findings (inputs whose outcome is neither identical data nor a CheckpointError)
are written to ``fuzz/findings/TARGET-*.bin`` with a ``.txt`` beside each. The atheris engine runs
the same target and mutator under libFuzzer (``-max_total_time``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
TARGETS = ("safetensors", "npz", "hdf5", "dcp")
ct: Any = None  # convert_targets, imported by main() (under atheris' instrumentation there)


def _load_targets(instrument: bool = False) -> None:
    global ct
    if instrument:
        import atheris

        with atheris.instrument_imports(include=["ckptfmt"]):
            import ckptfmt.convert._dcp
            import ckptfmt.convert._hdf5
            import ckptfmt.convert._numpy
            import ckptfmt.convert._safetensors  # noqa: F401
    import convert_targets

    ct = convert_targets


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Hang()


def child(target: str, seconds: float, seed: int, timeout: int, memory_mb: int, state: str) -> None:
    """Fuzz until ``seconds`` pass; keep counts in ``state``; write each input to ``state + '.cur'`` first."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    signal.signal(signal.SIGALRM, _alarm)
    rng = random.Random(seed)
    corpus = [ct.SEEDS[target]()]
    if target == "npz":
        corpus.append(ct.seed_npz(compressed=False))
    seen = set()
    counts: collections.Counter[str] = collections.Counter()
    findings = 0
    end = time.monotonic() + seconds
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as work:
        while time.monotonic() < end:
            data = rng.choice(corpus)
            for _ in range(rng.randrange(1, 4)):
                data = ct.mutate(target, data, rng)
            with open(state + ".cur", "wb") as f:
                f.write(data)
            signal.alarm(timeout)
            try:
                outcome = ct.run_one(target, data, work)
            except (ct.Finding, MemoryError, _Hang) as e:
                outcome = "FINDING"
                findings += 1
                _save(target, data, f"{type(e).__name__}: {e}")
            finally:
                signal.alarm(0)
            counts[outcome] += 1
            if outcome not in seen or (outcome == "ok" and len(corpus) < 64 and rng.random() < 0.2):
                seen.add(outcome)
                corpus.append(data)
            if sum(counts.values()) % 50 == 0:
                _write_state(state, counts, findings)
    _write_state(state, counts, findings)


def _write_state(state: str, counts: collections.Counter[str], findings: int) -> None:
    with open(state, "w") as f:
        json.dump({"counts": dict(counts), "findings": findings}, f)


def _save(target: str, data: bytes, why: str) -> None:
    out = os.path.join(HERE, "findings")
    os.makedirs(out, exist_ok=True)
    n = len([x for x in os.listdir(out) if x.startswith(target)]) // 2
    base = os.path.join(out, f"{target}-{n:04d}")
    with open(base + ".bin", "wb") as f:
        f.write(data)
    with open(base + ".txt", "w") as f:
        f.write(why + "\n")


def supervise(args: argparse.Namespace) -> int:
    """Run children until the time is spent; a child killed by a signal leaves its input as a finding."""
    end = time.monotonic() + args.seconds
    totals: collections.Counter[str] = collections.Counter()
    findings = crashes = 0
    seed = args.seed
    with tempfile.TemporaryDirectory() as d:
        state = os.path.join(d, "state.json")
        while (left := end - time.monotonic()) > 1:
            cmd = [sys.executable, os.path.abspath(__file__), args.target, "--child", "--seconds", str(left),
                   "--seed", str(seed), "--timeout", str(args.timeout), "--memory-mb", str(args.memory_mb),
                   "--state", state]
            rc = subprocess.call(cmd)
            if os.path.exists(state):
                with open(state) as f:
                    got = json.load(f)
                totals.update(got["counts"])
                findings += got["findings"]
                os.unlink(state)
            if rc != 0:
                crashes += 1
                cur = state + ".cur"
                if os.path.exists(cur):
                    with open(cur, "rb") as f:
                        _save(args.target, f.read(), f"the child died with status {rc}")
            seed += 1
    runs = sum(totals.values())
    print(json.dumps({"target": args.target, "engine": "random", "inputs": runs, "outcomes": dict(totals),
                      "findings": findings, "crashed_children": crashes}, sort_keys=True))
    return 1 if findings or crashes else 0


def run_atheris(args: argparse.Namespace) -> int:
    import atheris

    seed_data = ct.SEEDS[args.target]()
    work = tempfile.mkdtemp(prefix=f"fuzz-{args.target}-")

    def one(data: bytes) -> None:
        ct.run_one(args.target, data or seed_data, work)

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        return ct.mutate(args.target, data or seed_data, rng)[:max_size]

    atheris.Setup([sys.argv[0], f"-max_total_time={int(args.seconds)}", "-max_len=1000000",
                   f"-rss_limit_mb={args.memory_mb}", f"-timeout={args.timeout}"], one, custom_mutator=mutator)
    atheris.Fuzz()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", choices=TARGETS)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--engine", choices=("random", "atheris"), default="random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=20, help="seconds one input may take (a hang is a finding)")
    p.add_argument("--memory-mb", type=int, default=6144, help="address-space limit of the fuzzed process")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine == "atheris" and not args.child:
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris is not installed; using the random engine", file=sys.stderr)
        else:
            _load_targets(instrument=True)
            return run_atheris(args)
    _load_targets()
    if args.child:
        child(args.target, args.seconds, args.seed, args.timeout, args.memory_mb, args.state)
        return 0
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
