"""The convenience API: ``save``, ``load``, ``async_save`` with options, on top of DCP and :class:`Writer`."""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import functools
import gc
import inspect
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.staging import BlockingAsyncStager

from ._errors import DistributedCheckpointError, from_dcp
from ._index import DEFAULT_BLOCK_SIZE
from ._planner import LoadPlanner, SavePlanner
from ._storage import Reader, Writer
from ._store import Location

#: top-level keys treated as optimizer state by ``include_optimizer=False`` (besides Optimizer objects)
OPTIMIZER_KEYS = ("optim", "optimizer", "optimizers")
#: top-level keys kept by ``model_only=True`` (besides nn.Module objects)
MODEL_KEYS = ("model", "models")
#: the top-level key of the per-rank RNG states
RNG_KEY = "rng_state"


@dataclass(frozen=True)
class SaveOptions:
    """What and how to save (the requirement's SaveOptions).

    ``model_only`` keeps only modules and the keys in :data:`MODEL_KEYS`; ``include_optimizer=False``
    drops optimizers and :data:`OPTIMIZER_KEYS`; ``rng_state`` adds each rank's RNG states under
    ``rng_state/rank<N>``; ``timeout`` (s) bounds every collective wait; ``compression`` is a format
    compression level (``fast``, ``balanced``, ``maximum``; None: raw), stored so that a reshard still
    reads and decodes only the chunks it needs (spec/DISTRIBUTED.md §3.1).
    """

    name: str | None = None
    model_only: bool = False
    include_optimizer: bool = True
    rng_state: bool = False
    compression: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    overwrite: bool = True
    sync: bool = True
    retries: int = 4
    storage_options: dict[str, Any] | None = None
    disable_gc: bool = True


@dataclass(frozen=True)
class LoadOptions:
    """What and how to load: the same selection switches as :class:`SaveOptions`; ``strict`` refuses missing keys."""

    model_only: bool = False
    include_optimizer: bool = True
    rng_state: bool = False
    strict: bool = True
    timeout: float | None = None
    retries: int = 4
    storage_options: dict[str, Any] | None = None
    max_index_bytes: int = 1 << 30
    disable_gc: bool = True


def _select(state: dict[str, Any], *, model_only: bool, include_optimizer: bool) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        is_optim = isinstance(v, torch.optim.Optimizer) or k in OPTIMIZER_KEYS
        is_model = isinstance(v, torch.nn.Module) or k in MODEL_KEYS
        if model_only and not is_model:
            continue
        if not include_optimizer and is_optim:
            continue
        out[k] = v
    return out


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _rank(pg: Any) -> int:
    return dist.get_rank(pg) if dist.is_available() and dist.is_initialized() else 0


def _rng_entry() -> dict[str, Any]:
    from ..torch._training import capture_rng_state

    def conv(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            return torch.from_numpy(x.copy())
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, list):
            return [conv(v) for v in x]
        return x

    return conv(capture_rng_state())


_GROUPS: dict[tuple[int, float], Any] = {}
_GROUPS_LOCK = threading.Lock()


def _group(pg: Any, timeout: float | None) -> Any:
    """``pg``, or (once per (group, timeout)) a gloo group over the same ranks whose waits end after ``timeout`` s."""
    if timeout is None or not (dist.is_available() and dist.is_initialized()):
        return pg
    key = (id(pg), float(timeout))
    with _GROUPS_LOCK:
        g = _GROUPS.get(key)
        if g is None:
            ranks = None if pg is None else dist.get_process_group_ranks(pg)
            g = dist.new_group(ranks=ranks, backend="gloo", timeout=datetime.timedelta(seconds=timeout))
            _GROUPS[key] = g
        return g


_QUIET_LOCK = threading.Lock()
_QUIET = [0, 0]  # [calls inside, the level to restore]


