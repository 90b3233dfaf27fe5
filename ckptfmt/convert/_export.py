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
import re
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._atomic import atomic_write
from .._backend import get_backend
from .._dtypes import DTYPES, numpy_dtype
from .._keypath import join
from .._reader import Checkpoint
from .._tables import ViewRef, tensor_ref
from .._tree import map_tree, walk
from .._writer import contiguous_chunks
from ..errors import MissingDependencyError, UnsupportedObjectError
from ._errors import ConversionError, DiskFullError
from ._hdf5 import export_hdf5

__all__ = ["EXPORT_FORMATS", "ExportError", "export", "export_hf_safetensors", "export_safetensors", "export_torch",
           "parse_size"]

#: the values ``export(..., to=...)`` accepts
EXPORT_FORMATS = ("hdf5", "safetensors", "hf-safetensors", "torch")
#: file names of a Hugging Face safetensors model directory
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
_HF_SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
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
           shard_size: int | str | None = None, **hdf5_options: Any) -> None:
    """Write checkpoint ``src`` as ``dst`` in format ``to``: "hdf5", "safetensors", "hf-safetensors" or "torch".

    - ``hdf5``: :func:`ckptfmt.convert._hdf5.export_hdf5` (``hdf5_options``: ``compression``,
      ``compression_opts``, ``chunks``, ``progress``); holds everything.
    - ``safetensors``: one tensor per tensor leaf, named by its key path; see :func:`export_safetensors`
      for ``flatten``.
    - ``hf-safetensors``: ``dst`` is a directory of safetensors shards of at most ``shard_size``
      plus their index, as Hugging Face writes; see :func:`export_hf_safetensors`.
    - ``torch``: ``torch.save`` of the tree as torch tensors in plain containers, loadable with
      ``torch.load(dst, weights_only=True)``; see :func:`export_torch`.
    """
    if to not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {to!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if flatten is not None and to not in ("safetensors", "hf-safetensors"):
        raise ValueError(f"flatten applies to to='safetensors' and 'hf-safetensors' only, not to={to!r}")
    if shard_size is not None and to != "hf-safetensors":
        raise ValueError(f"shard_size applies to to='hf-safetensors' only, not to={to!r}")
    if hdf5_options and to != "hdf5":
        raise TypeError(f"options {sorted(hdf5_options)} apply to to='hdf5' only, not to={to!r}")
    if to == "hdf5":
        export_hdf5(src, dst, **hdf5_options)
    elif to == "safetensors":
        export_safetensors(src, dst, flatten=flatten)
    elif to == "hf-safetensors":
        export_hf_safetensors(src, dst, flatten=flatten, shard_size="5GB" if shard_size is None else shard_size)
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
    return walk(node, path, empty_leaves=True)


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
    with Checkpoint(src) as ckpt:
        entries, metadata = _plan_safetensors(ckpt, _flatten_modes(flatten))
        _write_safetensors(ckpt, os.fspath(dst), entries, metadata, _array_reader(ckpt))


#: (name, "row" | "view", index, dtype, shape) of one tensor to write
_Entry = tuple[str, str, int, str, tuple[int, ...]]


def _plan_safetensors(ckpt: Checkpoint, modes: set[str], *, skip_meta: tuple[str, ...] = ()
                      ) -> tuple[list[_Entry], dict[str, str]]:
    """The tensors to write and the ``__metadata__``, or :class:`ExportError` naming all that cannot go."""
    views = ckpt.manifest.views
    entries: list[_Entry] = []
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
    metadata, bad_meta = _metadata_text({k: v for k, v in ckpt.metadata.items() if k not in skip_meta})
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
    return entries, metadata


def _nbytes(entry: _Entry) -> int:
    return math.prod(entry[4]) * DTYPES[entry[3]].itemsize


def _write_safetensors(ckpt: Checkpoint, dst: str, entries: list[_Entry], metadata: dict[str, str],
                       array: Callable[[str, int], np.ndarray]) -> None:
    """Stream ``entries`` into the safetensors file ``dst``, atomically."""
    header: dict[str, Any] = {_METADATA_KEY: metadata}
    offset = 0
    for entry in entries:
        name, _, _, dtype, shape = entry
        nbytes = _nbytes(entry)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    with _target(dst, "safetensors") as raw, io.BufferedWriter(raw, 1 << 20) as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for _, kind, index, _, _ in entries:
            for chunk in contiguous_chunks(array(kind, index)):
                fh.write(chunk.data)


# ------------------------------------------------------------------ Hugging Face directory


def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or a str such as ``"5GB"`` (10^9, as Hugging Face counts) or ``"2GiB"``."""
    if isinstance(size, bool):
        raise ValueError(f"shard size {size!r}: give bytes (int) or a str such as '5GB' or '500MiB'")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if m is None or m.group(2) not in _UNITS:
            raise ValueError(f"shard size {size!r}: give bytes (int) or a str such as '5GB' or '500MiB'")
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise ValueError(f"shard size {size!r} must be positive")
    return n


def export_hf_safetensors(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                          shard_size: int | str = "5GB", flatten: str | None = None) -> None:
    """Write checkpoint ``src`` as a Hugging Face safetensors model directory ``dst``.

    The tensors, named by key path in tree order, are cut into shards of at most ``shard_size`` bytes
    of tensor data (a tensor larger than that gets a shard of its own), written as
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (``{"metadata":
    {"total_size": ...}, "weight_map": {name: shard}}``); a single shard is ``model.safetensors`` with
    no index, as Hugging Face does. ``flatten`` and the refusals are those of :func:`export_safetensors`
    (Hugging Face drops tied weights, safetensors refuses them: ``flatten="copy"`` stores copies).
    Side files kept by ``convert`` from a model directory (user metadata ``"hf_files"``:
    ``config.json``, tokenizer files, ...) are written back beside the shards.

    Each file is written atomically, the index last; shards of an earlier export into ``dst`` that the
    new index does not name (``model-*-of-*.safetensors``) are removed after it is written.
    """
    from ._hfdir import SIDE_FILES, SIDE_KEY

    limit = parse_size(shard_size)
    out = os.fspath(dst)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"{out}: exists and is not a directory; an hf-safetensors export writes a directory")
    with Checkpoint(src) as ckpt:
        entries, metadata = _plan_safetensors(ckpt, _flatten_modes(flatten),
                                              skip_meta=(SIDE_KEY, "torch_state_dict_metadata"))
        side = ckpt.metadata.get(SIDE_KEY)
        shards: list[list[_Entry]] = []
        size = 0
        for entry in entries:
            n = _nbytes(entry)
            if not shards or (size + n > limit and shards[-1]):
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += n
        shards = shards or [[]]
        names = [HF_SINGLE] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        os.makedirs(out, exist_ok=True)
        array = _array_reader(ckpt)
        for name, part in zip(names, shards, strict=True):
            _write_safetensors(ckpt, os.path.join(out, name), part, metadata, array)
        if isinstance(side, dict):
            for name in SIDE_FILES:  # only these names: a hostile metadata cannot write elsewhere
                if name not in side:
                    continue
                value = side[name]
                text = value if name.endswith(".txt") and isinstance(value, str) else \
                    json.dumps(value, indent=2, ensure_ascii=False) + "\n"
                with _target(os.path.join(out, name), "hf-safetensors") as fh:
                    fh.write(text.encode("utf-8"))
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(_nbytes(e) for e in entries)},
                     "weight_map": {e[0]: name for name, part in zip(names, shards, strict=True) for e in part}}
            with _target(os.path.join(out, HF_INDEX), "hf-safetensors") as fh:
                fh.write(json.dumps(index, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
    keep = set(names)
    for stale in os.listdir(out):
        if (_HF_SHARD_RE.match(stale) or stale in (HF_SINGLE, HF_INDEX)) and stale not in keep \
                and not (stale == HF_INDEX and len(shards) > 1):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out, stale))


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
