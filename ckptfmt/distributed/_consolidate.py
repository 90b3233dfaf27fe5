"""A distributed checkpoint outside a process group: consolidate, verify, inspect (list and delete: ``_directory``).

Torch-free: ``ckptfmt load/consolidate/verify/inspect`` of a sharded directory need only numpy.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from .._api import save as _save
from .._api import verify as _verify_file
from ..errors import CheckpointError, CheckpointNotFoundError
from ._directory import delete, list_checkpoints
from ._index import Index
from ._read import check_files, covered_exactly_once, nest, open_index, read_range, read_tensor
from ._store import Location
from ._values import decode_value


def top_key(idx: Index, key: str) -> str | int:
    """The top-level key of the state that DCP's flat ``key`` belongs to."""
    path = idx.planner_data.get(key)
    return path[0] if path else key.split(".", 1)[0]


def consolidate(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, nested: bool = True,
                storage_options: dict[str, Any] | None = None,
                only: Collection[str] | None = None) -> dict[str, Any]:
    """The full state of a sharded checkpoint as numpy arrays and plain values (written to ``out`` if given).

    ``nested`` rebuilds the structure DCP flattened (``{"model": {...}, "optim": {...}}``); otherwise
    the keys are DCP's flat names. ``only``: read just these top-level keys of the state.
    """
    loc = Location(path, storage_options=storage_options)
    try:
        idx = open_index(loc)
        check_files(loc, idx)
        flat: dict[str, Any] = {}
        for key, rec in idx.tensors.items():
            if only is None or top_key(idx, key) in only:
                flat[key] = read_tensor(loc, idx, rec)
        for key, v in idx.values.items():
            if only is not None and top_key(idx, key) not in only:
                continue
            raw = read_range(loc, idx, v.extent, 0, v.extent.length, key=key)
            flat[key] = decode_value(raw.tobytes(), where=f"{loc.url}: value {key!r}")
    finally:
        loc.close()
    state = nest(flat, idx.planner_data) if nested else flat
    if out is not None:
        _save(out, state, metadata={"consolidated_from": loc.url, "name": idx.name, "world_size": idx.world_size,
                                    "user": idx.metadata})
    return state


@dataclass
class ShardedVerifyReport:
    """The outcome of :func:`verify`: coverage of every tensor, every block checksum, every container file."""

    path: str
    ok: bool
    tensors_checked: int = 0
    values_checked: int = 0
    bytes_checked: int = 0
    files_checked: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "tensors_checked": self.tensors_checked,
                "values_checked": self.values_checked, "bytes_checked": self.bytes_checked,
                "files_checked": self.files_checked, "errors": self.errors}


def verify(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> ShardedVerifyReport:
    """Check a sharded checkpoint: each chunk covered exactly once, each checksum good; a missing one raises."""
    loc = Location(path, storage_options=storage_options)
    rep = ShardedVerifyReport(loc.url, ok=True)
    try:
        try:
            idx = open_index(loc)
        except CheckpointNotFoundError:
            raise
        except CheckpointError as e:
            rep.ok, rep.errors = False, [str(e)]
            return rep
        for f in idx.files:
            try:
                size = loc.file_size(f.name)
            except (OSError, CheckpointError) as e:
                rep.errors.append(f"{f.name}: {e}")
                continue
            if size != f.size:
                rep.errors.append(f"{f.name}: {size} bytes, the index records {f.size}")
                continue
            local = loc.local_path(f.name)
            if local is not None:
                r = _verify_file(local)
                rep.errors.extend(r.errors)
            rep.files_checked += 1
        if rep.errors:
            rep.ok = False
            return rep
        for key, rec in idx.tensors.items():
            problem = covered_exactly_once(rec)
            if problem:
                rep.errors.append(f"{key}: {problem}")
            for c in rec.chunks:
                try:
                    read_range(loc, idx, c.extent, 0, c.extent.length, key=key)
                    rep.bytes_checked += c.extent.length
                except CheckpointError as e:
                    rep.errors.append(str(e))
            rep.tensors_checked += 1
        for key, v in idx.values.items():
            try:
                raw = read_range(loc, idx, v.extent, 0, v.extent.length, key=key)
                decode_value(raw.tobytes(), where=f"value {key!r}")
                rep.bytes_checked += v.extent.length
            except CheckpointError as e:
                rep.errors.append(str(e))
            rep.values_checked += 1
    finally:
        loc.close()
    rep.ok = not rep.errors
    return rep


def inspect(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-ready summary of a sharded checkpoint: ranks, files, every tensor's chunks, every value's size."""
    loc = Location(path, storage_options=storage_options)
    idx: Index = open_index(loc)
    return {
        "path": loc.url, "kind": "sharded", "name": idx.name, "created": idx.created, "producer": idx.producer,
        "world_size": idx.world_size, "block_size": idx.block_size,
        "files": [{"name": f.name, "size": f.size, "rank": f.rank} for f in idx.files],
        "tensor_count": len(idx.tensors), "value_count": len(idx.values),
        "tensor_bytes": sum(c.extent.length for t in idx.tensors.values() for c in t.chunks),
        "metadata": idx.metadata,
        "tensors": [{"key": t.key, "dtype": t.dtype, "shape": list(t.shape),
                     "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes),
                                 "file": idx.files[c.extent.file].name, "offset": c.extent.offset,
                                 "length": c.extent.length} for c in t.chunks]} for t in idx.tensors.values()],
        "values": [{"key": v.key, "file": idx.files[v.extent.file].name, "length": v.extent.length}
                   for v in idx.values.values()],
    }


__all__ = ["ShardedVerifyReport", "consolidate", "delete", "inspect", "list_checkpoints", "top_key", "verify"]
