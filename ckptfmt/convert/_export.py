"""Export a checkpoint to other formats: HDF5 (spec/HDF5.md), safetensors, and ``torch.save``.

Every export reads the checkpoint lazily, tensor by tensor, and writes its target atomically (a
temporary beside it, renamed over it once complete). An export either holds everything the
checkpoint holds or fails naming what it cannot hold (:class:`ExportError`), unless the caller says
how to flatten the tree (safetensors' ``flatten``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._atomic import atomic_write
from .._backend import get_backend
from .._dtypes import DTYPES, numpy_dtype
from .._keypath import join
from .._manifest import ViewRef, tensor_ref
from .._reader import Checkpoint, map_tree
from .._writer import contiguous_chunks
from ..errors import MissingDependencyError, UnsupportedObjectError
from ._errors import ConversionError, DiskFullError
from ._hdf5 import export_hdf5

__all__ = ["EXPORT_FORMATS", "ExportError", "export", "export_safetensors", "export_torch"]

#: the values ``export(..., to=...)`` accepts
EXPORT_FORMATS = ("hdf5", "safetensors", "torch")
#: ``flatten`` words for safetensors: drop non-tensor leaves, copy tensors that share storage
FLATTEN_MODES = ("drop", "copy")

#: canonical dtype -> safetensors dtype code (safetensors has no complex128)
SAFETENSORS_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "int32": "I32",
    "uint32": "U32", "int64": "I64", "uint64": "U64", "float16": "F16", "bfloat16": "BF16",
    "float32": "F32", "float64": "F64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "complex64": "C64",
}
_METADATA_KEY = "__metadata__"
_SHOWN = 10


class ExportError(ConversionError, ValueError):
    """The target format cannot hold part of the checkpoint; ``keys`` lists the key paths concerned."""

    def __init__(self, message: str, *, keys: list[str] | None = None) -> None:
        self.keys = list(keys or [])
        super().__init__(message)


def export(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, to: str, flatten: str | None = None,
           **hdf5_options: Any) -> None:
    """Write checkpoint ``src`` as ``dst`` in format ``to``: "hdf5", "safetensors" or "torch".

    - ``hdf5``: :func:`ckptfmt.convert._hdf5.export_hdf5` (``hdf5_options``: ``compression``,
      ``compression_opts``, ``chunks``, ``progress``); holds everything.
    - ``safetensors``: one tensor per tensor leaf, named by its key path; see :func:`export_safetensors`
      for ``flatten``.
    - ``torch``: ``torch.save`` of the tree as torch tensors in plain containers, loadable with
      ``torch.load(dst, weights_only=True)``; see :func:`export_torch`.
    """
    if to not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {to!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if flatten is not None and to != "safetensors":
        raise ValueError(f"flatten applies to to='safetensors' only, not to={to!r}")
    if hdf5_options and to != "hdf5":
        raise TypeError(f"options {sorted(hdf5_options)} apply to to='hdf5' only, not to={to!r}")
    if to == "hdf5":
        export_hdf5(src, dst, **hdf5_options)
    elif to == "safetensors":
        export_safetensors(src, dst, flatten=flatten)
    else:
        export_torch(src, dst)


# ------------------------------------------------------------------ writing the target


class _FdWriter(io.RawIOBase):
    """A write-only raw file object over a file descriptor that remembers the OSError that stopped it.

    ``torch.save`` swallows its file object's exceptions and reports a bare ``RuntimeError`` ("unexpected
    pos ..."); the error kept here says what really happened (a full disk).
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.error: OSError | None = None

    def writable(self) -> bool:
        """Always."""
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:])
        except OSError as e:
            self.error = e
            raise
        return done


@contextlib.contextmanager
def _target(dst: str, what: str) -> Iterator[_FdWriter]:
    """An unbuffered writer on a temporary that replaces ``dst`` on success; a full disk as :class:`DiskFullError`."""
    writer: _FdWriter | None = None
    try:
        with atomic_write(dst) as fd:
            writer = _FdWriter(fd)
            yield writer
    except Exception as e:
        err = writer.error if writer is not None and writer.error is not None else e
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(dst, f"the disk is full ({err.strerror}) while writing the {what} export; "
                                     "nothing was replaced: free space and export again") from e
        raise


# ------------------------------------------------------------------ walking a decoded tree


