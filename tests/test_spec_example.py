"""spec/FORMAT.md §12 and the writer must agree byte for byte, so that spec and code cannot drift."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

import ckptfmt
from ckptfmt._plan import plan
from ckptfmt._writer import Writer

SPEC = Path(__file__).resolve().parent.parent / "spec" / "FORMAT.md"


def _spec_bytes() -> bytes:
    text = SPEC.read_text(encoding="utf-8")
    block = re.search(r"<!-- example-hexdump:begin -->\s*```\n(.*?)```\s*<!-- example-hexdump:end -->", text, re.S)
    assert block is not None, "the worked example's hex dump is missing from spec/FORMAT.md"
    out = bytearray()
    for line in block.group(1).splitlines():
        offset, _, hexbytes = line.partition(":")
        assert int(offset, 16) == len(out), f"dump line {line!r} starts at the wrong offset"
        out += bytes.fromhex(hexbytes)
    return bytes(out)


def _write_example(path: str) -> bytes:
    obj = {"w": np.array([1.0, -2.0], dtype=np.float32), "step": 7}
    what = plan(obj)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        writer = Writer(fd, alignment=64)
        writer.write_blobs(what.rows)
        writer.finish(what.tree, producer={"name": "ckptfmt", "version": "1.0"},
                      created="2026-01-01T00:00:00Z", user={})
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        return f.read()


def test_writer_reproduces_the_spec_dump(tmp_path: Path) -> None:
    expected = _spec_bytes()
    written = _write_example(str(tmp_path / "example.ckpt"))
    assert len(written) == len(expected) == 403
    assert written == expected


def test_spec_dump_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "from-spec.ckpt"
    path.write_bytes(_spec_bytes())
    loaded = ckptfmt.load(path)
    assert loaded["step"] == 7 and type(loaded["step"]) is int
    assert loaded["w"].dtype == np.float32
    assert loaded["w"].tolist() == [1.0, -2.0]
    with ckptfmt.open(path) as ckpt:
        info = ckpt.info("w")
        assert (info.offset, info.nbytes, info.checksum) == (64, 8, 0x28A0BA9C345D3723)
        assert ckpt.producer == {"name": "ckptfmt", "version": "1.0"}
        assert ckpt.created == "2026-01-01T00:00:00Z"
    assert ckptfmt.verify(path).ok


def test_spec_annotations_match_the_dump() -> None:
    data = _spec_bytes()
    assert data[0:8] == b"\x89CKPT\r\n\x1a"  # magic
    assert data[8:10] == (1).to_bytes(2, "little")  # major
    assert data[10:12] == (0).to_bytes(2, "little")  # minor
    assert data[12:16] == bytes.fromhex("0d0c0b0a")  # byte-order mark 0x0A0B0C0D
    assert data[24:28] == (64).to_bytes(4, "little")  # alignment
    assert int.from_bytes(data[56:64], "little") == 0x169147C56E58D908  # header checksum
    assert data[64:72] == np.array([1.0, -2.0], "<f4").tobytes()  # blob 0
    assert not any(data[72:128])  # padding
    footer = data[-64:]
    assert int.from_bytes(footer[0:8], "little") == 128  # metadata offset
    assert int.from_bytes(footer[8:16], "little") == 211  # metadata length
    assert int.from_bytes(footer[16:24], "little") == 0xBD028C7F9BA36926  # metadata checksum
    assert footer[48:56] == b"CKPTFOOT"  # footer magic
    assert int.from_bytes(footer[56:64], "little") == 0xC5833EBA4729F18B  # footer checksum
