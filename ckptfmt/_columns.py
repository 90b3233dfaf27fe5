"""The tensor and view tables built from their decoded columns, and checked (spec §4.3, §4.5, §4.7, §8.2).

Every column's length against the row count, dtype names and codes, ranks under the cap (§8.1),
shape x itemsize == nbytes (§8.2), empty blobs' checksums (§7), views inside their base blob (§4.7),
and blobs in table order at aligned offsets (§4.5; the packed layout of §14.2 in ``_features``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checksum import EMPTY_CHECKSUM
from ._dtypes import DTYPES
from ._features import packed_layout
from ._tables import Limits, TensorTable, ViewTable, blob_region_start, nonzero_bytes
from ._versions import FORMAT_MINOR
from .errors import InvalidMetadataError, MetadataLimitError

_I64 = np.dtype("<i8")
_U64 = np.dtype("<u8")
_U8 = np.dtype("u1")


def _column(table: dict[str, Any], name: str, dtype: np.dtype, count: int, path: str | None,
            what: str = "tensor table") -> np.ndarray:
    raw = table.get(name)
    if not isinstance(raw, (bytes, memoryview)):
        raise InvalidMetadataError(path, f"{what} column {name!r} is missing or not binary")
    if len(raw) != count * dtype.itemsize:
        raise InvalidMetadataError(path, f"{what} column {name!r} has {len(raw)} bytes, "
                                         f"expected {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype)


def _typed_columns(table: Any, what: str, rows: str, *, path: str | None, minor: int, limits: Limits
                   ) -> tuple[int, list[str], np.ndarray, np.ndarray, int]:
    """The columns the tensor and view tables share: count, dtype names and codes, ndim (§4.3, §4.7).

    Returns (count, dtype names, dtype codes, ndim, total number of dimensions).
    """
    if not isinstance(table, dict):
        raise InvalidMetadataError(path, f"'{rows}' is not a map")
    count = table.get("count")
    if type(count) is not int or count < 0:
        raise InvalidMetadataError(path, f"{what} 'count' is not a non-negative int")
    if count > limits.max_tensors:
        raise MetadataLimitError(path, f"{count} {rows}, over the cap of {limits.max_tensors}")
    names = _dtype_names(table, what, path, minor)
    code = _column(table, "dtype", _U8, count, path, what)
    ndim = _column(table, "ndim", _U8, count, path, what)
    if count and int(code.max()) >= len(names):
        raise InvalidMetadataError(path, f"{what}: dtype code {int(code.max())} has no entry in 'dtypes'")
    if count and int(ndim.max()) > limits.max_ndim:
        raise MetadataLimitError(path, f"{what}: a row has {int(ndim.max())} dimensions, over {limits.max_ndim}")
    return count, names, code, ndim, int(ndim.sum(dtype=np.int64))


def parse_tensor_table(table: Any, *, path: str | None, minor: int, limits: Limits) -> TensorTable:
    count, names, code, ndim, total_dims = _typed_columns(table, "tensor table", "tensors", path=path, minor=minor,
                                                          limits=limits)
    shape_flat = _column(table, "shape", _U64, total_dims, path)
    offset = _column(table, "offset", _U64, count, path)
    nbytes = _column(table, "nbytes", _U64, count, path)
    checksum = _column(table, "checksum", _U64, count, path) if "checksum" in table else None
    tt = TensorTable(names, code, ndim, shape_flat, offset, nbytes, checksum)
    _check_sizes(tt, path)
    return tt


def parse_views(table: Any, tensors: TensorTable, *, path: str | None, minor: int, limits: Limits) -> ViewTable:
    """Decode and check the view table (§4.7)."""
    count, names, code, ndim, total = _typed_columns(table, "view table", "views", path=path, minor=minor,
                                                     limits=limits)
    w = "view table"
    vt = ViewTable(names, code, ndim, _column(table, "shape", _U64, total, path, w),
                   _column(table, "strides", _I64, total, path, w), _column(table, "base", _U64, count, path, w),
                   _column(table, "offset", _U64, count, path, w))
    if not count:
        return vt
    if int(vt.base.max()) >= len(tensors):
        raise InvalidMetadataError(path, f"a view's base is row {int(vt.base.max())}, but the tensor table has "
                                         f"{len(tensors)} rows")
    if vt.shape_flat.size and int(vt.shape_flat.max()) >= 1 << 63:
        raise InvalidMetadataError(path, "a view dimension is 2**63 or larger")
    # per dimension: (shape - 1) * stride, negative and positive parts; exact in int64 once bounded
    span_f = (vt.shape_flat.astype(np.float64) - 1) * vt.strides_flat.astype(np.float64)
    if span_f.size and float(np.abs(span_f).max()) >= 2.0**56:
        raise InvalidMetadataError(path, "a view's extent (shape - 1) x stride reaches 2**56 bytes or more")
    span = (vt.shape_flat.astype(np.int64) - 1) * vt.strides_flat
    empty_dim = vt.shape_flat == 0
    owner = np.repeat(np.arange(count), ndim.astype(np.int64))
    lo = np.zeros(count, np.int64)
    hi = np.zeros(count, np.int64)
    np.add.at(lo, owner, np.where(empty_dim, 0, np.minimum(span, 0)))
    np.add.at(hi, owner, np.where(empty_dim, 0, np.maximum(span, 0)))
    is_empty = np.zeros(count, bool)
    np.logical_or.at(is_empty, owner, empty_dim)
    itemsize = np.array([DTYPES[n].itemsize if n in DTYPES else 1 for n in names], np.int64)[code]
    base_nbytes = tensors.nbytes[vt.base.astype(np.int64)].astype(np.int64)
    _check_view_sizes(vt, itemsize, base_nbytes, path, limits)
    offset = vt.offset
    if int(offset.max()) >= 1 << 62:
        raise InvalidMetadataError(path, "a view offset is 2**62 or larger")
    off = offset.astype(np.int64)
    bad = np.where(is_empty, off > base_nbytes, (off + lo < 0) | (off + hi + itemsize > base_nbytes))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidMetadataError(path, f"view {i} reaches outside the blob of its base row {int(vt.base[i])}")
    return vt


def _check_view_sizes(vt: ViewTable, itemsize: np.ndarray, base_nbytes: np.ndarray, path: str | None,
                      limits: Limits) -> None:
    """A view's elements x itemsize stays below 2**63 and within ``max_view_expansion`` x its base (§4.7)."""
    count = len(vt)
    dims_f = vt.shape_flat.astype(np.float64)
    owner = np.repeat(np.arange(count), vt.ndim.astype(np.int64))
    logical = np.ones(count, np.float64)
    nonzero = np.ones(count, np.float64)
    np.multiply.at(logical, owner, dims_f)
    dims_f[dims_f == 0] = 1
    np.multiply.at(nonzero, owner, dims_f)
    isz = itemsize.astype(np.float64)
    for i in np.flatnonzero(~(nonzero * isz < 2.0**62)).tolist():
        v = vt.entry(i)
        if nonzero_bytes(v.shape, int(itemsize[i])) >= 1 << 63:
            raise InvalidMetadataError(path, f"view {i}: shape {v.shape}: its non-zero dimensions make 2**63 bytes "
                                             "or more, which no array can hold (§4.7)")
    cap = np.maximum(base_nbytes.astype(np.float64), 1.0) * float(limits.max_view_expansion)
    over = logical * isz > cap
    if over.any():
        i = int(np.flatnonzero(over)[0])
        raise MetadataLimitError(path, f"view {i} spans {int(logical[i])} elements of {int(itemsize[i])} bytes, over "
                                       f"{limits.max_view_expansion} times its base's {int(base_nbytes[i])} bytes "
                                       "(raise Limits.max_view_expansion)")


