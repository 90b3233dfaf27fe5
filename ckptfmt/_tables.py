"""The metadata's nouns (spec §4): the tensor and view tables as columns, the tree's references into them.

§4.1 the top-level map (:class:`Manifest`), §4.2 the ext types of the tree and the references a decoded
tree holds (:class:`TensorRef`, :class:`ViewRef`, :class:`PlainInt`), §4.3 the tensor table
(:class:`TensorTable`, :class:`TensorEntry`), §4.5 the blob layout arithmetic, §4.7 the view table
(:class:`ViewTable`, :class:`ViewEntry`), §8.1 the caps a reader applies (:class:`Limits`). No I/O, no
decoding: the writer side builds these in ``_encode``, the reader side in ``_parse``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._header import HEADER_SIZE

EXT_TENSOR = 1
EXT_TUPLE = 2
EXT_SCALAR = 3
EXT_INT = 4
EXT_MAP = 5
EXT_VIEW = 6
_I64 = np.dtype("<i8")
_U64 = np.dtype("<u8")
_U8 = np.dtype("u1")


@dataclass(frozen=True)
class Limits:
    """Caps a reader applies to untrusted metadata before trusting it (spec §8.1); all configurable."""

    max_metadata_bytes: int = 256 << 20
    max_depth: int = 64
    #: below what the metadata cap allows (a row costs at least 27 bytes), so that this cap can trigger
    max_tensors: int = 1 << 23
    max_ndim: int = 64
    #: at most one decoded container (list, map, tuple) per this many metadata bytes, plus 4096 (0: no cap)
    bytes_per_container: int = 4
    #: a view may span at most this many times its base's bytes (stride 0 repeats elements)
    max_view_expansion: int = 1 << 16


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A decoded array-scalar leaf (ext 3): row ``index`` of the tensor table, returned as a scalar.

    In a decoded tree a plain ``int`` (exactly type int) is a tensor reference (§4.2); plain integer
    values decode as :class:`PlainInt`.
    """

    index: int
    scalar: bool = True


@dataclass(frozen=True, slots=True)
class ViewRef:
    """A decoded view leaf (ext 6): row ``index`` of the view table (§4.7)."""

    index: int


class PlainInt(int):
    """An integer value of the tree (ext 4), told apart from tensor references by its type."""


def tensor_ref(node: Any) -> tuple[int, bool] | None:
    """(row, is_scalar) if ``node`` is a tensor leaf of a decoded tree, else None."""
    t = type(node)
    if t is int:
        return node, False
    if t is TensorRef:
        return node.index, True
    return None


@dataclass(frozen=True)
class TensorEntry:
    """One row of the tensor table (§4.3): what a blob holds and where."""

    index: int
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksum: int | None


@dataclass
class TensorTable:
    """The tensor table as columns, so that a million rows cost a few numpy arrays, not a million objects."""

    dtype_names: list[str]
    dtype_code: np.ndarray
    ndim: np.ndarray
    shape_flat: np.ndarray
    offset: np.ndarray
    nbytes: np.ndarray
    checksum: np.ndarray | None
    _shapes: list[tuple[int, ...]] | None = field(default=None, repr=False)
    _ends: np.ndarray | None = field(default=None, repr=False)
    # format 1.1, compressed blobs (§13.2): None/0 when the file has none
    codec_names: list[str] | None = None
    codec: np.ndarray | None = None
    stored: np.ndarray | None = None
    piece_count: np.ndarray | None = None
    piece_bytes: np.ndarray | None = None
    chunk_bytes: int = 0
    piece_start: np.ndarray | None = field(default=None, repr=False)
    # format 1.1, packed blobs (§14): 0 when the file has none
    pack_alignment: int = 0
    pack_below: int = 0
    #: where each blob's zero padding ends (set by the layout check of a packed file)
    gap_end: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.offset)

    def stored_sizes(self) -> np.ndarray:
        """Bytes each blob occupies in the file: ``stored`` (§13.2), else ``nbytes``."""
        return self.nbytes if self.stored is None else self.stored

    def codec_of(self, i: int) -> str:
        """Row ``i``'s codec name (``raw`` in a file without compressed blobs)."""
        return "raw" if self.codec is None or self.codec_names is None else self.codec_names[int(self.codec[i])]

    def padding_end(self, i: int, alignment: int) -> int:
        """Where the zero padding after row ``i``'s blob ends: the next blob, or the metadata."""
        if self.gap_end is not None:
            return int(self.gap_end[i])
        return align_up(int(self.offset[i]) + int(self.stored_sizes()[i]), alignment)

    def shape(self, i: int) -> tuple[int, ...]:
        """Shape of row ``i`` (without building every row's shape: a lazy get reads one row)."""
        if self._shapes is not None:
            return self._shapes[i]
        if self._ends is None:
            self._ends = np.cumsum(self.ndim, dtype=np.int64)
        end = int(self._ends[i])
        return tuple(self.shape_flat[end - int(self.ndim[i]) : end].tolist())

    def shapes(self) -> list[tuple[int, ...]]:
        """Every row's shape, computed once."""
        if self._shapes is None:
            flat = self.shape_flat.tolist()
            ndim = self.ndim.tolist()
            ends = np.cumsum(self.ndim, dtype=np.int64).tolist()
            self._shapes = [tuple(flat[e - n : e]) for e, n in zip(ends, ndim, strict=True)]
        return self._shapes

    def entry(self, i: int) -> TensorEntry:
        """Row ``i`` as a :class:`TensorEntry`."""
        return TensorEntry(
            index=i,
            dtype=self.dtype_names[int(self.dtype_code[i])],
            shape=self.shape(i),
            offset=int(self.offset[i]),
            nbytes=int(self.nbytes[i]),
            checksum=None if self.checksum is None else int(self.checksum[i]),
        )

    def pack(self) -> dict[str, Any]:
        """The ``tensors`` map as written to the file."""
        out: dict[str, Any] = {
            "count": len(self),
            "dtypes": self.dtype_names,
            "dtype": self.dtype_code.astype(_U8).tobytes(),
            "ndim": self.ndim.astype(_U8).tobytes(),
            "shape": self.shape_flat.astype(_U64).tobytes(),
            "offset": self.offset.astype(_U64).tobytes(),
            "nbytes": self.nbytes.astype(_U64).tobytes(),
        }
        if self.checksum is not None:
            out["checksum"] = self.checksum.astype(_U64).tobytes()
        if self.codec is not None and self.stored is not None and self.piece_count is not None \
                and self.piece_bytes is not None:  # §13.2
            out.update(codecs=self.codec_names, codec=self.codec.astype(_U8).tobytes(),
                       stored=self.stored.astype(_U64).tobytes(), pieces=self.piece_count.astype(_U64).tobytes(),
                       piece_bytes=self.piece_bytes.astype(_U64).tobytes(), chunk_bytes=self.chunk_bytes)
        if self.pack_alignment:  # §14
            out.update(pack_alignment=self.pack_alignment, pack_below=self.pack_below)
        return out


