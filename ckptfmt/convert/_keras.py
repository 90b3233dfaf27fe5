"""Keras 3 ``.keras`` archives, read without Keras: a zip of ``config.json``, ``metadata.json`` and
``model.weights.h5``.

The weights file is HDF5 (``layers/<layer path>/vars/<i>``, ``optimizer/vars/<i>``, ``vars``); it is
opened in place inside the zip (Keras stores members uncompressed) through h5py on a read-only window
of the archive, and each dataset becomes a :class:`FileArray` over its bytes in the archive, so nothing
is read until written. The tree is the HDF5 group tree (layer paths as keys, variables keyed
``"0"``, ``"1"``, ... as the generic HDF5 converter gives for a ``.weights.h5`` file); the user
metadata key ``"keras"`` holds ``config`` and ``metadata`` (the parsed JSON members) and ``names``
(each ``vars`` group's ``name`` attribute, by key path). Chunked or compressed datasets (Keras writes
none) are refused rather than decompressed.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any

from .._dtypes import from_numpy
from .._keypath import join
from ..errors import MissingDependencyError, UnsupportedDTypeError
from ._errors import CorruptSourceError, UnsupportedSourceError
from ._lazy import FileArray

__all__ = ["METADATA_KEY", "WEIGHTS", "is_keras", "read_keras"]

WEIGHTS = "model.weights.h5"
METADATA_KEY = "keras"
_MAX_JSON = 64 << 20
_MAX_DEPTH = 64


def is_keras(names: list[str]) -> bool:
    """True for the member names of a Keras 3 archive."""
    return {"config.json", "metadata.json", WEIGHTS} <= set(names)


class _Window(io.RawIOBase):
    """Bytes ``[start, start + size)`` of an open file as a read-only, seekable file object."""

    def __init__(self, f: Any, start: int, size: int) -> None:
        super().__init__()
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self.pos, self.size)[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf: Any) -> int:
        n = max(0, min(len(buf), self.size - self.pos))
        if n == 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buf)[:n])
        self.pos += got
        return int(got)


def member_offset(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start in the archive (after its local header)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise CorruptSourceError(path, f"{info.filename}: broken local zip header")
    return info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")


def _json_member(path: str, zf: zipfile.ZipFile, name: str) -> Any:
    info = zf.getinfo(name)
    if info.file_size > _MAX_JSON:
        raise UnsupportedSourceError(path, f"keras: {name} is {info.file_size} bytes, over the cap of {_MAX_JSON}")
    try:
        with zf.open(info) as f:
            return json.loads(f.read(_MAX_JSON + 1))
    except RecursionError:
        raise CorruptSourceError(path, f"keras: {name} nests too deeply") from None
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        raise CorruptSourceError(path, f"keras: {name} is not valid JSON ({e})") from None


def read_keras(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the weights' group tree of lazy tensors, ``{"keras": {...}}``) of a ``.keras`` archive."""
    try:
        import h5py
    except ImportError as e:
        raise MissingDependencyError("converting .keras files needs h5py: pip install 'ckptfmt[hdf5]'") from e
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CorruptSourceError(path, f"keras: not a readable zip archive ({e})") from None
    with zf:
        config = _json_member(path, zf, "config.json")
        meta = _json_member(path, zf, "metadata.json")
        info = zf.getinfo(WEIGHTS)
        if info.compress_type != zipfile.ZIP_STORED:
            raise UnsupportedSourceError(path, f"keras: {WEIGHTS} is compressed in the archive; Keras stores it "
                                               "uncompressed (re-zip it with ZIP_STORED)")
        start = member_offset(path, zf, info)
    size = os.path.getsize(path)
    if start + info.file_size > size:
        raise CorruptSourceError(path, f"keras: {WEIGHTS} runs past the end of the archive (truncated?)")
    names: dict[str, str] = {}
    with open(path, "rb") as raw:
        window = io.BufferedReader(_Window(raw, start, info.file_size))
        try:
            h5 = h5py.File(window, "r")
        except OSError as e:
            raise CorruptSourceError(path, f"keras: {WEIGHTS} is not a readable HDF5 file ({e})") from None
        with h5:
            tree = _group(path, h5, (), start, info.file_size, names, h5py)
    return tree, {METADATA_KEY: {"config": config, "metadata": meta, "names": names}}


def _group(path: str, g: Any, keys: tuple[str, ...], start: int, limit: int, names: dict[str, str],
           h5py: Any) -> dict[str, Any]:
    if len(keys) > _MAX_DEPTH:
        raise CorruptSourceError(path, f"keras: {WEIGHTS} nests groups deeper than {_MAX_DEPTH}")
    name = g.attrs.get("name")
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    if isinstance(name, str):
        names[join(keys)] = name
    out: dict[str, Any] = {}
    for key in g:
        link = g.get(key, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise UnsupportedSourceError(path, f"keras: {join((*keys, key))} is a {type(link).__name__}; only "
                                               "objects inside the weights file are read")
        obj = g[key]
        where = (*keys, key)
        if isinstance(obj, h5py.Group):
            out[key] = _group(path, obj, where, start, limit, names, h5py)
            continue
        try:
            dtype = from_numpy(obj.dtype)
        except (UnsupportedDTypeError, TypeError, KeyError):
            raise UnsupportedSourceError(path, f"keras: {join(where)} has dtype {obj.dtype}, which ckptfmt cannot "
                                               "store") from None
        offset = obj.id.get_offset()
        nbytes = int(obj.size) * obj.dtype.itemsize
        if nbytes == 0:
            offset = 0
        elif obj.chunks is not None or offset is None:
            raise UnsupportedSourceError(path, f"keras: {join(where)} is chunked or compressed; Keras writes "
                                               "contiguous datasets")
        if offset + nbytes > limit:
            raise CorruptSourceError(path, f"keras: {join(where)} runs past the end of {WEIGHTS}")
        out[key] = FileArray(path, start + offset, dtype, tuple(obj.shape), name=join(where),
                             numpy_dtype=obj.dtype)
    return out
