"""Moving blobs between a file and GPU memory without a whole copy on the host.

Saving: a device array is copied to the host in chunks, into two reusable pinned buffers, on a
side stream; while the writer hashes and writes one chunk, the next is already being copied.

Loading: each blob is read in chunks into two pinned buffers (``preadv`` releases the GIL), hashed
there (checksums are verified on the host chunks, before the data is handed out), and copied
asynchronously into a device allocation of the blob's size. With ``verify=False`` and NVIDIA's
kvikio importable, blobs go from the file to the device through cuFile (GPUDirect Storage where the
system supports it) and the host buffers are not used at all.

Only the framework-specific steps differ between torch and cupy; they live in the two ``_Ops``
classes. Nothing here runs without a GPU; it is imported lazily by the torch and cupy adapters,
and imports neither of them (each adapter views the raw device bytes as its own arrays).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

#: Bytes per pinned staging buffer (two are used, so copies overlap with hashing and I/O).
CHUNK = 16 << 20


class _TorchOps:
    """The torch spelling of pinned buffers, streams, events and async copies."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self._pinned: list[Any] = []

    def pinned(self, n: int) -> list[Any]:
        if not self._pinned or self._pinned[0].numel() < n:
            self._pinned = [self.torch.empty(n, dtype=self.torch.uint8, pin_memory=True) for _ in range(2)]
        return self._pinned

    def host(self, buf: Any, n: int) -> np.ndarray:
        return buf[:n].numpy()

    def stream(self, device: Any) -> Any:
        s = self.torch.cuda.Stream(device=device)
        s.wait_stream(self.torch.cuda.current_stream(device))
        return s

    def d2h(self, dst: Any, src: Any, stream: Any) -> Any:
        with self.torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            ev = self.torch.cuda.Event()
            ev.record(stream)
        return ev

    def h2d(self, dst: Any, src: Any, stream: Any) -> Any:
        return self.d2h(dst, src, stream)

    def empty(self, n: int, device: Any) -> Any:
        return self.torch.empty(n, dtype=self.torch.uint8, device=device)

    def finish(self, stream: Any) -> None:
        stream.synchronize()


class _CupyOps:
    """The cupy spelling of the same steps."""

    def __init__(self) -> None:
        import cupy

        self.cupy = cupy
        self._pinned: list[tuple[Any, np.ndarray]] = []

    def pinned(self, n: int) -> list[Any]:
        if not self._pinned or self._pinned[0][1].size < n:
            self._pinned = []
            for _ in range(2):
                mem = self.cupy.cuda.alloc_pinned_memory(n)
                self._pinned.append((mem, np.frombuffer(mem, dtype=np.uint8, count=n)))
        return [arr for _, arr in self._pinned]

    def host(self, buf: Any, n: int) -> np.ndarray:
        return buf[:n]

    def stream(self, device: Any) -> Any:
        s = self.cupy.cuda.Stream(non_blocking=True)
        s.wait_event(self.cupy.cuda.get_current_stream().record())  # after work already queued on the arrays
        return s

    def d2h(self, dst: np.ndarray, src: Any, stream: Any) -> Any:
        src.get(stream=stream, out=dst, blocking=False)
        ev = self.cupy.cuda.Event()
        ev.record(stream)
        return ev

    def h2d(self, dst: Any, src: np.ndarray, stream: Any) -> Any:
        dst.set(src, stream=stream)
        ev = self.cupy.cuda.Event()
        ev.record(stream)
        return ev

    def empty(self, n: int, device: Any) -> Any:
        return self.cupy.empty(n, dtype=self.cupy.uint8)

    def finish(self, stream: Any) -> None:
        stream.synchronize()


def _chunks(ops: Any, flat: Any, nbytes: int, device: Any, limit: int) -> Iterator[np.ndarray]:
    """Device bytes ``flat`` (uint8, contiguous) as host chunks, double-buffered."""
    size = min(limit, CHUNK, max(nbytes, 1))
    bufs = ops.pinned(size)
    stream = ops.stream(device)
    starts = list(range(0, nbytes, size))
    events: list[Any] = [None, None]

    def issue(k: int) -> None:
        a = starts[k]
        n = min(size, nbytes - a)
        events[k % 2] = ops.d2h(bufs[k % 2][:n], flat[a : a + n], stream)

    if starts:
        issue(0)
    for k, a in enumerate(starts):
        if k + 1 < len(starts):
            issue(k + 1)  # its buffer held chunk k - 1, which the consumer has finished with
        events[k % 2].synchronize()
        yield ops.host(bufs[k % 2], min(size, nbytes - a))
    ops.finish(stream)