def _dtype_names(table: dict[str, Any], what: str, path: str | None, minor: int) -> list[str]:
    names = table.get("dtypes")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) > 255:
        raise InvalidMetadataError(path, f"{what} 'dtypes' is not a list of at most 255 str")
    if len(set(names)) != len(names):
        raise InvalidMetadataError(path, f"{what} 'dtypes' names a dtype twice")
    if minor <= FORMAT_MINOR:
        for n in names:
            if n not in DTYPES:
                raise InvalidMetadataError(path, f"unknown dtype {n!r} in a version 1.{minor} file")
    return names


def _check_sizes(tt: TensorTable, path: str | None) -> None:
    """shape x itemsize == nbytes for every tensor of a known dtype (§8.2).

    Whole-column numpy passes with few temporaries (each a fresh column costs page faults on open).
    """
    n = len(tt)
    if not n:
        return
    shape = tt.shape_flat
    if shape.size and int(shape.max()) >= 1 << 63:
        raise InvalidMetadataError(path, "a dimension is 2**63 or larger")
    ends = np.cumsum(tt.ndim, dtype=np.int64)
    tt._ends = ends  # what TensorTable.shape(i) needs for a lazy get: computed once, here
    # itemsizes are at most 16 (§6): a uint8 column, widened element by element where it is multiplied
    sizes = [DTYPES[nm].itemsize if nm in DTYPES else 0 for nm in tt.dtype_names]
    itemsize = np.array(sizes, dtype=np.uint8 if max(sizes, default=0) < 256 else np.uint64)
    isz = itemsize[tt.dtype_code]
    all_known = bool(itemsize.all()) or not bool((isz == 0).any())
    if shape.size:
        has = tt.ndim != 0
        every = bool(has.all())
        starts = ends - tt.ndim
        if not every:
            starts = starts[has]
        # The float product skips zero dimensions: an empty tensor must still have a shape numpy
        # can represent. Overflow to inf is what we are looking for, not an accident.
        dims_f = shape.astype(np.float64)
        np.maximum(dims_f, 1.0, out=dims_f)
        with np.errstate(over="ignore", invalid="ignore"):
            prod_u = np.multiply.reduceat(shape, starts)
            prod_f = np.multiply.reduceat(dims_f, starts)
        del dims_f
        if not every:
            full_u, full_f = np.ones(n, np.uint64), np.ones(n, np.float64)
            full_u[has], full_f[has] = prod_u, prod_f
            prod_u, prod_f = full_u, full_f
    else:
        prod_u, prod_f = np.ones(n, np.uint64), np.ones(n, np.float64)
    prod_f *= np.maximum(isz, 1)
    if float(prod_f.max()) >= 2.0**62:
        huge = prod_f >= 2.0**62
        if not all_known:
            huge &= isz > 0
        for i in np.flatnonzero(huge).tolist():  # near the bound: decide exactly, with Python ints
            if nonzero_bytes(tt.shape(i), int(isz[i])) >= 1 << 63:
                raise InvalidMetadataError(path, f"tensor {i}: shape {tt.shape(i)} x itemsize {int(isz[i])}: its "
                                                 "non-zero dimensions make 2**63 bytes or more, which no array can "
                                                 "hold (§8.2)")
    del prod_f
    with np.errstate(over="ignore", invalid="ignore"):
        prod_u *= isz
    bad = prod_u != tt.nbytes
    if not all_known:
        bad &= isz > 0
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidMetadataError(path, f"tensor {i}: shape {tt.shape(i)} x itemsize {int(isz[i])} != "
                                         f"nbytes {int(tt.nbytes[i])}")
    if tt.checksum is not None:
        wrong = (tt.nbytes == 0) & (tt.checksum != np.uint64(EMPTY_CHECKSUM))
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise InvalidMetadataError(path, f"tensor {i} is empty but its checksum is not xxh3 of no bytes")


