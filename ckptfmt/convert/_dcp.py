"""torch.distributed.checkpoint (DCP) directories, consolidated into one tree of whole tensors.

A DCP directory holds ``.metadata`` (a pickled ``Metadata``) and ``*.distcp`` files. The metadata maps
each flattened key to a ``TensorStorageMetadata`` (dtype, global size, chunks with offsets and sizes)
or a ``BytesStorageMetadata`` (a non-tensor value), and each (key, chunk offset) to a ``_StorageInfo``
(file, byte offset, length). FileSystemWriter ``torch.save``\\ s every chunk, and every non-tensor value,
into its byte range. ``planner_data`` maps each flattened key back to its path in the nested state.

Nothing but the metadata is unpickled with the pickle module, and that through
:class:`RestrictedUnpickler`, which resolves only DCP's metadata classes and a few torch and builtin
types. Chunks and values are read with ``torch.load(weights_only=True)``. A tensor is read when it
is written: chunks that are whole slabs along dim 0 are streamed one by one; other layouts are
assembled in memory one tensor at a time.

The metadata is untrusted: before anything is allocated, every chunk is checked to lie inside its
tensor, the chunks to tile it exactly (no overlap, no hole), every storage entry to lie inside an
existing data file and to hold at least its chunk's bytes (so the declared sizes are bounded by the
bytes present), and every planner path index to be a list index the state could have.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import pickle
import pickletools
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._dtypes import DTYPES, DType
from .._writer import contiguous_chunks
from ..errors import CheckpointError, UnsupportedDTypeError
from ._errors import CorruptSourceError, UnsafePickleError, UnsupportedSourceError
from ._lazy import LazyArray
from ._torch import import_torch, torch_load_bytes

__all__ = ["METADATA_FILE", "RestrictedUnpickler", "is_dcp_dir", "read_dcp", "read_dcp_metadata"]

METADATA_FILE = ".metadata"
SUFFIX = ".distcp"
#: a .metadata larger than this is refused before it is read
MAX_METADATA = 1 << 30
#: pickle opcodes naming a memo index
_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})

_DCP = "torch.distributed.checkpoint"
#: (module, name) the metadata pickle may name; resolved by import, so a renamed class fails cleanly
_ALLOWED: frozenset[tuple[str, str]] = frozenset({
    *((f"{_DCP}.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "_MEM_FORMAT_ENCODING", "MetadataIndex", "StorageMeta")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    # torch < 2.1 spelled TensorProperties from the sharded-tensor package
    ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"),
    ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("copyreg", "_reconstructor"),
    *(("builtins", n) for n in ("object", "set", "frozenset", "tuple", "list", "dict", "int", "float", "str",
                                 "bytes", "bool", "complex")),
    *((m, n) for m in ("pathlib", "pathlib._local")
      for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")),
})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: its dataclasses, ``torch.Size``, torch dtypes and layouts, a few builtins.

    Any other global is refused with :class:`UnsafePickleError` naming it, before it is imported.
    """

    def __init__(self, file: Any, *, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allowlisted global; refuse the rest."""
        torch = import_torch()
        if module == "torch" and name != "Size":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        elif (module, name) == ("builtins", "bytes"):
            return _bytes  # bytes(10**12) from a few pickle opcodes would allocate a terabyte
        elif (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(self._path, f"the DCP metadata pickle names {module}.{name}, which is not one of "
                                            "DCP's metadata types; refusing to load it", globals=[f"{module}.{name}"])


def _bytes(*args: Any) -> bytes:
    """``bytes`` for the metadata pickle: from an existing buffer or iterable, never a size to allocate."""
    if args and isinstance(args[0], int):
        raise pickle.UnpicklingError(f"the pickle calls bytes({args[0]}), which would allocate that many bytes")
    return bytes(*args)


def is_dcp_dir(path: str) -> bool:
    """True for a directory holding ``.metadata`` and at least one ``*.distcp`` file."""
    if not os.path.isfile(os.path.join(path, METADATA_FILE)):
        return False
    return any(n.endswith(SUFFIX) for n in os.listdir(path))


def read_dcp_metadata(path: str) -> Any:
    """The ``Metadata`` of a DCP directory, unpickled by :class:`RestrictedUnpickler`."""
    meta_path = os.path.join(path, METADATA_FILE)
    size = os.path.getsize(meta_path)
    if size > MAX_METADATA:
        raise CorruptSourceError(meta_path, f"{size} bytes of metadata, over the cap of {MAX_METADATA}")
    import_torch()
    with open(meta_path, "rb") as f:
        data = f.read(size + 1)
    # the C unpickler allocates what a length field says before reading it: check every length first
    # (and sizes its memo table by the largest memo index)
    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name in _MEMO_OPS and not (isinstance(arg, int) and 0 <= arg <= len(data)):
                raise ValueError(f"memo index {arg} at byte {pos}, past any the pickle can have made")
    except (ValueError, KeyError, EOFError) as e:  # genops: an unknown opcode, a length past the end, ...
        raise CorruptSourceError(meta_path, f"DCP metadata: not a well-formed pickle ({e})") from None
    with io.BytesIO(data) as f:
        try:
            meta = RestrictedUnpickler(f, path=meta_path).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError,
                IndexError, KeyError, OverflowError, RecursionError) as e:
            raise CorruptSourceError(meta_path, f"DCP metadata: cannot unpickle ({type(e).__name__}: {e})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(meta, Metadata):
        raise CorruptSourceError(meta_path, f"DCP metadata: holds a {type(meta).__name__}, not a Metadata")
    return meta


class _FileRange(io.RawIOBase):
    """A read-only, seekable window ``[offset, offset + length)`` of an open file."""

    def __init__(self, f: Any, offset: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        with memoryview(b) as mv, mv[:n] as part:  # released now: the caller may free ``b`` after an error
            got = self._f.readinto(part)
        self._pos += got
        return got


class _Item:
    """Where one saved item (a value, or a tensor chunk) lies; checked against the file's size when made."""

    def __init__(self, directory: str, info: Any, what: str, sizes: dict[str, int | None]) -> None:
        rel = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(rel, str) or type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise CorruptSourceError(os.path.join(directory, METADATA_FILE), f"{what}: bad storage entry {info!r}")
        if getattr(info, "transform_descriptors", None):
            raise UnsupportedSourceError(directory, f"{what} is stored through DCP stream extensions "
                                                    f"{list(info.transform_descriptors)}, which convert cannot read")
        root = os.path.realpath(directory)
        self.file = os.path.realpath(os.path.join(directory, rel))
        if os.path.commonpath([root, self.file]) != root:
            raise CorruptSourceError(directory, f"{what}: file {rel!r} lies outside the checkpoint")
        self.offset, self.length, self.what = offset, length, what
        if self.file not in sizes:
            sizes[self.file] = os.path.getsize(self.file) if os.path.isfile(self.file) else None
        size = sizes[self.file]
        if size is None:
            raise CorruptSourceError(self.file, f"{what}: the file is missing")
        if offset + length > size:
            raise CorruptSourceError(self.file, f"{what}: bytes [{offset}, {offset + length}) lie past the end of the "
                                                f"file, {size} bytes (truncated?)")

    def load(self, torch: Any, *, allow_pickle: bool) -> Any:
        try:
            f = open(self.file, "rb", buffering=0)  # noqa: SIM115 (closed below; the window reads through it)
        except FileNotFoundError:
            raise CorruptSourceError(self.file, f"{self.what}: the file is missing") from None
        with f:
            if f.seek(0, 2) < self.offset + self.length:
                raise CorruptSourceError(self.file, f"{self.what}: bytes [{self.offset}, {self.offset + self.length})"
                                                    " lie past the end of the file (truncated?)")
            try:
                return torch_load_bytes(torch, _FileRange(f, self.offset, self.length), path=self.file,
                                        what=self.what, allow_pickle=allow_pickle)
            except (IndexError, KeyError, TypeError, AttributeError, struct.error) as e:
                # torch's weights-only unpickler on a damaged pickle (``pop from empty list``, ...)
                raise CorruptSourceError(self.file, f"{self.what}: torch.load failed ({type(e).__name__}: "
                                                    f"{e})") from None


class DcpTensor(LazyArray):
    """A tensor of a DCP checkpoint, assembled from its chunks while it is written."""

    def __init__(self, fqn: str, dtype: DType, torch_dtype: Any, shape: tuple[int, ...],
                 chunks: list[tuple[tuple[int, ...], tuple[int, ...], _Item]], path: str) -> None:
        self.fqn, self.dtype, self.torch_dtype, self.shape = fqn, dtype, torch_dtype, shape
        self.parts = chunks
        self.path = path
        self._check()

    def _check(self) -> None:
        """Chunks inside the shape, tiling it exactly, each stored in at least its own bytes."""
        where = os.path.join(self.path, METADATA_FILE)
        if any(not 0 <= n < 1 << 63 for n in self.shape):
            raise CorruptSourceError(where, f"tensor {self.fqn!r}: a size in its shape {list(self.shape)} is negative "
                                            "or 2**63 or more")
        volume = 0
        for off, size, item in self.parts:
            if len(off) != len(self.shape) or len(size) != len(self.shape) or any(
                    o < 0 or s < 0 or o + s > n for o, s, n in zip(off, size, self.shape, strict=True)):
                raise CorruptSourceError(where, f"tensor {self.fqn!r}: chunk at {list(off)} of size {list(size)} "
                                                f"does not fit its shape {list(self.shape)}")
            nbytes = math.prod(size) * self.dtype.itemsize
            if nbytes > item.length:
                raise CorruptSourceError(where, f"{item.what}: {nbytes} bytes of elements stored in {item.length} "
                                                "bytes of the data file")
            volume += math.prod(size)
        if volume != math.prod(self.shape):
            raise CorruptSourceError(where, f"tensor {self.fqn!r}: its chunks hold {volume} elements, its shape "
                                            f"{list(self.shape)} {math.prod(self.shape)}")
        boxes = sorted((off, size) for off, size, _ in self.parts if math.prod(size))
        for i, (a_off, a_size) in enumerate(boxes):  # sorted by offset: stop once dim 0 is past a's end
            for b_off, b_size in boxes[i + 1:]:
                if b_off[0] >= a_off[0] + a_size[0]:
                    break
                if all(bo < ao + az and ao < bo + bz for ao, az, bo, bz in zip(a_off, a_size, b_off, b_size,
                                                                                 strict=True)):
                    raise CorruptSourceError(where, f"tensor {self.fqn!r}: chunks at {list(a_off)} and {list(b_off)} "
                                                    "overlap (and so leave part of the tensor unwritten)")

    def _slabs(self) -> bool:
        """True when the chunks are whole slabs along dim 0 (the usual Shard(0) layout)."""
        if not self.shape:
            return True
        start = 0
        for off, size, _ in sorted(self.parts, key=lambda p: p[0][0]):
            if off[0] != start or any(off[1:]) or size[1:] != self.shape[1:]:
                return False
            start += size[0]
        return start == self.shape[0]

    def _load(self, part: tuple[tuple[int, ...], tuple[int, ...], _Item]) -> Any:
        torch = import_torch()
        _, size, item = part
        t = item.load(torch, allow_pickle=False)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != size or t.dtype != self.torch_dtype:
            got = f"a {t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise CorruptSourceError(item.file, f"{item.what}: expected a {self.torch_dtype} tensor of shape "
                                                f"{list(size)}, found {got}")
        return t

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """Stream dim-0 slabs chunk by chunk; assemble other layouts first."""
        from ckptfmt.backends.torch import BACKEND as TORCH

        if math.prod(self.shape) == 0:
            return
        if self._slabs():
            for part in sorted(self.parts, key=lambda p: p[0][:1]):
                if math.prod(part[1]) == 0:
                    continue
                src = TORCH.host_view(self._load(part))[0]
                yield from contiguous_chunks(src, limit)
            return
        torch = import_torch()
        full = torch.empty(self.shape, dtype=self.torch_dtype)
        for part in self.parts:
            off, size, _ = part
            if math.prod(size) == 0:
                continue
            full[tuple(slice(o, o + s) for o, s in zip(off, size, strict=True))] = self._load(part)
        yield from contiguous_chunks(TORCH.host_view(full)[0], limit)


