"""torch.save sources: the zip format (torch >= 1.6) and the legacy pickle and tar formats.

Files are loaded with ``torch.load(weights_only=True)``: its unpickler builds tensors, containers and
a fixed list of plain types, and refuses every other global instead of running it. To that list we add,
by name, the globals that rebuild numpy values and a few plain containers (:data:`SAFE_GLOBALS`: numpy
arrays, scalars and dtypes, ``argparse.Namespace``, ``frozenset``), none of which runs code named by the
file; :func:`to_tree` then turns what they build into ckptfmt values. Zip files are also memory-mapped
(``mmap=True``), so their tensors are views of the file that the writer streams from the page cache;
legacy files are read into memory. ``torch.load`` gives tensors that shared a storage in the file one
storage again, which ckptfmt then stores once.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._keypath import join
from ..errors import CheckpointError, MissingDependencyError
from ._errors import CorruptSourceError, UnsafePickleError, UnsupportedSourceError
from ._pickle_scan import describe, global_paths

__all__ = ["SAFE_GLOBALS", "STATE_DICT_METADATA", "import_torch", "load_torch", "safe_globals", "to_tree",
           "torch_load_bytes", "unsafe_globals"]

#: user-metadata key holding the ``_metadata`` attribute of each state-dict OrderedDict, by key path
STATE_DICT_METADATA = "torch_state_dict_metadata"
#: numpy dtype kinds whose globals are allowed (all but object ``O``)
_DTYPE_CHARS = "?bBhHiIlLqQefdgFDGSUVMm"
#: pickles of a zip larger than this are not scanned for the key paths of refused globals
_MAX_PICKLE = 256 << 20


def safe_globals() -> list[tuple[Any, str]]:
    """(object, "module.name") of the globals allowed beside weights_only's own, under each name numpy uses.

    numpy 1.x pickles name ``numpy.core.multiarray``, numpy 2 ``numpy._core.multiarray``; both map to the
    installed functions. None of them runs code named by the file: ``_reconstruct`` makes an empty
    array, ``scalar`` a scalar from its bytes, ``dtype`` a dtype from its description.
    """
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    pairs: list[tuple[Any, str]] = []
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        pairs += [(multiarray._reconstruct, f"{mod}._reconstruct"), (multiarray.scalar, f"{mod}.scalar")]
    pairs += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype"),
              (argparse.Namespace, "argparse.Namespace"), (frozenset, "builtins.frozenset")]
    for char in _DTYPE_CHARS:
        cls = type(np.dtype(char))
        if cls is not np.dtype:  # numpy >= 1.25: one class per dtype, numpy.dtypes.Float32DType, ...
            pairs.append((cls, f"numpy.dtypes.{cls.__name__}"))
    return pairs


#: the names of :func:`safe_globals`
SAFE_GLOBALS = frozenset(name for _, name in safe_globals())

_GLOBAL_RE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*) was not an allowed global")
_UNSAFE_HINT = ("pass allow_pickle=True (`ckptfmt convert --allow-pickle`) to load it with the full pickle "
                "module instead. UNSAFE: that runs code named by the file; do it only for files you trust")


def import_torch() -> Any:
    """The torch module, or :class:`MissingDependencyError` naming the extra to install."""
    try:
        import torch
    except ImportError as e:
        raise MissingDependencyError("converting torch files needs torch: pip install 'ckptfmt[torch]'") from e
    return torch


def unsafe_globals(torch: Any, source: Any) -> list[str]:
    """The globals of a zip file's pickle outside weights_only's allowlist ([] if torch cannot tell)."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return []
    try:
        return sorted(finder(source))
    except Exception:  # older zip layouts, TorchScript: torch.load reports those itself
        return []