def _leaves(node: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """(path, leaf) of every leaf in tree order; an empty container is a leaf of its own."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(node, path)]
    while stack:
        n, p = stack.pop()
        t = type(n)
        if (t is dict or t is list or t is tuple) and len(n):
            items = n.items() if t is dict else enumerate(n)
            stack.extend(reversed([(v, (*p, k)) for k, v in items]))
        else:
            yield p, n


def _listing(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


# ------------------------------------------------------------------ safetensors


def _flatten_modes(flatten: str | None) -> set[str]:
    if flatten is None:
        return set()
    if not isinstance(flatten, str):
        raise ValueError(f"flatten is a str such as 'drop', 'copy' or 'drop,copy', not {flatten!r}")
    words = {w.strip() for w in flatten.replace("+", ",").split(",") if w.strip()}
    modes = {"copy" if w == "duplicate" else w for w in words}
    unknown = sorted(modes - set(FLATTEN_MODES))
    if unknown or not modes:
        raise ValueError(f"flatten {flatten!r}: known words are 'drop' (leave out non-tensor leaves), 'copy' "
                         "(alias 'duplicate': store tensors that share storage as copies), or both ('drop,copy')")
    return modes


def _metadata_text(user: dict[Any, Any]) -> tuple[dict[str, str], list[str]]:
    """safetensors ``__metadata__`` (str → str) from the user metadata, and the keys it cannot hold."""
    out: dict[str, str] = {}
    bad: list[str] = []
    for k, v in user.items():
        if isinstance(v, str):
            out[str(k)] = v
            continue
        try:
            out[str(k)] = json.dumps(v, ensure_ascii=False)
        except (TypeError, ValueError):  # bytes somewhere inside
            bad.append(str(k))
    return out, bad


def export_safetensors(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                       flatten: str | None = None) -> None:
    """Write the tensors of checkpoint ``src`` as the safetensors file ``dst``, named by key path.

    safetensors holds a flat map of tensors and a str → str metadata map. By default the export is
    lossless or fails with :class:`ExportError` naming every key it cannot hold:

    - leaves that are not tensors (plain values, empty containers): ``flatten="drop"`` leaves them out;
    - tensors that share storage (one tensor at two keys, views of one buffer: safetensors refuses
      shared tensors): ``flatten="copy"`` (or ``"duplicate"``) stores each as a copy of its own;
    - user metadata values holding bytes: ``flatten="drop"`` leaves them out. Other values go into
      ``__metadata__``: str as is, the rest as JSON text; ``"format": "pt"`` is added unless given.

    Both: ``flatten="drop,copy"``. Always refused: complex128 tensors (safetensors has no such
    dtype) and a tensor at the key path ``__metadata__``. Array scalars are stored as 0-d tensors.
    The file is streamed: memory stays bounded whatever the size of the tensors.
    """
    modes = _flatten_modes(flatten)
    with Checkpoint(src) as ckpt:
        views = ckpt.manifest.views
        entries: list[tuple[str, str, int, str, tuple[int, ...]]] = []  # (name, "row"|"view", index, dtype, shape)
        nontensor: list[str] = []
        users: dict[int, list[str]] = {}  # stored row -> the keys reading its bytes
        for path, leaf in _leaves(ckpt.manifest.tree):
            name = join(path)
            ref = tensor_ref(leaf)
            if ref is not None:
                e = ckpt.entry(ref[0])
                entries.append((name, "row", ref[0], e.dtype, e.shape))
                users.setdefault(ref[0], []).append(name)
            elif type(leaf) is ViewRef:
                v = views.entry(leaf.index)
                entries.append((name, "view", leaf.index, v.dtype, v.shape))
                users.setdefault(v.base, []).append(name)
            else:
                nontensor.append(name)
        metadata, bad_meta = _metadata_text(ckpt.metadata)
        metadata.setdefault("format", "pt")

        problems: list[str] = []
        keys: list[str] = []
        unsupported = [n for n, _, _, d, _ in entries if d not in SAFETENSORS_DTYPES]
        if unsupported:
            kinds = sorted({d for n, _, _, d, _ in entries if d not in SAFETENSORS_DTYPES})
            problems.append(f"tensors of dtype {', '.join(kinds)}, which safetensors lacks: {_listing(unsupported)}")
            keys += unsupported
        if any(n == _METADATA_KEY for n, *_ in entries):
            problems.append(f"a tensor at key {_METADATA_KEY!r}, the name safetensors reserves for metadata")
            keys.append(_METADATA_KEY)
        if nontensor and "drop" not in modes:
            problems.append(f"leaves that are not tensors: {_listing(nontensor)} (flatten='drop' leaves them out)")
            keys += nontensor
        if bad_meta and "drop" not in modes:
            problems.append(f"user metadata holding bytes: {_listing(bad_meta)} (flatten='drop' leaves them out)")
            keys += [f"metadata:{k}" for k in bad_meta]
        shared = [k for group in users.values() if len(group) > 1 for k in group]
        if shared and "copy" not in modes:
            problems.append(f"tensors that share storage: {_listing(shared)} (flatten='copy' stores each as a copy)")
            keys += shared
        if problems:
            raise ExportError(f"{ckpt.path}: safetensors cannot hold " + "; ".join(problems), keys=keys)

        header: dict[str, Any] = {_METADATA_KEY: metadata}
        offset = 0
        for name, _, _, dtype, shape in entries:
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        head = json.dumps(header, separators=(",", ":")).encode("utf-8")
        head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
        array = _array_reader(ckpt)
        with _target(os.fspath(dst), "safetensors") as raw, io.BufferedWriter(raw, 1 << 20) as fh:
            fh.write(struct.pack("<Q", len(head)))
            fh.write(head)
            for _, kind, index, _, _ in entries:
                for chunk in contiguous_chunks(array(kind, index)):
                    fh.write(chunk.data)


def _array_reader(ckpt: Checkpoint) -> Callable[[str, int], np.ndarray]:
    """``array("row" | "view", index)``: the numpy array of a row or view (each blob verified once)."""
    verified: set[int] = set()

    def row(index: int) -> np.ndarray:
        arr = ckpt.read_rows([index], verify=index not in verified)[index]
        verified.add(index)
        return arr

    def array(kind: str, index: int) -> np.ndarray:
        if kind == "row":
            return row(index)
        v = ckpt.manifest.views.entry(index)
        raw = row(v.base).reshape(-1).view(np.uint8)
        return np.ndarray(v.shape, dtype=numpy_dtype(DTYPES[v.dtype]), buffer=raw, offset=v.offset, strides=v.strides)

    return array


# ------------------------------------------------------------------ torch


def export_torch(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """``torch.save`` the tree of checkpoint ``src`` to ``dst``, with torch tensors in plain containers.

    The result loads with ``torch.load(dst, weights_only=True)``: dicts, lists, tuples, tensors,
    int, float, bool, str, bytes, None. Tensors that share storage (tied weights, views) still share
    it (``torch.save`` keeps sharing), except views torch cannot express (negative or unaligned
    strides), which are stored as copies. Array scalars become 0-d tensors. The user metadata is
    not part of a ``torch.save`` file and is left out.
    """
    try:
        import torch
    except ImportError as e:
        raise MissingDependencyError("export to torch needs torch; install it with: pip install 'ckptfmt[torch]'"
                                     ) from e
    be = get_backend("torch")
    np_be = get_backend("numpy")
    with Checkpoint(src) as ckpt:
        arrays = ckpt.read_rows(range(len(ckpt)), writable=True)  # copy-on-write views: torch wants writable
        made: dict[tuple[int, bool | None], Any] = {}

        def tensor(row: int) -> Any:
            hit = made.get((row, False))
            if hit is None:
                hit = be.from_host(arrays[row], DTYPES[ckpt.entry(row).dtype], scalar=False, device=None)
                made[(row, False)] = hit
            return hit

        def leaf(index: int, scalar: bool | None, key: str) -> Any:
            hit = made.get((index, scalar))
            if hit is not None:
                return hit
            if scalar is None:
                v = ckpt.manifest.views.entry(index)
                dtype = DTYPES[v.dtype]
                try:
                    hit = be.view(tensor(v.base), dtype, v.shape, v.strides, v.offset)
                except UnsupportedObjectError:  # negative or unaligned strides: a copy
                    data = np.ascontiguousarray(np_be.view(arrays[v.base], dtype, v.shape, v.strides, v.offset))
                    hit = be.from_host(data, dtype, scalar=False, device=None)
            elif scalar:
                hit = be.from_host(arrays[index], DTYPES[ckpt.entry(index).dtype], scalar=True, device=None)
            else:
                hit = tensor(index)
            made[(index, scalar)] = hit
            return hit

        tree = map_tree(ckpt.manifest.tree, leaf, ())
        with _target(os.fspath(dst), "torch") as fh:
            torch.save(tree, fh)  # type: ignore[arg-type]  # any object with write() will do
