"""The lazy Reader: opening costs O(metadata); blobs are read, and verified, only when asked for (spec §10).

Block I/O, the one public door to a blob's bytes (the CUDA path, activation spills and converters
use it too): :meth:`Checkpoint.read_into` fills a buffer the caller owns, :meth:`Checkpoint.iter_chunks`
streams a blob in bounded pieces, :meth:`Checkpoint.get_slice` reads only the byte ranges a slice
needs. Whole-blob reads are verified against the blob's xxh3 checksum; partial reads cannot be.
"""

from __future__ import annotations

import math
import mmap as _mmap
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._backend import ArrayBackend, get_backend, is_host
from ._checksum import checksum, hasher
from ._dtypes import DTYPES, DType, numpy_dtype
from ._fileio import SharedFile, madvise_populate, map_file, pread_exact
from ._footer import FOOTER_SIZE, parse_footer
from ._header import HEADER_SIZE, MAGIC, Header, parse_header
from ._lazy import LazyArray
from ._parse import parse_manifest
from ._slice import plan_slice
from ._tables import Limits, Manifest, TensorEntry, ViewRef, blob_region_start, tensor_ref
from ._tree import map_tree, plain, rebuild, resolve, tensor_rows, walk_leaves
from ._types import TYPES_KEY, parse_types, restore_types
from .errors import (
    BadMagicError,
    CheckpointClosedError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    InvalidMetadataError,
    MetadataLimitError,
    NotACheckpointFileError,
    TruncatedCheckpointError,
    UnsupportedDTypeError,
)

__all__ = ["Checkpoint", "TensorInfo", "TensorSlice", "VerifyReport", "map_tree", "plain", "walk_leaves"]

#: A blob this large read by itself (``read_into``) is split across worker threads.
_PARALLEL_MIN = 4 << 20
#: In a load of many rows, blobs this large are read and hashed on worker threads while the calling
#: thread goes on with the rest (smaller ones cost less than a hand-over between threads).
_THREAD_MIN = 256 << 10
_WORKERS = max(1, min(8, os.cpu_count() or 1))


class _Workers:
    """Jobs handed to threads as a load finds them, while the calling thread goes on with the rest."""

    def __init__(self, job: Callable[[Any], None]) -> None:
        self._job = job
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[None]] = []

    def submit(self, item: Any) -> None:
        if _WORKERS == 1:
            self._job(item)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="ckptfmt-read")
        self._futures.append(self._pool.submit(self._job, item))

    def finish(self) -> None:
        """Wait for every job; re-raise the first error (in submission order)."""
        for f in self._futures:
            f.result()

    def close(self) -> None:
        """Cancel what has not started, wait for what has (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._futures.clear()


@dataclass(frozen=True)
class TensorInfo:
    """What :meth:`Checkpoint.info` tells about a tensor without reading it."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int
    checksum: int | None


@dataclass
class VerifyReport:
    """The outcome of a full verification: every structure, every blob, every padding byte."""

    path: str
    ok: bool
    tensors_checked: int = 0
    bytes_checked: int = 0
    checksummed: bool = True
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"path": self.path, "ok": self.ok, "tensors_checked": self.tensors_checked,
                "bytes_checked": self.bytes_checked, "checksummed": self.checksummed, "errors": self.errors}


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    return pread_exact(fd, n, offset)


def writable_bytes(out: Any) -> memoryview:
    """``out`` (numpy array, CPU torch tensor, bytearray, memoryview, ...) as a flat writable byte view.

    The buffer must be C-contiguous; its size is checked by the caller.
    """
    if type(out).__module__.partition(".")[0] == "torch":
        if out.device.type != "cpu":
            raise TypeError(f"read_into fills host memory; {out.device} tensors load with get(..., device=...)")
        if not out.is_contiguous():
            raise ValueError("read_into needs a contiguous tensor (call .contiguous() and read into that)")
        import torch

        out = out.detach().reshape(-1).view(torch.uint8).numpy()
    if isinstance(out, np.ndarray):
        if not out.flags.c_contiguous:
            raise ValueError("read_into needs a C-contiguous array (np.ascontiguousarray makes one)")
        if not out.flags.writeable:
            raise TypeError("read_into needs a writable array; this one is read-only")
        out = out.reshape(-1).view(np.uint8)
    try:
        mv = memoryview(out)
    except TypeError:
        raise TypeError(f"read_into needs a writable buffer (numpy array, CPU tensor, bytearray), not "
                        f"{type(out).__name__}") from None
    if mv.readonly:
        raise TypeError(f"read_into needs a writable buffer; this {type(out).__name__} is read-only")
    if not mv.c_contiguous:
        raise ValueError("read_into needs a C-contiguous buffer")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


#: Padding is checked in pieces of this size: O(1) memory whatever the alignment.
_ZERO_CHUNK = 1 << 20


