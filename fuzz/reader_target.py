"""Fuzz target for the ``.ckpt`` reader: every input ends as the saved data or a ``CheckpointError``.

Run under atheris (coverage-guided; ``pip install 'ckptfmt[fuzz]'``)::

    python fuzz/reader_target.py -atheris_runs=100000 [corpus_dir]

or, without atheris, with the built-in structure-aware mutation driver::

    python fuzz/reader_target.py --plain --seconds 300 [--seed 1]

Seeds are valid files written by ``ckptfmt.save`` (dicts, lists, tuples, views, every dtype kind,
scalars, user metadata). The driver mutates them (bit flips, byte runs, truncation, splices, edits
of header, footer and metadata fields) and, half the time, recomputes every checksum so that the
mutation reaches validation instead of stopping at a checksum. Outcomes:

- ``refused``: a :class:`ckptfmt.CheckpointError` (the right answer for a damaged file);
- ``same``: loaded, and equal to the seed (a mutation of padding, say);
- ``changed``: loaded with checksums recomputed, and different (a valid file that says other things);
- a **finding**: any other exception, or different data from a mutation whose checksums were *not*
  recomputed (silent corruption). Findings are written to ``fuzz/findings/`` and raise under atheris.

Each input is also bounded in time by the caller (atheris ``-timeout``; the driver reports the
slowest input) and in memory (``RLIMIT_AS`` set by ``--memory-mb``, default 2048).
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import tempfile
import time
from typing import Any

import numpy as np

try:
    import atheris
except ImportError:  # the built-in driver runs without it
    atheris = None

if atheris is not None and __name__ == "__main__" and "--plain" not in sys.argv:
    with atheris.instrument_imports(include=["ckptfmt"]):  # coverage of the reader's code guides atheris
        import ckptfmt
        from ckptfmt._checksum import checksum
        from ckptfmt._reader import walk_leaves
else:
    import ckptfmt
    from ckptfmt._checksum import checksum
    from ckptfmt._reader import walk_leaves

HERE = os.path.dirname(os.path.abspath(__file__))
_SCRATCH = os.path.join(tempfile.gettempdir(), f"ckptfmt-fuzz-{os.getpid()}.ckpt")


def seed_objects() -> list[tuple[dict[str, Any], Any, int]]:
    """(object, user metadata, alignment) of every seed file."""
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    return [
        ({"w": base, "step": 7, "t": (1.5, "x", None, b"\x00\x01")}, {"run": "a", "n": [1, 2]}, 64),
        ({"layers": [{"k": np.ones((2, 3), np.float16), "b": np.zeros(3, np.int8)} for _ in range(3)],
          "s": np.float64(2.5), 3: True}, {}, 128),
        ({"x": base, "tied": base, "slice": base[1:3], "rev": base[::-1], "tr": base.T}, {}, 64),
        ({"b": np.array([True, False, True]), "c": np.array([1 + 2j], np.complex64), "e": np.zeros((0, 5)),
          "u": np.arange(5, dtype=np.uint64), "z": np.int32(3)}, {"deep": {"a": {"b": [None, 1.0]}}}, 4096),
        ({"nested": ((([np.arange(3)],),),), "keys": {"a/b": 1, "~": 2, -5: 3}}, {}, 64),
    ]


def seeds() -> list[bytes]:
    """The seed files' bytes."""
    out = []
    for obj, user, alignment in seed_objects():
        ckptfmt.save(_SCRATCH, obj, metadata=user, alignment=alignment, durable=False)
        with open(_SCRATCH, "rb") as f:
            out.append(f.read())
    return out


# ---------------------------------------------------------------- running one input


def _flat(tree: Any) -> list[tuple[str, Any]]:
    return list(walk_leaves(tree))


def _equal(a: Any, b: Any) -> bool:
    fa, fb = _flat(a), _flat(b)
    if [k for k, _ in fa] != [k for k, _ in fb]:
        return False
    for (_, x), (_, y) in zip(fa, fb, strict=True):
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == y.dtype
                    and x.shape == y.shape and x.tobytes() == y.tobytes()):
                return False
        elif type(x) is not type(y) or (x != y and not (x != x and y != y)):
            return False
    return True