def _set_path(root: dict[str, Any], path: tuple[Any, ...], value: Any, where: str, most: int) -> None:
    """Put ``value`` at ``path`` (str keys make dicts, int keys lists), as DCP's own ``set_element`` does.

    A list index is at most ``most`` (the number of saved items: a longer list would hold only holes).
    """
    if not path or not all(type(p) in (str, int) for p in path):
        raise CorruptSourceError(where, f"DCP metadata: bad object path {path!r}")
    for p in path:
        if type(p) is int and not 0 <= p < most:
            raise CorruptSourceError(where, f"DCP metadata: object path {list(path)!r} has the list index {p}; the "
                                            f"checkpoint has {most} items, so an index is in [0, {most})")
    cur: Any = root
    for key, nxt in itertools.pairwise(path):
        default: Any = {} if type(nxt) is str else []
        if isinstance(cur, dict):
            cur = cur.setdefault(key, default)
        elif isinstance(cur, list) and type(key) is int:
            cur.extend([None] * (key + 1 - len(cur)))
            if cur[key] is None:
                cur[key] = default
            cur = cur[key]
        else:
            raise CorruptSourceError(where, f"DCP metadata: object path {path!r} crosses a non-container")
    last = path[-1]
    if isinstance(cur, list) and type(last) is int:
        cur.extend([None] * (last + 1 - len(cur)))
    elif not isinstance(cur, dict):
        raise CorruptSourceError(where, f"DCP metadata: object path {path!r} crosses a non-container")
    cur[last] = value


