"""The array-backend Protocol and its registry (spec-free: how the core meets numpy, torch, cupy).

The core only ever sees host numpy views of arrays; each framework's adapter in
``ckptfmt.backends`` turns its arrays into such views and back. Adapters are imported lazily, on the
first array of their framework, so importing ckptfmt never imports torch or cupy.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ._dtypes import DType

__all__ = ["ArrayBackend", "backend_for", "get_backend", "register_backend"]


@runtime_checkable
class ArrayBackend(Protocol):
    """What the core needs from an array library.

    The writer calls, per leaf: 1. :meth:`is_array` to claim it, 2. :meth:`host_view` to get its
    bytes. The reader calls :meth:`from_host` once per tensor it returns.
    """

    #: Short name users pass as ``backend=``.
    name: str

    def is_array(self, obj: Any) -> bool:
        """True if ``obj`` is an array (or array scalar) of this library."""
        ...

    def host_view(self, obj: Any) -> tuple[np.ndarray, DType, bool]:
        """A numpy view of ``obj``'s host bytes (any strides), its canonical dtype, and whether it is a scalar."""
        ...

    def from_host(self, array: np.ndarray, dtype: DType, *, scalar: bool, device: str | None) -> Any:
        """This library's array over (or copied from) ``array`` holding elements of ``dtype``."""
        ...


_BACKENDS: dict[str, ArrayBackend] = {}
#: top-level module of an array's type -> ckptfmt module providing its adapter
_LAZY: dict[str, str] = {"numpy": "ckptfmt.backends.numpy"}
_BY_MODULE: dict[str, ArrayBackend] = {}


def register_backend(backend: ArrayBackend, *, modules: tuple[str, ...] = ()) -> None:
    """Make ``backend`` available by name and for arrays whose type lives in one of ``modules``."""
    _BACKENDS[backend.name] = backend
    for m in modules:
        _BY_MODULE[m] = backend


def _load_for_module(root: str) -> ArrayBackend | None:
    found = _BY_MODULE.get(root)
    if found is None and root in _LAZY:
        importlib.import_module(_LAZY[root])
        found = _BY_MODULE.get(root)
    return found


def backend_for(obj: Any) -> ArrayBackend | None:
    """The backend that claims ``obj``, or None for a non-array value."""
    root = type(obj).__module__.partition(".")[0]
    if root in ("builtins",):
        return None
    be = _load_for_module(root)
    if be is not None and be.is_array(obj):
        return be
    if isinstance(obj, (np.ndarray, np.generic)):  # numpy subclasses and ml_dtypes scalars
        np_be = _load_for_module("numpy")
        if np_be is not None and np_be.is_array(obj):
            return np_be
    return None


def get_backend(name: str) -> ArrayBackend:
    """The backend called ``name`` (``"numpy"``, ...), importing its adapter if needed."""
    if name not in _BACKENDS:
        module = _LAZY.get(name)
        if module is None:
            raise ValueError(f"unknown backend {name!r}; known: {sorted(set(_LAZY) | set(_BACKENDS))}")
        importlib.import_module(module)
    return _BACKENDS[name]