def _dcp_logger() -> Any:
    """DCP's method logger when nothing can receive its records (only NullHandlers, no propagation), else None."""
    try:
        from torch.distributed.checkpoint.logger import _dcp_logger as lg
    except ImportError:
        return None
    if not isinstance(lg, logging.Logger) or lg.propagate or \
            not all(isinstance(h, logging.NullHandler) for h in lg.handlers):
        return None
    return lg


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """DCP's method logger above DEBUG for the call, when its debug records would be discarded anyway.

    DCP logs a start and an end record around every planning step and every top-level key; with its
    logger at DEBUG each one pays for ``findCaller`` (measured: ~0.1 ms a record, 2 per top-level key
    per save). Nothing is lost: the records go to a NullHandler and do not propagate.
    """
    lg = _dcp_logger()
    if lg is None:
        yield
        return
    with _QUIET_LOCK:
        if _QUIET[0] == 0:
            _QUIET[1] = lg.level
            if lg.level < logging.INFO:
                lg.setLevel(logging.INFO)
        _QUIET[0] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET[0] -= 1
            if _QUIET[0] == 0:
                lg.setLevel(_QUIET[1])


def _is_stateful(v: Any) -> bool:
    """``isinstance(v, Stateful)`` (a runtime-checkable Protocol: both methods present), without the
    Protocol machinery's ~0.1 ms per call."""
    return not isinstance(v, torch.Tensor) and hasattr(v, "state_dict") and hasattr(v, "load_state_dict")


def _to_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with each Stateful replaced by its ``state_dict()`` (what ``dcp.save`` does first)."""
    return {k: v.state_dict() if _is_stateful(v) else v for k, v in state.items()}


def _dcp_save(state: dict[str, Any], writer: Writer, pg: Any) -> None:
    """``dcp.save(state, storage_writer=writer, planner=SavePlanner(), ...)``, minus its per-key wrapper.

    ``dcp.save`` calls each top-level value's ``state_dict()`` through a logging wrapper that draws a
    uuid4 and builds a log record per key, whatever the log level (~0.1 ms a key). Where this torch
    has DCP's inner ``_save_state_dict`` with the expected parameters, the Stateful conversion is
    done here and that is called; otherwise ``dcp.save`` as is.
    """
    inner = _inner_save()
    if inner is None:
        dcp.save(state, storage_writer=writer, planner=SavePlanner(), process_group=pg, no_dist=_no_dist())
        return
    inner(state_dict=_to_state_dict(state), storage_writer=writer, process_group=pg, no_dist=_no_dist(),
          planner=SavePlanner())


def _dcp_load(state: dict[str, Any], reader: Reader, planner: LoadPlanner, pg: Any) -> None:
    """``dcp.load(state, storage_reader=reader, planner=planner, ...)`` with the Stateful handling done here.

    ``dcp.load`` checks ``isinstance(v, Stateful)`` (a Protocol check) twice per top-level key; where
    this torch has DCP's inner ``_load_state_dict`` with the expected parameters, the same steps are
    done here (sorted keys, ``state_dict()`` before, ``load_state_dict()`` after) around it.
    """
    inner = _inner("state_dict_loader", "_load_state_dict", frozenset({
        "state_dict", "storage_reader", "process_group", "no_dist", "planner"}))
    if inner is None:
        dcp.load(state, storage_reader=reader, planner=planner, process_group=pg, no_dist=_no_dist())
        return
    keys = sorted(state)
    sd = {k: state[k].state_dict() if _is_stateful(state[k]) else state[k] for k in keys}
    inner(state_dict=sd, storage_reader=reader, process_group=pg, no_dist=_no_dist(), planner=planner)
    for k in keys:
        if _is_stateful(state[k]):
            state[k].load_state_dict(sd[k])
        else:
            state[k] = sd[k]


@functools.cache
def _inner(module: str, name: str, params: frozenset[str]) -> Any:
    """DCP's private ``torch.distributed.checkpoint.<module>.<name>`` if it takes ``params``, else None."""
    import importlib

    try:
        fn = getattr(importlib.import_module(f"torch.distributed.checkpoint.{module}"), name)
        sig = inspect.signature(fn).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    return fn if params <= set(sig) else None


