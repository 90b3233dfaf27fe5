"""Flax msgpack files written by flax.serialization (in a child process); converted without JAX or Flax."""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ckptfmt
from ckptfmt.convert import CorruptSourceError, UnknownFormatError, convert, detect

pytestmark = pytest.mark.skipif(importlib.util.find_spec("flax") is None, reason="needs flax to write the files")

WRITER = """
import sys, numpy as np, jax.numpy as jnp
from flax import serialization
d = sys.argv[1]
rng = np.random.default_rng(0)
state = {
    "params": {"Dense_0": {"kernel": rng.standard_normal((4, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)},
               "embed": np.asarray(jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3))},
    "opt_state": [{"count": np.int32(7), "mu": np.ones((2, 2), np.float16)}, {}],
    "step": 42, "lr": 0.5, "name": "run", "flag": True, "nothing": None, "z": 1 + 2j,
}
open(d + "/state.msgpack", "wb").write(serialization.to_bytes(state))
np.save(d + "/kernel.npy", state["params"]["Dense_0"]["kernel"])
serialization.MAX_CHUNK_SIZE = 64  # force Flax's chunked-array encoding for anything over 64 bytes
big = {"w": rng.standard_normal((10, 7)).astype(np.float64)}
open(d + "/chunked.msgpack", "wb").write(serialization.msgpack_serialize(big))
np.save(d + "/big.npy", big["w"])
"""


@pytest.fixture(scope="module")
def flax_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("flax")
    subprocess.run([sys.executable, "-c", WRITER, str(d)], check=True, timeout=300, capture_output=True,
                   env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    return d


def test_a_flax_state_dict_converts(flax_files: Path, tmp_path: Path) -> None:
    src = flax_files / "state.msgpack"
    assert detect(src) == "flax-msgpack"
    convert(src, tmp_path / "s.ckpt")
    got = ckptfmt.load(tmp_path / "s.ckpt", backend="numpy")
    kernel = np.load(flax_files / "kernel.npy")
    assert got["params"]["Dense_0"]["kernel"].dtype == np.float32
    assert np.array_equal(got["params"]["Dense_0"]["kernel"], kernel)
    assert np.array_equal(got["params"]["Dense_0"]["bias"], np.zeros(3, np.float32))
    if importlib.util.find_spec("torch"):  # bfloat16 read back through torch
        import torch

        embed = ckptfmt.load(tmp_path / "s.ckpt", backend="torch")["params"]["embed"]
        assert embed.dtype == torch.bfloat16 and embed.float().tolist() == [[0, 1, 2], [3, 4, 5]]
    opt = got["opt_state"]
    assert isinstance(opt, dict) and list(opt) == ["0", "1"]  # Flax's state dict turns lists into {"0": ...}
    assert type(opt["0"]["count"]) is np.int32 and opt["0"]["count"] == 7
    assert opt["0"]["mu"].dtype == np.float16 and opt["1"] == {}
    assert got["step"] == 42 and got["lr"] == 0.5 and got["name"] == "run" and got["flag"] is True
    assert got["nothing"] is None and got["z"] == 1 + 2j


def test_chunked_arrays_are_reassembled(flax_files: Path, tmp_path: Path) -> None:
    convert(flax_files / "chunked.msgpack", tmp_path / "c.ckpt")
    got = ckptfmt.load(tmp_path / "c.ckpt", backend="numpy")
    want = np.load(flax_files / "big.npy")
    assert got["w"].dtype == np.float64 and got["w"].shape == (10, 7) and np.array_equal(got["w"], want)


def test_hostile_files(flax_files: Path, tmp_path: Path) -> None:
    data = (flax_files / "state.msgpack").read_bytes()
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(data[:-5])
    with pytest.raises(UnknownFormatError):  # no longer parses to its end: not told as Flax
        detect(bad)
    from ckptfmt.convert._flax import read_flax

    with pytest.raises(CorruptSourceError):
        read_flax(str(bad))
    bad.write_bytes(b"\xdf" + struct.pack(">I", 2**31) + b"\xa1a\x01")  # a map claiming 2^31 entries
    with pytest.raises(CorruptSourceError, match="cannot fit"):
        read_flax(str(bad))
    bad.write_bytes(b"\x81\xa1a" + b"\x91" * 200 + b"\xc0")  # arrays nested 200 deep
    with pytest.raises(CorruptSourceError, match="nesting"):
        read_flax(str(bad))
    i = data.index(b"kernel") + len(b"kernel")
    assert data[i] == 0xC7  # ext8 holding the kernel array
    bad.write_bytes(data[:i + 1] + bytes([data[i + 1] + 40]) + data[i + 2:])  # its length runs past its content
    with pytest.raises(CorruptSourceError):
        read_flax(str(bad))
