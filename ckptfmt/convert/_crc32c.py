"""CRC-32C (Castagnoli), as TensorFlow and LevelDB store it (masked), in numpy; google-crc32c when installed.

TensorFlow checksums every tensor and every index block with CRC-32C. Python's ``zlib`` only has
CRC-32, so this module computes CRC-32C itself. A pure-Python table loop is ~5 MB/s, too slow for
weights; CRC without its pre/post inversion is linear over GF(2), so the register after a 128-byte
segment is the XOR of one table entry per byte (a table per position in the segment: 128 x 256
entries), which numpy computes for all the segments of a block in one gather and one XOR-reduce. The
segments' registers are then folded pairwise with the "advance through n zero bytes" operator (the
way zlib's ``crc32_combine`` joins CRCs), applied a byte at a time through four 256-entry tables.
When the ``google-crc32c`` package is importable with its C implementation it is used instead
(hardware CRC, ~20-40x faster); ``benchmarks/bench_tensorflow.py crc`` measures both.
"""

from __future__ import annotations

from functools import cache, lru_cache
from typing import Any

import numpy as np

__all__ = ["MASK_DELTA", "Crc32c", "crc32c", "mask", "unmask"]

_POLY = 0x82F63B78  # reflected Castagnoli polynomial
MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
#: bytes per segment (one positional table each), and the largest block one gather covers
_SEG = 128
_BLOCK = 1 << 18


def _table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


_T0 = _table()
_TLIST = [int(v) for v in _T0]


def _positional() -> np.ndarray:
    """Row ``j``: the register (from 0) after byte ``b`` at position ``j`` of a ``_SEG``-byte segment."""
    t = np.empty((_SEG, 256), dtype=np.uint32)
    t[_SEG - 1] = _T0
    for j in range(_SEG - 2, -1, -1):
        t[j] = _T0[t[j + 1] & 0xFF] ^ (t[j + 1] >> 8)
    return t.reshape(-1)


_POS = _positional()
_ROW = np.arange(_SEG, dtype=np.uint16) * 256


def mask(crc: int) -> int:
    """The masked form TensorFlow and LevelDB store (a CRC of data holding CRCs stays informative)."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    """The CRC a masked value was made from."""
    rot = (masked - MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


def _raw_small(reg: int, data: Any) -> int:
    """Advance the register ``reg`` through ``data`` (no pre/post inversion), one byte at a time."""
    t = _TLIST
    for b in bytes(data):
        reg = t[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


def _matvec(mat: tuple[int, ...], vec: int) -> int:
    """A 32x32 GF(2) matrix (its columns) times a 32-bit vector."""
    out = 0
    i = 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


@cache
def _shift_pow2(k: int) -> tuple[int, ...]:
    """The operator advancing a register through 2**k zero bytes, as 32 columns."""
    if k == 0:
        return tuple(_raw_small(1 << i, b"\0") for i in range(32))
    half = _shift_pow2(k - 1)
    return tuple(_matvec(half, c) for c in half)


def _shift(reg: int, n: int) -> int:
    """Advance ``reg`` through ``n`` zero bytes in O(log n) matrix products."""
    k = 0
    while n:
        if n & 1:
            reg = _matvec(_shift_pow2(k), reg)
        n >>= 1
        k += 1
    return reg


@lru_cache(maxsize=64)
def _shift_tables(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Four 256-entry tables applying "advance through ``n`` zero bytes" to a uint32 array, a byte at a time."""
    bits = np.arange(256, dtype=np.uint32)
    out = []
    for byte in range(4):
        basis = [_shift(1 << (8 * byte + i), n) for i in range(8)]
        tab = np.zeros(256, dtype=np.uint32)
        for i, col in enumerate(basis):
            tab ^= np.where((bits >> i) & 1, np.uint32(col), np.uint32(0)).astype(np.uint32)
        out.append(tab)
    return out[0], out[1], out[2], out[3]


def _apply(tables: tuple[np.ndarray, ...], regs: np.ndarray) -> np.ndarray:
    b = regs.view(np.uint8).reshape(-1, 4)
    return tables[0][b[:, 0]] ^ tables[1][b[:, 1]] ^ tables[2][b[:, 2]] ^ tables[3][b[:, 3]]


def _raw_block(block: np.ndarray) -> int:
    """Register (from 0) after ``block`` (uint8, ``_SEG`` times a power of two bytes)."""
    segs = block.size // _SEG
    regs = np.bitwise_xor.reduce(_POS[block.reshape(segs, _SEG) + _ROW], axis=1)
    span = _SEG
    while regs.size > 1:  # fold neighbours: reg(A + B) = shift(reg(A), len(B)) ^ reg(B)
        regs = _apply(_shift_tables(span), np.ascontiguousarray(regs[0::2])) ^ regs[1::2]
        span *= 2
    return int(regs[0])


def _raw(data: np.ndarray) -> int:
    """Register (from 0) after ``data`` (flat uint8), no inversion: power-of-two blocks, then a byte loop."""
    reg = 0
    pos = 0
    n = data.size
    while n - pos >= _SEG:
        size = _BLOCK
        while size > n - pos:
            size //= 2
        reg = _shift(reg, size) ^ _raw_block(data[pos : pos + size])
        pos += size
    if pos < n:
        reg = _raw_small(reg, data[pos:].tobytes())
    return reg


def _as_u8(data: Any) -> np.ndarray:
    arr = data if isinstance(data, np.ndarray) else np.frombuffer(memoryview(data), dtype=np.uint8)
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


try:  # the C (SSE4.2 / ARMv8 CRC) implementation, when installed; never required
    import google_crc32c as _google

    _FAST: Any = _google if getattr(_google, "implementation", "") == "c" else None
except ImportError:  # pragma: no cover - depends on the environment
    _FAST = None


def crc32c(data: Any, crc: int = 0, *, use_library: bool = True) -> int:
    """CRC-32C of ``data`` (bytes-like or uint8 array), continuing from the CRC ``crc`` of earlier bytes."""
    arr = _as_u8(data)
    if use_library and _FAST is not None:
        return int(_FAST.extend(crc, arr))
    if arr.size == 0:
        return crc
    # crc(A + B) = ~reg(~crc(A), B) and reg(r, B) = shift(r, len(B)) ^ reg(0, B)
    return (_shift(crc ^ _U32, arr.size) ^ _raw(arr)) ^ _U32


class Crc32c:
    """A running CRC-32C over chunks (``update`` each, then ``value``)."""

    def __init__(self, *, use_library: bool = True) -> None:
        self.value = 0
        self._use_library = use_library

    def update(self, data: Any) -> None:
        """Add the next bytes."""
        self.value = crc32c(data, self.value, use_library=self._use_library)


def implementation() -> str:
    """``"google-crc32c"`` when the C library is used, else ``"numpy"``."""
    return "google-crc32c" if _FAST is not None else "numpy"
