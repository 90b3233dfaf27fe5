"""safetensors sources with hostile headers (issue 9): the library's own header rules, bounded JSON nesting."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

st = pytest.importorskip("safetensors")
from safetensors.numpy import save_file  # noqa: E402

import ckptfmt  # noqa: E402
import ckptfmt.convert  # noqa: E402
from ckptfmt.convert._errors import CorruptSourceError  # noqa: E402
from ckptfmt.convert._safetensors import MAX_DEPTH, read_safetensors  # noqa: E402

TENSORS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int16),
           "c": np.zeros(0, np.float64)}


def written(tmp_path: Path) -> tuple[Path, dict[str, Any], bytes]:
    """A file written by the safetensors library: its path, parsed header and data bytes."""
    p = tmp_path / "ok.safetensors"
    save_file(TENSORS, str(p), metadata={"k": "v"})
    raw = p.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    return p, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def rewrite(path: Path, header: dict[str, Any] | bytes, data: bytes) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def library_refuses(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                f.get_tensor(k)
    except Exception:  # the library raises its own SafetensorError (or OSError)
        return True
    return False


def test_a_file_the_library_writes_converts_exactly(tmp_path: Path) -> None:
    p, _, _ = written(tmp_path)
    ckptfmt.convert(p, tmp_path / "ok.ckpt")
    back = ckptfmt.load(tmp_path / "ok.ckpt")
    for k, v in TENSORS.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v)


BREAKS = {
    # b's bytes also serve as a's: [0, 24) and [16, 24): the library refuses overlaps
    "overlap": lambda h, d: (h["b"].__setitem__("data_offsets", [16, 24]), d),
    # a gap of 8 unused bytes between two tensors
    "gap": lambda h, d: (h["b"].__setitem__("data_offsets", [32, 40]), d[:24] + bytes(8) + d[24:]),
    # bytes after the last tensor that no tensor covers
    "trailing bytes": lambda h, d: (h, d + b"hidden"),
    # a tensor named twice in the header
    "duplicate name": lambda h, d: (json.dumps(h)[:-1].encode() + b', "a": ' + json.dumps(h["a"]).encode() + b"}",
                                    d),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_headers_the_safetensors_library_refuses_are_refused(tmp_path: Path, name: str) -> None:
    _, header, data = written(tmp_path)
    out = BREAKS[name](header, data)
    new_header, new_data = (header, out[1]) if out[0] is None else out
    p = rewrite(tmp_path / f"{name.replace(' ', '_')}.safetensors", new_header, new_data)
    if name != "duplicate name":  # serde keeps the last duplicate; the rule here is stricter
        assert library_refuses(p)
    with pytest.raises(CorruptSourceError) as e:
        read_safetensors(str(p))
    assert str(p) in str(e.value)
    with pytest.raises(CorruptSourceError):
        ckptfmt.convert(p, tmp_path / "out.ckpt")


def test_nesting_100000_deep_is_a_corrupt_source_not_a_recursion_error(tmp_path: Path) -> None:
    p = rewrite(tmp_path / "deep.safetensors", b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"")
    with pytest.raises(CorruptSourceError, match=f"deeper than {MAX_DEPTH}"):
        read_safetensors(str(p))
    out = subprocess.run([sys.executable, "-m", "ckptfmt", "convert", str(p), str(tmp_path / "d.ckpt"), "--quiet"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "deeper than" in out.stderr, out.stderr


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path: Path) -> None:
    p = tmp_path / "s.safetensors"
    save_file(TENSORS, str(p), metadata={"note": "[" * 1000 + '\\"{' * 100})
    tensors, meta = read_safetensors(str(p))
    assert meta["note"].startswith("[[[") and set(tensors) == set(TENSORS)


def test_a_sharded_index_nested_deep_is_a_corrupt_source(tmp_path: Path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    save_file(TENSORS, str(d / "model-00001-of-00001.safetensors"))
    (d / "model.safetensors.index.json").write_text('{"weight_map": {}, "metadata": ' + "[" * 50_000 + "]" * 50_000
                                                    + "}")
    with pytest.raises(ckptfmt.CheckpointError, match="deeper than"):
        ckptfmt.convert(d, tmp_path / "m.ckpt")
