"""Fuzz targets for the converters: seeds written by the real libraries, structure-aware mutators, oracles.

Each target takes one input (bytes), turns it into a source of its format (a safetensors file, an
``.npz``, an HDF5 file, a DCP directory), converts it with ``ckptfmt.convert`` and checks the outcome:
either a :class:`ckptfmt.CheckpointError`, or a file that verifies and holds exactly what the format's
own library reads from the same source (safetensors, numpy, h5py). Anything else raises
:class:`Finding`. The same mutators drive the hypothesis tests (``tests/convert/test_fuzz_convert.py``)
and the long runs (``fuzz/run_convert.py``, atheris or a plain random driver).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import shutil
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

import ckptfmt
from ckptfmt.errors import CheckpointError

TARGETS = ("safetensors", "npz", "hdf5", "dcp")
INTERESTING = [0, 1, 2, 7, 8, 255, 256, 4096, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 10**8, 10**12,
               -1, -(2**31), -(2**63)]


class Finding(AssertionError):
    """An outcome other than identical data or a CheckpointError."""


# ------------------------------------------------------------------ seeds (written by the real libraries)


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.arange(5, dtype=np.int16),
            "e": np.zeros((0, 2), np.float64), "s": np.array(7, np.uint8)}


def seed_safetensors() -> bytes:
    from safetensors.numpy import save

    return bytes(save(_arrays(), metadata={"k": "v"}))


def seed_npz(compressed: bool = True) -> bytes:
    buf = io.BytesIO()
    arrays = {**_arrays(), "f": np.asfortranarray(np.arange(12, dtype=">i4").reshape(3, 4))}
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def seed_hdf5() -> bytes:
    import h5py

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "s.h5")
        with h5py.File(p, "w") as f:
            a = _arrays()
            f["model/w"] = a["w"]
            f.create_dataset("model/b", data=a["b"], chunks=(2,), compression="gzip")
            f["model/b"].attrs["note"] = "bias"
            f["s"] = a["s"]
            f["text"] = "hello"
            f.create_dataset("fill", shape=(6,), dtype="f4", fillvalue=1.5)
            f["same"] = f["model/w"]
            f["soft"] = h5py.SoftLink("/model/b")
        with open(p, "rb") as fh:
            return fh.read()


def seed_dcp() -> bytes:
    """A DCP directory as bytes: ``pack_dir`` of the files ``torch.distributed.checkpoint.save`` wrote."""
    import torch
    import torch.distributed.checkpoint as dcp

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = {"w": torch.arange(12.0).reshape(3, 4), "l": [torch.ones(2, dtype=torch.float16), 5], "n": 3}
        dcp.save(state, checkpoint_id=d)
        return pack_dir(d)


SEEDS: dict[str, Callable[[], bytes]] = {"safetensors": seed_safetensors, "npz": seed_npz, "hdf5": seed_hdf5,
                                         "dcp": seed_dcp}


def pack_dir(d: str) -> bytes:
    """The files of a directory as ``name\\0len\\0bytes`` records (how a DCP input travels as bytes)."""
    out = bytearray()
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), "rb") as f:
            data = f.read()
        out += name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data
    return bytes(out)


def unpack_dir(data: bytes, d: str) -> None:
    """Write the records of :func:`pack_dir` (damaged ones as far as they go) into ``d``."""
    pos = 0
    while pos < len(data):
        name_end = data.find(b"\0", pos)
        len_end = data.find(b"\0", name_end + 1) if name_end >= 0 else -1
        if len_end < 0:
            break
        name = os.path.basename(data[pos:name_end].decode("utf-8", "replace"))[:100] or "x"
        try:
            n = int(data[name_end + 1 : len_end])
        except ValueError:
            break
        body = data[len_end + 1 : len_end + 1 + max(n, 0)]
        with contextlib.suppress(OSError), open(os.path.join(d, name.replace("\0", "") or "x"), "wb") as f:
            f.write(body)
        pos = len_end + 1 + max(n, 0)


# ------------------------------------------------------------------ mutators


def mutate_bytes(data: bytes, rng: random.Random, *, region: tuple[int, int] | None = None) -> bytes:
    """One random byte-level edit: flip, overwrite with an interesting integer, insert, delete, truncate, repeat."""
    b = bytearray(data)
    lo, hi = region or (0, len(b))
    hi = max(lo + 1, min(hi, len(b)))
    op = rng.randrange(7)
    at = rng.randrange(lo, hi) if b else 0
    if op == 0 and b:
        b[at] ^= 1 << rng.randrange(8)
    elif op == 1 and b:
        width = rng.choice((1, 2, 4, 8))
        v = rng.choice(INTERESTING) % (1 << (8 * width))
        b[at : at + width] = v.to_bytes(width, "little")
    elif op == 2:
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    elif op == 3 and b:
        del b[at : at + rng.randrange(1, 17)]
    elif op == 4:
        del b[rng.randrange(len(b) + 1) :]
    elif op == 5 and b:
        n = rng.randrange(1, 33)
        b[at:at] = b[at : at + n] * rng.randrange(2, 8)
    elif b:
        b[at] = rng.randrange(256)
    return bytes(b)


def _mutate_json(value: Any, rng: random.Random, depth: int = 0) -> Any:
    """One structure-aware edit somewhere in a decoded JSON value."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        op = rng.randrange(4)
        out = dict(value)
        if op == 0:
            del out[key]
        elif op == 1:
            out[key + rng.choice(["", "x", "\0"])] = _mutate_json(value[key], rng, depth + 1)
        else:
            out[key] = _mutate_json(value[key], rng, depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        out_list = list(value)
        i = rng.randrange(len(out_list))
        op = rng.randrange(4)
        if op == 0:
            del out_list[i]
        elif op == 1:
            out_list.append(rng.choice(INTERESTING))
        else:
            out_list[i] = _mutate_json(out_list[i], rng, depth + 1)
        return out_list
    choices: list[Any] = [rng.choice(INTERESTING), "F32", "BF16", "I64", "bogus", None, [], {}, True, 1.5,
                          [[[[1]]]], "x" * rng.randrange(0, 64)]
    if isinstance(value, int) and not isinstance(value, bool):
        choices += [value + 1, value - 1, value * 2, value + 8]
    return rng.choice(choices)


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    """Edit the JSON header (offsets, shapes, dtypes, names, nesting), or the bytes around it."""
    if len(data) >= 8 and rng.random() < 0.7:
        (n,) = struct.unpack_from("<Q", data)
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            header = json.loads(data[8 : 8 + n])
            if rng.random() < 0.05:
                text = b'{"__metadata__": ' + b"[" * rng.randrange(60, 5000) + b"]}"
            else:
                text = json.dumps(_mutate_json(header, rng)).encode()
            return struct.pack("<Q", len(text)) + text + data[8 + n :]
    return mutate_bytes(data, rng)


def mutate_npz(data: bytes, rng: random.Random) -> bytes:
    """Rewrite one member with an edited npy header (shape, dtype, order) or damaged bytes, or edit the zip."""
    if rng.random() < 0.6:
        with contextlib.suppress(zipfile.BadZipFile, ValueError, OSError, EOFError, SyntaxError):
            zin = zipfile.ZipFile(io.BytesIO(data))
            infos = zin.infolist()
            victim = rng.randrange(len(infos))
            out = io.BytesIO()
            with zipfile.ZipFile(out, "w") as zout:
                for k, info in enumerate(infos):
                    body = zin.read(info)
                    if k == victim:
                        body = _mutate_npy(body, rng)
                    zout.writestr(info.filename, body, compress_type=rng.choice((info.compress_type,
                                                                                 zipfile.ZIP_STORED)))
            return out.getvalue()
    return mutate_bytes(data, rng)


def _mutate_npy(body: bytes, rng: random.Random) -> bytes:
    f = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(f)
        hdr = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
               else np.lib.format.read_array_header_2_0(f))
    except (ValueError, SyntaxError, EOFError):
        return mutate_bytes(body, rng)
    shape, fortran, dtype = hdr
    payload = body[f.tell() :]
    op = rng.randrange(6)
    if op == 0:
        shape = tuple(rng.choice([*INTERESTING[:8], 10**8, 10**12]) for _ in range(rng.randrange(0, 4)))
    elif op == 1:
        dtype = np.dtype(rng.choice(["<f4", ">f8", "<i2", "|u1", "<c8", "|b1", "<f2", "|V3", "<U2", "|S4"]))
    elif op == 2:
        fortran = not fortran
    elif op == 3:
        payload = payload[: rng.randrange(len(payload) + 1)]
    elif op == 4:
        payload += bytes(rng.randrange(64))
    else:
        return mutate_bytes(body, rng)
    head = io.BytesIO()
    with contextlib.suppress(ValueError):
        np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                    "fortran_order": fortran, "shape": shape})
        return head.getvalue() + payload
    return mutate_bytes(body, rng)


