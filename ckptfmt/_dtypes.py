"""Canonical dtype names of the format and their numpy mapping (spec §6)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UnsupportedDTypeError

__all__ = ["DType", "DTYPES", "from_name", "from_numpy", "numpy_dtype"]


@dataclass(frozen=True)
class DType:
    """One canonical element type: its name in files, its width, and its numpy spelling."""

    name: str
    itemsize: int
    #: numpy dtype string for types numpy has natively; None for the ml_dtypes-only ones.
    numpy: str | None


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("bool", 1, "|b1"),
        DType("int8", 1, "|i1"),
        DType("int16", 2, "<i2"),
        DType("int32", 4, "<i4"),
        DType("int64", 8, "<i8"),
        DType("uint8", 1, "|u1"),
        DType("uint16", 2, "<u2"),
        DType("uint32", 4, "<u4"),
        DType("uint64", 8, "<u8"),
        DType("float16", 2, "<f2"),
        DType("bfloat16", 2, None),
        DType("float32", 4, "<f4"),
        DType("float64", 8, "<f8"),
        DType("complex64", 8, "<c8"),
        DType("complex128", 16, "<c16"),
        DType("float8_e4m3fn", 1, None),
        DType("float8_e5m2", 1, None),
    )
}

_ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")
_by_numpy: dict[np.dtype, DType] = {}
_to_numpy: dict[str, np.dtype] = {}


def _ml_dtypes() -> object | None:
    try:
        import ml_dtypes
    except ImportError:
        return None
    return ml_dtypes


def _build_tables() -> None:
    for d in DTYPES.values():
        if d.numpy is not None:
            _to_numpy[d.name] = np.dtype(d.numpy)
    ml = _ml_dtypes()
    for name in _ML_DTYPES:
        if ml is not None:
            _to_numpy[name] = np.dtype(getattr(ml, name))
    for name, npd in _to_numpy.items():
        _by_numpy[npd] = DTYPES[name]


_build_tables()


def from_name(name: str) -> DType:
    """The canonical dtype called ``name``; :class:`UnsupportedDTypeError` if 1.0 defines none."""
    try:
        return DTYPES[name]
    except KeyError:
        raise UnsupportedDTypeError(f"unknown dtype {name!r}: this reader knows {sorted(DTYPES)}") from None


def from_numpy(dtype: np.dtype) -> DType:
    """The canonical dtype of a numpy dtype (either byte order); refuses object, string, record types."""
    found = _by_numpy.get(dtype)
    if found is None and dtype.byteorder not in ("=", "|", "<"):
        found = _by_numpy.get(dtype.newbyteorder("<"))
    if found is None and dtype.byteorder == "=":
        found = _by_numpy.get(dtype.newbyteorder("<"))
    if found is None:
        hint = " (install ml_dtypes for bfloat16/float8)" if dtype.kind == "V" else ""
        raise UnsupportedDTypeError(
            f"numpy dtype {dtype!s} has no ckptfmt equivalent{hint}; supported: {sorted(DTYPES)}"
        )
    return found


def numpy_dtypes() -> dict[np.dtype, DType]:
    """numpy dtype -> canonical dtype, for the native-byte-order numpy types (a fast-path table)."""
    return _by_numpy


def numpy_dtype(d: DType) -> np.dtype:
    """The little-endian numpy dtype for ``d``: the ml_dtypes type when installed, else raw ``V<n>`` bytes."""
    found = _to_numpy.get(d.name)
    return found if found is not None else np.dtype(f"V{d.itemsize}")