def _refusal(path: str, e: BaseException, fmt: str) -> UnsafePickleError:
    """An :class:`UnsafePickleError` from torch's weights_only error, naming what it refused and where."""
    text = str(e)
    names = sorted(set(_GLOBAL_RE.findall(text)))
    if names:
        where = _legacy_uses(path, set(names)) if fmt == "torch-legacy" else ""
        return UnsafePickleError(path, f"the pickle needs {', '.join(names)}{where}, which torch.load("
                                       f"weights_only=True) does not allow; {_UNSAFE_HINT}", globals=names)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    at = next((i for i, line in enumerate(lines) if "WeightsUnpickler error" in line), None)
    detail = text.strip() if at is None else \
        " ".join(lines[at : at + 2]).partition("WeightsUnpickler error:")[2].strip()
    return UnsafePickleError(path, f"torch.load(weights_only=True) refused the file ({detail}); {_UNSAFE_HINT}")


@contextlib.contextmanager
def _translated(path: str, fmt: str) -> Iterator[None]:
    """torch's load errors as ckptfmt conversion errors; any other exception of the unpickler is a broken pickle."""
    try:
        yield
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower() or "weights_only" in str(e):
            raise _refusal(path, e, fmt) from None
        raise CorruptSourceError(path, f"{fmt}: the pickle is broken ({e})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) and "legacy .tar" in str(e):
            raise UnsupportedSourceError(path, f"{fmt}: torch cannot read the legacy .tar format with "
                                               f"weights_only=True; {_UNSAFE_HINT}") from None
        raise CorruptSourceError(path, f"{fmt}: torch.load failed ({type(e).__name__}: {msg})") from None
    except CheckpointError:
        raise
    except Exception as e:  # the weights-only unpickler lets a hostile pickle's IndexError, KeyError, ... through
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CorruptSourceError(path, f"{fmt}: the pickle is broken ({type(e).__name__}"
                                       + (f": {msg})" if msg else ")")) from None


def load_torch(path: str, fmt: str, *, allow_pickle: bool) -> tuple[Any, dict[str, Any]]:
    """(the object saved in a torch file as a ckptfmt tree, user metadata); zip files are memory-mapped.

    The metadata holds the state dicts' ``_metadata`` (:data:`STATE_DICT_METADATA`), if any.
    """
    torch = import_torch()
    zip_file = fmt == "torch-zip"
    if zip_file and not allow_pickle:
        names = [n for n in unsafe_globals(torch, path) if n not in SAFE_GLOBALS]
        if names:
            raise _refused_by_scan(path, names)
    if zip_file:
        _refuse_torchscript(path)
    with _translated(path, fmt), warnings.catch_warnings(), torch.serialization.safe_globals(safe_globals()):
        # torch warns when weights_only=False is passed explicitly (an informed choice here)
        warnings.simplefilter("ignore", FutureWarning)
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=zip_file)
    meta: dict[str, Any] = {}
    tree = to_tree(obj, path, meta)
    return tree, ({STATE_DICT_METADATA: meta} if meta else {})


def _legacy_uses(path: str, names: set[str]) -> str:
    """`` (used by: ...)`` naming the key paths of ``names`` in a legacy torch.save file ("" if not found).

    The legacy layout is four pickles in a row (magic number, protocol version, system info, the object)
    followed by the storages; the fourth is replayed inertly by :func:`global_paths`.
    """
    try:
        if os.path.getsize(path) > _MAX_PICKLE:
            return ""
        with open(path, "rb") as f:
            data = f.read(_MAX_PICKLE + 1)
    except OSError:
        return ""
    found = global_paths(data, names, index=3)
    return f" (used by: {describe(found)})" if found else ""


def _refused_by_scan(path: str, names: list[str]) -> UnsafePickleError:
    """The refusal of a zip file's globals, naming the key paths that use them where the pickle tells."""
    where = ""
    try:
        with zipfile.ZipFile(path) as zf:
            member = next((i for i in zf.infolist() if i.filename.endswith("data.pkl")), None)
            if member is not None and member.file_size <= _MAX_PICKLE:
                found = global_paths(zf.read(member), set(names))
                where = f" (used by: {describe(found)})" if found else ""
    except Exception:  # a hostile archive: the refusal then names the globals only
        pass
    return UnsafePickleError(path, f"the pickle needs {', '.join(names)}{where}, which neither torch.load("
                                   f"weights_only=True) nor ckptfmt's numpy allowlist allows; {_UNSAFE_HINT}",
                             globals=names)