def check_layout(tt: TensorTable, *, alignment: int, metadata_offset: int, path: str | None) -> None:
    """Blobs lie in table order, each at the next multiple of the alignment, with nothing between (§4.5)."""
    if tt.pack_alignment:  # format 1.1 packed blobs: two alignments (§14.2)
        end = packed_layout(tt, alignment=alignment, first=blob_region_start(alignment), path=path)
        if end != metadata_offset:
            raise InvalidMetadataError(path, f"metadata starts at {metadata_offset}, expected {end} (after the "
                                             "last blob's padding)")
        return
    a = np.uint64(alignment)
    first = np.uint64(blob_region_start(alignment))
    nb = tt.stored_sizes()  # format 1.1: compressed blobs occupy their stored size (§13.2)
    if not len(nb):
        end = int(first)
    else:
        if float(nb.sum(dtype=np.float64)) > 2.0**62:
            raise InvalidMetadataError(path, "blob sizes add up to more than 2**62 bytes")
        span = nb + (a - np.uint64(1))
        span &= ~(a - np.uint64(1))
        ends = np.cumsum(span, dtype=np.uint64)
        ends += first
        end = int(ends[-1])
        expected = np.subtract(ends, span, out=span)  # where each blob starts; an empty blob's offset is 0
        del ends
        expected[nb == 0] = 0
        if not np.array_equal(expected, tt.offset):
            i = int(np.flatnonzero(expected != tt.offset)[0])
            raise InvalidMetadataError(path, f"tensor {i}: offset {int(tt.offset[i])}, expected "
                                             f"{int(expected[i])} (blobs must follow each other in table order at "
                                             "aligned offsets)")
    if end != metadata_offset:
        raise InvalidMetadataError(path, f"metadata starts at {metadata_offset}, expected {end} (after the "
                                         "last blob's padding)")
