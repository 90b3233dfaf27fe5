"""Make the golden files of ``conformance/golden/`` and their entries in ``conformance/manifest.json``.

    python conformance/generate.py            # write missing files; never touches existing ones
    python conformance/generate.py --check    # rewrite every case to a temporary folder, compare bytes

Golden files are frozen: once committed they are never regenerated (a file of format 1.0 must stay
readable, byte for byte, forever). Each case is written by the real writer (``ckptfmt.save``) with
the producer and the creation time pinned (``CKPTFMT_PRODUCER``, ``SOURCE_DATE_EPOCH``), so ``--check``
(and ``tests/test_conformance.py``) proves the writer still makes exactly these bytes. Expected
outcomes are computed from the saved objects, never by reading the files back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import ckptfmt  # noqa: E402
from conformance.describe import numpy_describe, value  # noqa: E402

#: what every golden file is pinned to (see spec/CONFORMANCE.md §3)
PRODUCER = {"name": "ckptfmt", "version": "conformance"}
EPOCH = "1700000000"  # 2023-11-14T22:13:20Z
#: the zstd library that made the golden 1.1 frames (zstandard 0.25.0); other zstd releases may
#: compress to other (equally valid) bytes, so byte-for-byte checks of compressed cases need this one
ZSTD_VERSION = (1, 5, 7)


@dataclass
class Case:
    """One golden file: its name, version folder, what it exercises, and how to make it."""

    name: str
    version: str
    what: str
    make: Callable[[], Any]
    options: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] | None = None

    @property
    def path(self) -> str:
        """Path relative to ``conformance/``."""
        return f"golden/{self.version}/{self.name}.ckpt"


def _ml() -> Any:
    import ml_dtypes

    return ml_dtypes


def every_dtype() -> dict[str, Any]:
    ml = _ml()
    base = np.array([0, 1, -2, 3.5, 127, -128, 0.25, 100], np.float64)
    out: dict[str, Any] = {"bool": np.array([True, False, True])}
    for name in ("int8", "int16", "int32", "int64"):
        out[name] = np.array([0, 1, -1, np.iinfo(name).min, np.iinfo(name).max], name)
    for name in ("uint8", "uint16", "uint32", "uint64"):
        out[name] = np.array([0, 1, np.iinfo(name).max], name)
    for name in ("float16", "float32", "float64"):
        out[name] = np.array([0.0, -0.0, 1.5, np.inf, -np.inf, np.nan, np.finfo(name).tiny], name)
    out["bfloat16"] = base.astype(ml.bfloat16)
    out["float8_e4m3fn"] = np.array([0, 1, -2, 0.5, 448], np.float32).astype(ml.float8_e4m3fn)
    out["float8_e5m2"] = np.array([0, 1, -2, 0.5, 57344], np.float32).astype(ml.float8_e5m2)
    out["complex64"] = np.array([1 + 2j, -0.5j, np.nan], np.complex64)
    out["complex128"] = np.array([1 + 2j, 3e300 - 1j], np.complex128)
    out["matrix"] = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    out["big_endian"] = np.arange(5, dtype=">i4")  # stored little-endian
    return out


def empty_and_scalar() -> dict[str, Any]:
    return {"empty": np.zeros(0, np.float32), "empty_2d": np.zeros((3, 0), np.int64), "empty_3d": np.zeros((0, 2, 5)),
            "zero_d": np.array(2.5, np.float64), "np_scalar": np.float32(1.25), "int_scalar": np.int64(-7),
            "bool_scalar": np.bool_(True)}


def nesting() -> Any:
    deep: Any = np.arange(3, dtype=np.int16)
    for i in range(12):
        deep = ({"level": i, "child": deep}, [deep, i], (deep,))[i % 3]
    return {"deep": deep, "list": [1, [2, [3, []]], {}], "tuple": (1, (2.0, ("x",)), ()),
            "mixed": [{"a": (np.ones(2, np.uint8), None)}], "empty_dict": {}, "empty_list": [], "empty_tuple": ()}


def keys() -> dict[Any, Any]:
    return {"ключ": 1, "鍵": np.arange(2, dtype=np.int8), "emoji 🎉": "party", "a/b": 2, "c~d": 3, "~1": 4,
            "": {"": 5}, 7: "seven", -3: "minus three", 2**63 - 1: "max", "7x": "not an int", "with space": 0,
            "nested/~": {"x/y~z": np.float32(3)}}


def values() -> dict[str, Any]:
    return {"none": None, "true": True, "false": False, "zero": 0, "neg": -1, "i64_min": -(2**63),
            "u64_max": 2**64 - 1, "big": 2**63, "float": 0.1, "neg_zero": -0.0, "inf": float("inf"),
            "ninf": float("-inf"), "nan": float("nan"), "str": "hello", "empty_str": "", "bytes": b"\x00\xff",
            "empty_bytes": b"", "list": [1, "a", None], "tuple": (True, 2.5)}


def views() -> dict[str, Any]:
    w = np.arange(48, dtype=np.float32).reshape(6, 8)
    return {"w": w, "tied": w, "slice": w[1:4, 2:6], "transpose": w.T, "reversed": w[::-1],
            "step": w[:, ::-3], "row": w[2], "other": np.arange(5, dtype=np.int64)}


def weights(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.02).astype(np.float32)


def compressible() -> dict[str, Any]:
    w = weights(3000)
    return {"w": w.reshape(30, 100), "bf16": w.astype(_ml().bfloat16), "f16": w[:1000].astype(np.float16),
            "int8": (np.arange(2000) % 7).astype(np.int8), "zeros": np.zeros(1024, np.float64),
            "small": np.arange(10, dtype=np.float32), "scalar": np.float32(3), "empty": np.zeros((0, 4), np.float32),
            "view": [w[:50], w[::-2]], "step": 3}


def incompressible() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    return {"random": rng.integers(0, 256, 8192, dtype=np.uint8).view(np.float32), "w": weights(512)}


def many_small() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    out: dict[str, Any] = {f"p{i}": rng.standard_normal(int(n)).astype(np.float32)
                           for i, n in enumerate(rng.integers(1, 300, 40))}
    out["step"] = np.int64(100)
    out["large"] = weights(1500)  # 6000 bytes: at or above 4096, keeps the full alignment
    out["after"] = np.arange(3, dtype=np.int16)
    return out


CASES = [
    Case("dtypes", "1.0", "every dtype of §6, extreme values, big-endian input", every_dtype, {"alignment": 64}),
    Case("empty_and_scalar", "1.0", "empty tensors, 0-d tensors, array scalars (ext 3)", empty_and_scalar,
         {"alignment": 64}),
    Case("nesting", "1.0", "nested dict/list/tuple, empty containers, tuples (ext 2)", nesting, {"alignment": 64}),
    Case("keys", "1.0", "unicode keys, '/' and '~' escapes, int keys, the empty key", keys, {"alignment": 64}),
    Case("values", "1.0", "plain values of every kind (ext 4 ints, nan, -0.0, bytes)", values, {"alignment": 64}),
    Case("user_metadata", "1.0", "user metadata of every plain kind", lambda: {"x": np.ones(3, np.float32)},
         {"alignment": 64}, {"run": "golden", "epoch": 3, "lr": 1e-4, "tags": ["a", "b"], "nested": {"k": None},
                             "raw": b"\x01\x02", "flag": False}),
    Case("views", "1.0", "tied, slice, transpose, negative-stride views (§4.7)", views, {"alignment": 64}),
    Case("no_checksum", "1.0", "a file written without checksums", lambda: {"a": np.arange(4, dtype=np.int32)},
         {"alignment": 64, "checksum": False}),
    Case("align_default", "1.0", "the default alignment (4096)", lambda: {"a": np.arange(4, dtype=np.int32),
                                                                          "b": np.ones((2, 2))}),
    Case("align_64", "1.0", "the smallest alignment (64)", lambda: {"a": np.arange(4, dtype=np.int32),
                                                                    "b": np.ones((2, 2))}, {"alignment": 64}),
    Case("align_1m", "1.0", "alignment 2^20 (about 1 MiB of padding)", lambda: {"a": np.arange(4, dtype=np.int8)},
         {"alignment": 1 << 20}),
    Case("compressed_fast", "1.1", "compression 'fast': byte planes + zstd, raw planes, raw rows (§13)",
         compressible, {"alignment": 64, "compression": "fast"}),
    Case("compressed_balanced", "1.1", "compression 'balanced'", compressible,
         {"alignment": 64, "compression": "balanced"}),
    Case("compressed_maximum", "1.1", "compression 'maximum'", compressible,
         {"alignment": 64, "compression": "maximum"}),
    Case("compressed_chunks", "1.1", "chunk_bytes 4096: several chunks per row, a short last chunk",
         lambda: {"w": weights(5000), "bf16": weights(3000, 1).astype(_ml().bfloat16)},
         {"alignment": 64, "compression": "fast", "chunk_bytes": 4096}),
    Case("compressed_incompressible", "1.1", "random bytes: every piece stored raw", incompressible,
         {"alignment": 64, "compression": "fast"}),
    Case("packed", "1.1", "small blobs packed at 64 bytes, large ones at 4096 (§14)", many_small, {"pack": True}),
    Case("packed_compressed", "1.1", "packing and compression together", many_small,
         {"pack": True, "compression": "fast"}),
]


def write(case: Case, path: Path) -> None:
    """Write ``case`` to ``path`` with the pinned producer and time."""
    env = {"CKPTFMT_PRODUCER": json.dumps(PRODUCER), "SOURCE_DATE_EPOCH": EPOCH}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if "chunk_bytes" in case.options:
            _save_chunked(path, case)
        else:
            ckptfmt.save(path, case.make(), metadata=case.metadata, durable=False, **case.options)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _save_chunked(path: Path, case: Case) -> None:
    """``ckptfmt.save`` with a chunk size of the case's choosing (save itself always uses 1 MiB)."""
    from ckptfmt._api import _created, _producer
    from ckptfmt._atomic import atomic_write
    from ckptfmt._plan import plan
    from ckptfmt._writer11 import Writer11

    opts = dict(case.options)
    what = plan(case.make())
    with atomic_write(os.fspath(path), durable=False) as fd:
        writer = Writer11(fd, alignment=opts.pop("alignment"), compression=opts.pop("compression"),
                          chunk_bytes=opts.pop("chunk_bytes"))
        writer.write_blobs(what.rows)
        writer.finish(what.tree, producer=_producer(), created=_created(), user=case.metadata or {}, views=what.views)