@dataclass(frozen=True)
class ViewEntry:
    """One row of the view table (§4.7)."""

    index: int
    dtype: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    base: int
    offset: int


@dataclass
class ViewTable:
    """The view table as columns (§4.7)."""

    dtype_names: list[str]
    dtype_code: np.ndarray
    ndim: np.ndarray
    shape_flat: np.ndarray
    strides_flat: np.ndarray
    base: np.ndarray
    offset: np.ndarray
    _ends: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.base)

    def entry(self, i: int) -> ViewEntry:
        """Row ``i`` as a :class:`ViewEntry`."""
        if self._ends is None:
            self._ends = np.cumsum(self.ndim, dtype=np.int64)
        e, n = int(self._ends[i]), int(self.ndim[i])
        return ViewEntry(i, self.dtype_names[int(self.dtype_code[i])],
                         tuple(self.shape_flat[e - n : e].tolist()), tuple(self.strides_flat[e - n : e].tolist()),
                         int(self.base[i]), int(self.offset[i]))

    def pack(self) -> dict[str, Any]:
        """The ``views`` map as written to the file."""
        return {
            "count": len(self),
            "dtypes": self.dtype_names,
            "dtype": self.dtype_code.astype(_U8).tobytes(),
            "ndim": self.ndim.astype(_U8).tobytes(),
            "shape": self.shape_flat.astype(_U64).tobytes(),
            "strides": self.strides_flat.astype(_I64).tobytes(),
            "base": self.base.astype(_U64).tobytes(),
            "offset": self.offset.astype(_U64).tobytes(),
        }

    @classmethod
    def build(cls, entries: list[ViewEntry]) -> ViewTable:
        """A table from rows, in order."""
        names: dict[str, int] = {}
        codes = [names.setdefault(e.dtype, len(names)) for e in entries]
        return cls(list(names), np.asarray(codes, np.uint8), np.asarray([len(e.shape) for e in entries], np.uint8),
                   np.asarray([d for e in entries for d in e.shape], np.uint64),
                   np.asarray([s for e in entries for s in e.strides], np.int64),
                   np.asarray([e.base for e in entries], np.uint64), np.asarray([e.offset for e in entries], np.uint64))


EMPTY_VIEWS = ViewTable([], np.zeros(0, np.uint8), np.zeros(0, np.uint8), np.zeros(0, np.uint64),
                        np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.uint64))


@dataclass(frozen=True)
class Manifest:
    """The parsed metadata map (§4.1)."""

    tree: Any
    tensors: TensorTable
    producer: dict[str, Any]
    created: str
    user: dict[str, Any]
    views: ViewTable
    #: top-level keys this reader does not know (from a later minor version), kept verbatim.
    unknown: dict[str, Any]


#: The top-level entries of the metadata map this reader knows (§4.1, §4.7); others are kept undecoded.
KNOWN_SECTIONS = frozenset(("tree", "tensors", "producer", "created", "user", "views"))
#: Columns of the tensor and view tables this reader knows (1.0, then the 1.1 feature columns of §13-§14,
#: which ``_features`` checks against the header's feature bits); any other key is skipped undecoded (§4.3).
TENSOR_COLUMNS = frozenset(("count", "dtypes", "dtype", "ndim", "shape", "offset", "nbytes", "checksum",
                            "codecs", "codec", "stored", "pieces", "piece_bytes", "chunk_bytes",
                            "pack_alignment", "pack_below"))
VIEW_COLUMNS = frozenset(("count", "dtypes", "dtype", "ndim", "shape", "strides", "base", "offset"))


def container_budget(metadata_length: int, limits: Limits) -> int:
    """How many containers (lists, maps, tuples) metadata of this length may decode to (§8.1)."""
    if limits.bytes_per_container <= 0:
        return 1 << 62
    return metadata_length // limits.bytes_per_container + 4096


def nonzero_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Product of the non-zero dimensions times the itemsize: what an array library must be able to index."""
    n = itemsize
    for d in shape:
        n *= d or 1
    return n


def blob_region_start(alignment: int) -> int:
    """Offset of the first blob: the header rounded up to the alignment."""
    return -(-HEADER_SIZE // alignment) * alignment


def align_up(n: int, alignment: int) -> int:
    """``n`` rounded up to a multiple of ``alignment`` (a power of two)."""
    return (n + alignment - 1) & ~(alignment - 1)