def run_one(data: bytes) -> tuple[str, Any]:
    """Feed ``data`` to every reader entry point; return ("refused", error) or ("loaded", the object)."""
    with open(_SCRATCH, "wb") as f:
        f.write(data)
    try:
        with ckptfmt.open(_SCRATCH) as ckpt:
            ckpt.keys()
            ckpt.tree()
            got = ckpt.load()
            ckpt.load(mmap=False)
            for key in ckpt.tensor_keys()[:8]:
                ckpt.get(key)
            report = ckpt.verify()
        ckptfmt.inspect(_SCRATCH, max_leaves=20)
    except ckptfmt.CheckpointError as e:
        return "refused", e
    return ("loaded" if report.ok else "loaded-unverified"), got


# ---------------------------------------------------------------- mutations


def fix_checksums(data: bytes) -> bytes:
    """Recompute the header, metadata and footer checksums where the fields they cover can be found."""
    b = bytearray(data)
    if len(b) >= 64:
        b[56:64] = struct.pack("<Q", checksum(bytes(b[:56])))
    if len(b) >= 128:
        m, length = struct.unpack_from("<QQ", b, len(b) - 64)
        if m + length <= len(b) - 64:
            struct.pack_into("<Q", b, len(b) - 48, checksum(bytes(b[m : m + length])))
        b[-8:] = struct.pack("<Q", checksum(bytes(b[-64:-8])))
    return bytes(b)


def _metadata_span(data: bytes) -> tuple[int, int]:
    m, length = struct.unpack_from("<QQ", data, len(data) - 64)
    return m, min(m + length, len(data) - 64)