def expected(case: Case) -> dict[str, Any]:
    """The manifest entry of ``case``: computed from the object saved, not from the file."""
    meta = case.metadata or {}
    return {"file": case.path, "version": case.version, "what": case.what, "expect": "load",
            "tree": numpy_describe(case.make()), "metadata": {k: _plain(v) for k, v in meta.items()},
            "producer": PRODUCER, "created": "2023-11-14T22:13:20Z"}


def readme(version: str) -> str:
    """The table of one version folder: each file, what it exercises, how it was written."""
    rows = [f"| `{c.name}.ckpt` | {(HERE / c.path).stat().st_size} | {c.what} | "
            f"`{', '.join(f'{k}={v!r}' for k, v in c.options.items()) or 'defaults'}` |"
            for c in CASES if c.version == version]
    return (f"# Golden files, format {version}\n\nFrozen: written once by `conformance/generate.py` (producer "
            f"`{PRODUCER}`, `SOURCE_DATE_EPOCH={EPOCH}`), never regenerated. Each must load with the content "
            "`conformance/manifest.json` describes.\n\n| file | bytes | exercises | save options |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def _plain(v: Any) -> Any:
    if type(v) is dict:
        return {"dict": [[k, _plain(x)] for k, x in v.items()]}
    if type(v) in (list, tuple):
        return {"list": [_plain(x) for x in v]}
    return value(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="regenerate into a temporary folder and compare bytes")
    args = p.parse_args(argv)
    if args.check:
        bad = []
        with tempfile.TemporaryDirectory() as tmp:
            for case in CASES:
                out = Path(tmp) / case.path
                write(case, out)
                if out.read_bytes() != (HERE / case.path).read_bytes():
                    bad.append(case.path)
        print("\n".join(f"differs: {b}" for b in bad) or f"all {len(CASES)} golden files reproduce byte for byte")
        return 1 if bad else 0
    for case in CASES:
        target = HERE / case.path
        if not target.exists():  # frozen: existing files are never rewritten
            write(case, target)
            print(f"wrote {case.path} ({target.stat().st_size} bytes)")
    for version in sorted({c.version for c in CASES}):
        (HERE / "golden" / version / "README.md").write_text(readme(version), encoding="utf-8")
    manifest = {"format": "ckptfmt conformance manifest", "version": 1, "cases": [expected(c) for c in CASES]}
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
