"""The canonical JSON description of a checkpoint's content (spec/CONFORMANCE.md §2).

The generator describes the objects it saves; the runner describes what a backend loads; the two
must be equal. Tensors are described by dtype, shape and the SHA-256 of their C-order little-endian
bytes, so a description is small and any language can compute it.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any

import numpy as np

#: canonical dtype name of each numpy dtype name (ml_dtypes included)
_NUMPY_NAMES = {"bool": "bool", "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
                "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
                "float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "float64": "float64",
                "complex64": "complex64", "complex128": "complex128", "float8_e4m3fn": "float8_e4m3fn",
                "float8_e5m2": "float8_e5m2"}


def tensor(dtype: str, shape: tuple[int, ...], data: bytes, *, scalar: bool = False) -> dict[str, Any]:
    """A tensor leaf: dtype, shape, sha256 of its bytes (C order, little-endian)."""
    return {"scalar" if scalar else "tensor": {"dtype": dtype, "shape": list(shape),
                                              "sha256": hashlib.sha256(data).hexdigest()}}


def numpy_leaf(arr: Any, *, scalar: bool = False) -> dict[str, Any]:
    """Describe a numpy array (or numpy scalar)."""
    a = np.asarray(arr)
    name = _NUMPY_NAMES.get(a.dtype.name)
    if name is None:
        raise TypeError(f"no canonical dtype for numpy {a.dtype}")
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return tensor(name, a.shape, np.ascontiguousarray(a).tobytes(), scalar=scalar)


def value(v: Any) -> Any:
    """Describe a plain value exactly: ints as decimal strings, floats by their bits."""
    if v is None:
        return None
    if type(v) is bool:
        return {"bool": v}
    if isinstance(v, int):
        return {"int": str(int(v))}
    if type(v) is float:
        return {"float": struct.pack("<d", v).hex(), "approx": v if math.isfinite(v) else str(v)}
    if type(v) is str:
        return {"str": v}
    if type(v) is bytes:
        return {"bytes": v.hex()}
    raise TypeError(f"not a plain value: {type(v).__name__}")


def key(k: Any) -> Any:
    """A map key: a str as is, an int as {"int": decimal}."""
    return k if type(k) is str else {"int": str(k)}


def describe(node: Any, leaf: Any) -> Any:
    """The description of a loaded or saved tree; ``leaf(x)`` describes an array (or returns None)."""
    found = leaf(node)
    if found is not None:
        return found
    if type(node) is dict:
        return {"dict": [[key(k), describe(v, leaf)] for k, v in node.items()]}
    if type(node) is list:
        return {"list": [describe(v, leaf) for v in node]}
    if type(node) is tuple:
        return {"tuple": [describe(v, leaf) for v in node]}
    return value(node)


def numpy_array_leaf(x: Any) -> Any:
    """The description of a numpy array or numpy scalar; None for anything else."""
    if isinstance(x, np.ndarray):
        return numpy_leaf(x)
    if isinstance(x, np.generic):
        return numpy_leaf(x, scalar=True)
    return None


def numpy_describe(node: Any) -> Any:
    """Describe a tree whose arrays are numpy arrays or numpy scalars."""
    return describe(node, numpy_array_leaf)
