"""HDF5 export and import (spec/HDF5.md).

:func:`export_hdf5` writes a checkpoint as an HDF5 file that plain ``h5py`` and ``h5dump`` read:
containers become groups, tensors datasets, plain values attributes, and a few ``ckptfmt.*``
attributes record what HDF5 cannot say by itself (key types and order, tuples, ``None``, bytes,
bfloat16/float8), so that :func:`read_hdf5` gives back the exact tree. :func:`read_hdf5` also reads
any other HDF5 file ("foreign": Keras weights, ...): groups become dicts, datasets arrays, attributes
user metadata keyed by the object's HDF5 path.

Datasets are read lazily by default (:class:`DatasetArray`), so that ``ckptfmt.save`` of the
result streams each dataset from the HDF5 file without ever holding a whole tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._atomic import atomic_file
from .._dtypes import DTYPES, DType, from_numpy, numpy_dtype
from .._keypath import join
from .._reader import Checkpoint
from .._tables import TensorRef, ViewRef
from ..errors import (
    CheckpointError,
    MissingDependencyError,
    UnsupportedDTypeError,
    UnsupportedObjectError,
    UnsupportedVersionError,
)
from ._errors import CorruptSourceError, UnsupportedSourceError
from ._lazy import LazyArray

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DEFAULT_MAX_FILL",
    "DatasetArray",
    "METADATA_GROUP",
    "escape_name",
    "export_hdf5",
    "is_hdf5",
    "read_hdf5",
    "unescape_name",
]

#: value of the root attribute ``ckptfmt.format`` that marks an export
FORMAT_NAME = "ckptfmt-hdf5"
#: value of the root attribute ``ckptfmt.version``; a reader refuses a higher one
FORMAT_VERSION = 1
#: the root group member holding the user metadata (a "dict" container of plain values)
METADATA_GROUP = "ckptfmt.metadata"
#: the first bytes of every HDF5 superblock, found at offset 0, 512, 1024, 2048, ...
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

A_FORMAT = "ckptfmt.format"
A_VERSION = "ckptfmt.version"
A_KIND = "ckptfmt.kind"
A_TYPES = "ckptfmt.types"
A_KEYS = "ckptfmt.keys"
A_DTYPE = "ckptfmt.dtype"
_RESERVED_PREFIX = "ckptfmt."
_VALUE_MEMBER = "value"

# member tags of ``ckptfmt.types``
T_GROUP, T_ARRAY, T_SCALAR = "g", "a", "s"
T_INT, T_FLOAT, T_BOOL, T_STR, T_BYTES, T_NONE = "i", "f", "b", "u", "y", "n"
_TAGS = frozenset("gasifbuyn")
_PLAIN_TAGS = frozenset("ifbuyn")

#: how each canonical dtype is stored: the HDF5 (numpy) storage type of its datasets
_STORAGE: dict[str, np.dtype] = {name: np.dtype("<u2" if d.itemsize == 2 else "u1") if d.numpy is None
                                 else np.dtype(d.numpy) for name, d in DTYPES.items()}
#: largest slab written to or read from a dataset at once
_SLAB = 64 << 20
_LITTLE = sys.byteorder == "little"
_ESCAPED = re.compile(r"~(.)?")
#: bytes of fill value (dataset storage never written) an import produces, beyond the file's own size
DEFAULT_MAX_FILL = 64 << 20
#: filters built into every HDF5 library (deflate, shuffle, fletcher32, szip, nbit, scaleoffset) and
#: h5py's lzf; any other would make HDF5 search for and load a plugin: code from outside the file
_BUILTIN_FILTERS = frozenset({1, 2, 3, 4, 5, 6, 32000})
#: soft links followed in one lookup, so that a loop of them ends
_MAX_SOFT_HOPS = 32


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as e:
        raise MissingDependencyError("HDF5 support needs h5py; install it with: pip install 'ckptfmt[hdf5]'") from e
    return h5py


# ------------------------------------------------------------------ names


def escape_name(element: str | int) -> str:
    """The HDF5 link or attribute name of a dict key or list index (spec/HDF5.md §3).

    ``~`` → ``~0``, ``/`` → ``~1``, NUL → ``~2`` (the key-path escaping of FORMAT.md §4.4, plus
    NUL); then a name that is empty, ``.``, or starts with ``ckptfmt.`` gets the prefix ``~.``.
    """
    s = str(element) if type(element) is not str else element
    if "~" in s or "/" in s or "\0" in s:
        s = s.replace("~", "~0").replace("/", "~1").replace("\0", "~2")
    if s in ("", ".") or s.startswith(_RESERVED_PREFIX):
        s = "~." + s
    return s


def unescape_name(name: str) -> str:
    """The text :func:`escape_name` made ``name`` from; ValueError for a name it cannot make."""
    if name.startswith("~."):
        name = name[2:]
        if not (name in ("", ".") or name.startswith(_RESERVED_PREFIX)):
            raise ValueError(f"name {name!r}: '~.' prefixes only '', '.' and names starting with 'ckptfmt.'")
    elif name in ("", ".") or name.startswith(_RESERVED_PREFIX):
        raise ValueError(f"name {name!r} must be written with the prefix '~.'")
    if "~" not in name:
        return name

    def sub(m: re.Match[str]) -> str:
        code = m.group(1)
        if code not in ("0", "1", "2"):
            raise ValueError(f"name {name!r}: '~' must be followed by 0, 1 or 2")
        return {"0": "~", "1": "/", "2": "\0"}[code]

    return _ESCAPED.sub(sub, name)


# ------------------------------------------------------------------ detection


def is_hdf5(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` holds an HDF5 superblock signature (at 0, 512, 1024, ...); needs no h5py."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = 0
            while offset + len(HDF5_SIGNATURE) <= size:
                f.seek(offset)
                if f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else offset * 2
    except (IsADirectoryError, FileNotFoundError, PermissionError):
        return False
    return False


# ------------------------------------------------------------------ export


def _check_options(compression: str | None, compression_opts: int | None, chunks: bool) -> None:
    if compression not in (None, "gzip"):
        raise ValueError(f"compression must be None or 'gzip' (a filter every HDF5 reader has), not {compression!r}")
    if compression_opts is not None:
        if compression is None:
            raise ValueError("compression_opts needs compression='gzip'")
        if type(compression_opts) is not int or not 0 <= compression_opts <= 9:
            raise ValueError(f"compression_opts is the gzip level, an int in 0..9, not {compression_opts!r}")
    if type(chunks) is not bool:
        raise ValueError(f"chunks must be True or False, not {chunks!r}")


def _libver(h5py: Any) -> Any:
    # v108: dense attribute storage (groups with many attributes, large attributes);
    # v110 at most, so that HDF5 1.10 tools (h5dump) read every file.
    return ("v108", "v110") if h5py.version.hdf5_version_tuple >= (1, 10, 2) else ("v108", "latest")


def export_hdf5(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, compression: str | None = None,
                compression_opts: int | None = None, chunks: bool = False,
                progress: Callable[[int], None] | None = None) -> None:
    """Write the checkpoint ``src`` as the HDF5 file ``dst`` (layout: spec/HDF5.md), atomically.

    Tensors are read one at a time (verified against their checksums) and written as datasets in
    slabs, so memory stays bounded. ``compression="gzip"`` (level ``compression_opts``, 0-9) and
    ``chunks=True`` (h5py's automatic chunk shape) apply to every non-empty dataset of rank ≥ 1.
    ``progress(nbytes)`` is called after each dataset. A tensor referenced twice is stored once and
    hard-linked; views of shared storage (FORMAT.md §4.7) are stored as datasets of their own.
    """
    h5py = _h5py()
    _check_options(compression, compression_opts, chunks)
    options: dict[str, Any] = {}
    if compression is not None:
        options["compression"] = compression
        if compression_opts is not None:
            options["compression_opts"] = compression_opts
    if chunks or compression is not None:
        options["chunks"] = True
    # the one atomic-file helper: a locked temporary (exclusive, NAME_MAX-safe), fsync, rename, directory
    # fsync; written through a file object, so HDF5 never opens the temporary by name itself
    with Checkpoint(src) as ckpt, atomic_file(dst) as out, h5py.File(out, "w", libver=_libver(h5py)) as f:
        f.attrs[A_FORMAT] = FORMAT_NAME
        f.attrs[A_VERSION] = np.int64(FORMAT_VERSION)
        writer = _Writer(h5py, f, ckpt, options, progress)
        writer.container(f, ckpt.manifest.tree, (), tree=True, root=True)
        if ckpt.metadata:
            writer.container(f.create_group(METADATA_GROUP), ckpt.metadata, (), tree=False)


class _Writer:
    """Walks a decoded checkpoint tree and writes groups, datasets and attributes."""

    def __init__(self, h5py: Any, f: Any, ckpt: Checkpoint, options: dict[str, Any],
                 progress: Callable[[int], None] | None) -> None:
        self.h5py = h5py
        self.f = f
        self.ckpt = ckpt
        self.options = options
        self.progress = progress
        self.written: dict[tuple[str, int], str] = {}  # ("row"|"scalar"|"view", index) -> HDF5 path
        self.verified: set[int] = set()
        self.bases: dict[int, np.ndarray] = {}

    def container(self, g: Any, node: Any, path: tuple[str | int, ...], *, tree: bool, root: bool = False) -> None:
        """Write ``node`` (a dict, list or tuple; at the root also a single value) into group ``g``."""
        t = type(node)
        if t is dict:
            g.attrs[A_KIND] = "dict"
            g.attrs[A_KEYS] = json.dumps(list(node), ensure_ascii=False)
            items: Iterator[tuple[str | int, Any]] = iter(node.items())
        elif t is list or t is tuple:
            g.attrs[A_KIND] = "list" if t is list else "tuple"
            items = enumerate(node)
        else:
            assert root
            g.attrs[A_KIND] = "value"
            items = iter([(_VALUE_MEMBER, node)])
        tags = []
        for k, v in items:
            name = _VALUE_MEMBER if t not in (dict, list, tuple) else escape_name(k)
            sub = path if t not in (dict, list, tuple) else (*path, k)
            tags.append(self.member(g, name, v, sub, tree=tree))
        g.attrs[A_TYPES] = "".join(tags)

    def member(self, g: Any, name: str, v: Any, path: tuple[str | int, ...], *, tree: bool) -> str:
        """Write one member of a container; return its tag."""
        t = type(v)
        if t is dict or t is list or t is tuple:
            self.container(g.create_group(name), v, path, tree=tree)
            return T_GROUP
        if tree:
            if t is int:
                self.dataset(g, name, ("row", v), path)
                return T_ARRAY
            if t is TensorRef:
                self.dataset(g, name, ("scalar", v.index), path)
                return T_SCALAR
            if t is ViewRef:
                self.dataset(g, name, ("view", v.index), path)
                return T_ARRAY
        return self.plain(g.attrs, name, v, path)

    def plain(self, attrs: Any, name: str, v: Any, path: tuple[str | int, ...]) -> str:
        """Write a plain value as the attribute ``name``; return its tag."""
        if v is None:
            attrs[name] = self.h5py.Empty("u1")
            return T_NONE
        if isinstance(v, bool):
            attrs[name] = np.bool_(v)
            return T_BOOL
        if isinstance(v, int):  # int and PlainInt
            if not -(1 << 63) <= v < (1 << 64):
                raise UnsupportedObjectError(f"{join(path)!r}: int {v} does not fit in 64 bits")
            attrs[name] = np.int64(v) if v < (1 << 63) else np.uint64(v)
            return T_INT
        if isinstance(v, float):
            attrs[name] = np.float64(v)
            return T_FLOAT
        if isinstance(v, str):
            if "\0" in v:  # variable-length HDF5 strings end at the first NUL
                attrs[name] = np.frombuffer(v.encode("utf-8"), dtype=np.uint8)
            else:
                attrs.create(name, v, dtype=self.h5py.string_dtype("utf-8"))
            return T_STR
        if isinstance(v, bytes):
            attrs[name] = np.frombuffer(v, dtype=np.uint8)
            return T_BYTES
        raise UnsupportedObjectError(f"{join(path)!r}: cannot store a {type(v).__name__} in HDF5")

    def _row(self, row: int) -> np.ndarray:
        arr = self.bases.get(row)
        if arr is None:
            arr = self.ckpt.read_rows([row], verify=row not in self.verified)[row]
            self.verified.add(row)
        return arr

    def _array(self, what: tuple[str, int]) -> tuple[np.ndarray, str]:
        kind, index = what
        if kind != "view":
            entry = self.ckpt.entry(index)
            return self._row(index), entry.dtype
        v = self.ckpt.manifest.views.entry(index)
        if v.dtype not in DTYPES:
            raise UnsupportedDTypeError(f"{self.ckpt.path}: a view has dtype {v.dtype!r}, unknown to this reader")
        base = self._row(v.base)
        self.bases[v.base] = base  # views of one base read and verify it once
        raw = base.reshape(-1).view(np.uint8)
        arr = np.ndarray(v.shape, dtype=numpy_dtype(DTYPES[v.dtype]), buffer=raw, offset=v.offset,
                         strides=v.strides)
        return arr, v.dtype

    def dataset(self, g: Any, name: str, what: tuple[str, int], path: tuple[str | int, ...]) -> None:
        """Write a tensor (or hard-link the dataset already written for it)."""
        first = self.written.get(what)
        if first is not None:
            g[name] = self.f[first]  # a hard link: the same dataset under a second name
            return
        arr, dtype_name = self._array(what)
        if dtype_name not in DTYPES:  # read_rows raised already for rows; views are checked above
            raise UnsupportedDTypeError(f"{join(path)!r}: dtype {dtype_name!r} is unknown to this writer")
        storage = _STORAGE[dtype_name]
        data = arr if arr.dtype == storage else arr.view(storage)
        options = self.options if data.ndim and data.size else {}
        ds = g.create_dataset(name, shape=data.shape, dtype=storage, track_times=False, **options)
        ds.attrs[A_DTYPE] = dtype_name
        if data.size:
            _write_slabs(ds, data, ())
        self.written[what] = ds.name
        if self.progress is not None:
            self.progress(int(data.nbytes))


def _write_slabs(ds: Any, arr: np.ndarray, index: tuple[int, ...]) -> None:
    """``ds[index] = arr``, in pieces of at most about :data:`_SLAB` bytes."""
    if arr.ndim == 0:
        ds[index if index else ()] = arr
        return
    if arr.nbytes <= _SLAB:
        ds[index if index else ...] = arr
        return
    row = arr.nbytes // arr.shape[0]
    if row > _SLAB:
        for i in range(arr.shape[0]):
            _write_slabs(ds, arr[i], (*index, i))
        return
    step = max(1, _SLAB // row)
    for i in range(0, arr.shape[0], step):
        sel = (*index, slice(i, i + step))
        ds[sel] = arr[i : i + step]


# ------------------------------------------------------------------ import


def read_hdf5(path: str | os.PathLike[str], *, lazy: bool = True,
              max_fill_bytes: int | None = None) -> tuple[Any, dict[str, Any]]:
    """``(tree, user_metadata)`` of any HDF5 file, ready for ``ckptfmt.save(dst, tree, metadata=...)``.

    A file written by :func:`export_hdf5` gives back the exported tree exactly (key types, tuples,
    plain values, dtypes including bfloat16/float8) and its user metadata. Any other file maps by
    spec/HDF5.md §9: groups → dicts, datasets → arrays (strings → str), attributes → metadata
    ``{hdf5_path: {name: value}}``.

    With ``lazy`` (the default) non-empty numeric datasets come back as :class:`DatasetArray`
    leaves that read the file when saved (the file stays open while one of them lives); otherwise
    as numpy arrays read now.

    The import never opens another file and never loads a filter plugin (spec/HDF5.md §9.1):
    external links, datasets stored in external files, virtual datasets and filters that are not
    built into HDF5 are refused (:class:`UnsupportedSourceError`). ``max_fill_bytes`` caps the bytes
    of dataset storage that was never written, which HDF5 reads as the fill value, over the whole
    import (default: :data:`DEFAULT_MAX_FILL` plus the file's size), so a small file cannot expand
    without bound.
    """
    h5py = _h5py()
    p = os.fspath(path)
    try:
        f = h5py.File(p, "r")
    except FileNotFoundError:
        raise
    except OSError as e:
        if os.path.isfile(p):
            raise CorruptSourceError(p, f"not a readable HDF5 file ({e})") from e
        raise
    fill = DEFAULT_MAX_FILL + os.path.getsize(p) if max_fill_bytes is None else int(max_fill_bytes)
    reader = _Reader(h5py, f, p, lazy, fill)
    try:
        fmt = f.attrs.get(A_FORMAT)
        reader.enter(f, "/", set())
        if fmt is None:
            return reader.foreign_group(f, "/", set()), reader.meta
        return reader.own(fmt)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise CorruptSourceError(p, f"{reader.at}: HDF5 cannot read it ({type(e).__name__}: {e})") from None
    finally:
        if not reader.keep_open:
            f.close()


_MISSING = object()


def _text(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else value


class _Reader:
    def __init__(self, h5py: Any, f: Any, path: str, lazy: bool, fill: int) -> None:
        self.h5py = h5py
        self.f = f
        self.path = path
        self.lazy = lazy
        self.keep_open = False
        self.meta: dict[str, Any] = {}
        self.made: dict[Any, Any] = {}  # HDF5 object id -> value, so hard links give one object
        self.groups: dict[Any, str] = {}  # HDF5 group id -> the path it was first reached by
        self.fill_cap = self.fill_left = fill
        self.at = "/"  # the object being read, for errors HDF5 raises

    def bad(self, where: str, message: str) -> CorruptSourceError:
        return CorruptSourceError(self.path, f"{where}: {message}")

    def refuse(self, where: str, message: str) -> UnsupportedSourceError:
        return UnsupportedSourceError(self.path, f"{where}: {message}")

    # -- links, resolved one name at a time so that no lookup ever leaves the file
    def child(self, g: Any, name: str, where: str) -> Any:
        """The group or dataset the link ``name`` of ``g`` names; None for a dangling soft link or a datatype."""
        self.at = where
        oid = self.lookup(g.id, name.encode("utf-8", "surrogateescape"), where, [0])
        return None if oid is None else self.wrap(oid)

    def wrap(self, oid: Any) -> Any:
        h5py = self.h5py
        if isinstance(oid, h5py.h5g.GroupID):
            return h5py.Group(oid)
        if isinstance(oid, h5py.h5d.DatasetID):
            return h5py.Dataset(oid)
        return None  # a committed datatype

    def lookup(self, gid: Any, name: bytes, where: str, hops: list[int]) -> Any:
        """The low-level id of what link ``name`` of group ``gid`` names (None if nothing): hard and soft
        links only; an external or user-defined link is refused, never followed."""
        h5l = self.h5py.h5l
        links = gid.links
        if not links.exists(name):
            return None
        info = links.get_info(name)
        if info.type == h5l.TYPE_HARD:
            return self.h5py.h5o.open(gid, name)
        if info.type == h5l.TYPE_SOFT:
            hops[0] += 1
            if hops[0] > _MAX_SOFT_HOPS:
                raise self.bad(where, f"more than {_MAX_SOFT_HOPS} soft links to resolve one name (a loop of them?)")
            target = links.get_val(name)
            cur = self.h5py.h5g.open(self.f.id, b"/") if target.startswith(b"/") else gid
            for part in target.split(b"/"):
                if part in (b"", b"."):
                    continue
                if not isinstance(cur, self.h5py.h5g.GroupID):
                    return None
                cur = self.lookup(cur, part, where, hops)
                if cur is None:
                    return None
            return cur
        if info.type == h5l.TYPE_EXTERNAL:
            file, obj = links.get_val(name)
            raise self.refuse(where, f"an external link to {_text(obj)!r} in the file {_text(file)!r}; an HDF5 "
                                     "import never opens another file (copy the data into this file with h5copy)")
        raise self.refuse(where, f"a user-defined link (type {info.type}), which an import does not follow")

    def enter(self, g: Any, where: str, stack: set[Any], *, export: bool = False) -> None:
        """Record that group ``g`` is read at ``where``; a group reached by a second path is refused."""
        first = self.groups.get(g.id)
        if first is not None:
            if g.id in stack:
                raise self.bad(where, f"a link makes a cycle of groups (back to {first}); the file is not a tree")
            make = self.bad if export else self.refuse
            raise make(where, f"this group is also linked at {first}; a ckptfmt tree cannot hold one group at two "
                              "places (a dataset can), so an import refuses it")
        if len(stack) > 256:
            raise self.bad(where, "groups nest deeper than 256")
        self.groups[g.id] = where

    def check_storage(self, ds: Any, where: str) -> None:
        """Refuse data kept outside the file or behind a plugin; charge never-written storage to the fill cap."""
        h5d = self.h5py.h5d
        self.at = where
        dcpl = ds.id.get_create_plist()
        layout = dcpl.get_layout()
        if layout == h5d.VIRTUAL:
            raise self.refuse(where, "a virtual dataset (its data are mapped from other datasets, often in other "
                                     "files); an HDF5 import never opens another file")
        if dcpl.get_external_count():
            raise self.refuse(where, f"the dataset's raw data are stored in the external file "
                                     f"{_text(dcpl.get_external(0)[0])!r}; an HDF5 import never opens another file")
        for i in range(dcpl.get_nfilters()):
            code, _, _, label = dcpl.get_filter(i)
            if code not in _BUILTIN_FILTERS:
                raise self.refuse(where, f"the dataset uses the HDF5 filter {code} ({_text(label)!r}), which is not "
                                         "built into HDF5: reading it would load a plugin")
        if ds.shape is None:
            return
        nbytes = math.prod(ds.shape) * ds.dtype.itemsize
        missing = 0
        if layout == h5d.CHUNKED:
            chunk = dcpl.get_chunk()
            total = math.prod(-(-n // c) for n, c in zip(ds.shape, chunk, strict=True))
            per = math.prod(chunk) * ds.dtype.itemsize
            missing = min(nbytes, (total - ds.id.get_num_chunks()) * per)
        elif layout == h5d.CONTIGUOUS:
            missing = max(0, nbytes - ds.id.get_storage_size())
        if missing > self.fill_left:
            raise self.refuse(where, f"{missing} bytes of the dataset were never written (HDF5 reads them as the "
                                     f"fill value), which takes the import over its cap of {self.fill_cap} bytes "
                                     "of fill (max_fill_bytes= raises it)")
        self.fill_left -= missing

    # -- our own exports
    def own(self, fmt: Any) -> tuple[Any, dict[str, Any]]:
        f = self.f
        if _text(fmt) != FORMAT_NAME:
            raise self.bad("/", f"attribute {A_FORMAT} is {fmt!r}, not {FORMAT_NAME!r}")
        version = f.attrs.get(A_VERSION)
        if not isinstance(version, (int, np.integer)) or isinstance(version, (bool, np.bool_)):
            raise self.bad("/", f"attribute {A_VERSION} is {version!r}, not an integer")
        if version != FORMAT_VERSION:
            raise UnsupportedVersionError(self.path, f"ckptfmt-hdf5 version {int(version)}; this reader reads "
                                                     f"version {FORMAT_VERSION} (upgrade ckptfmt)")
        tree = self.container(f, "/", tree=True, root=True)
        meta: dict[str, Any] = {}
        where = f"/{METADATA_GROUP}"
        g = self.child(f, METADATA_GROUP, where)
        if g is not None:
            if not isinstance(g, self.h5py.Group):
                raise self.bad(where, "the metadata is not a group")
            self.enter(g, where, set(), export=True)
            meta = self.container(g, where, tree=False)
            if type(meta) is not dict:
                raise self.bad(where, "the metadata is not a dict")
        return tree, meta

    def container(self, g: Any, where: str, *, tree: bool, root: bool = False, depth: int = 0) -> Any:
        self.at = where
        if depth > 256:
            raise self.bad(where, "groups nest deeper than 256")
        kind = _text(g.attrs.get(A_KIND))
        types = _text(g.attrs.get(A_TYPES))
        if not isinstance(types, str) or not set(types) <= (_TAGS if tree else _PLAIN_TAGS | {T_GROUP}):
            raise self.bad(where, f"attribute {A_TYPES} is {types!r}, not a string of member tags")
        names: list[str]
        keys: list[Any] = []
        if kind == "dict":
            raw = _text(g.attrs.get(A_KEYS))
            try:
                found = json.loads(raw) if isinstance(raw, str) else None
            except (ValueError, RecursionError):
                found = None
            if type(found) is not list or any(type(k) not in (str, int) for k in found):
                raise self.bad(where, f"attribute {A_KEYS} is not a JSON array of str and int keys")
            keys = found
            if len({str(k) for k in keys}) != len(keys):
                raise self.bad(where, f"attribute {A_KEYS} repeats a key")
            names = [escape_name(k) for k in keys]
        elif kind == "list" or (kind == "tuple" and tree) or (kind == "value" and root and tree):
            names = [str(i) for i in range(len(types))] if kind != "value" else [_VALUE_MEMBER]
        else:
            raise self.bad(where, f"attribute {A_KIND} is {kind!r}, not dict, list or tuple")
        if len(names) != len(types):
            raise self.bad(where, f"{len(types)} member tags for {len(names)} members")
        values = [self.member(g, where, name, tag, tree=tree, depth=depth)
                  for name, tag in zip(names, types, strict=True)]
        if kind == "dict":
            return dict(zip(keys, values, strict=True))
        if kind == "list":
            return values
        if kind == "tuple":
            return tuple(values)
        return values[0]

    def member(self, g: Any, parent: str, name: str, tag: str, *, tree: bool, depth: int) -> Any:
        h5py = self.h5py
        where = f"{parent.rstrip('/')}/{name}"
        if tag in _PLAIN_TAGS:
            if name not in g.attrs:
                raise self.bad(parent, f"attribute {name!r} is missing")
            return self.plain(g.attrs[name], tag, f"{parent} attribute {name!r}")
        obj = self.child(g, name, where)
        if tag == T_GROUP:
            if not isinstance(obj, h5py.Group):
                raise self.bad(where, "expected a group")
            self.enter(obj, where, set(), export=True)
            return self.container(obj, where, tree=tree, depth=depth + 1)
        if not isinstance(obj, h5py.Dataset):
            raise self.bad(where, "expected a dataset")
        key = (obj.id, tag)
        hit = self.made.get(key, _MISSING)
        if hit is _MISSING:
            self.check_storage(obj, where)
            hit = self.own_dataset(obj, where, scalar=tag == T_SCALAR)
            self.made[key] = hit
        return hit

    def plain(self, v: Any, tag: str, where: str) -> Any:
        h5py = self.h5py
        if tag == T_NONE:
            if not isinstance(v, h5py.Empty):
                raise self.bad(where, "None is stored as an attribute with a null dataspace")
            return None
        if isinstance(v, h5py.Empty):
            raise self.bad(where, f"a null attribute tagged {tag!r}")
        if tag == T_INT:
            if not isinstance(v, np.integer) or isinstance(v, np.bool_):
                raise self.bad(where, f"expected an integer, found {type(v).__name__}")
            return int(v)
        if tag == T_FLOAT:
            if not isinstance(v, np.floating):
                raise self.bad(where, f"expected a float, found {type(v).__name__}")
            return float(v)
        if tag == T_BOOL:
            if not isinstance(v, (np.bool_, np.integer)):
                raise self.bad(where, f"expected a bool, found {type(v).__name__}")
            return bool(v)
        if tag == T_STR:
            if isinstance(v, str):
                return v
            if isinstance(v, (bytes, np.bytes_)):
                return bytes(v).decode("utf-8")
            if isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 1:
                return v.tobytes().decode("utf-8")
            raise self.bad(where, f"expected a string, found {type(v).__name__}")
        # T_BYTES
        if isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 1:
            return v.tobytes()
        raise self.bad(where, f"expected bytes (a 1-D uint8 array), found {type(v).__name__}")

    def own_dataset(self, ds: Any, where: str, *, scalar: bool) -> Any:
        name = _text(ds.attrs.get(A_DTYPE))
        if not isinstance(name, str):
            raise self.bad(where, f"dataset has no {A_DTYPE} attribute")
        dtype = DTYPES.get(name)
        if dtype is None:
            raise UnsupportedDTypeError(f"{self.path}: dataset {where!r} has dtype {name!r}, unknown to this reader; "
                                        "upgrade ckptfmt")
        storage = _STORAGE[name]
        found = ds.dtype
        if found.kind != storage.kind or found.itemsize != storage.itemsize or found.fields is not None:
            raise self.bad(where, f"dtype {name} is stored as {storage}, found {found}")
        if ds.shape is None:
            raise self.bad(where, "a tensor dataset has a null dataspace")
        if scalar:
            if ds.shape != ():
                raise self.bad(where, f"an array scalar has shape {ds.shape}")
            return self.materialize(ds, dtype)[()]
        return self.array(ds, dtype)

    # -- datasets of either kind
    def materialize(self, ds: Any, dtype: DType) -> np.ndarray:
        data = np.asarray(ds[()])
        storage = _STORAGE[dtype.name]
        if data.dtype != storage:
            data = data.astype(storage)
        target = numpy_dtype(dtype)
        return data if data.dtype == target else data.view(target)

    def array(self, ds: Any, dtype: DType) -> Any:
        if not self.lazy or ds.size == 0:
            return self.materialize(ds, dtype)
        self.keep_open = True
        return DatasetArray(self.f, ds, dtype, _STORAGE[dtype.name], path=self.path)

    # -- foreign files
    def attrs(self, obj: Any, where: str) -> None:
        self.at = where
        if len(obj.attrs) == 0:
            return
        out: dict[str, Any] = {}
        for name in obj.attrs:
            try:
                value = obj.attrs[name]
            except (OSError, TypeError, ValueError):  # a type h5py cannot read
                continue
            out[name] = self.to_plain(value)
        self.meta[where] = out

    def to_plain(self, v: Any) -> Any:
        h5py = self.h5py
        if isinstance(v, h5py.Empty) or v is None:
            return None
        if isinstance(v, str):
            return str(v)  # np.str_ too
        if isinstance(v, (bool, int, float)) and not isinstance(v, np.generic):  # np.float64 is a float
            return v
        if isinstance(v, (bytes, np.bytes_)):
            try:
                return bytes(v).decode("utf-8")
            except UnicodeDecodeError:
                return bytes(v)
        if isinstance(v, np.ndarray):
            if v.dtype.fields is not None:
                return [self.to_plain(x) for x in v.reshape(-1)] if v.ndim else self.to_plain(v[()])
            return self.to_plain(v.tolist())
        if isinstance(v, list):
            return [self.to_plain(x) for x in v]
        if isinstance(v, np.void):
            if v.dtype.fields is not None:
                return {f: self.to_plain(v[f]) for f in v.dtype.names or ()}
            return bytes(v.tobytes())
        if isinstance(v, np.bool_):
            return bool(v)
        if isinstance(v, np.integer):
            return int(v)
        if isinstance(v, np.floating):
            return float(v)
        if isinstance(v, (complex, np.complexfloating)):
            return [float(v.real), float(v.imag)]
        if isinstance(v, h5py.Reference):
            try:
                return self.f[v].name
            except (KeyError, ValueError, OSError):
                return None
        return repr(v)

    def foreign_group(self, g: Any, where: str, stack: set[Any]) -> dict[str, Any]:
        """A group as a dict; each group is entered once (:meth:`enter`), so the walk is linear in the objects."""
        h5py = self.h5py
        self.attrs(g, where)
        out: dict[str, Any] = {}
        stack.add(g.id)
        for raw in g.id:  # link names (bytes), in h5py's order
            name = raw.decode("utf-8", "surrogateescape")
            at = f"{where.rstrip('/')}/{name}"
            obj = self.child(g, name, at)
            if isinstance(obj, h5py.Group):
                self.enter(obj, at, stack)
                out[name] = self.foreign_group(obj, at, stack)
            elif isinstance(obj, h5py.Dataset):
                hit = self.made.get(obj.id, _MISSING)
                if hit is _MISSING:
                    self.attrs(obj, at)
                    self.check_storage(obj, at)
                    hit = self.foreign_dataset(obj, at)
                    self.made[obj.id] = hit
                out[name] = hit
            # None: a dangling soft link or a committed datatype, left out
        stack.discard(g.id)
        return out

    def foreign_dataset(self, ds: Any, where: str) -> Any:
        h5py = self.h5py
        if ds.shape is None:
            return None
        dt = ds.dtype
        if h5py.check_string_dtype(dt) is not None or (dt.kind == "V" and dt.fields is None) or dt.kind == "S":
            value = ds[()]
            return self.to_plain(value.tolist() if isinstance(value, np.ndarray) else value)
        if dt.fields is not None:  # a compound that is not complex: a dict of its fields' arrays
            data = ds[()]
            return {name: self.foreign_fields(np.asarray(data[name]), f"{where}:{name}") for name in dt.fields}
        if dt.kind not in "biufc":
            raise UnsupportedDTypeError(f"{self.path}: dataset {where!r} has HDF5 type {dt}, which has no "
                                        "ckptfmt equivalent")
        le = dt.newbyteorder("<") if dt.byteorder == ">" or (dt.byteorder == "=" and not _LITTLE) else dt
        try:
            dtype = from_numpy(np.dtype(le.str))
        except UnsupportedDTypeError:
            raise UnsupportedDTypeError(f"{self.path}: dataset {where!r} has numpy type {dt}, which has no "
                                        f"ckptfmt equivalent") from None
        if not self.lazy or ds.size == 0:
            data = np.asarray(ds[()])
            return data.astype(numpy_dtype(dtype), copy=False)
        self.keep_open = True
        return DatasetArray(self.f, ds, dtype, numpy_dtype(dtype), path=self.path)

    def foreign_fields(self, arr: np.ndarray, where: str) -> Any:
        if arr.dtype.fields is not None:
            return {name: self.foreign_fields(np.asarray(arr[name]), f"{where}:{name}") for name in arr.dtype.fields}
        if arr.dtype.kind in "biufc":
            le = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
            return np.ascontiguousarray(arr, dtype=le)
        return self.to_plain(arr.tolist())


class DatasetArray(LazyArray):
    """An HDF5 dataset whose bytes are read only when the checkpoint writer asks for them.

    ``storage`` is the numpy type whose little-endian bytes are the tensor's (``uint16`` for
    bfloat16, ...). Holds the open h5py file, so the file stays open as long as the array lives.
    """

    def __init__(self, f: Any, ds: Any, dtype: DType, storage: np.dtype, *, path: str = "") -> None:
        self.path = path or f.filename
        self.dtype = dtype
        self.shape = tuple(int(n) for n in ds.shape)
        self.name = ds.name
        self._file = f
        self._ds = ds
        self._storage = storage

    def read_bytes(self, offset: int, n: int) -> np.ndarray:
        """Bytes ``[offset, offset + n)`` of the tensor in C order (whole elements), as a flat uint8 array."""
        size = self._storage.itemsize
        if offset % size or n % size:
            raise ValueError(f"unaligned read of {n} bytes at {offset} from a dataset of itemsize {size}")
        try:
            data = _read_elements(self._ds, self.shape, offset // size, (offset + n) // size, ())
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise CorruptSourceError(self.path, f"{self.name}: HDF5 cannot read bytes [{offset}, {offset + n}) "
                                                f"({type(e).__name__}: {e})") from None
        if data.dtype != self._storage:
            data = data.astype(self._storage)
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """The bytes in C order, little-endian, as uint8 arrays of at most ``limit`` bytes (whole elements)."""
        size = self._storage.itemsize
        step = max(limit - limit % size, size)
        total = self.nbytes
        for start in range(0, total, step):
            yield self.read_bytes(start, min(step, total - start))

    def numpy(self) -> np.ndarray:
        """The whole tensor, read now, as a numpy array of its dtype (``ml_dtypes`` types or raw bytes)."""
        raw = self.read_bytes(0, self.nbytes) if self.nbytes else np.empty(0, np.uint8)
        return raw.view(numpy_dtype(self.dtype)).reshape(self.shape)


def _read_elements(ds: Any, shape: tuple[int, ...], a: int, b: int, index: tuple[int, ...]) -> np.ndarray:
    """Elements ``[a, b)`` in C order of the part ``ds[index]`` (of shape ``shape``), as a 1-D array."""
    if not shape:
        return np.asarray(ds[()]).reshape(-1)
    if len(shape) == 1:
        sel = (*index, slice(a, b))
        return np.asarray(ds[sel]).reshape(-1)
    inner = math.prod(shape[1:])
    first, last = a // inner, (b - 1) // inner
    if first == last:
        return _read_elements(ds, shape[1:], a - first * inner, b - first * inner, (*index, first))
    parts = []
    lo, hi = first, last + 1
    if a % inner:
        parts.append(_read_elements(ds, shape[1:], a % inner, inner, (*index, first)))
        lo += 1
    tail = None
    if b % inner:
        tail = _read_elements(ds, shape[1:], 0, b % inner, (*index, last))
        hi -= 1
    if hi > lo:
        sel = (*index, slice(lo, hi))
        parts.append(np.asarray(ds[sel]).reshape(-1))
    if tail is not None:
        parts.append(tail)
    return np.concatenate(parts)