def _inner_save() -> Any:
    return _inner("state_dict_saver", "_save_state_dict", frozenset({
        "state_dict", "storage_writer", "process_group", "no_dist", "planner"}))


@contextlib.contextmanager
def _no_gc(on: bool) -> Iterator[None]:
    """Automatic garbage collection off for the call (DCP's planning allocates enough to trigger full passes).

    Outside a process group DCP warns that it saves in a single process: here that is the intent.
    """
    was = gc.isenabled()
    if on and was:
        gc.disable()
    try:
        with warnings.catch_warnings(), _quiet_dcp():
            if _no_dist():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    finally:
        if on and was:
            gc.enable()


def _abort(writer: Writer, path: str | os.PathLike[str], o: SaveOptions) -> None:
    """Remove a failed attempt through the writer's own location: the one holding the attempt's lock (on the
    coordinator), so that an attempt another save is writing is never taken for this one's."""
    loc = writer.location if writer.location is not None else Location(path, storage_options=o.storage_options)
    loc.abort()


def _writer(path: str | os.PathLike[str], o: SaveOptions) -> Writer:
    meta = dict(o.metadata)
    return Writer(path, block_size=o.block_size, overwrite=o.overwrite, name=o.name, metadata=meta, sync=o.sync,
                  storage_options=o.storage_options, retries=o.retries, compression=o.compression)


def _prepare(state: dict[str, Any], o: SaveOptions, pg: Any) -> dict[str, Any]:
    sel = _select(state, model_only=o.model_only, include_optimizer=o.include_optimizer)
    if o.rng_state:
        sel[RNG_KEY] = {f"rank{_rank(pg)}": _rng_entry()}
    return sel


def save(state: dict[str, Any], path: str | os.PathLike[str], *, process_group: Any = None,
         options: SaveOptions | None = None) -> str:
    """Save ``state`` (tensors, DTensors, Stateful objects, plain values) on every rank; returns the path.

    Any rank's failure raises :class:`DistributedCheckpointError` on every rank, listing each cause;
    the attempt is removed and a previous checkpoint at ``path`` is untouched.
    """
    o = options or SaveOptions()
    pg = _group(process_group, o.timeout)
    sel = _prepare(state, o, pg)
    writer = _writer(path, o)
    try:
        with _no_gc(o.disable_gc):
            _dcp_save(sel, writer, pg)
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        _abort(writer, path, o)
        raise from_dcp(e, os.fspath(path), "save") from None
    return os.fspath(path)


def load(state: dict[str, Any], path: str | os.PathLike[str], *, process_group: Any = None,
         options: LoadOptions | None = None) -> dict[str, Any]:
    """Load into ``state`` in place (resharding as its tensors/DTensors ask) and return it."""
    o = options or LoadOptions()
    pg = _group(process_group, o.timeout)
    sel = _select(state, model_only=o.model_only, include_optimizer=o.include_optimizer)
    rng_key = f"rank{_rank(pg)}"
    if o.rng_state:
        sel[RNG_KEY] = {rng_key: _rng_entry()}
    reader = Reader(path, storage_options=o.storage_options, retries=o.retries, max_index_bytes=o.max_index_bytes)
    try:
        with _no_gc(o.disable_gc):
            _dcp_load(sel, reader, LoadPlanner(allow_partial_load=not o.strict), pg)
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise from_dcp(e, os.fspath(path), "load") from None
    if o.rng_state:
        from ..torch._training import restore_rng_state

        restore_rng_state(sel[RNG_KEY][rng_key])
    for k, v in sel.items():
        if k != RNG_KEY and k in state and not hasattr(state[k], "load_state_dict"):
            state[k] = v
    return state


