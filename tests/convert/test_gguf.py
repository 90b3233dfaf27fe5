"""GGUF files written by the gguf package (llama.cpp's Python writer): floats as such, quantized blocks bit-exact."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptfmt
from ckptfmt.convert import CorruptSourceError, UnsupportedSourceError, convert, detect
from ckptfmt.convert._gguf import GGML_TYPES

gguf = pytest.importorskip("gguf")


def write(path: Path, tensors: dict[str, Any], kv: bool = True) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    if kv:
        w.add_block_count(2)
        w.add_context_length(4096)
        w.add_float32("llama.rope.freq_base", 10000.0)
        w.add_bool("general.flag", True)
        w.add_string("general.name", "tiny")
        w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "héllo"])
        w.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.25])
        w.add_array("nested", [[1, 2], [3]])
    for name, (arr, raw_dtype) in tensors.items():
        if raw_dtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_float_and_quantized_tensors_and_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((4, 64)).astype(np.float32)
    f16 = rng.standard_normal((3, 5)).astype(np.float16)
    i32 = np.arange(7, dtype=np.int32)
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    q4 = gguf.quants.quantize(rng.standard_normal((3, 128)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
    src = tmp_path / "tiny.gguf"
    write(src, {"tok_embd.weight": (f32, None), "norm.weight": (f16, None), "ids": (i32, None),
                "blk.0.attn_q.weight": (q8, gguf.GGMLQuantizationType.Q8_0),
                "blk.0.ffn_up.weight": (q4, gguf.GGMLQuantizationType.Q4_0)})
    assert detect(src) == "gguf"
    convert(src, tmp_path / "tiny.ckpt")
    got = ckptfmt.load(tmp_path / "tiny.ckpt", backend="numpy")
    assert got["tok_embd.weight"].dtype == np.float32 and np.array_equal(got["tok_embd.weight"], f32)
    assert got["norm.weight"].dtype == np.float16 and np.array_equal(got["norm.weight"], f16)
    assert np.array_equal(got["ids"], i32)
    reader = gguf.GGUFReader(str(src))  # the library's own reader: raw blocks identical
    for t in reader.tensors:
        assert got[t.name].tobytes() == np.asarray(t.data).tobytes(), t.name
    assert got["blk.0.attn_q.weight"].dtype == np.uint8 and got["blk.0.attn_q.weight"].shape == q8.shape
    assert np.array_equal(got["blk.0.ffn_up.weight"], q4)
    with ckptfmt.open(tmp_path / "tiny.ckpt") as ckpt:
        meta = ckpt.metadata["gguf"]
    assert meta["version"] == 3 and meta["alignment"] == 32
    kv = meta["kv"]
    assert kv["general.architecture"] == "llama" and kv["llama.block_count"] == 2 and kv["general.flag"] is True
    assert kv["llama.rope.freq_base"] == 10000.0 and kv["general.name"] == "tiny"
    assert kv["tokenizer.ggml.tokens"] == ["<s>", "</s>", "héllo"] and kv["tokenizer.ggml.scores"] == [0.0, -1.5, 2.25]
    assert kv["nested"] == [[1, 2], [3]]
    assert meta["kv_types"]["llama.context_length"] == "UINT32"
    assert meta["kv_types"]["tokenizer.ggml.tokens"] == ["ARRAY", "STRING"]
    assert meta["tensor_types"]["blk.0.attn_q.weight"] == {"type": "Q8_0", "shape": [2, 64]}
    assert meta["tensor_types"]["blk.0.ffn_up.weight"] == {"type": "Q4_0", "shape": [3, 128]}
    assert meta["tensor_types"]["tok_embd.weight"] == {"type": "F32", "shape": [4, 64]}


def test_the_block_table_matches_gguf() -> None:
    sizes = gguf.constants.GGML_QUANT_SIZES
    for tid, (name, block, nbytes, _) in GGML_TYPES.items():
        t = gguf.GGMLQuantizationType(tid)
        assert t.name == name and sizes[t] == (block, nbytes), name


def _small(tmp_path: Path) -> bytes:
    src = tmp_path / "s.gguf"
    write(src, {"w": (np.ones((2, 32), np.float32), None)})
    return src.read_bytes()


@pytest.mark.parametrize("patch,error,match", [
    (lambda b: b[:4] + struct.pack("<I", 7) + b[8:], UnsupportedSourceError, "version 7"),
    (lambda b: b[:8] + struct.pack("<Q", 2**60) + b[16:], CorruptSourceError, "cannot fit"),
    (lambda b: b[:16] + struct.pack("<Q", 2**40) + b[24:], CorruptSourceError, "cannot fit"),
    (lambda b: b[:-100], CorruptSourceError, "truncated"),
    (lambda b: b[:30], CorruptSourceError, "bytes|ended"),
], ids=["version", "tensor-count", "kv-count", "truncated-data", "truncated-header"])
def test_hostile_headers(tmp_path: Path, patch: Any, error: type, match: str) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(patch(_small(tmp_path)))
    with pytest.raises(error, match=match):
        convert(bad, tmp_path / "bad.ckpt")


def test_a_huge_string_length_is_refused_before_allocating(tmp_path: Path) -> None:
    data = bytearray(_small(tmp_path))
    key_len_at = 24  # the first key's uint64 length
    data[key_len_at:key_len_at + 8] = struct.pack("<Q", 2**62)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptSourceError, match="left"):
        convert(bad, tmp_path / "bad.ckpt")


def test_a_huge_array_count_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "a.gguf"
    write(src, {"w": (np.ones(32, np.float32), None)})
    data = src.read_bytes()
    at = data.index(b"tokenizer.ggml.scores") + len("tokenizer.ggml.scores") + 4 + 4  # type, item type
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:at] + struct.pack("<Q", 2**50) + data[at + 8:])
    with pytest.raises(CorruptSourceError, match="claims"):
        convert(bad, tmp_path / "bad.ckpt")


def test_progress_is_reported(tmp_path: Path) -> None:
    src = tmp_path / "p.gguf"
    write(src, {"a": (np.ones((8, 64), np.float32), None), "b": (np.ones(32, np.float16), None)}, kv=False)
    seen: list[int] = []
    report = convert(src, tmp_path / "p.ckpt", progress=seen.append)
    assert seen and all(n > 0 for n in seen) and sum(seen) == report.bytes == 8 * 64 * 4 + 32 * 2