def mutate_hdf5(data: bytes, rng: random.Random) -> bytes:
    """Byte edits of an HDF5 file (the C library parses it; damage anywhere is fair game), or a new
    file of random hostile structure (:func:`build_hdf5`)."""
    if rng.random() < 0.3:
        return build_hdf5(rng)
    out = data
    for _ in range(rng.randrange(1, 4)):
        out = mutate_bytes(out, rng)
    return out


_H5_DTYPES = [np.dtype(t) for t in ("<f4", ">f8", "<i2", "|u1", "<c8", "|b1", "<f2", "<u8")] + [
    np.dtype([("a", "<f8"), ("b", "<i4")])]


def build_hdf5(rng: random.Random) -> bytes:
    """An HDF5 file written by h5py with a random structure: groups, datasets of many types and layouts
    (chunked, compressed, never written, compound, strings), hard and soft links to earlier objects
    (groups too), dangling and external links, external raw storage, attributes."""
    import h5py

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "b.h5")
        side = os.path.join(d, "side.bin")
        with open(side, "wb") as f:
            f.write(bytes(range(256)))
        with h5py.File(p, "w") as f:
            groups = [f]
            objects: list[Any] = []
            for i in range(rng.randrange(1, 12)):
                g = rng.choice(groups)
                name = rng.choice([f"n{i}", f"x.{i}", f"ckptfmt.{i}", f"sp ace{i}", f"u\u00e9{i}"])
                op = rng.randrange(10)
                with contextlib.suppress(ValueError, TypeError, KeyError, OSError, RuntimeError):
                    if op == 0:
                        groups.append(g.create_group(name))
                        objects.append(groups[-1])
                    elif op in (1, 2, 3):
                        dt = rng.choice(_H5_DTYPES)
                        shape = tuple(rng.choice([0, 1, 3, 7]) for _ in range(rng.randrange(0, 3)))
                        kw: dict[str, Any] = {}
                        if shape and all(shape) and rng.random() < 0.5:
                            kw["chunks"] = tuple(max(1, n // 2) for n in shape)
                            if rng.random() < 0.5:
                                kw["compression"] = "gzip"
                        if rng.random() < 0.3:
                            kw["fillvalue"] = np.zeros((), dt)[()]
                        ds = g.create_dataset(name, shape=shape, dtype=dt, **kw)
                        if op != 3 and ds.size:  # op 3: never written, read as the fill value
                            raw = np.frombuffer(bytes(rng.randrange(256) for _ in range(ds.size * dt.itemsize)),
                                                dtype=dt.newbyteorder("=") if dt.fields is None else dt)
                            if dt.kind == "b":
                                raw = raw.view(np.uint8) % 2 == 1
                            ds[...] = raw.reshape(shape)
                        objects.append(ds)
                    elif op == 4 and objects:
                        g[name] = rng.choice(objects)  # a hard link to a group or dataset
                    elif op == 5 and objects:
                        g[name] = h5py.SoftLink(rng.choice(objects).name if rng.random() < 0.8 else "/nowhere")
                    elif op == 6:
                        g[name] = h5py.ExternalLink(side, "/x")
                    elif op == 7:
                        g.create_dataset(name, shape=(16,), dtype="u1", external=[(side, 0, 16)])
                    elif op == 8:
                        g.create_dataset(name, shape=(rng.choice([10**6, 10**9, 10**11]),), dtype="f4",
                                         chunks=(1024,))
                    else:
                        g.attrs[name] = rng.choice([1, 2.5, "s", np.arange(3), b"by"])
        with open(p, "rb") as fh:
            return fh.read()


def mutate_dcp(data: bytes, rng: random.Random) -> bytes:
    """Edit the unpickled DCP metadata (sizes, offsets, planner paths, storage ranges) or a file's bytes."""
    with tempfile.TemporaryDirectory() as d:
        unpack_dir(data, d)
        meta_path = os.path.join(d, ".metadata")
        if os.path.exists(meta_path) and rng.random() < 0.7:
            try:
                with open(meta_path, "rb") as f:
                    meta = pickle.load(f)
            except Exception:  # a damaged seed: fall back to bytes
                meta = None
            if meta is not None:
                _mutate_meta(meta, rng)
                with open(meta_path, "wb") as f:
                    pickle.dump(meta, f)
                return pack_dir(d)
        names = sorted(os.listdir(d))
        if names:
            name = rng.choice(names)
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                body = f.read()
            with open(p, "wb") as f:
                f.write(mutate_bytes(body, rng))
        return pack_dir(d)


def _mutate_meta(meta: Any, rng: random.Random) -> None:
    import dataclasses

    import torch

    def number() -> int:
        return int(rng.choice(INTERESTING))

    op = rng.randrange(5)
    sd = meta.state_dict_metadata
    fqn = rng.choice(list(sd))
    md = sd[fqn]
    if op == 0 and hasattr(md, "size"):
        dims = list(md.size) or [1]
        dims[rng.randrange(len(dims))] = abs(number())
        md.size = torch.Size(dims)
    elif op == 1 and getattr(md, "chunks", None):
        c = rng.choice(md.chunks)
        field = rng.choice(["offsets", "sizes"])
        dims = list(getattr(c, field)) or [0]
        dims[rng.randrange(len(dims))] = number()
        with contextlib.suppress(Exception):
            object.__setattr__(c, field, torch.Size(dims))
    elif op == 2 and isinstance(meta.planner_data, dict) and meta.planner_data:
        key = rng.choice(list(meta.planner_data))
        path = list(meta.planner_data[key])
        path[rng.randrange(len(path))] = rng.choice([number(), "x", fqn])
        meta.planner_data[key] = tuple(path)
    elif op == 3 and meta.storage_data:
        index = rng.choice(list(meta.storage_data))
        info = meta.storage_data[index]
        field = rng.choice(["offset", "length", "relative_path"])
        value: Any = number() if field != "relative_path" else rng.choice(["../x", "/etc/passwd", "missing", ""])
        meta.storage_data[index] = dataclasses.replace(info, **{field: value})
    else:
        del sd[fqn]


MUTATORS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "safetensors": mutate_safetensors, "npz": mutate_npz, "hdf5": mutate_hdf5, "dcp": mutate_dcp}


def mutate(fmt: str, data: bytes, rng: random.Random) -> bytes:
    """One edit by the format's mutator; a mutator that cannot parse its input edits its bytes instead."""
    try:
        return MUTATORS[fmt](data, rng)
    except Exception:  # the mutators parse damaged inputs with the real libraries, which raise anything
        return mutate_bytes(data, rng)


# ------------------------------------------------------------------ running one input, with its oracle


def _reference(fmt: str, src: str) -> dict[str, np.ndarray] | None:
    """What the format's own library reads from ``src``: {key path: array}, None if it refuses the input."""
    try:
        if fmt == "safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(src))
        if fmt == "npz":
            with np.load(src, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if fmt == "hdf5":
            import h5py

            out: dict[str, np.ndarray] = {}
            with h5py.File(src, "r") as f:
                def visit(name: str, obj: Any) -> None:
                    if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "biufc" and obj.shape is not None:
                        out[name] = obj[()]
                f.visititems(visit)
            return out
    except Exception:  # the library refuses it: any outcome of ours is then acceptable if typed
        return None
    return None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}/{i}" if prefix else str(i)))
        return out
    return {prefix: tree}


def run_one(fmt: str, data: bytes, workdir: str) -> str:
    """Convert one input; return ``"ok"`` or the CheckpointError's class name; raise :class:`Finding` otherwise."""
    src = os.path.join(workdir, "src" if fmt == "dcp" else f"src.{fmt}")
    dst = os.path.join(workdir, "out.ckpt")
    for p in (src, dst):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)
    if fmt == "dcp":
        os.mkdir(src)
        unpack_dir(data, src)
    else:
        with open(src, "wb") as f:
            f.write(data)
    try:
        ckptfmt.convert(src, dst)
    except CheckpointError as e:
        return type(e).__name__
    except RecursionError as e:  # never acceptable: a typed error must come first
        raise Finding(f"{fmt}: RecursionError {e}") from e
    except Exception as e:
        raise Finding(f"{fmt}: {type(e).__name__}: {e}") from e
    if not ckptfmt.verify(dst).ok:
        raise Finding(f"{fmt}: the converted file does not verify")
    ref = _reference(fmt, src)
    if ref is not None:
        got = _flatten(ckptfmt.load(dst))
        for key, want in ref.items():
            have = got.get(key)
            if have is None:
                continue  # e.g. a foreign HDF5 dataset ckptfmt maps elsewhere (strings, compounds)
            a = np.ascontiguousarray(have)
            w = np.ascontiguousarray(want)
            w = w.astype(w.dtype.newbyteorder("<")) if w.dtype.byteorder == ">" else w
            if w.dtype == np.bool_:  # a bool is stored as 0 or 1 (spec §6), whatever nonzero byte the source held
                w = w.view(np.uint8) != 0
            if a.shape != w.shape or a.tobytes() != w.tobytes():
                raise Finding(f"{fmt}: {key!r} differs from what the format's own library reads")
    return "ok"
