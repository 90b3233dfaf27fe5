"""The user-facing functions: save, load, open, verify, inspect, diff."""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import itertools
import math
import operator
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgpack
import numpy as np

from ._backend import ArrayBackend, Source
from ._codec import CHUNK_BYTES, check_chunk_bytes
from ._dtypes import DType
from ._encode import PackedTree, fit_metadata
from ._header import DEFAULT_ALIGNMENT, check_alignment
from ._keypath import join
from ._plain import check_plain
from ._plan import Plan, plan
from ._reader import Checkpoint, VerifyReport
from ._staging import SaveHandle, Stager, StagingPool, _Cancelled, _Feed, staged_rows
from ._stream import is_path, name_of, open_bytes, open_stream, output
from ._tables import Limits, ViewRef, tensor_ref
from ._tree import count_leaves, plain, walk_leaves, walk_nodes
from ._types import TYPES_KEY, encode_types
from ._writer import ProgressCallback, Writer
from ._writer11 import Writer11
from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsupportedObjectError,
    UnsupportedVersionError,
)

__version__ = "0.1.0"
PRODUCER = {"name": "ckptfmt", "version": __version__}


def _producer() -> dict[str, Any]:
    """PRODUCER, or the JSON map in ``CKPTFMT_PRODUCER`` (with SOURCE_DATE_EPOCH: byte-reproducible files)."""
    pinned = os.environ.get("CKPTFMT_PRODUCER")
    if not pinned:
        return PRODUCER
    import json

    value = json.loads(pinned)
    if not isinstance(value, dict):
        raise UnsupportedObjectError("CKPTFMT_PRODUCER must be a JSON object, e.g. {\"name\": \"ckptfmt\"}")
    check_plain(value, what="producer")
    return value


