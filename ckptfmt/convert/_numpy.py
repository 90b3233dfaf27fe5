"""numpy ``.npy`` and ``.npz`` sources, read lazily.

An ``.npy`` file and every stored (uncompressed) ``.npz`` member become a :class:`FileArray` over
their bytes in the file; a compressed member is decompressed while it is written, a bounded piece at
a time. Arrays of Python objects are pickles: refused unless ``allow_pickle``.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from .._dtypes import DType, from_numpy
from .._writer import contiguous_chunks
from ..errors import UnsupportedDTypeError
from ._errors import CorruptSourceError, UnsafePickleError, UnsupportedSourceError
from ._lazy import FileArray, LazyArray

__all__ = ["read_npy", "read_npz"]

_NPY_MAGIC = b"\x93NUMPY"
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header, 30 bytes
_PICKLE_HINT = ("its elements are Python objects, stored as a pickle, which can run code when loaded; pass "
                "allow_pickle=True (UNSAFE: only for files you trust) to convert what the pickle holds")


def _header(f: IO[bytes], path: str, what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Parse an npy header at ``f``'s position (which ends after it)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise UnsupportedSourceError(path, f"{what}: npy format version {version[0]}.{version[1]} is not "
                                               "supported (only 1.0 and 2.0)")
    except (ValueError, SyntaxError, EOFError) as e:
        raise CorruptSourceError(path, f"{what}: not a valid npy header ({e})") from None
    return tuple(shape), bool(fortran), dtype


def _canonical(dtype: np.dtype, path: str, what: str) -> DType:
    try:
        return from_numpy(dtype)
    except UnsupportedDTypeError as e:
        raise UnsupportedDTypeError(f"{path}: {what}: {e}") from None


def _unpickled(arr: np.ndarray) -> Any:
    """An object array as what it holds: a 0-d array as its element, others as nested lists."""
    return arr.item() if arr.ndim == 0 else arr.tolist()


def read_npy(path: str, *, allow_pickle: bool) -> Any:
    """The array of an ``.npy`` file, as a lazy array (or, for an object array, what it holds)."""
    with open(path, "rb") as f:
        shape, fortran, dtype = _header(f, path, "npy")
        offset = f.tell()
    if dtype.hasobject:
        if not allow_pickle:
            raise UnsafePickleError(path, f"the array has dtype object: {_PICKLE_HINT}")
        return _unpickled(np.load(path, allow_pickle=True))
    canonical = _canonical(dtype, path, "npy")
    return FileArray(path, offset, canonical, shape, numpy_dtype=dtype, fortran_order=fortran)


def _member_key(name: str) -> str:
    return name[:-4] if name.endswith(".npy") else name


def read_npz(path: str, *, allow_pickle: bool) -> dict[str, Any]:
    """``{key: array}`` of an ``.npz`` archive, in archive order (keys as ``numpy.load`` gives them)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CorruptSourceError(path, f"not a readable zip archive ({e})") from None
    out: dict[str, Any] = {}
    with zf, open(path, "rb") as raw:
        size = raw.seek(0, 2)
        for info in zf.infolist():
            if info.is_dir():
                continue
            key = _member_key(info.filename)
            if key in out:
                raise CorruptSourceError(path, f"member {info.filename!r} appears twice")
            if info.flag_bits & 0x1:
                raise UnsupportedSourceError(path, f"member {info.filename!r} is encrypted")
            out[key] = _member(zf, info, raw, size, path, key, allow_pickle=allow_pickle)
    return out


def _member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, raw: IO[bytes], size: int, path: str, key: str, *,
            allow_pickle: bool) -> Any:
    what = f"member {info.filename!r}"
    try:
        with zf.open(info) as m:
            head = m.read(len(_NPY_MAGIC))
            if head != _NPY_MAGIC:  # numpy.load returns such members as their bytes
                return head + m.read()
    except CorruptSourceError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CorruptSourceError(path, f"{what}: {e}") from None
    if info.compress_type == zipfile.ZIP_STORED:
        raw.seek(info.header_offset)
        local = raw.read(_LOCAL_HEADER.size)
        if len(local) != _LOCAL_HEADER.size or local[:4] != b"PK\x03\x04":
            raise CorruptSourceError(path, f"{what}: bad local file header at byte {info.header_offset}")
        fields = _LOCAL_HEADER.unpack(local)
        start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        raw.seek(start)
        shape, fortran, dtype = _header(raw, path, what)
        offset = raw.tell()
        if not dtype.hasobject:
            arr = FileArray(path, offset, _canonical(dtype, path, what), shape, name=key, numpy_dtype=dtype,
                            fortran_order=fortran, file_size=size)
            if offset - start + arr.nbytes > info.file_size:
                raise CorruptSourceError(path, f"{what}: the array is larger than the member")
            return arr
    else:
        with zf.open(info) as m:
            shape, fortran, dtype = _header(m, path, what)
    if dtype.hasobject:
        if not allow_pickle:
            raise UnsafePickleError(path, f"{what} has dtype object: {_PICKLE_HINT}")
        with zf.open(info) as m:
            return _unpickled(np.lib.format.read_array(m, allow_pickle=True))
    return ZipMemberArray(path, info.filename, _canonical(dtype, path, what), shape, dtype, fortran)


class ZipMemberArray(LazyArray):
    """A compressed ``.npz`` member, decompressed while it is written."""

    def __init__(self, path: str, member: str, dtype: DType, shape: tuple[int, ...], numpy_dtype: np.dtype,
                 fortran_order: bool) -> None:
        self.path = path
        self.member = member
        self.dtype = dtype
        self.shape = tuple(int(n) for n in shape)
        self.numpy_dtype = numpy_dtype
        self.fortran_order = fortran_order and len(self.shape) > 1

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """Decompress ``limit`` bytes at a time (whole, for a Fortran-order array)."""
        what = f"member {self.member!r}"
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as m:
                _header(m, self.path, what)
                if self.fortran_order:  # C order needs all of it: one array at a time
                    data = m.read(self.nbytes)
                    if len(data) != self.nbytes:
                        raise CorruptSourceError(self.path, f"{what}: the member ends before the array does")
                    arr = np.frombuffer(data, dtype=self.numpy_dtype).reshape(self.shape, order="F")
                    yield from contiguous_chunks(arr, limit)
                    m.read()
                    return
                step = max(self.itemsize, limit - limit % self.itemsize)
                swap = self.numpy_dtype.itemsize > 1 and self.numpy_dtype.byteorder == ">"
                left = self.nbytes
                while left:
                    data = m.read(min(step, left))
                    if len(data) != min(step, left) or len(data) % self.itemsize:
                        raise CorruptSourceError(self.path, f"{what}: the member ends before the array does")
                    left -= len(data)
                    if swap:
                        yield np.frombuffer(data, dtype=self.numpy_dtype).astype(
                            self.numpy_dtype.newbyteorder("<")).view(np.uint8)
                    else:
                        yield np.frombuffer(data, dtype=np.uint8)
                m.read()  # to the end: zipfile checks the CRC there
        except CorruptSourceError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise CorruptSourceError(self.path, f"{what}: {e}") from None
