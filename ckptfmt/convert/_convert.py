"""``convert``: read a checkpoint of another format and write it as one ckptfmt file, streaming."""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Union

from .. import _api
from ..errors import MissingDependencyError, NotACheckpointFileError, UnsupportedObjectError
from ._detect import detect
from ._errors import SameFileError
from ._lazy import RAW, count

__all__ = ["ConversionReport", "ProgressLike", "convert"]


class _TqdmLike(Protocol):
    def update(self, n: int) -> Any: ...


#: a callable receiving each increment of tensor bytes written, or a tqdm-like object (``update(n)``)
ProgressLike = Union[Callable[[int], Any], _TqdmLike]  # noqa: UP007 (a runtime alias on Python 3.10)


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert` did."""

    #: the detected source format (one of ``FORMATS``)
    source_format: str
    src: str
    dst: str
    #: distinct tensors converted (a tensor referenced twice counts once)
    tensors: int
    #: their bytes (tensors that share storage count each; the file stores shared bytes once)
    bytes: int
    #: size of the written file
    file_size: int
    #: wall time of the whole conversion: reading, writing and the final fsync
    seconds: float

    @property
    def mb_per_s(self) -> float:
        """Tensor megabytes (10^6 bytes) converted per second."""
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return asdict(self)


def _read(fmt: str, src: str, *, allow_pickle: bool) -> tuple[Any, dict[str, Any]]:
    """(tree, metadata from the source) for a detected format."""
    if fmt == "ckptfmt":
        with _api.open(src) as ckpt:  # raw arrays: bfloat16 and float8 pass through without ml_dtypes
            return ckpt.load(mmap=True, backend=RAW), dict(ckpt.metadata)
    if fmt in ("torch-zip", "torch-legacy"):
        from ._torch import load_torch

        return load_torch(src, fmt, allow_pickle=allow_pickle)
    if fmt == "flax-msgpack":
        from ._flax import read_flax

        return read_flax(src), {}
    if fmt == "keras":
        from ._keras import read_keras

        return read_keras(src)
    if fmt == "gguf":
        from ._gguf import read_gguf

        return read_gguf(src)
    if fmt == "lightning":
        from ._lightning import read_lightning

        return read_lightning(src, "torch-zip", allow_pickle=allow_pickle)
    if fmt == "torchscript":
        from ._torchscript import read_torchscript

        return read_torchscript(src), {}
    if fmt == "safetensors":
        from ._safetensors import read_safetensors

        return read_safetensors(src)
    if fmt == "safetensors-sharded":
        from ._safetensors import read_sharded

        return read_sharded(src)
    if fmt == "torch-sharded":
        from ._detect import detect
        from ._hfdir import read_torch_sharded

        return read_torch_sharded(src, allow_pickle=allow_pickle, detect=detect)
    if fmt == "npy":
        from ._numpy import read_npy

        return read_npy(src, allow_pickle=allow_pickle), {}
    if fmt == "npz":
        from ._numpy import read_npz

        return read_npz(src, allow_pickle=allow_pickle), {}
    if fmt == "hdf5":
        return _read_hdf5(src)
    if fmt == "dcp":
        from ._dcp import read_dcp

        return read_dcp(src, allow_pickle=allow_pickle), {}
    if fmt == "tensorflow":
        from ._tensorflow import read_tensorflow

        return read_tensorflow(src)
    if fmt == "orbax":
        from ._orbax import read_orbax

        return read_orbax(src)
    raise ValueError(f"unknown source format {fmt!r}")  # detect() returns none other


def _read_hdf5(src: str) -> tuple[Any, dict[str, Any]]:
    try:
        hdf5 = importlib.import_module(f"{__package__}._hdf5")
    except ImportError as e:
        if e.name == "h5py":
            raise MissingDependencyError("converting HDF5 files needs h5py: pip install 'ckptfmt[hdf5]'") from e
        raise MissingDependencyError("HDF5 conversion is not available in this installation "
                                     f"(ckptfmt.convert._hdf5 cannot be imported: {e})") from e
    tree, meta = hdf5.read_hdf5(src)
    return tree, dict(meta or {})


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, allow_pickle: bool = False,
            progress: ProgressLike | None = None, metadata: dict[str, Any] | None = None) -> ConversionReport:
    """Convert the checkpoint at ``src`` (any format :func:`detect` knows) to a ckptfmt file at ``dst``.

    The format is told by content, not by extension. Tensors keep their dtype, shape and bytes; tensors
    that shared storage still do; nested containers and plain values keep their structure. The write is
    atomic (``ckptfmt.save``) and streams: sources are memory-mapped or read a chunk at a time, so a
    checkpoint larger than the RAM converts.

    ``allow_pickle``: **UNSAFE** — load pickled content (torch files needing globals outside
    ``torch.load(weights_only=True)``'s allowlist, numpy object arrays, DCP values) with the full
    pickle module, which runs code named by the file. Only for files you trust. Objects that are not
    tensors or plain values still cannot be stored: the save then fails with
    :class:`~ckptfmt.UnsupportedObjectError` naming their key path.

    ``progress``: either a callable, called with each increment of tensor bytes written (the save's
    writer callback, see :func:`ckptfmt.save`), or a tqdm-like object, whose ``update(n)`` gets the
    increments (and whose ``total`` is set to the tensor bytes when it has none). The increments add
    up to the report's ``bytes``: tensors that share stored bytes are counted when the save ends.

    ``metadata``: plain values merged into the file's user metadata, over the source's own (a
    safetensors ``__metadata__``, a sharded index's ``metadata``, a model directory's side files under
    ``"hf_files"``, torch state dicts' ``_metadata`` under ``"torch_state_dict_metadata"``) and over the
    ``{"converted_from": {"format": ..., "path": <source file name>}}`` entry added to every file.
    """
    start = time.perf_counter()
    src_s, dst_s = os.fspath(src), os.fspath(dst)
    if metadata is not None and not isinstance(metadata, dict):
        raise UnsupportedObjectError(f"metadata must be a dict, not {type(metadata).__name__}")
    fmt = detect(src_s)
    if os.path.isdir(dst_s):
        raise NotACheckpointFileError(f"{dst_s}: is a directory; give the path of the file to write")
    if os.path.exists(dst_s) and os.path.exists(src_s) and os.path.samefile(src_s, dst_s):
        raise SameFileError(f"{dst_s}: the destination is the source; write the conversion elsewhere")
    if _part_of_source(fmt, src_s, dst_s):
        raise SameFileError(f"{dst_s}: the destination is a file of the source checkpoint ({fmt} at {src_s}), "
                            "which the conversion would replace; write it elsewhere")
    tree, source_meta = _read(fmt, src_s, allow_pickle=allow_pickle)
    if fmt in ("safetensors-sharded", "torch-sharded"):  # a model directory: its config and tokenizer files too
        from ._hfdir import SIDE_KEY, read_side_files

        side = read_side_files(src_s if os.path.isdir(src_s) else os.path.dirname(os.path.abspath(src_s)))
        if side:
            source_meta = {**source_meta, SIDE_KEY: side}
    name = os.path.basename(os.path.normpath(os.path.abspath(src_s)))
    user = {**source_meta, "converted_from": {"format": fmt, "path": name}, **(metadata or {})}
    tensors, nbytes = count(tree)
    sink = _sink(progress, nbytes)
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        sink(n)  # type: ignore[misc]  # only passed when there is a sink

    _api.save(dst_s, tree, metadata=user, progress=None if sink is None else report)
    del tree
    if sink is not None and nbytes > done:
        sink(nbytes - done)  # bytes shared by several tensors were stored once; they count as converted
    return ConversionReport(fmt, src_s, dst_s, tensors, nbytes, os.path.getsize(dst_s), time.perf_counter() - start)


#: formats whose checkpoint is several files in one directory (shards, index, metadata)
_MULTI_FILE = frozenset({"dcp", "safetensors-sharded", "torch-sharded", "orbax", "tensorflow"})


def _part_of_source(fmt: str, src: str, dst: str) -> bool:
    """Whether ``dst`` is an existing file of a multi-file source: any file in its directory tree that is
    not a ckptfmt file (a shard, an index, metadata), which the save's rename would replace."""
    if fmt not in _MULTI_FILE or not os.path.lexists(dst):
        return False
    root = os.path.realpath(src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src)))
    named = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(dst))), os.path.basename(dst))
    if all(os.path.commonpath([root, t]) != root for t in (named, os.path.realpath(dst))):
        return False  # neither the name (a link in a hub snapshot, say) nor the file it reaches is the source's
    try:
        return detect(dst) != "ckptfmt"
    except Exception:  # not a file a converter reads: still one of the source directory's files
        return True


def _sink(progress: ProgressLike | None, total: int) -> Callable[[int], Any] | None:
    """Where increments go: the callable, or a tqdm-like object's ``update`` (its ``total`` set if it has none)."""
    if progress is None:
        return None
    update = getattr(progress, "update", None)
    if update is None:
        return progress  # type: ignore[return-value]
    if hasattr(progress, "total") and not progress.total:
        progress.total = total
        refresh = getattr(progress, "refresh", None)
        if callable(refresh):
            refresh()
    return update
