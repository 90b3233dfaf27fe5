"""Helpers for the conversion tests: bit-exact tree comparison for torch and numpy values."""

from __future__ import annotations

import socket
from typing import Any

import numpy as np


def raw_bytes(x: Any) -> bytes:
    """The C-order bytes of a torch tensor or numpy array (bfloat16 and float8 included)."""
    if type(x).__module__.startswith("torch"):
        import torch

        t = x.detach().contiguous().cpu()
        return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    a = np.ascontiguousarray(x)
    return a.astype(a.dtype.newbyteorder("<")).tobytes() if a.dtype.byteorder == ">" else a.tobytes()


def is_tensor(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return True
    if type(x).__module__.startswith("torch"):
        import torch

        return isinstance(x, torch.Tensor)
    return False


def assert_same_tensor(a: Any, b: Any, where: str) -> None:
    """Same dtype, shape and bytes (both torch, or both numpy)."""
    assert type(a).__module__.split(".")[0] == type(b).__module__.split(".")[0], where
    assert a.dtype == b.dtype or str(a.dtype) == str(b.dtype).replace(">", "<"), f"{where}: {a.dtype} != {b.dtype}"
    assert tuple(a.shape) == tuple(b.shape), f"{where}: {tuple(a.shape)} != {tuple(b.shape)}"
    assert raw_bytes(a) == raw_bytes(b), f"{where}: bytes differ"


def assert_trees_equal(got: Any, want: Any, where: str = "", *, ordered: bool = True) -> None:
    """Equal structure (dict keys and their types, list vs tuple), tensors bit for bit, values by type and value.

    ``ordered``: dict keys must also come in the same order.
    """
    if is_tensor(want):
        assert is_tensor(got), f"{where}: a {type(got).__name__}, not a tensor"
        assert_same_tensor(got, want, where)
    elif isinstance(want, dict):
        assert isinstance(got, dict), f"{where}: {type(got).__name__}"
        keys, wanted = (list(got), list(want)) if ordered else (sorted(got, key=repr), sorted(want, key=repr))
        assert keys == wanted, f"{where}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_trees_equal(got[k], want[k], f"{where}/{k}", ordered=ordered)
    elif isinstance(want, (list, tuple)):
        assert type(got) is (tuple if isinstance(want, tuple) else list), f"{where}: {type(got).__name__}"
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_trees_equal(g, w, f"{where}/{i}", ordered=ordered)
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