def _dtype(torch: Any, torch_dtype: Any, fqn: str, path: str) -> DType:
    from ckptfmt.backends.torch import TORCH_DTYPES

    for name, t in TORCH_DTYPES.items():
        if t == torch_dtype:
            return DTYPES[name]
    raise UnsupportedDTypeError(f"{path}: tensor {fqn!r} has dtype {torch_dtype}, which ckptfmt cannot store")


def read_dcp(path: str, *, allow_pickle: bool) -> dict[str, Any]:
    """The consolidated state of a DCP directory: whole (lazy) tensors and values, nested as saved.

    Every entry of the metadata is checked (:func:`_plan`) before the first value is loaded; tensors
    are read only when they are written.
    """
    torch = import_torch()
    meta = read_dcp_metadata(path)
    meta_path = os.path.join(path, METADATA_FILE)
    at = ["the storage index"]
    try:
        plan, mapping, items = _plan(torch, meta, path, at)
    except CheckpointError:
        raise
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, OverflowError) as e:
        raise CorruptSourceError(meta_path, f"DCP metadata: {at[0]} is malformed ({type(e).__name__}: {e})") from None
    state: dict[str, Any] = {}
    for fqn, entry in plan:
        value = entry.load(torch, allow_pickle=allow_pickle) if isinstance(entry, _Item) else entry
        target = mapping.get(fqn)
        if target is None:
            state[fqn] = value
        else:
            _set_path(state, tuple(target), value, meta_path, items)
    return state


