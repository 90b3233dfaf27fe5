"""The array-backend Protocol and its registry (spec-free: how the core meets numpy, torch, cupy).

The core only ever sees host numpy views of arrays; each framework's adapter in
``ckptfmt.backends`` turns its arrays into such views and back. Adapters are imported lazily, on the
first array of their framework, so importing ckptfmt never imports torch or cupy.
"""

from __future__ import annotations

import importlib
from collections.abc import Hashable, Iterator
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np

from ._dtypes import DType
from .errors import MissingDependencyError

__all__ = ["ArrayBackend", "DeviceSource", "Source", "backend_for", "get_backend", "is_host", "register_backend"]


@runtime_checkable
class DeviceSource(Protocol):
    """The bytes of an array that lives off the host (a GPU), handed to the writer chunk by chunk."""

    shape: tuple[int, ...]
    ndim: int
    itemsize: int
    nbytes: int

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """The bytes in C order as uint8 host arrays of at most ``limit`` bytes; each stays valid until the next."""
        ...


#: What a backend hands the writer: a host numpy view (any strides) or a device source.
Source = Union[np.ndarray, DeviceSource]  # noqa: UP007 (a runtime alias: Python 3.10 has no `type`)


@runtime_checkable
class ArrayBackend(Protocol):
    """What the core needs from an array library.

    The writer calls, per distinct leaf: 1. :meth:`is_array` to claim it; 2. :meth:`host_view` for
    its bytes; 3. :meth:`alias_key`, and for leaves whose key another leaf shares, 4.
    :meth:`alias_info` and maybe 5. :meth:`storage_bytes` (spec §4.7). The reader calls
    :meth:`from_host` once per tensor row it returns and :meth:`view` once per view row.
    """

    #: Short name users pass as ``backend=``.
    name: str

    def is_array(self, obj: Any) -> bool:
        """True if ``obj`` is an array (or array scalar) of this library."""
        ...

    def host_view(self, obj: Any) -> tuple[Source, DType, bool]:
        """``obj``'s bytes (a numpy view of any strides, or a device source), canonical dtype, and is-scalar."""
        ...

    def alias_key(self, obj: Any) -> Hashable | None:
        """An identity of the allocation ``obj`` lives in (equal for arrays that may share bytes), or None."""
        ...

    def alias_info(self, obj: Any) -> tuple[int, tuple[int, ...]]:
        """The address of ``obj``'s first element and its byte strides, within its allocation."""
        ...

    def storage_bytes(self, obj: Any, address: int, nbytes: int) -> Source:
        """``nbytes`` raw bytes of ``obj``'s allocation starting at ``address``."""
        ...

    def from_host(self, array: np.ndarray, dtype: DType, *, scalar: bool, device: str | None) -> Any:
        """This library's array over (or copied from) ``array`` holding elements of ``dtype``."""
        ...

    def view(self, base: Any, dtype: DType, shape: tuple[int, ...], strides: tuple[int, ...], offset: int) -> Any:
        """An array over the memory of ``base`` (one of ours): element 0 at byte ``offset``, byte ``strides``."""
        ...


_BACKENDS: dict[str, ArrayBackend] = {}
#: top-level module of an array's type -> ckptfmt module providing its adapter
_LAZY: dict[str, str] = {
    "numpy": "ckptfmt.backends.numpy",
    "ml_dtypes": "ckptfmt.backends.numpy",
    "torch": "ckptfmt.backends.torch",
    "cupy": "ckptfmt.backends.cupy",
}
#: top-level module of an array's type -> the backends that may claim its arrays, newest first
_BY_MODULE: dict[str, list[ArrayBackend]] = {}


def is_host(device: str | None) -> bool:
    """True for a device spec that means host memory: None, "cpu", "cpu:N"."""
    return device is None or str(device).partition(":")[0] == "cpu"


def register_backend(backend: ArrayBackend, *, modules: tuple[str, ...] = ()) -> None:
    """Make ``backend`` available by name and for arrays whose type lives in one of ``modules``."""
    _BACKENDS[backend.name] = backend
    for m in modules:
        claims = _BY_MODULE.setdefault(m, [])
        claims[:] = [backend] + [b for b in claims if b.name != backend.name]


def _load_for_module(root: str) -> list[ArrayBackend]:
    found = _BY_MODULE.get(root)
    if found is None and root in _LAZY:
        importlib.import_module(_LAZY[root])
        found = _BY_MODULE.get(root)
    return found or []


def backend_for(obj: Any) -> ArrayBackend | None:
    """The backend that claims ``obj``, or None for a non-array value."""
    root = type(obj).__module__.partition(".")[0]
    if root in ("builtins",):
        return None
    for be in _load_for_module(root):
        if be.is_array(obj):
            return be
    if isinstance(obj, (np.ndarray, np.generic)):  # numpy subclasses and ml_dtypes scalars
        for be in _load_for_module("numpy"):
            if be.is_array(obj):
                return be
    if root != "ckptfmt":  # ckptfmt's own leaf types (LazyArray) may be subclassed in any module
        for be in _BY_MODULE.get("ckptfmt", ()):
            if be.is_array(obj):
                return be
    return None


def get_backend(name: str) -> ArrayBackend:
    """The backend called ``name`` (``"numpy"``, ...), importing its adapter if needed."""
    if name not in _BACKENDS:
        module = _LAZY.get(name)
        if module is None:
            raise ValueError(f"unknown backend {name!r}; known: {sorted(set(_LAZY) | set(_BACKENDS))}")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise MissingDependencyError(
                f"backend {name!r} needs {e.name or name}; install it with: pip install 'ckptfmt[{name}]'") from e
    if name not in _BACKENDS:
        raise ValueError(f"{name!r} is not a backend name; known: {sorted(_BACKENDS)}")
    return _BACKENDS[name]
