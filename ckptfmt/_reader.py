"""The lazy Reader: opening costs O(metadata); blobs are read, and verified, only when asked for (spec §10)."""

from __future__ import annotations

import mmap as _mmap
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _keypath
from ._backend import ArrayBackend, get_backend, is_host
from ._checksum import checksum
from ._dtypes import DTYPES, DType, numpy_dtype
from ._footer import FOOTER_SIZE, parse_footer
from ._header import HEADER_SIZE, MAGIC, Header, parse_header
from ._manifest import (
    Limits,
    Manifest,
    PlainInt,
    TensorEntry,
    TensorRef,
    ViewRef,
    blob_region_start,
    parse_manifest,
    tensor_ref,
)
from .errors import (
    BadMagicError,
    CheckpointError,
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

#: Blobs this large are read and hashed on worker threads.
_PARALLEL_MIN = 4 << 20
_WORKERS = max(1, min(8, os.cpu_count() or 1))
_MADV_POPULATE_READ = 22  # Linux 5.14+; older kernels answer EINVAL and we fall back to WILLNEED


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
    out = os.pread(fd, n, offset)
    while len(out) < n:
        more = os.pread(fd, n - len(out), offset + len(out))
        if not more:
            break
        out += more
    return out


def _readinto_exact(fd: int, dest: memoryview, offset: int) -> int:
    done = 0
    while done < len(dest):
        n = os.preadv(fd, [dest[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


class Checkpoint:
    """An open checkpoint file: metadata parsed and validated, blobs untouched until asked for.

    Use as a context manager (``with ckptfmt.open(path) as ckpt: ...``). Arrays it returns from a
    memory map stay valid after :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str], *, limits: Limits | None = None) -> None:
        self.path = os.fspath(path)
        self._limits = limits or Limits()
        self._mm: _mmap.mmap | None = None
        self._fd = -1
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CheckpointNotFoundError(self.path) from None
        except IsADirectoryError:
            raise NotACheckpointFileError(f"{self.path}: is a directory, not a checkpoint file") from None
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise NotACheckpointFileError(f"{self.path}: is a directory, not a checkpoint file")
            self._fd = fd
            self._open()
        except BaseException:
            self._fd = -1
            os.close(fd)
            raise

    def _open(self) -> None:
        path, fd = self.path, self._fd
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
        if start > HEADER_SIZE and any(_pread_exact(fd, start - HEADER_SIZE, HEADER_SIZE)):
            raise CorruptCheckpointError(path, f"padding bytes {HEADER_SIZE}..{start - 1} after the header are "
                                               "not zero")

    # -- lifetime
    def close(self) -> None:
        """Release the file; arrays already returned from the memory map stay usable."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        # Never mm.close(): arrays returned from it hold it (numpy keeps no buffer export, so closing
        # would unmap memory they still point to). It is unmapped when the last of them is freed.
        self._mm = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)

    def _check_open(self) -> None:
        if self._fd < 0:
            raise CheckpointError(f"{self.path}: checkpoint is closed")

    # -- metadata
    @property
    def metadata(self) -> dict[str, Any]:
        """The user metadata saved with the checkpoint."""
        return self.manifest.user

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
        except CheckpointError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def _resolve(self, key: str) -> Any:
        node = self.manifest.tree
        if key == "" and not (type(node) is dict and "" in node):
            return node  # §4.4: the whole tree, unless the root dict has a key ""
        for el in _keypath.split(key):
            if type(node) is dict:
                if el in node:
                    node = node[el]
                    continue
                if _is_decimal(el) and int(el) in node:
                    node = node[int(el)]
                    continue
            elif type(node) in (list, tuple) and _is_decimal(el) and 0 <= int(el) < len(node):
                node = node[int(el)]
                continue
            raise CheckpointKeyError(f"{self.path}: no key {key!r} in the checkpoint (element {el!r} not found)")
        return node

    def _key_of(self, row: int) -> str:
        """The first key path that references tensor ``row`` (for messages)."""
        for k, v in walk_leaves(self.manifest.tree):
            ref = tensor_ref(v)
            if ref is not None and ref[0] == row:
                return k
        return f"#{row}"

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

    # -- data
    def _map(self) -> _mmap.mmap:
        self._check_open()
        if self._mm is None:
            # Private (copy-on-write) mapping: frameworks that want writable arrays get them, and
            # writes land in private pages, never in the file. numpy arrays are made read-only.
            self._mm = _mmap.mmap(self._fd, 0, access=_mmap.ACCESS_COPY)
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
        if pad and any(self._map()[end : end + pad]):
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

    def read_rows(self, rows: Iterable[int], *, verify: bool = True, mmap: bool = True,
                  writable: bool = False) -> dict[int, np.ndarray]:
        """Tensors by table row, as numpy arrays: views of the memory map, or fresh writable arrays.

        Views of the map are read-only unless ``writable``; then writes go to private
        copy-on-write pages and never reach the file.


        With ``verify``, each blob is checked against its checksum before any array is returned.
        Large blobs are read and hashed on worker threads (both release the GIL), so a load runs
        on every core.
        """
        self._check_open()
        tt = self.manifest.tensors
        if tt.codec is not None:  # format 1.1: compressed rows are decoded into fresh arrays (§13)
            from ._decode import read_compressed

            rows = list(rows)
            coded = [i for i in rows if tt.codec_of(i) != "raw"]
            if coded:
                decoded = read_compressed(self, coded, verify=verify)
                rest = [i for i in rows if tt.codec_of(i) == "raw"]
                if rest:
                    decoded.update(self.read_rows(rest, verify=verify, mmap=mmap, writable=writable))
                return {i: decoded[i] for i in rows}
        sums = tt.checksum.tolist() if verify and tt.checksum is not None else None
        offsets, sizes, codes = tt.offset.tolist(), tt.nbytes.tolist(), tt.dtype_code.tolist()
        npd = [numpy_dtype(DTYPES[n]) if n in DTYPES else None for n in tt.dtype_names]
        rows = list(rows)
        shapes: Any = tt.shapes() if 8 * len(rows) >= len(tt) else {i: tt.shape(i) for i in rows}
        out: dict[int, np.ndarray] = {}
        mm = self._map() if mmap else None
        view = memoryview(mm) if mm is not None and sums is not None else None
        fd = self._fd
        # (row, destination or None for mmap, bytes to hash or None): the work for the threads
        big: list[tuple[int, Any, Any]] = []
        try:
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
                        if nb >= _PARALLEL_MIN:
                            big.append((i, None, view[off : off + nb]))
                        elif checksum(view[off : off + nb]) != sums[i]:  # type: ignore[index]
                            raise self._mismatch(i)
                else:
                    arr = np.empty(shapes[i], dtype=dt)
                    raw = arr.reshape(-1).view(np.uint8)
                    if nb >= _PARALLEL_MIN:
                        big.append((i, raw, None))
                    else:
                        self._read_into(i, raw, fd, off, sums)
                out[i] = arr
            if big:
                self._run_parallel(big, fd, offsets, sums)
        finally:
            big.clear()  # drop the slices of ``view`` before releasing it
            if view is not None:
                view.release()
        return out

    def _read_into(self, row: int, raw: np.ndarray, fd: int, offset: int, sums: list[int] | None) -> None:
        got = _readinto_exact(fd, raw.data, offset)
        if got != raw.nbytes:
            raise TruncatedCheckpointError(self.path, f"tensor {self._key_of(row)!r}: read {got} of {raw.nbytes} "
                                                      "bytes")
        if sums is not None and checksum(raw) != sums[row]:
            raise self._mismatch(row)

    def _run_parallel(self, work: list[tuple[int, Any, Any]], fd: int, offsets: list[int],
                      sums: list[int] | None) -> None:
        def job(item: tuple[int, Any, Any]) -> None:
            row, dest, data = item
            if dest is not None:
                self._read_into(row, dest, fd, offsets[row], sums)
            elif sums is not None and checksum(data) != sums[row]:
                raise self._mismatch(row)

        workers = min(len(work), _WORKERS)
        if workers == 1:
            job(work[0])
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="ckptfmt-read") as pool:
            list(pool.map(job, work))  # draining the results re-raises the first worker's error

    def get(self, key: str, *, verify: bool = True, mmap: bool = True, backend: str | ArrayBackend = "numpy",
            device: str | None = None) -> Any:
        """The value at ``key``: a tensor, a plain value or a whole subtree, read now."""
        return self.load(keys=[key], verify=verify, mmap=mmap, backend=backend, device=device)[key]

    def load(self, *, keys: Iterable[str] | str | None = None, verify: bool = True, mmap: bool = True,
             backend: str | ArrayBackend = "numpy", device: str | None = None) -> Any:
        """The whole saved object, or ``{key: value}`` for the selected ``keys``."""
        be = get_backend(backend) if isinstance(backend, str) else backend
        if keys is None:
            if mmap and len(self) and not self._direct(be, device):
                self._prefault()
            return _rebuild(self.manifest.tree, self._read(range(len(self)), be, device, verify=verify, mmap=mmap))
        if isinstance(keys, str):
            keys = [keys]
        nodes = [(k, self._resolve(k)) for k in keys]
        rows: dict[int, None] = {}
        views = self.manifest.views
        for _, n in nodes:
            for _, leaf in walk_leaves(n):
                ref = tensor_ref(leaf)
                if ref is not None:
                    rows[ref[0]] = None
                elif type(leaf) is ViewRef:
                    rows[int(views.base[leaf.index])] = None
        convert = self._read(rows, be, device, verify=verify, mmap=mmap)
        return {k: _rebuild(n, convert) for k, n in nodes}

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

    def _prefault(self) -> None:
        mm = self._map()
        start = blob_region_start(self.header.alignment)
        length = self.footer.metadata_offset - start
        if length <= 0:
            return
        try:
            mm.madvise(_MADV_POPULATE_READ, start, length)
        except (OSError, ValueError, AttributeError):
            try:
                mm.madvise(_mmap.MADV_WILLNEED, start, length)
            except (OSError, ValueError, AttributeError):
                pass

    def verify(self, *, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Check every blob's checksum and every padding byte; reports corruption instead of raising it.

        Needs no dtype: a file with dtypes this reader does not know is verified all the same.
        """
        tt = self.manifest.tensors
        report = VerifyReport(self.path, ok=True, checksummed=tt.checksum is not None)
        sums = tt.checksum.tolist() if tt.checksum is not None else None
        offsets, sizes = tt.offset.tolist(), tt.stored_sizes().tolist()
        view = memoryview(self._map()) if len(tt) else None
        try:
            for i in range(len(tt)):
                nb, off = sizes[i], offsets[i]
                try:
                    if nb and sums is not None and view is not None and checksum(view[off : off + nb]) != sums[i]:
                        raise self._mismatch(i)
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


def _is_decimal(el: str) -> bool:
    body = el[1:] if el.startswith("-") else el
    return body.isdigit() and body.isascii() and str(int(el)) == el


def walk_leaves(node: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str, Any]]:
    """(key path, leaf) for every leaf of a decoded tree, in tree order (empty containers have none)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(node, path)]
    while stack:
        n, p = stack.pop()
        t = type(n)
        if t is dict:
            stack.extend(reversed([(v, (*p, k)) for k, v in n.items()]))
        elif t is list or t is tuple:
            stack.extend(reversed([(v, (*p, i)) for i, v in enumerate(n)]))
        else:
            yield _keypath.join(p), n


def plain(value: Any) -> Any:
    """A decoded plain leaf as the user saved it."""
    return int(value) if type(value) is PlainInt else value


def map_tree(node: Any, leaf: Callable[[int, Any, str], Any], path: tuple[str | int, ...]) -> Any:
    """Copy a decoded tree, replacing each tensor leaf by ``leaf(row, is_scalar, key_path)``.

    A view leaf comes as ``leaf(view_row, None, key_path)``.
    """
    ref = tensor_ref(node)
    if ref is not None:
        return leaf(ref[0], ref[1], _keypath.join(path))
    t = type(node)
    if t is ViewRef:
        return leaf(node.index, None, _keypath.join(path))
    if t is dict:
        return {k: map_tree(v, leaf, (*path, k)) for k, v in node.items()}
    if t is list:
        return [map_tree(v, leaf, (*path, i)) for i, v in enumerate(node)]
    if t is tuple:
        return tuple(map_tree(v, leaf, (*path, i)) for i, v in enumerate(node))
    return plain(node)


def _rebuild(node: Any, convert: Callable[[int, bool | None], Any]) -> Any:
    """Copy a decoded tree with tensors in place of references: the hot loop of a full load."""
    t = type(node)
    if t is int:
        return convert(node, False)
    if t is dict:
        out = {}
        for k, v in node.items():
            tv = type(v)
            if tv is int:
                out[k] = convert(v, False)
            elif tv is dict or tv is list or tv is tuple or tv is TensorRef or tv is PlainInt or tv is ViewRef:
                out[k] = _rebuild(v, convert)
            else:
                out[k] = v
        return out
    if t is list:
        return [_rebuild(v, convert) for v in node]
    if t is tuple:
        return tuple(_rebuild(v, convert) for v in node)
    if t is TensorRef:
        return convert(node.index, True)
    if t is ViewRef:
        return convert(node.index, None)
    return plain(node)
