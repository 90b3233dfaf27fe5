"""Which byte ranges of a C-order blob a basic index (ints, slices, ``...``) needs: no I/O here.

:func:`plan_slice` turns ``t[a:b, ::2, 3]`` into a few contiguous runs of the blob to read into a
box, and the numpy index that cuts the result out of the box. Runs are made as long as possible:
small runs are merged by reading whole inner rows when that at most quadruples the bytes read
(plus 1 MiB), so ``t[:, 0]`` of a narrow matrix is one read, and of a wide one a read per row.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["SlicePlan", "plan_slice"]

#: runs shorter than this are merged into longer ones when the waste stays bounded
_MIN_RUN = 64 << 10
#: a strided dimension whose elements are this large is read element by element, not as a range
_SPLIT_BLOCK = 64 << 10


@dataclass(frozen=True)
class _Sel:
    """The indices ``start + step * i`` for ``i < count`` of one dimension; ``drop`` for an int index."""

    start: int
    step: int
    count: int
    drop: bool

    @property
    def lo(self) -> int:
        return self.start if self.step > 0 else self.start + self.step * (self.count - 1)

    @property
    def hi(self) -> int:
        return (self.start + self.step * (self.count - 1) if self.step > 0 else self.start) + 1

    def indices(self) -> range:
        return range(self.start, self.start + self.step * self.count, self.step)


def _normalize(index: Any, shape: tuple[int, ...]) -> list[_Sel]:
    """One :class:`_Sel` per dimension, with numpy's rules for ints, slices and one ``...``."""
    items = index if isinstance(index, tuple) else (index,)
    if sum(1 for x in items if x is Ellipsis) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    used = sum(1 for x in items if x is not Ellipsis)
    if used > len(shape):
        raise IndexError(f"too many indices: the tensor is {len(shape)}-dimensional, but {used} were indexed")
    full = []
    for x in items:
        if x is Ellipsis:
            full.extend([slice(None)] * (len(shape) - used))
        else:
            full.append(x)
    full.extend([slice(None)] * (len(shape) - len(full)))
    out = []
    for dim, (x, n) in enumerate(zip(full, shape, strict=True)):
        if isinstance(x, slice):
            start, stop, step = x.indices(n)
            out.append(_Sel(start, step, len(range(start, stop, step)), False))
            continue
        if isinstance(x, bool) or not hasattr(x, "__index__"):
            raise TypeError(f"get_slice supports ints, slices and '...' only, not {type(x).__name__} "
                            "(read the slice, then index it with numpy or torch)")
        i = operator.index(x)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of bounds for dimension {dim} with size {n}")
        out.append(_Sel(i % n, 1, 1, True))
    return out


@dataclass(frozen=True)
class SlicePlan:
    """How to read a slice: ``runs`` of ``run_bytes`` each into a box of ``box_shape``, then ``box[post]``."""

    box_shape: tuple[int, ...]
    run_bytes: int
    starts: tuple[int, ...]
    post: tuple[Any, ...]
    shape: tuple[int, ...]
    whole: bool

    @property
    def nbytes(self) -> int:
        """Bytes read."""
        return self.run_bytes * len(self.starts)

    def runs(self) -> Iterator[tuple[int, int]]:
        """(byte offset within the blob, byte offset within the box) of each run."""
        for k, s in enumerate(self.starts):
            yield s, k * self.run_bytes


def plan_slice(shape: tuple[int, ...], itemsize: int, index: Any, *, min_run: int = _MIN_RUN,
               slack: int = 1 << 20) -> SlicePlan:
    """The reads ``blob[index]`` needs; ``whole`` when it selects every element in order.

    Runs shorter than ``min_run`` are widened while that reads at most four times the bytes needed
    plus ``slack``. A compressed row (spec §13) is planned with ``slack=0``, so that a narrow slice
    touches as few chunks as it can: there every byte widened into is a byte decoded.
    """
    sels = _normalize(index, shape)
    ndim = len(shape)
    out_shape = tuple(s.count for s in sels if not s.drop)
    # bytes of one step along each dimension
    block = [itemsize * math.prod(shape[d + 1 :]) for d in range(ndim)]
    full = [s.start == 0 and s.step == 1 and s.count == n and not s.drop for s, n in zip(sels, shape, strict=True)]
    if all(full) or math.prod(s.count for s in sels) == 0:
        whole = all(full)
        return SlicePlan(tuple(shape) if whole else (0,), 0, (), (), out_shape, whole)
    needed = itemsize * math.prod(s.count for s in sels)
    # dims < e are read index by index, dim e as the range [lo, hi), dims > e whole
    e = max(d for d in range(ndim) if not full[d])
    if abs(sels[e].step) > 1 and block[e] >= _SPLIT_BLOCK:
        e += 1  # each selected element of dim e is a long run of its own
    def cost(at: int) -> int:
        enum = math.prod(sels[d].count for d in range(at))
        if at == ndim:
            return enum * itemsize
        return enum * (sels[at].hi - sels[at].lo) * block[at]

    while e > 0 and math.prod(sels[d].count for d in range(e)) > 1:  # widen only to make fewer runs
        run = itemsize if e == ndim else (sels[e].hi - sels[e].lo) * block[e]
        if run >= min_run or cost(e - 1) > 4 * needed + slack:
            break
        e -= 1
    # box: selected counts for dims < e, [lo, hi) of dim e, whole dims after
    box = [sels[d].count for d in range(e)]
    if e < ndim:
        box.append(sels[e].hi - sels[e].lo)
        box.extend(shape[e + 1 :])
        base = sels[e].lo * block[e]
        run_bytes = (sels[e].hi - sels[e].lo) * block[e]
    else:
        base, run_bytes = 0, itemsize
    starts = tuple(base + sum(i * b for i, b in zip(combo, block, strict=False))
                   for combo in itertools.product(*(sels[d].indices() for d in range(e))))
    post: list[Any] = []
    for d in range(ndim):
        s = sels[d]
        if d < e:
            post.append(0 if s.drop else slice(None))
            continue
        first = s.start - (s.lo if d == e else 0)
        if s.drop:
            post.append(first)
            continue
        stop = first + s.step * s.count
        post.append(slice(first, stop if stop >= 0 else None, s.step))
    return SlicePlan(tuple(box), run_bytes, starts, tuple(post), out_shape, False)