def _created() -> str:
    """Now, or ``SOURCE_DATE_EPOCH`` when set (reproducible builds: equal inputs, equal bytes)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch else _dt.datetime.now(_dt.timezone.utc)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


#: What ``save`` and ``load`` accept as a file: a path, or a binary file object (or socket).
Target = Any

#: Readers of checkpoint directories for :func:`load`: ``reader(path)`` returns the state, or
#: ``NotImplemented`` when the directory is not of its layout. ``ckptfmt.distributed`` adds the
#: sharded layout (spec/DISTRIBUTED.md) when imported, which ``import ckptfmt`` does (it needs no torch).
DIRECTORY_READERS: list[Callable[[str], Any]] = []


_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
_SHAPE, _ITEMSIZE = operator.attrgetter("shape"), operator.attrgetter("itemsize")


def _prepare(obj: Any, metadata: dict[str, Any] | None, alignment: int | None, limits: Limits | None,
             created: str) -> tuple[int, Plan, dict[str, Any], PackedTree]:
    """Alignment, save plan, user metadata (with the type side table, spec §4.8) and the packed tree.

    A file that a reader with ``limits`` (default :class:`Limits`) would refuse is refused here, before
    any byte is written (:class:`ObjectLimitError`): what ``save`` writes, ``load`` reads.
    """
    align = check_alignment(DEFAULT_ALIGNMENT if alignment is None else alignment)
    obj, types = encode_types(obj)
    what = plan(obj)
    user = {} if metadata is None else metadata
    if not isinstance(user, dict):
        raise UnsupportedObjectError(f"metadata must be a dict, not {type(user).__name__}")
    if TYPES_KEY in user:
        raise UnsupportedObjectError(f"metadata key {TYPES_KEY!r} is reserved (it records saved types, spec §4.8)")
    containers = check_plain(user)
    if types:
        user = {**user, TYPES_KEY: types}
        containers += check_plain(types, what="a state dict's _metadata")
    sources, dtypes = list(map(_FIRST, what.rows)), list(map(_SECOND, what.rows))
    shapes = list(map(_SHAPE, sources))
    if set(map(type, shapes)) != {tuple}:  # e.g. torch.Size of a device source
        shapes = [tuple(shape) for shape in shapes]
    distinct = dict(zip(map(id, dtypes), dtypes, strict=True)).values()  # DType hashes in Python: by id
    tree = fit_metadata(what.tree, shapes=shapes, dtypes={dt.name for dt in distinct},
                        views=what.views, user=user, producer=_producer(), created=created,
                        containers=what.containers + containers, limits=limits or Limits(),
                        itemsizes=list(map(_ITEMSIZE, dtypes)))
    return align, what, user, tree


def _write(target: Target, rows: list[tuple[Source, DType]], what: Plan, *, tree: PackedTree, align: int,
           checksum: bool, durable: bool, created: str, user: dict[str, Any], compression: str = "none",
           pack: bool = False, progress: ProgressCallback | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
    with output(target, durable=durable) as sink:
        writer = Writer(sink, alignment=align, checksum=checksum, progress=progress) \
            if compression == "none" and not pack else \
            Writer11(sink, alignment=align, checksum=checksum, compression=compression, pack=pack, progress=progress,
                     chunk_bytes=chunk_bytes)
        try:
            writer.write_blobs(rows)
        except BaseException:
            writer.close()
            raise
        writer.finish(tree, producer=_producer(), created=created, user=user, views=what.views)


def save(path: Target, obj: Any, *, metadata: dict[str, Any] | None = None, alignment: int | None = None,
         checksum: bool = True, durable: bool = True, background: bool = False,
         staging: StagingPool | None = None, limits: Limits | None = None, compression: str = "none",
         pack: bool = False, progress: ProgressCallback | None = None,
         chunk_bytes: int = CHUNK_BYTES) -> SaveHandle | None:
    """Write ``obj`` (nested dicts/lists/tuples of arrays and plain values) to ``path``, atomically.

    The previous file at ``path`` is replaced only once the new one is complete (and, with
    ``durable``, fsynced with its directory); on any failure it is left as it was. ``metadata`` is
    a dict of plain values (str, int, float, bool, bytes, None, lists and dicts of them).
    ``path`` may be a binary file object or a socket: the file is streamed to it, front to back.
    A file that a reader with ``limits`` (default :class:`Limits`) would refuse is refused before
    any byte is written (:class:`ObjectLimitError`).

    ``background=True`` copies every tensor into ``staging`` (a :class:`StagingPool`, by default a
    shared 1 GiB one), returns a :class:`SaveHandle` once the copy is done (so the arrays may change
    right away), and writes the file on a thread; errors surface at ``handle.wait()``, or at the next
    background save through the same pool if nobody waited.
    ``compression`` (``none|fast|balanced|maximum``) and ``pack`` (small blobs at a 64-byte alignment)
    write format 1.1 (spec §13-§14); without them the file is format 1.0. ``chunk_bytes`` (a multiple
    of 64, at most 2^26; 1 MiB by default) is how many decoded bytes each compressed chunk holds: a
    partial read decodes whole chunks, so smaller chunks over-read less and compress a little worse.
    ``progress``, when given, is called by the writer with each increment of tensor bytes written
    (e.g. ``tqdm.update``); the increments add up to the bytes of the distinct tensors stored (bytes
    shared by several views count once). With ``background=True`` it is called on the writing thread.
    """
    check_chunk_bytes(chunk_bytes)
    created = _created()
    align, what, user, tree = _prepare(obj, metadata, alignment, limits, created)
    how: dict[str, Any] = {"tree": tree, "align": align, "checksum": checksum, "durable": durable,
                           "created": created, "user": user, "compression": compression, "pack": pack,
                           "progress": progress, "chunk_bytes": chunk_bytes}
    if not background:
        _write(path, what.rows, what, **how)
        return None
    return _save_background(path, what, staging or _default_pool(), **how)


_POOL: StagingPool | None = None
_POOL_LOCK = threading.Lock()


def _default_pool() -> StagingPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = StagingPool()
        return _POOL


def _save_background(path: Target, what: Plan, pool: StagingPool, **how: Any) -> SaveHandle:
    with pool.turn:
        return _stage_and_start(path, what, pool, **how)


def _stage_and_start(path: Target, what: Plan, pool: StagingPool, **how: Any) -> SaveHandle:
    prev = pool.inflight
    if prev is not None:
        prev.join()  # one save per pool at a time: wait for the one before, and report its error once
        if prev.unseen_error is not None:
            error, prev.seen = prev.unseen_error, True
            raise error
    handle = SaveHandle(os.fsdecode(path) if is_path(path) else name_of(path))
    feed = _Feed(pool)
    rows = staged_rows(what.rows, feed)
    failed = threading.Event()
    stager = Stager(pool, feed, failed.is_set)

    def run() -> None:
        error: BaseException | None = None
        try:
            stager.go.wait()
            _write(path, rows, what, **how)
        except BaseException as e:  # handed to the user at wait() or the next save
            error = e
            failed.set()
        finally:
            feed.drain()
            handle._finish(error)

    pool.inflight = handle
    threading.Thread(target=run, name="ckptfmt-save", daemon=False).start()
    try:
        stager.stage(what.rows)
    except _Cancelled:  # the writer failed first: its error is the one wait() reports
        with contextlib.suppress(BaseException):
            stager.settle()
        feed.put_end(aborted=True)
        return handle
    except BaseException:
        with contextlib.suppress(BaseException):
            stager.settle()  # no copy may still read the caller's arrays once this returns
        feed.put_end(aborted=True)
        stager.go.set()
        handle.join()
        handle.seen = True  # the staging error below is the one to report
        raise
    stager.finish()
    return handle


def save_bytes(obj: Any, *, metadata: dict[str, Any] | None = None, alignment: int | None = None,
               checksum: bool = True) -> bytes:
    """The checkpoint file of ``obj`` as bytes (as ``safetensors``' ``save``)."""
    buf = io.BytesIO()
    save(buf, obj, metadata=metadata, alignment=alignment, checksum=checksum, durable=False)
    return buf.getvalue()


def _checkpoint(path: Target, limits: Limits | None, **defaults: Any) -> Checkpoint:
    if is_path(path):
        return Checkpoint(path, limits=limits, **defaults)
    return open_stream(path, limits=limits, **defaults)


def open(path: Target, *, limits: Limits | None = None,  # noqa: A001
         backend: str | ArrayBackend = "numpy", device: str | None = None) -> Checkpoint:
    """Open a checkpoint lazily: validates the structure and metadata, reads no tensor data.

    ``path`` may be a binary file object (a stream is read in once; see :func:`load`).
    ``backend``/``device`` choose what ``get``, ``load`` and ``get_slice`` return (e.g. torch tensors).
    """
    return _checkpoint(path, limits, backend=backend, device=device)


def load(path: Target, *, keys: Iterable[str] | str | None = None, verify: bool = True,
         mmap: bool = True, backend: str | ArrayBackend = "numpy", device: str | None = None,
         limits: Limits | None = None) -> Any:
    """Read a checkpoint back: the whole object, or ``{key: value}`` for the key paths in ``keys``.

    ``mmap=True`` returns read-only zero-copy views of a memory map; ``mmap=False`` reads into fresh
    writable arrays (the better choice on network filesystems). With ``verify``, each blob read is
    checked against its checksum first. ``path`` may be a binary file object or socket: a regular
    file at offset 0 is read in place, any other stream once, front to back, into anonymous memory.
    A sharded directory (spec/DISTRIBUTED.md) loads consolidated, as numpy.
    """
    if keys is None and is_path(path) and os.path.isdir(path):
        for read_dir in DIRECTORY_READERS:
            state = read_dir(os.fspath(path))
            if state is not NotImplemented:
                return state
    with _checkpoint(path, limits) as ckpt:
        return ckpt.load(keys=keys, verify=verify, mmap=mmap, backend=backend, device=device)


def load_bytes(data: Any, *, keys: Iterable[str] | str | None = None, verify: bool = True,
               backend: str | ArrayBackend = "numpy", device: str | None = None, limits: Limits | None = None) -> Any:
    """Read a checkpoint from a bytes-like object (as ``safetensors``' ``load``); arrays own their memory."""
    with open_bytes(data, limits=limits) as ckpt:
        return ckpt.load(keys=keys, verify=verify, mmap=True, backend=backend, device=device)


def verify(path: str | os.PathLike[str], *, limits: Limits | None = None) -> VerifyReport:
    """Check a whole file; corruption is reported (``report.ok`` False), a missing file raises."""
    try:
        ckpt = Checkpoint(path, limits=limits)
    except CheckpointNotFoundError:
        raise
    except (CorruptCheckpointError, UnsupportedVersionError) as e:
        return VerifyReport(os.fspath(path), ok=False, errors=[str(e)])
    with ckpt:
        return ckpt.verify()


def _describe(value: Any) -> Any:
    """A JSON-safe stand-in for a plain value: bytes by their length, non-finite floats as text."""
    if isinstance(value, bytes):
        return {"type": "bytes", "len": len(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def leaf_summaries(ckpt: Checkpoint) -> Iterator[dict[str, Any]]:
    """One JSON-ready dict per leaf (tensor info or value), in tree order, made lazily."""
    tt = ckpt.manifest.tensors
    for key, leaf in walk_leaves(ckpt.manifest.tree):
        ref = tensor_ref(leaf)
        if ref is not None:
            e = tt.entry(ref[0])
            yield {"key": key, "kind": "scalar" if ref[1] else "tensor", "dtype": e.dtype,
                   "shape": list(e.shape), "nbytes": e.nbytes, "offset": e.offset, "row": e.index}
        elif type(leaf) is ViewRef:
            info = ckpt.info(key)
            v = ckpt.manifest.views.entry(leaf.index)
            yield {"key": key, "kind": "view", "dtype": info.dtype, "shape": list(info.shape),
                   "nbytes": info.nbytes, "offset": info.offset, "base_row": v.base, "strides": list(v.strides)}
        else:
            value = plain(leaf)
            yield {"key": key, "kind": "value", "type": type(value).__name__, "value": _describe(value)}


def inspect(path: str | os.PathLike[str], *, limits: Limits | None = None, max_leaves: int | None = None
            ) -> dict[str, Any]:
    """A JSON-ready summary: version, sizes, dtypes, the leaves (tensor info or value) and the metadata.

    ``max_leaves`` bounds the listed leaves (``leaf_count`` still counts them all), so that a tree
    of millions of leaves costs O(max_leaves) memory.
    """
    with Checkpoint(path, limits=limits) as ckpt:
        tt = ckpt.manifest.tensors
        dtypes: dict[str, int] = {}
        leaves = list(itertools.islice(leaf_summaries(ckpt), max_leaves))
        for i in range(len(tt)):
            name = tt.dtype_names[int(tt.dtype_code[i])]
            dtypes[name] = dtypes.get(name, 0) + int(tt.nbytes[i])
        return {
            "path": ckpt.path,
            "format_version": f"{ckpt.header.major}.{ckpt.header.minor}",
            "file_size": ckpt.file_size,
            "alignment": ckpt.header.alignment,
            "tensor_count": len(tt),
            "tensor_bytes": int(tt.nbytes.sum()) if len(tt) else 0,
            "checksummed": tt.checksum is not None,
            "dtype_bytes": dtypes,
            "producer": ckpt.producer,
            "created": ckpt.created,
            "metadata": _jsonable(ckpt.metadata),
            "leaf_count": len(leaves) if max_leaves is None else count_leaves(ckpt.manifest.tree),
            "leaves": leaves,
        }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return _describe(plain(x))


def diff(a: str | os.PathLike[str], b: str | os.PathLike[str], *, limits: Limits | None = None
         ) -> dict[str, list[str]]:
    """Which key paths differ between two checkpoints: ``only_a``, ``only_b``, ``changed``.

    Leaves are compared bit for bit (tensors by dtype, shape and bytes); containers by kind (dict,
    list, tuple), and an empty container counts as a node of its own.
    """
    with Checkpoint(a, limits=limits) as ca, Checkpoint(b, limits=limits) as cb:
        na, nb = _nodes(ca.manifest.tree), _nodes(cb.manifest.tree)
        changed = [k for k, x in na.items() if k in nb and not _same_node(ca, x, cb, nb[k], k)]
        return {"only_a": [k for k, x in na.items() if k not in nb and _listed(x)],
                "only_b": [k for k, x in nb.items() if k not in na and _listed(x)],
                "changed": changed}


_CONTAINER_TYPES = (dict, list, tuple)


def _nodes(tree: Any) -> dict[str, Any]:
    """Every node of a decoded tree, containers included, by key path."""
    return {join(p): node for p, node in walk_nodes(tree)}


def _listed(node: Any) -> bool:
    """Leaves and empty containers are reported as missing; a non-empty container is its leaves."""
    return type(node) not in _CONTAINER_TYPES or len(node) == 0


def _same_node(ca: Checkpoint, x: Any, cb: Checkpoint, y: Any, key: str) -> bool:
    if type(x) in _CONTAINER_TYPES or type(y) in _CONTAINER_TYPES:
        return type(x) is type(y)
    if type(x) is ViewRef or type(y) is ViewRef:  # compare the values a view shows, whatever stores them
        if type(x) is not type(y):
            return False
        va, vb = ca.get(key), cb.get(key)
        return bool(va.dtype == vb.dtype and va.shape == vb.shape and va.tobytes() == vb.tobytes())
    rx, ry = tensor_ref(x), tensor_ref(y)
    if rx is None or ry is None:
        # bit-exact: nan equals itself, 0.0 differs from -0.0, 1 differs from True and 1.0
        return rx is None and ry is None and type(plain(x)) is type(plain(y)) and \
            msgpack.packb(plain(x)) == msgpack.packb(plain(y))
    ea, eb = ca.entry(rx[0]), cb.entry(ry[0])
    if (ea.dtype, ea.shape, ea.nbytes, rx[1]) != (eb.dtype, eb.shape, eb.nbytes, ry[1]):
        return False
    raw = ca.manifest.tensors.codec_of(rx[0]) == "raw" == cb.manifest.tensors.codec_of(ry[0])  # 1.1: stored bytes
    if raw and ea.checksum is not None and eb.checksum is not None and ea.checksum != eb.checksum:
        return False
    ra = ca.read_rows([rx[0]])[rx[0]].reshape(-1).view(np.uint8)
    rb = cb.read_rows([ry[0]])[ry[0]].reshape(-1).view(np.uint8)
    return bool(np.array_equal(ra, rb))
