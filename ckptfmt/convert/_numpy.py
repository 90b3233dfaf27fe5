"""numpy ``.npy`` and ``.npz`` sources, read lazily.

An ``.npy`` file and every stored (uncompressed) ``.npz`` member become a :class:`FileArray` over
their bytes in the file; a compressed member is decompressed while it is written, a bounded piece at
a time. Arrays of Python objects are pickles: refused unless ``allow_pickle``.

Every size is checked before anything is allocated: the array a header declares must fit in its
member, a member may declare no more bytes than its compression method can produce from its
compressed size, and a member that is not NPY data is refused after its first six bytes.
"""

from __future__ import annotations

import math
import struct
import tempfile
import tokenize
import zipfile
import zlib
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
#: deflate expands at most about 1032:1; a member declaring more than this is lying about its size
_MAX_DEFLATE_RATIO = 1100
_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
#: what zipfile and zlib raise on a damaged archive (NotImplementedError: a zip feature it lacks)
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error)
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
    except (ValueError, SyntaxError, EOFError, TypeError, RecursionError, tokenize.TokenError) as e:
        # numpy parses the header with ast.literal_eval, and tokenize for headers of old numpy versions
        raise CorruptSourceError(path, f"{what}: not a valid npy header ({type(e).__name__}: {e})") from None
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
    except _ZIP_ERRORS as e:
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


def _check_sizes(info: zipfile.ZipInfo, path: str, what: str) -> None:
    """Refuse a member whose declared sizes its compression method cannot produce."""
    if info.compress_type not in _COMPRESSIONS:
        raise UnsupportedSourceError(path, f"{what} is compressed with zip method {info.compress_type}; npz members "
                                           "are stored or deflated (numpy.savez, numpy.savez_compressed)")
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise CorruptSourceError(path, f"{what} is stored, yet declares {info.file_size} bytes in "
                                       f"{info.compress_size}")
    if info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:
        raise CorruptSourceError(path, f"{what} declares {info.file_size} bytes, more than deflate can make of its "
                                       f"{info.compress_size} compressed bytes")


def _member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, raw: IO[bytes], size: int, path: str, key: str, *,
            allow_pickle: bool) -> Any:
    what = f"member {info.filename!r}"
    _check_sizes(info, path, what)
    try:
        with zf.open(info) as m:
            head = m.read(len(_NPY_MAGIC))
    except _ZIP_ERRORS as e:
        raise CorruptSourceError(path, f"{what}: {e}") from None
    if head != _NPY_MAGIC:  # numpy.load would return the member's raw bytes, however large
        raise UnsupportedSourceError(path, f"{what} is not NPY data (it starts with {head!r}); convert stores arrays, "
                                           "not the raw bytes numpy.load gives for such a member")
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
        try:
            with zf.open(info) as m:
                shape, fortran, dtype = _header(m, path, what)
                start = m.tell()
        except CorruptSourceError:
            raise
        except _ZIP_ERRORS as e:
            raise CorruptSourceError(path, f"{what}: {e}") from None
        if not dtype.hasobject:
            nbytes = math.prod(shape) * dtype.itemsize
            if start + nbytes > info.file_size:
                raise CorruptSourceError(path, f"{what}: the header declares an array of {nbytes} bytes at byte "
                                               f"{start}, but the member holds {info.file_size}")
    if dtype.hasobject:
        if not allow_pickle:
            raise UnsafePickleError(path, f"{what} has dtype object: {_PICKLE_HINT}")
        with zf.open(info) as m:
            return _unpickled(np.lib.format.read_array(m, allow_pickle=True))
    return ZipMemberArray(path, info.filename, _canonical(dtype, path, what), shape, dtype, fortran)


class ZipMemberArray(LazyArray):
    """A compressed ``.npz`` member, decompressed while it is written, a bounded piece at a time."""

    def __init__(self, path: str, member: str, dtype: DType, shape: tuple[int, ...], numpy_dtype: np.dtype,
                 fortran_order: bool) -> None:
        self.path = path
        self.member = member
        self.dtype = dtype
        self.shape = tuple(int(n) for n in shape)
        self.numpy_dtype = numpy_dtype
        self.fortran_order = fortran_order and len(self.shape) > 1

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """Decompress ``limit`` bytes at a time (through a temporary file, for a Fortran-order array)."""
        what = f"member {self.member!r}"
        if self.nbytes == 0:
            return
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as m:
                _header(m, self.path, what)
                if self.fortran_order:
                    yield from self._fortran(m, limit, what)
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
                _drain(m, limit)
        except CorruptSourceError:
            raise
        except _ZIP_ERRORS as e:
            raise CorruptSourceError(self.path, f"{what}: {e}") from None

    def _fortran(self, m: IO[bytes], limit: int, what: str) -> Iterator[np.ndarray]:
        """C order needs the whole member: decompress it into an unnamed temporary file a piece at a
        time, then reorder from a read-only map of it (page cache, not process memory)."""
        with tempfile.TemporaryFile(prefix="ckptfmt-npz-") as tmp:
            left = self.nbytes
            while left:
                data = m.read(min(limit, left))
                if not data:
                    raise CorruptSourceError(self.path, f"{what}: the member ends before the array does")
                tmp.write(data)
                left -= len(data)
            _drain(m, limit)
            tmp.flush()
            arr = np.memmap(tmp, dtype=self.numpy_dtype, mode="r", shape=self.shape, order="F")
            try:
                yield from contiguous_chunks(arr, limit)
            finally:
                del arr


def _drain(m: IO[bytes], limit: int) -> None:
    """Read ``m`` to its end a bounded piece at a time: zipfile checks the CRC there."""
    while m.read(limit):
        pass