def _plan(torch: Any, meta: Any, path: str, at: list[str]) -> tuple[list[tuple[str, Any]], dict[str, Any], int]:
    """``([(fqn, DcpTensor or value _Item)], planner mapping, item count)``, every entry checked."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    meta_path = os.path.join(path, METADATA_FILE)
    storage: dict[tuple[str, tuple[int, ...] | None], Any] = {}
    for index, info in (meta.storage_data or {}).items():
        fqn = getattr(index, "fqn", None)
        if not isinstance(fqn, str):
            raise CorruptSourceError(meta_path, f"DCP metadata: bad storage index {index!r}")
        off = getattr(index, "offset", None)
        storage[(fqn, None if off is None else tuple(int(o) for o in off))] = info
    mapping = meta.planner_data if isinstance(meta.planner_data, dict) else {}
    sizes: dict[str, int | None] = {}
    items = len(meta.state_dict_metadata)
    for fqn, target in mapping.items():  # every path checked before any value is loaded
        at[0] = f"the planner path of {fqn!r}"
        if fqn in meta.state_dict_metadata:
            _set_path({}, tuple(target) if isinstance(target, (list, tuple)) else (), None, meta_path, items)
    plan: list[tuple[str, Any]] = []
    for fqn, md in meta.state_dict_metadata.items():
        at[0] = f"the entry of {fqn!r}"
        if isinstance(md, TensorStorageMetadata):
            shape = tuple(int(n) for n in md.size)
            tdtype = md.properties.dtype
            dtype = _dtype(torch, tdtype, fqn, path)
            parts: dict[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...], _Item]] = {}
            for chunk in md.chunks:
                off, size = tuple(int(o) for o in chunk.offsets), tuple(int(s) for s in chunk.sizes)
                info = storage.get((fqn, off))
                if info is None:
                    raise CorruptSourceError(meta_path, f"tensor {fqn!r}: no storage entry for its chunk at "
                                                        f"{list(off)}")
                parts[off] = (off, size, _Item(path, info, f"tensor {fqn!r} chunk at {list(off)}", sizes))
            plan.append((fqn, DcpTensor(fqn, dtype, tdtype, shape, list(parts.values()), path)))
        elif isinstance(md, BytesStorageMetadata):
            info = storage.get((fqn, None))
            if info is None:
                raise CorruptSourceError(meta_path, f"value {fqn!r}: no storage entry")
            plan.append((fqn, _Item(path, info, f"value {fqn!r}", sizes)))
        else:
            raise CorruptSourceError(meta_path, f"{fqn!r}: unknown storage metadata {type(md).__name__}")
    return plan, mapping, items
