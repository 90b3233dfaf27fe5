"""The user-facing functions: save, load, open, verify, inspect, diff."""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Iterable
from typing import Any

import msgpack
import numpy as np

from ._atomic import atomic_write
from ._backend import ArrayBackend
from ._header import DEFAULT_ALIGNMENT, check_alignment
from ._keypath import join
from ._manifest import Limits, ViewRef, check_plain, tensor_ref
from ._plan import plan
from ._reader import Checkpoint, VerifyReport, plain, walk_leaves
from ._writer import Writer
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


def save(path: str | os.PathLike[str], obj: Any, *, metadata: dict[str, Any] | None = None,
         alignment: int | None = None, checksum: bool = True, durable: bool = True, compression: str = "none",
         pack: bool = False) -> None:
    """Write ``obj`` (nested dicts/lists/tuples of arrays and plain values) to ``path``, atomically.

    The previous file at ``path`` is replaced only once the new one is complete (and, with
    ``durable``, fsynced with its directory); on any failure it is left as it was. ``metadata`` is
    a dict of plain values (str, int, float, bool, bytes, None, lists and dicts of them).
    ``compression`` (``none|fast|balanced|maximum``) and ``pack`` (small blobs at a 64-byte alignment)
    write format 1.1 (spec §13-§14); without them the file is format 1.0.
    """
    align = check_alignment(DEFAULT_ALIGNMENT if alignment is None else alignment)
    what = plan(obj)
    user = {} if metadata is None else metadata
    if not isinstance(user, dict):
        raise UnsupportedObjectError(f"metadata must be a dict, not {type(user).__name__}")
    check_plain(user)
    created = _created()
    with atomic_write(os.fspath(path), durable=durable) as fd:
        writer = Writer(fd, alignment=align, checksum=checksum) if compression == "none" and not pack else \
            Writer11(fd, alignment=align, checksum=checksum, compression=compression, pack=pack)
        try:
            writer.write_blobs(what.rows)
        except BaseException:
            writer.close()
            raise
        writer.finish(what.tree, producer=_producer(), created=created, user=user, views=what.views)


def open(path: str | os.PathLike[str], *, limits: Limits | None = None) -> Checkpoint:  # noqa: A001
    """Open a checkpoint lazily: validates the structure and metadata, reads no tensor data."""
    return Checkpoint(path, limits=limits)


def load(path: str | os.PathLike[str], *, keys: Iterable[str] | str | None = None, verify: bool = True,
         mmap: bool = True, backend: str | ArrayBackend = "numpy", device: str | None = None,
         limits: Limits | None = None) -> Any:
    """Read a checkpoint back: the whole object, or ``{key: value}`` for the key paths in ``keys``.

    ``mmap=True`` returns read-only zero-copy views of a memory map; ``mmap=False`` reads into fresh
    writable arrays (the better choice on network filesystems). With ``verify``, each blob read is
    checked against its checksum first.
    """
    with Checkpoint(path, limits=limits) as ckpt:
        return ckpt.load(keys=keys, verify=verify, mmap=mmap, backend=backend, device=device)


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


def inspect(path: str | os.PathLike[str], *, limits: Limits | None = None) -> dict[str, Any]:
    """A JSON-ready summary: version, sizes, dtypes, every leaf (tensor info or value) and the metadata."""
    with Checkpoint(path, limits=limits) as ckpt:
        tt = ckpt.manifest.tensors
        leaves = []
        dtypes: dict[str, int] = {}
        for key, leaf in walk_leaves(ckpt.manifest.tree):
            ref = tensor_ref(leaf)
            if ref is not None:
                e = tt.entry(ref[0])
                leaves.append({"key": key, "kind": "scalar" if ref[1] else "tensor", "dtype": e.dtype,
                               "shape": list(e.shape), "nbytes": e.nbytes, "offset": e.offset, "row": e.index})
            elif type(leaf) is ViewRef:
                info = ckpt.info(key)
                v = ckpt.manifest.views.entry(leaf.index)
                leaves.append({"key": key, "kind": "view", "dtype": info.dtype, "shape": list(info.shape),
                               "nbytes": info.nbytes, "offset": info.offset, "base_row": v.base,
                               "strides": list(v.strides)})
            else:
                value = plain(leaf)
                leaves.append({"key": key, "kind": "value", "type": type(value).__name__, "value": _describe(value)})
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
    out: dict[str, Any] = {}
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(tree, ())]
    while stack:
        node, p = stack.pop()
        out[join(p)] = node
        if type(node) is dict:
            stack.extend((v, (*p, k)) for k, v in node.items())
        elif type(node) in (list, tuple):
            stack.extend((v, (*p, i)) for i, v in enumerate(node))
    return dict(reversed(out.items()))


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