def _zero_range(file: SharedFile, start: int, end: int) -> bool:
    """Whether bytes ``[start, end)`` of the file are all zero, read a bounded piece at a time (§3.3 step 8)."""
    buf = np.empty(min(_ZERO_CHUNK, max(end - start, 0)), np.uint8)
    pos = start
    while pos < end:
        piece = buf[: min(len(buf), end - pos)]
        got = file.readinto(piece.data.cast("B"), pos)
        if got != len(piece) or piece.any():
            return False
        pos += got
    return True


class Checkpoint:
    """An open checkpoint file: metadata parsed and validated, blobs untouched until asked for.

    Use as a context manager (``with ckptfmt.open(path) as ckpt: ...``). Arrays it returns from a
    memory map stay valid after :meth:`close`; a read started after :meth:`close` raises
    :class:`~ckptfmt.errors.CheckpointClosedError`, and one in flight in another thread finishes on
    the file it started on. ``backend`` and ``device`` are the defaults of :meth:`get`,
    :meth:`load` and :meth:`get_slice` (``ckptfmt.torch.open`` sets them to torch).
    """

    def __init__(self, path: str | os.PathLike[str], *, limits: Limits | None = None,
                 backend: str | ArrayBackend = "numpy", device: str | None = None) -> None:
        name = os.fspath(path)
        try:
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            raise CheckpointNotFoundError(name) from None
        except IsADirectoryError:
            raise NotACheckpointFileError(f"{name}: is a directory, not a checkpoint file") from None
        self._setup(fd, name, limits, backend, device)

    @classmethod
    def from_fd(cls, fd: int, name: str, *, limits: Limits | None = None,
                backend: str | ArrayBackend = "numpy", device: str | None = None) -> Checkpoint:
        """A checkpoint over an open descriptor, which it then owns; ``name`` is what messages call it."""
        self = cls.__new__(cls)
        self._setup(fd, name, limits, backend, device)
        return self

    def _setup(self, fd: int, name: str, limits: Limits | None, backend: str | ArrayBackend,
               device: str | None) -> None:
        """Take ownership of ``fd`` and parse the file behind it (closing ``fd`` on any failure)."""
        self.path = name
        self._limits = limits or Limits()
        self._mm: _mmap.mmap | None = None
        self._mm_copy: _mmap.mmap | None = None
        self._file: SharedFile | None = None
        self._row_keys: dict[int, str] | None = None
        self._backend = backend
        self._device = device
        file = SharedFile(fd, self.path)
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise NotACheckpointFileError(f"{self.path}: is a directory, not a checkpoint file")
            self._file = file
            self._open()
        except BaseException:
            self._file = None
            file.close()
            raise

    def _open(self) -> None:
        path, fd = self.path, self._file.fileno()  # type: ignore[union-attr]  # set just before
        self.file_size = os.fstat(fd).st_size
        head = _pread_exact(fd, HEADER_SIZE, 0)
        if len(head) < HEADER_SIZE:
            if head[: len(MAGIC)] == MAGIC[: len(head)]:
                raise TruncatedCheckpointError(path, f"file is {len(head)} bytes, shorter than the 64-byte header")
            raise BadMagicError(path, f"not a ckptfmt checkpoint (first bytes {head[:8]!r})")
        self.header: Header = parse_header(head, path)
        start = blob_region_start(self.header.alignment)
        if self.file_size < HEADER_SIZE + FOOTER_SIZE:
            raise TruncatedCheckpointError(path, f"file is {self.file_size} bytes: header present, footer missing")
        self.footer = parse_footer(_pread_exact(fd, FOOTER_SIZE, self.file_size - FOOTER_SIZE),
                                   self.file_size, self.header.minor, path)
        if self.footer.metadata_offset < start:
            raise InvalidMetadataError(path, f"footer: metadata offset {self.footer.metadata_offset} lies inside "
                                             f"the header region (< {start})")
        if self.footer.metadata_length > self._limits.max_metadata_bytes:
            raise MetadataLimitError(path, f"metadata is {self.footer.metadata_length} bytes, over the cap of "
                                           f"{self._limits.max_metadata_bytes} (raise Limits.max_metadata_bytes)")
        meta = _pread_exact(fd, self.footer.metadata_length, self.footer.metadata_offset)
        if checksum(meta) != self.footer.metadata_checksum:
            raise ChecksumMismatchError(path, "metadata checksum mismatch (the metadata is corrupted)",
                                        region="metadata")
        self.manifest: Manifest = parse_manifest(
            meta, path=path, minor=self.header.minor, alignment=self.header.alignment,
            metadata_offset=self.footer.metadata_offset, limits=self._limits,
            features=self.header.required_features)
        if start > HEADER_SIZE and not _zero_range(self._check_open(), HEADER_SIZE, start):
            raise CorruptCheckpointError(path, f"padding bytes {HEADER_SIZE}..{start - 1} after the header are "
                                               "not zero")

    # -- lifetime
    def close(self) -> None:
        """Release the file; arrays already returned from the memory map stay usable.

        Reads in flight in other threads finish first (the descriptor is closed after the last).
        """
        if self._file is not None:
            self._file.close()
        # Never mm.close(): arrays returned from it hold it (numpy keeps no buffer export, so closing
        # would unmap memory they still point to). It is unmapped when the last of them is freed.
        self._mm = self._mm_copy = None

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._file is None or self._file.closed

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()

    def _check_open(self) -> SharedFile:
        file = self._file
        if file is None or file.closed:
            raise CheckpointClosedError(f"{self.path}: checkpoint is closed")
        return file

    # -- metadata
    @property
    def metadata(self) -> dict[str, Any]:
        """The user metadata saved with the checkpoint (without the reserved type table, spec §4.8)."""
        user = self.manifest.user
        return {k: v for k, v in user.items() if k != TYPES_KEY} if TYPES_KEY in user else user

    @property
    def producer(self) -> dict[str, Any]:
        """Which program wrote the file (name, version)."""
        return self.manifest.producer

    @property
    def created(self) -> str:
        """When the file was written (RFC 3339, UTC)."""
        return self.manifest.created

    @property
    def version(self) -> tuple[int, int]:
        """The file's format version (major, minor)."""
        return (self.header.major, self.header.minor)

    def __len__(self) -> int:
        return len(self.manifest.tensors)

    def keys(self) -> list[str]:
        """Key paths of every leaf of the tree, tensors and plain values alike, in tree order."""
        return [k for k, _ in walk_leaves(self.manifest.tree)]

    def tensor_keys(self) -> list[str]:
        """Key paths of the tensor leaves only."""
        return [k for k, v in walk_leaves(self.manifest.tree) if tensor_ref(v) is not None or type(v) is ViewRef]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        try:
            self._resolve(key)
        except (CheckpointKeyError, ValueError):
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def _resolve(self, key: str) -> Any:
        return resolve(self.manifest.tree, key, where=self.path)

    def _key_of(self, row: int) -> str:
        """The first key path that references tensor ``row`` (for messages; the index is built on first use)."""
        if self._row_keys is None:
            keys: dict[int, str] = {}
            for k, v in walk_leaves(self.manifest.tree):
                ref = tensor_ref(v)
                if ref is not None:
                    keys.setdefault(ref[0], k)
            self._row_keys = keys
        return self._row_keys.get(row, f"#{row}")

    def row_key(self, row: int) -> str:
        """The first key path that references tensor-table row ``row`` (``"#row"`` if none): for messages."""
        return self._key_of(row)

    def metadata_bytes(self) -> bytes:
        """The metadata section as stored (spec §5: msgpack, ext types untouched), checked against the footer.

        For tools that rewrite a file's blobs and carry its tree over verbatim (``ckptfmt.migrate``).
        """
        footer = self.footer
        with self._check_open().held() as fd:
            meta = pread_exact(fd, footer.metadata_length, footer.metadata_offset)
        if checksum(meta) != footer.metadata_checksum:
            raise ChecksumMismatchError(self.path, "metadata checksum mismatch (the file changed since it was "
                                                   "opened, or is corrupted)", region="metadata")
        return meta

    def info(self, key: str) -> TensorInfo:
        """dtype, shape, size and offset of the tensor at ``key``, without reading it.

        For a view (§4.7) the offset is that of its first element in the file, and it has no checksum.
        """
        node = self._resolve(key)
        if type(node) is ViewRef:
            return self._view_info(node.index, key)
        ref = tensor_ref(node)
        if ref is None:
            raise CheckpointKeyError(f"{self.path}: key {key!r} is not a tensor")
        e = self.manifest.tensors.entry(ref[0])
        return TensorInfo(key, e.dtype, e.shape, e.nbytes, e.offset, e.checksum)

    def _view_info(self, index: int, key: str) -> TensorInfo:
        v = self.manifest.views.entry(index)
        size = DTYPES[v.dtype].itemsize if v.dtype in DTYPES else 0
        n = 1
        for d in v.shape:
            n *= d
        return TensorInfo(key, v.dtype, v.shape, n * size, self.entry(v.base).offset + v.offset, None)

    def entry(self, index: int) -> TensorEntry:
        """Row ``index`` of the tensor table."""
        return self.manifest.tensors.entry(index)

    def tree(self) -> Any:
        """The saved structure with a :class:`TensorInfo` in place of each tensor; reads no blob."""
        tt = self.manifest.tensors

        def info(row: int, scalar: bool, key: str) -> TensorInfo:
            if scalar is None:
                return self._view_info(row, key)
            e = tt.entry(row)
            return TensorInfo(key, e.dtype, e.shape, e.nbytes, e.offset, e.checksum)

        return map_tree(self.manifest.tree, info, ())

    # -- block I/O
    def _row(self, key: str | int) -> int:
        """The tensor-table row stored at ``key`` (or ``key`` itself, a row number); views and values refused."""
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < len(self.manifest.tensors):
                raise CheckpointKeyError(f"{self.path}: no tensor row {key} (the table has "
                                         f"{len(self.manifest.tensors)})")
            return key
        node = self._resolve(str(key))
        ref = tensor_ref(node)
        if ref is None:
            what = "a view of another tensor (§4.7)" if type(node) is ViewRef else "not a tensor"
            raise CheckpointKeyError(f"{self.path}: key {key!r} is {what}; block reads need a stored tensor "
                                     "(use get() for it)")
        return ref[0]

    def _blob(self, row: int) -> tuple[int, int, int | None]:
        """(offset, nbytes, checksum or None) of row ``row``: O(1), whatever the table's size."""
        tt = self.manifest.tensors
        return int(tt.offset[row]), int(tt.nbytes[row]), None if tt.checksum is None else int(tt.checksum[row])

    def _decoded(self, row: int, verify: bool) -> memoryview | None:
        """Row ``row``'s decoded bytes if it is a compressed blob (format 1.1, §13), else None (read it in place)."""
        if self.manifest.tensors.codec_of(row) == "raw":
            return None
        from ._decode import read_compressed

        arr = read_compressed(self, self._map(), [row], verify=verify)[row]
        return np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data

    def read_into(self, key: str | int, out: Any, *, verify: bool = True) -> int:
        """Read the bytes of the tensor at ``key`` into ``out``, a writable buffer its size; returns the size.

        ``key`` is a key path, or a tensor-table row number (as :meth:`read_rows` and :meth:`entry` take).

        ``out`` is any C-contiguous writable buffer of exactly ``info(key).nbytes`` bytes: a numpy
        array, a CPU (or pinned) torch tensor, a ``bytearray``, a ``memoryview``. The bytes are the
        blob as stored (little-endian, C order); nothing is allocated. With ``verify`` the whole blob
        is checked against its checksum after the read, and :class:`ChecksumMismatchError` raised
        (``out`` then holds the corrupt bytes). The read holds the file: a concurrent :meth:`close`
        waits for it.
        """
        row = self._row(key)
        dest = writable_bytes(out)
        off, nb, want = self._blob(row)
        if len(dest) != nb:
            raise ValueError(f"{self.path}: tensor {key!r} is {nb} bytes; the buffer has {len(dest)}")
        decoded = self._decoded(row, verify)
        if decoded is not None:  # checked (stored bytes) and decoded whole, then copied
            dest[:] = decoded
            return nb
        file = self._check_open()
        with file.held() as fd:
            if nb >= _PARALLEL_MIN and _WORKERS > 1:
                step = -(-nb // _WORKERS)
                step += -step % 4096
                parts = [(a, min(step, nb - a)) for a in range(0, nb, step)]
                with ThreadPoolExecutor(len(parts), thread_name_prefix="ckptfmt-read") as pool:
                    got = sum(pool.map(lambda p: file.readinto_held(fd, dest[p[0]: p[0] + p[1]], off + p[0]), parts))
            else:
                got = file.readinto_held(fd, dest, off)
        if got != nb:
            raise TruncatedCheckpointError(self.path, f"tensor {self._key_of(row)!r}: read {got} of {nb} bytes")
        if verify and want is not None and checksum(dest) != want:
            raise self._mismatch(row)
        return nb

    def iter_chunks(self, key: str | int, size: int, *, verify: bool = True,
                    buffers: list[Any] | None = None) -> Iterator[memoryview]:
        """The bytes of the tensor at ``key`` in order, as ``memoryview`` chunks of at most ``size`` bytes.

        Memory stays bounded by ``size``: each chunk is read into a buffer of its own, or, with
        ``buffers`` (writable buffers of at least ``size`` bytes, e.g. two pinned tensors for
        overlapped device copies), into ``buffers[k % len(buffers)]``, valid until that buffer comes
        round again. With ``verify`` the blob's xxh3 checksum is streamed over the chunks, and a
        mismatch raises :class:`ChecksumMismatchError` *before the last chunk is yielded*: a consumer
        that reaches the end without an error has received the verified blob, and one that stops
        early has received an unverified prefix.
        """
        if size <= 0:
            raise ValueError(f"chunk size must be positive, not {size}")
        row = self._row(key)
        off, nb, want = self._blob(row)
        slots = [writable_bytes(b) for b in buffers] if buffers else None
        if slots is not None and min(len(b) for b in slots) < min(size, nb):
            raise ValueError(f"every buffer must hold a chunk of {min(size, nb)} bytes")
        return self._chunks(key, row, off, nb, want if verify else None, size, slots)

    def _chunks(self, key: str | int, row: int, off: int, nb: int, want: int | None, size: int,
                slots: list[memoryview] | None) -> Iterator[memoryview]:
        if self.manifest.tensors.codec_of(row) != "raw":  # compressed (§13): stored bytes checked, then
            from ._decode import iter_decoded  # decoded a chunk at a time, memory bounded by ``size``

            yield from iter_decoded(self, self._map(), row, size, slots, verify=want is not None)
            return
        file = self._check_open()
        h = hasher() if want is not None else None
        for k, a in enumerate(range(0, nb, size)):
            n = min(size, nb - a)
            dest = slots[k % len(slots)][:n] if slots is not None else memoryview(bytearray(n))
            got = file.readinto(dest, off + a)
            if got != n:
                raise TruncatedCheckpointError(self.path, f"tensor {self._key_of(row)!r}: the file ends at byte "
                                                          f"{off + a + got}")
            if h is not None:
                h.update(dest)
                if a + n == nb and h.intdigest() != want:
                    raise self._mismatch(row)
            yield dest

    def lazy(self, key: str | int, *, verify: bool = True) -> LazyArray:
        """The tensor at ``key`` as a :class:`~ckptfmt.LazyArray`: saving it streams it from this file.

        ``ckptfmt.save(dst, {"w": ckpt.lazy("w")})`` copies a tensor with memory bounded by the writer's
        chunk size; with ``verify`` a corrupt blob fails the save (its checksum is checked before the
        last chunk is handed over, so the previous file at ``dst`` stays). The checkpoint must stay
        open until the save is done.
        """
        return _StoredArray(self, self._row(key), verify)

    def get_slice(self, key: str, *, backend: str | ArrayBackend | None = None,
                  device: str | None = None) -> TensorSlice:
        """The tensor at ``key``, to index without reading it whole: ``ckpt.get_slice("w")[0:128, ::2]``.

        Indexing (ints, slices with any step, ``...``; numpy's rules) reads only the byte ranges
        the selection needs, into fresh memory, and returns an array of the checkpoint's backend
        (torch with ``ckptfmt.torch.open``). A partial read cannot be checked against the blob's
        checksum, which covers the whole blob: slices are **not verified**, except one that selects
        the whole tensor (``[:]``, ``[...]``), which is read whole and verified (``verify`` applies to
        whole reads; per-chunk checksums in a later format version could cover slices too).
        """
        row = self._row(key)
        be, dev = self._backend_for(backend, device)
        return TensorSlice(self, key, row, be, dev)

    def _read_slice(self, sl: TensorSlice, index: Any) -> Any:
        dt = self._dtype(sl.row)
        coded = self.manifest.tensors.codec_of(sl.row) != "raw"
        plan = plan_slice(sl.shape, dt.itemsize, index, slack=0) if coded else plan_slice(sl.shape, dt.itemsize, index)
        npd = numpy_dtype(dt)
        # where the result lands: page-locked memory when the backend copies it on to a GPU
        nbytes = dt.itemsize * math.prod(plan.shape)
        stage = getattr(sl.backend, "pinned_empty", None)
        host = stage(nbytes, sl.device) if stage is not None and nbytes else None
        arr = np.empty(plan.shape, dtype=npd) if host is None else host.view(npd).reshape(plan.shape)
        if plan.whole:
            if arr.nbytes:
                self.read_into(sl.row, arr, verify=True)
        elif coded and plan.starts:  # compressed (§13): only the chunks the runs overlap are decoded
            from ._decode import decode_runs

            box = np.empty(plan.box_shape, dtype=npd)
            decode_runs(self, self._map(), sl.row, plan.starts, plan.run_bytes, box.reshape(-1).view(np.uint8))
            arr[...] = box[plan.post]
        elif plan.starts:
            off, _, _ = self._blob(sl.row)
            box = np.empty(plan.box_shape, dtype=npd)
            raw = box.reshape(-1).view(np.uint8).data
            file = self._check_open()
            with file.held() as fd:
                for start, at in plan.runs():
                    dest = raw[at : at + plan.run_bytes]
                    if file.readinto_held(fd, dest, off + start) != plan.run_bytes:
                        raise TruncatedCheckpointError(self.path, f"tensor {sl.key!r}: the file ends inside it")
            arr[...] = box[plan.post]
        return self._converter({sl.row: arr}, sl.backend, sl.device)(sl.row, False)

    def _backend_for(self, backend: str | ArrayBackend | None, device: str | None
                     ) -> tuple[ArrayBackend, str | None]:
        if backend is None:
            backend = self._backend
            device = self._device if device is None else device
        return (get_backend(backend) if isinstance(backend, str) else backend), device

    # -- data
    def _map(self, writable: bool = False) -> _mmap.mmap:
        """The file mapped: private copy-on-write pages if ``writable`` (writes never reach the file), else
        the process's one read-only map of this file."""
        file = self._check_open()
        if writable:
            if self._mm_copy is None:
                self._mm_copy = map_file(file, writable=True)
            return self._mm_copy
        if self._mm is None:
            self._mm = map_file(file, writable=False)
        return self._mm

    def _mismatch(self, row: int) -> ChecksumMismatchError:
        key = self._key_of(row)
        return ChecksumMismatchError(self.path, f"tensor {key!r}: checksum mismatch (its bytes are corrupted)",
                                     region="blob", key=key)

    def _check_padding(self, row: int) -> None:
        tt = self.manifest.tensors
        nb = int(tt.stored_sizes()[row])
        if not nb:
            return
        end = int(tt.offset[row]) + nb
        pad = tt.padding_end(row, self.header.alignment) - end
        if pad and not _zero_range(self._check_open(), end, end + pad):
            raise CorruptCheckpointError(self.path, f"padding bytes {end}..{end + pad - 1} after tensor "
                                                    f"{self._key_of(row)!r} are not zero")

    def _dtype(self, row: int) -> DType:
        tt = self.manifest.tensors
        name = tt.dtype_names[int(tt.dtype_code[row])]
        found = DTYPES.get(name)
        if found is None:
            raise UnsupportedDTypeError(f"{self.path}: tensor {self._key_of(row)!r} has dtype {name!r}, unknown "
                                        "to this reader; upgrade ckptfmt")
        return found

    def row_dtype(self, row: int) -> DType:
        """The canonical dtype of tensor-table row ``row`` (:class:`UnsupportedDTypeError` if unknown here)."""
        return self._dtype(row)

    def _columns(self, rows: list[int], verify: bool) -> tuple[Any, Any, Any, Any]:
        """offset, nbytes, dtype code and checksum (or None) by row: whole columns as lists for a big
        selection, a dict of the selected rows for a small one (a lazy get costs O(1), not O(table))."""
        tt = self.manifest.tensors
        cols = [tt.offset, tt.nbytes, tt.dtype_code]
        if verify and tt.checksum is not None:
            cols.append(tt.checksum)
        dense = 8 * len(rows) >= len(tt)
        out: list[Any] = [c.tolist() if dense else {i: int(c[i]) for i in rows} for c in cols]
        return out[0], out[1], out[2], out[3] if len(out) > 3 else None

    def read_rows(self, rows: Iterable[int], *, verify: bool = True, mmap: bool = True,
                  writable: bool = False) -> dict[int, np.ndarray]:
        """Tensors by table row, as numpy arrays: views of the memory map, or fresh writable arrays.

        Views of the map are read-only unless ``writable``; then writes go to private
        copy-on-write pages and never reach the file.

        With ``verify``, each blob is checked against its checksum before any array is returned.
        Large blobs are read and hashed on worker threads (both release the GIL), so a load runs
        on every core.
        """
        file = self._check_open()
        tt = self.manifest.tensors
        if tt.codec is not None:  # format 1.1: compressed rows are decoded into fresh arrays (§13)
            from ._decode import read_compressed

            rows = list(rows)
            coded = [i for i in rows if tt.codec_of(i) != "raw"]
            if coded:
                decoded = read_compressed(self, self._map(), coded, verify=verify)
                rest = [i for i in rows if tt.codec_of(i) == "raw"]
                if rest:
                    decoded.update(self.read_rows(rest, verify=verify, mmap=mmap, writable=writable))
                return {i: decoded[i] for i in rows}
        rows = list(rows)
        offsets, sizes, codes, sums = self._columns(rows, verify)
        npd = [numpy_dtype(DTYPES[n]) if n in DTYPES else None for n in tt.dtype_names]
        shapes: Any = tt.shapes() if 8 * len(rows) >= len(tt) else {i: tt.shape(i) for i in rows}
        out: dict[int, np.ndarray] = {}
        mm = self._map(writable) if mmap else None
        view = memoryview(mm) if mm is not None and sums is not None else None

        def job(item: tuple[int, Any, Any]) -> None:
            row, dest, data = item  # a fresh array's bytes to read into, or mapped bytes to hash
            if dest is not None:
                self._read_into(file, fd, row, dest, offsets[row], sums)
            elif checksum(data) != sums[row]:  # data only when verifying
                raise self._mismatch(row)

        workers = _Workers(job)
        try:
            with file.held() as fd:
                for i in rows:
                    dt = npd[codes[i]]
                    if dt is None:
                        self._dtype(i)
                    nb, off = sizes[i], offsets[i]
                    if nb == 0:
                        arr = np.empty(shapes[i], dtype=dt)
                        if mm is not None and not writable:
                            arr.flags.writeable = False
                    elif mm is not None:
                        arr = np.ndarray(shapes[i], dtype=dt, buffer=mm, offset=off)
                        if not writable:
                            arr.flags.writeable = False
                        if view is not None:
                            if nb >= _THREAD_MIN:
                                workers.submit((i, None, view[off : off + nb]))
                            elif checksum(view[off : off + nb]) != sums[i]:
                                raise self._mismatch(i)
                    else:
                        arr = np.empty(shapes[i], dtype=dt)
                        raw = arr.reshape(-1).view(np.uint8)
                        if nb >= _THREAD_MIN:
                            workers.submit((i, raw, None))
                        else:
                            self._read_into(file, fd, i, raw, off, sums)
                    out[i] = arr
                workers.finish()
        finally:
            workers.close()  # every job has ended (and dropped its slice of ``view``) before it is released
            if view is not None:
                view.release()
        return out

    def _read_into(self, file: SharedFile, fd: int, row: int, raw: np.ndarray, offset: int, sums: Any) -> None:
        got = file.readinto_held(fd, raw.data, offset)
        if got != raw.nbytes:
            raise TruncatedCheckpointError(self.path, f"tensor {self._key_of(row)!r}: read {got} of {raw.nbytes} "
                                                      "bytes")
        if sums is not None and checksum(raw) != sums[row]:
            raise self._mismatch(row)

    def get(self, key: str, *, verify: bool = True, mmap: bool = True, backend: str | ArrayBackend | None = None,
            device: str | None = None) -> Any:
        """The value at ``key``: a tensor, a plain value or a whole subtree, read now."""
        return self.load(keys=[key], verify=verify, mmap=mmap, backend=backend, device=device)[key]

    def load(self, *, keys: Iterable[str] | str | None = None, verify: bool = True, mmap: bool = True,
             backend: str | ArrayBackend | None = None, device: str | None = None) -> Any:
        """The whole saved object, or ``{key: value}`` for the selected ``keys``.

        ``backend``/``device`` default to the checkpoint's own (see :class:`Checkpoint`).
        """
        be, device = self._backend_for(backend, device)
        if keys is None:
            if mmap and len(self) and not self._direct(be, device):
                self._prefault(getattr(be, "copy_on_write", False))
            out = _rebuild(self.manifest.tree, self._read(range(len(self)), be, device, verify=verify, mmap=mmap))
            return self._restore_types(out, "", be)
        if isinstance(keys, str):
            keys = [keys]
        nodes = [(k, self._resolve(k)) for k in keys]
        rows: dict[int, None] = {}
        views = self.manifest.views
        for _, n in nodes:
            rows.update(tensor_rows(n, lambda i: int(views.base[i])))
        convert = self._read(rows, be, device, verify=verify, mmap=mmap)
        return {k: self._restore_types(_rebuild(n, convert), k, be) for k, n in nodes}

    def _restore_types(self, value: Any, at: str, be: ArrayBackend) -> Any:
        """OrderedDicts (with a state dict's ``_metadata``) and torch config values back (spec §4.8)."""
        table = self.manifest.user.get(TYPES_KEY)
        if table is None:
            return value
        return restore_types(value, parse_types(table, self.path), at=at, torch_types=be.name == "torch",
                             path=self.path)

    @staticmethod
    def _direct(be: ArrayBackend, device: str | None) -> bool:
        """Whether blobs go straight to the device (GPU-direct) instead of through host arrays."""
        return not is_host(device) and hasattr(be, "read_to_device")

    def _read(self, rows: Iterable[int], be: ArrayBackend, device: str | None, *, verify: bool, mmap: bool
              ) -> Callable[[int, bool | None], Any]:
        if self._direct(be, device) and self.manifest.tensors.codec is None:  # compressed rows decode on the host
            self._check_open()
            made = be.read_to_device(self, list(rows), device, verify=verify)  # type: ignore[attr-defined]
            return self._converter(made, be, device, ready=True)
        arrays = self.read_rows(rows, verify=verify, mmap=mmap, writable=getattr(be, "copy_on_write", False))
        return self._converter(arrays, be, device)

    def _converter(self, arrays: dict[int, Any], be: ArrayBackend, device: str | None, *, ready: bool = False
                   ) -> Callable[[int, bool | None], Any]:
        """(row, is_scalar) -> user-facing array, made once per row so aliases stay one object.

        ``is_scalar`` None asks for row ``row`` of the view table instead (§4.7). ``ready``: the
        arrays are the backend's own objects already (a device load), to hand out as they are.
        """
        return _Converter(self, arrays, be, device, ready)

    def _prefault(self, writable: bool = False) -> None:
        start = blob_region_start(self.header.alignment)
        length = self.footer.metadata_offset - start
        if length > 0:
            madvise_populate(self._map(writable), start, length)

    def verify(self, *, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Check every blob's checksum and every padding byte; reports corruption instead of raising it.

        Needs no dtype: a file with dtypes this reader does not know is verified all the same.
        """
        tt = self.manifest.tensors
        report = VerifyReport(self.path, ok=True, checksummed=tt.checksum is not None)
        sums = tt.checksum.tolist() if tt.checksum is not None else None
        offsets, sizes = tt.offset.tolist(), tt.stored_sizes().tolist()
        bools = [tt.dtype_names[c] == "bool" for c in tt.dtype_code.tolist()]
        view = memoryview(self._map()) if len(tt) else None
        try:
            for i in range(len(tt)):
                nb, off = sizes[i], offsets[i]
                try:
                    if nb and sums is not None and view is not None and checksum(view[off : off + nb]) != sums[i]:
                        raise self._mismatch(i)
                    if nb and bools[i] and view is not None and tt.codec_of(i) == "raw" and \
                            np.frombuffer(view[off : off + nb], np.uint8).max() > 1:
                        raise InvalidMetadataError(self.path, f"tensor {self._key_of(i)!r}: a bool byte is neither 0 "
                                                              "nor 1 (§6)")
                    self._check_padding(i)
                except CorruptCheckpointError as e:
                    report.ok = False
                    report.errors.append(e.reason)
                report.tensors_checked += 1
                report.bytes_checked += nb
                if progress is not None:
                    progress(nb)
        finally:
            if view is not None:
                view.release()
        return report


class _StoredArray(LazyArray):
    """A stored tensor streamed out of an open checkpoint through :meth:`Checkpoint.iter_chunks`."""

    def __init__(self, ckpt: Checkpoint, row: int, verify: bool) -> None:
        self._ckpt = ckpt
        self._row = row
        self._verify = verify
        self.dtype = ckpt.row_dtype(row)
        self.shape = ckpt.manifest.tensors.shape(row)

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """Whole elements per chunk, read into one reused buffer (each valid until the next)."""
        step = max(limit - limit % self.itemsize, self.itemsize)
        buf = np.empty(min(step, self.nbytes), np.uint8)
        for chunk in self._ckpt.iter_chunks(self._row, step, verify=self._verify, buffers=[buf]):
            yield buf[: len(chunk)]


class TensorSlice:
    """A tensor of an open checkpoint, read only where indexed (:meth:`Checkpoint.get_slice`).

    ``shape``, ``dtype`` (the canonical name) and ``nbytes`` cost nothing; ``get_shape()`` and
    ``get_dtype()`` spell them as safetensors' slices do. Slices are not checksum-verified unless
    they select the whole tensor.
    """

    def __init__(self, ckpt: Checkpoint, key: str, row: int, backend: ArrayBackend, device: str | None) -> None:
        self._ckpt = ckpt
        self.key = key
        self.row = row
        self.backend = backend
        self.device = device
        e = ckpt.manifest.tensors
        self.shape: tuple[int, ...] = e.shape(row)
        self.dtype: str = e.dtype_names[int(e.dtype_code[row])]
        self.nbytes = int(e.nbytes[row])

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def get_shape(self) -> list[int]:
        """The shape, as safetensors' ``get_slice(...).get_shape()``."""
        return list(self.shape)

    def get_dtype(self) -> str:
        """The canonical dtype name (``"float32"``, ``"bfloat16"``, ...)."""
        return self.dtype

    def __getitem__(self, index: Any) -> Any:
        return self._ckpt._read_slice(self, index)

    def __repr__(self) -> str:
        return f"<TensorSlice {self.key!r} {self.dtype}{list(self.shape)}>"


class _Converter:
    """The callable :meth:`Checkpoint._converter` returns.

    A class rather than a closure: a closure that calls itself (views convert their base) is a
    reference cycle, which would keep every loaded array alive until the garbage collector runs.
    """

    def __init__(self, ckpt: Checkpoint, arrays: dict[int, Any], be: ArrayBackend, device: str | None,
                 ready: bool) -> None:
        self._ckpt, self._arrays, self._be, self._device, self._ready = ckpt, arrays, be, device, ready
        # numpy arrays come off the file as numpy wants them; device loads come ready-made
        self._fast = ready or (be.name == "numpy" and is_host(device))
        self._made: dict[tuple[int, bool | None], Any] = {}

    def __call__(self, row: int, scalar: bool | None) -> Any:
        if self._fast and scalar is False:
            return self._arrays[row]
        hit = self._made.get((row, scalar))
        if hit is None:
            if scalar is None:
                v = self._ckpt.manifest.views.entry(row)
                if v.dtype not in DTYPES:
                    raise UnsupportedDTypeError(f"{self._ckpt.path}: a view has dtype {v.dtype!r}, unknown to this "
                                                "reader; upgrade ckptfmt")
                hit = self._be.view(self(v.base, False), DTYPES[v.dtype], v.shape, v.strides, v.offset)
            elif self._ready:
                hit = self._arrays[row]
            elif self._fast:
                hit = self._arrays[row][()]
            else:
                hit = self._be.from_host(self._arrays[row], self._ckpt._dtype(row), scalar=scalar,
                                         device=self._device)
            self._made[(row, scalar)] = hit
        return hit


# Kept under the name the benchmarks' stage profiler wraps (benchmarks/bench_core.py).
_rebuild = rebuild