class TorchDeviceSource:
    """A CUDA tensor's bytes for the writer (``ckptfmt.DeviceSource``)."""

    def __init__(self, t: Any) -> None:
        self._t = t
        self.shape = tuple(t.shape)
        self.ndim = t.dim()
        self.itemsize = t.element_size()
        self.nbytes = t.numel() * self.itemsize

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """Host chunks of at most ``limit`` bytes, each valid until the next is asked for."""
        import torch

        # a device-side copy for a strided tensor, made only now that it is written; host memory stays bounded
        flat = self._t.contiguous().reshape(-1).view(torch.uint8)
        yield from _chunks(_ops("torch"), flat, self.nbytes, self._t.device, limit)


class CupyDeviceSource:
    """A cupy array's bytes for the writer (``ckptfmt.DeviceSource``)."""

    def __init__(self, a: Any) -> None:
        self._a = a
        self.shape = tuple(a.shape)
        self.ndim = a.ndim
        self.itemsize = a.itemsize
        self.nbytes = a.nbytes

    def chunks(self, limit: int) -> Iterator[np.ndarray]:
        """Host chunks of at most ``limit`` bytes, each valid until the next is asked for."""
        import cupy

        with self._a.device:
            flat = cupy.ascontiguousarray(self._a).reshape(-1).view(cupy.uint8)
            yield from _chunks(_ops("cupy"), flat, self.nbytes, self._a.device, limit)


_LOCAL = threading.local()


def _ops(kind: str) -> Any:
    """This thread's staging buffers and framework calls (threads never share a staging buffer)."""
    ops = getattr(_LOCAL, kind, None)
    if ops is None:
        ops = _TorchOps() if kind == "torch" else _CupyOps()
        setattr(_LOCAL, kind, ops)
    return ops


def _kvikio() -> Any | None:
    try:
        import kvikio
    except ImportError:
        return None
    return kvikio


def read_rows(kind: str, ckpt: Any, rows: list[int], device: Any, *, verify: bool) -> dict[int, Any]:
    """Each row's blob in a fresh device uint8 array of its size, checksums verified on host chunks.

    The bytes come through the checkpoint's public block I/O (``Checkpoint.iter_chunks`` into the two
    pinned buffers, which verifies the checksum before it hands over a blob's last chunk); the adapter
    views each array as its dtype and shape.
    """
    ops = _ops(kind)
    entries = {row: ckpt.entry(row) for row in rows}
    out: dict[int, Any] = {}
    checksummed = any(e.checksum is not None for e in entries.values())
    kvikio = _kvikio() if not (verify and checksummed) else None
    if kvikio is not None:
        with kvikio.CuFile(ckpt.path, "r") as f:
            futures = []
            for row, e in entries.items():
                out[row] = dst = ops.empty(e.nbytes, device)
                if e.nbytes:
                    futures.append(f.pread(dst, e.nbytes, e.offset))
            for fut in futures:
                fut.get()
        return out
    bufs = ops.pinned(CHUNK)
    hosts = [ops.host(b, CHUNK) for b in bufs]
    stream = ops.stream(device)
    events: list[Any] = [None, None]
    try:
        for row, e in entries.items():
            out[row] = dst = ops.empty(e.nbytes, device)
            chunks = ckpt.iter_chunks(row, CHUNK, verify=verify, buffers=hosts)
            a = 0
            for k in itertools.count():
                slot = k % 2
                if events[slot] is not None:
                    events[slot].synchronize()  # the copy that last used this buffer is done
                chunk = next(chunks, None)  # reads (and, for the last chunk, verifies) into bufs[slot]
                if chunk is None:
                    break
                n = len(chunk)
                events[slot] = ops.h2d(dst[a : a + n], bufs[slot][:n], stream)
                a += n
    finally:
        ops.finish(stream)  # no copy may still read a buffer or write a freed allocation
    return out