def _signature(obj: Any, out: list[Any]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((type(obj).__name__, tuple(obj.shape), obj.dtype, getattr(obj, "placements", None)))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.append(k)
            _signature(v, out)
    elif isinstance(obj, (list, tuple)):
        out.append(len(obj))
        for v in obj:
            _signature(v, out)
    else:
        out.append(type(obj).__name__)


class ReusingStager(BlockingAsyncStager):
    """An async stager that copies into CPU buffers allocated once and reused while the state keeps its shapes.

    DCP's ``DefaultStager`` allocates fresh memory on every save; reusing it cuts the training stall
    to one memcpy. Peak extra host memory: one copy of the state. Before staging, it waits for the
    previous save through it (its buffers are still being written from).
    """

    def __init__(self) -> None:
        super().__init__(cache_staged_state_dict=True)
        self._signature: list[Any] | None = None
        self.pending: concurrent.futures.Future[Any] | None = None
        self.allocations = 0

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self.pending is not None:
            with contextlib.suppress(BaseException):
                self.pending.result()
            self.pending = None
        sig: list[Any] = []
        _signature(state_dict, sig)
        if self.state_dict_cache is None or sig != self._signature:
            self.state_dict_cache = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
            self._signature = sig
            self.allocations += 1
        return _copy_state_dict(state_dict, self.state_dict_cache)

    def close(self) -> None:
        self.state_dict_cache = None
        self._signature = None


_DEFAULT_STAGER: ReusingStager | None = None


def async_save(state: dict[str, Any], path: str | os.PathLike[str], *, process_group: Any = None,
               options: SaveOptions | None = None, stager: ReusingStager | None = None
               ) -> concurrent.futures.Future[str]:
    """Stage ``state`` to reused CPU buffers, return at once, and save in the background.

    The future's ``result()`` is the path, or raises :class:`DistributedCheckpointError` (the attempt
    removed). One save per stager is in flight: the next ``async_save`` waits for the previous one.
    """
    global _DEFAULT_STAGER
    o = options or SaveOptions()
    if stager is None:
        if _DEFAULT_STAGER is None:
            _DEFAULT_STAGER = ReusingStager()
        stager = _DEFAULT_STAGER
    pg = _group(process_group, o.timeout)
    sel = _prepare(state, o, pg)
    writer = _writer(path, o)
    out: concurrent.futures.Future[str] = concurrent.futures.Future()
    p = os.fspath(path)
    if _no_dist():  # one process: stage here, save in a thread of ours (DCP's would warn from its thread)
        from torch.distributed.checkpoint.state_dict_saver import _stateful_to_state_dict

        try:
            staged = stager.stage(_stateful_to_state_dict(sel))
        except Exception as e:
            out.set_exception(from_dcp(e, p, "async save"))
            return out

        def run() -> None:
            try:
                with _no_gc(o.disable_gc):
                    _dcp_save(staged, writer, None)
            except BaseException as e:
                _abort(writer, path, o)
                out.set_exception(from_dcp(e, p, "async save"))
                return
            out.set_result(p)

        threading.Thread(target=run, name="ckptfmt-async-save", daemon=True).start()
        stager.pending = out
        return out
    try:
        with _no_gc(o.disable_gc):
            fut = dcp.async_save(sel, storage_writer=writer, planner=SavePlanner(), process_group=pg,
                                 async_stager=stager, no_dist=_no_dist())
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        _abort(writer, path, o)
        out.set_exception(from_dcp(e, p, "async save"))
        return out
    inner: Any = getattr(fut, "upload_completion", fut)

    def done(f: Any) -> None:
        try:
            f.result()
        except BaseException as e:
            _abort(writer, path, o)
            out.set_exception(from_dcp(e, p, "async save"))
            return
        out.set_result(p)

    inner.add_done_callback(done)
    stager.pending = out
    return out


__all__ = ["DistributedCheckpointError", "LoadOptions", "ReusingStager", "SaveOptions", "async_save", "load", "save"]