_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x90, 0xC0, 0xC1, 0xD6, 0xDC, 0xDD, 0xDE, 0xDF, 0xC7, 0xC9]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One structure-aware mutation of a seed (see the module docstring)."""
    b = bytearray(data)
    m, end = _metadata_span(data) if len(data) >= 128 else (0, len(data))
    kind = rng.randrange(9)
    if kind == 0 and b:  # a bit anywhere
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif kind == 1 and end > m:  # a byte of the metadata: a msgpack type byte, length or value
        b[rng.randrange(m, end)] = rng.choice(_INTERESTING) if rng.random() < 0.5 else rng.randrange(256)
    elif kind == 2 and end - m > 8:  # a u64 inside a table column: an offset, size, dimension or stride
        i = rng.randrange(m, end - 8)
        value = rng.choice([0, 1, 2**31, 2**32 - 1, 2**40, 2**56, 2**62, 2**63, 2**64 - 1, rng.randrange(2**64)])
        b[i : i + 8] = struct.pack("<Q", value)
    elif kind == 3:  # a header field
        off, fmt = rng.choice([(8, "<H"), (10, "<H"), (16, "<I"), (20, "<I"), (24, "<I")])
        value = rng.choice([0, 1, 2, 63, 64, 65, 1 << 20, 1 << 30, 1 << 31, 0xFFFF])
        if off + struct.calcsize(fmt) <= len(b):
            struct.pack_into(fmt, b, off, value & (0xFFFF if fmt == "<H" else 0xFFFFFFFF))
    elif kind == 4 and len(b) >= 64:  # a footer field
        struct.pack_into("<Q", b, len(b) - 64 + rng.choice([0, 8]),
                         rng.choice([0, 64, m, end - m + 1, 2**40, 2**63, rng.randrange(len(b))]) % 2**64)
    elif kind == 5:  # truncate
        del b[rng.randrange(len(b) + 1):]
    elif kind == 6 and end > m:  # delete or duplicate a run inside the metadata
        i = rng.randrange(m, end)
        j = min(end, i + rng.randrange(1, 16))
        b[i:j] = b"" if rng.random() < 0.5 else bytes(b[i:j]) * 2
    elif kind == 7 and end > m:  # insert bytes inside the metadata
        i = rng.randrange(m, end)
        b[i:i] = bytes(rng.choice(_INTERESTING) for _ in range(rng.randrange(1, 6)))
    else:  # a run of random bytes anywhere
        if b:
            i = rng.randrange(len(b))
            b[i : i + 4] = bytes(rng.randrange(256) for _ in range(4))
    if kind in (6, 7) and len(b) - 64 - m >= 0:  # keep the footer pointing at the metadata it now delimits
        struct.pack_into("<Q", b, len(b) - 56, len(b) - 64 - m)
    return bytes(b)


# ---------------------------------------------------------------- drivers


def check(data: bytes, original: Any | None, fixed: bool) -> str:
    """Classify one input; raise on a finding."""
    outcome, value = run_one(data)
    if outcome == "refused":
        return "refused"
    if original is not None and _equal(value, original):
        return "same"
    if original is not None and not fixed:
        raise AssertionError("silent corruption: an unrepaired mutation loaded as different data")
    return "changed"


def plain_driver(seconds: float, seed: int, findings: str) -> dict[str, Any]:
    """Random structure-aware mutation for ``seconds``; returns counts, findings and the slowest input."""
    rng = random.Random(seed)
    corpus = seeds()
    originals = []
    for data in corpus:
        outcome, value = run_one(data)
        assert outcome == "loaded", outcome
        originals.append(value)
    counts: dict[str, int] = {}
    found = 0
    slowest = (0.0, "")
    stop = time.monotonic() + seconds
    n = 0
    while time.monotonic() < stop:
        k = rng.randrange(len(corpus))
        data = corpus[k]
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            data = mutate(data, rng)
        fixed = rng.random() < 0.5
        if fixed:
            data = fix_checksums(data)
        t = time.perf_counter()
        try:
            outcome = check(data, originals[k], fixed)
        except Exception as e:
            outcome = f"finding {type(e).__name__}"
            found += 1
            os.makedirs(findings, exist_ok=True)
            with open(os.path.join(findings, f"finding-{seed}-{n}.ckpt"), "wb") as f:
                f.write(data)
            print(f"finding {n}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        dt = time.perf_counter() - t
        if dt > slowest[0]:
            slowest = (dt, outcome)
        counts[outcome] = counts.get(outcome, 0) + 1
        n += 1
    return {"inputs": n, "outcomes": counts, "findings": found, "slowest_s": round(slowest[0], 4)}


def atheris_main(argv: list[str]) -> None:
    """Coverage-guided fuzzing: atheris mutates whole files, starting from the seeds when no corpus is given."""
    def one_input(data: bytes) -> None:
        run_one(data)  # anything but a CheckpointError propagates: atheris records it as a crash

    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if not corpus:
        directory = tempfile.mkdtemp(prefix="ckptfmt-fuzz-corpus-")
        for i, data in enumerate(seeds()):
            with open(os.path.join(directory, f"seed{i}.ckpt"), "wb") as f:
                f.write(data)
        argv = [*argv, directory]
    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        """Half libFuzzer's byte mutations, half ours; half the time checksums recomputed to reach validation."""
        rng = random.Random(seed)
        out = mutate(data, rng) if data and rng.random() < 0.5 else atheris.Mutate(data, max_size)
        return (fix_checksums(out) if rng.random() < 0.5 else out)[:max_size]

    atheris.Setup(argv, one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plain", action="store_true", help="the built-in mutation driver, not atheris")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-mb", type=int, default=2048)
    parser.add_argument("--findings", default=os.path.join(HERE, "findings"))
    args, rest = parser.parse_known_args(argv[1:])
    try:
        import resource

        limit = args.memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    try:
        if args.plain:
            print(plain_driver(args.seconds, args.seed, args.findings))
            return
        if atheris is None:
            print("atheris is not installed: running the built-in driver (pip install 'ckptfmt[fuzz]')",
                  file=sys.stderr)
            print(plain_driver(args.seconds, args.seed, args.findings))
            return
        atheris_main([argv[0], *rest])
    finally:
        if os.path.exists(_SCRATCH):
            os.unlink(_SCRATCH)


if __name__ == "__main__":
    main(sys.argv)
