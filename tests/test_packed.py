"""Format 1.1 packed small blobs (spec §14): no extra dependency needed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import ckptfmt
from ckptfmt._checksum import checksum
from ckptfmt._footer import FOOTER_SIZE, Footer, parse_footer


def weights(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.02).astype(np.float32)


def rewrite_meta(path: Path, change: Any) -> None:
    """Edit a file's metadata map and write it back with fresh checksums."""
    data = path.read_bytes()
    footer = parse_footer(data[-FOOTER_SIZE:], len(data), 1)
    meta = msgpack.unpackb(data[footer.metadata_offset : footer.metadata_offset + footer.metadata_length],
                           raw=False, strict_map_key=False)
    change(meta)
    new = msgpack.packb(meta, use_bin_type=True)
    path.write_bytes(data[: footer.metadata_offset] + new + Footer(footer.metadata_offset, len(new),
                                                                    checksum(new)).pack())

def test_many_small_tensors_pack_within_five_percent(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    obj = {f"t{i}": rng.standard_normal(int(n)).astype(np.float32) for i, n in enumerate(rng.integers(256, 1025, 2000))}
    data = sum(v.nbytes for v in obj.values())
    ckptfmt.save(tmp_path / "packed.ckpt", obj, pack=True)
    ckptfmt.save(tmp_path / "plain.ckpt", obj)
    assert os.path.getsize(tmp_path / "packed.ckpt") <= 1.05 * data
    assert os.path.getsize(tmp_path / "plain.ckpt") > 1.5 * data
    back = ckptfmt.load(tmp_path / "packed.ckpt")
    for k, v in obj.items():
        assert back[k].tobytes() == v.tobytes()


def test_large_blobs_keep_the_full_alignment_when_packing(tmp_path: Path) -> None:
    obj = {"a": np.float32(1), "big": weights(5000), "b": np.int64(2), "c": weights(3), "big2": weights(2048)}
    ckptfmt.save(tmp_path / "x.ckpt", obj, pack=True)
    with ckptfmt.open(tmp_path / "x.ckpt") as ckpt:
        for key in obj:
            info = ckpt.info(key)
            assert info.offset % (4096 if info.nbytes >= 4096 else 64) == 0
        assert ckpt.info("b").offset - ckpt.info("a").offset != 4096
    assert ckptfmt.verify(tmp_path / "x.ckpt").ok


def test_packed_layout_and_padding_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "x.ckpt"
    ckptfmt.save(path, {"a": weights(3), "b": weights(5)}, pack=True)
    clean = path.read_bytes()
    with ckptfmt.open(path) as ckpt:
        end = ckpt.info("a").offset + 12
    bad = bytearray(clean)
    bad[end] = 1  # a padding byte between two packed blobs
    path.write_bytes(bytes(bad))
    report = ckptfmt.verify(path)
    assert not report.ok and "padding" in report.errors[0]
    path.write_bytes(clean)

    def move(meta: dict[str, Any]) -> None:
        t = meta["tensors"]
        offs = np.frombuffer(t["offset"], "<u8").copy()
        offs[1] += 64
        t["offset"] = offs.tobytes()
    rewrite_meta(path, move)
    with pytest.raises(ckptfmt.InvalidMetadataError, match="offset"):
        ckptfmt.open(path)
    path.write_bytes(clean)
    for bad in (48, 8, 8192):
        path.write_bytes(clean)
        rewrite_meta(path, lambda meta, bad=bad: meta["tensors"].update(pack_alignment=bad))
        with pytest.raises(ckptfmt.InvalidMetadataError, match="pack_alignment"):
            ckptfmt.open(path)