def to_tree(obj: Any, path: str, state_dict_meta: dict[str, Any]) -> Any:
    """``obj`` as ckptfmt stores it; how each value the allowlist admits becomes a tree value:

    - numpy arrays and numeric scalars: kept (stored as tensors; a scalar loads back as a scalar);
      object arrays are refused (:class:`UnsupportedSourceError` naming the key path);
    - ``numpy.dtype``: its name, ``str(dtype)`` (``"float32"``, ``"<U3"``); ``torch.dtype`` and
      ``torch.device``: ``str()`` (``"torch.float32"``, ``"cpu"``); ``torch.Size``: a tuple of ints;
    - ``set`` / ``frozenset``: a list, sorted when the items compare, else in iteration order;
    - ``argparse.Namespace``: a dict of its attributes;
    - ``OrderedDict``: a dict in the same order; its ``_metadata`` (torch's per-module state-dict
      versions) goes to ``state_dict_meta[key path]``.

    Everything else passes unchanged (tensors, plain values, dicts, lists, tuples).
    """
    import torch

    def walk(o: Any, keys: tuple[str | int, ...], depth: int) -> Any:
        if depth > 256:
            return o  # the save refuses trees this deep by name
        t = type(o)
        if t in (str, int, float, bool, bytes, type(None)) or isinstance(o, torch.Tensor):
            return o
        if isinstance(o, np.ndarray):
            if o.dtype.hasobject:
                raise UnsupportedSourceError(path, f"key {join(keys)!r}: a numpy array of Python objects "
                                                   f"(dtype {o.dtype}), which ckptfmt cannot store")
            return o
        if isinstance(o, np.generic):
            return o.item() if isinstance(o, (np.str_, np.bytes_)) else o
        if isinstance(o, np.dtype):
            return str(o)
        if isinstance(o, (torch.dtype, torch.device)):
            return str(o)
        if isinstance(o, torch.Size):
            return tuple(int(d) for d in o)
        if isinstance(o, argparse.Namespace):
            o = dict(vars(o))
        if isinstance(o, dict):
            md = getattr(o, "_metadata", None) if isinstance(o, OrderedDict) else None
            if md is not None:
                state_dict_meta[join(keys)] = walk(dict(md), (*keys, "_metadata"), depth + 1)
            return {k: walk(v, (*keys, k), depth + 1) for k, v in o.items()}
        if isinstance(o, (set, frozenset)):
            items = list(o)
            with contextlib.suppress(TypeError):
                items = sorted(items)
            return [walk(v, (*keys, i), depth + 1) for i, v in enumerate(items)]
        if t is list:
            return [walk(v, (*keys, i), depth + 1) for i, v in enumerate(o)]
        if t is tuple:
            return tuple(walk(v, (*keys, i), depth + 1) for i, v in enumerate(o))
        return o  # what the save cannot store it names by key path

    return walk(obj, (), 0)


def _refuse_torchscript(path: str) -> None:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CorruptSourceError(path, f"torch-zip: not a readable zip archive ({e})") from None
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        raise UnsupportedSourceError(path, "this is a TorchScript archive (torch.jit.save), not a torch.save file; "
                                           "load it with torch.jit.load and save its state_dict()")


def torch_load_bytes(torch: Any, data: io.RawIOBase | io.BytesIO, *, path: str, what: str, allow_pickle: bool) -> Any:
    """``torch.load`` of an in-file record (a DCP item), with the same refusals as :func:`load_torch`."""
    if not allow_pickle:
        names = unsafe_globals(torch, data)
        data.seek(0)
        if names:
            raise UnsafePickleError(path, f"{what}: the pickle needs {', '.join(names)}, which torch.load("
                                          f"weights_only=True) does not allow; {_UNSAFE_HINT}", globals=names)
    with _translated(path, what), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.load(data, map_location="cpu", weights_only=not allow_pickle)
