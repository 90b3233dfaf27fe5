"""export --to hf-safetensors: shards + index that safetensors and huggingface_hub read back, side files restored."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptfmt
from ckptfmt._cli import main
from ckptfmt.convert import convert
from ckptfmt.convert._export import ExportError, export, parse_size

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def read_hf_dir(d: Path) -> dict[str, np.ndarray]:
    """The tensors of a Hugging Face directory, by its index (or its single model.safetensors)."""
    index_path = d / "model.safetensors.index.json"
    if not index_path.exists():
        return dict(safetensors_numpy.load_file(d / "model.safetensors"))
    index = json.loads(index_path.read_text())
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = safetensors_numpy.load_file(d / shard)
        assert all(index["weight_map"][k] == shard for k in part)
        out.update(part)
    assert sorted(out) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in out.values())
    return out


def state(n: int = 6) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {f"model.layers.{i}.weight": rng.standard_normal((16, 16)).astype(np.float32) for i in range(n)} | {
        "model.norm.bias": np.arange(16, dtype=np.float16), "model.step": np.int64(7)}


def test_sharded_export_reads_back_bit_for_bit(tmp_path: Path) -> None:
    src = tmp_path / "m.ckpt"
    want = state()
    ckptfmt.save(src, want)
    out = tmp_path / "hf"
    export(src, out, to="hf-safetensors", shard_size=2050)  # two 1 KiB tensors per shard, then the small ones
    names = sorted(os.listdir(out))
    assert names == ["model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
                     "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors",
                     "model.safetensors.index.json"]
    got = read_hf_dir(out)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == np.asarray(v).dtype and np.array_equal(got[k], v), k
    for name in names[:-1]:
        sizes = [a.nbytes for a in safetensors_numpy.load_file(out / name).values()]
        assert sum(sizes) <= 2050
    with open(out / names[0], "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"]["format"] == "pt"


def test_one_shard_is_model_safetensors_and_a_reexport_removes_stale_shards(tmp_path: Path) -> None:
    src = tmp_path / "m.ckpt"
    ckptfmt.save(src, state())
    out = tmp_path / "hf"
    export(src, out, to="hf-safetensors", shard_size="1KB")
    assert len(os.listdir(out)) == 8
    (out / "README.md").write_text("mine")
    export(src, out, to="hf-safetensors")  # default 5GB: one file
    assert sorted(os.listdir(out)) == ["README.md", "model.safetensors"]
    assert sorted(read_hf_dir(out)) == sorted(state())


def test_hf_directory_round_trip_with_side_files_and_huggingface_hub(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    hub = pytest.importorskip("huggingface_hub")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    hub.save_torch_state_dict(model.state_dict(), src_dir, max_shard_size=300)
    config = {"hidden_size": 8, "eps": 1e-5, "names": ["a", "é"]}
    (src_dir / "config.json").write_text(json.dumps(config))
    (src_dir / "merges.txt").write_text("a b\n")
    convert(src_dir, tmp_path / "m.ckpt")
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "m.ckpt"), str(out), "--to", "hf-safetensors", "--shard-size", "300B"]) == 0
    assert json.loads((out / "config.json").read_text()) == config and (out / "merges.txt").read_text() == "a b\n"
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    hub.load_torch_model(fresh, out)  # the library's own loader, strict
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_tied_weights_are_refused_unless_copied(tmp_path: Path) -> None:
    src = tmp_path / "m.ckpt"
    w = np.ones((4, 4), np.float32)
    ckptfmt.save(src, {"embed.weight": w, "lm_head.weight": w, "note": "x"})
    with pytest.raises(ExportError, match="share storage") as info:
        export(src, tmp_path / "hf", to="hf-safetensors")
    assert "note" in info.value.keys and not (tmp_path / "hf").exists()
    export(src, tmp_path / "hf", to="hf-safetensors", flatten="drop,copy")
    got = read_hf_dir(tmp_path / "hf")
    assert np.array_equal(got["embed.weight"], w) and np.array_equal(got["lm_head.weight"], w)


def test_hostile_side_file_names_in_metadata_are_not_written(tmp_path: Path) -> None:
    src = tmp_path / "m.ckpt"
    ckptfmt.save(src, {"w": np.ones(2)}, metadata={"hf_files": {"../evil.json": {"x": 1}, "config.json": {"a": 1}}})
    export(src, tmp_path / "hf", to="hf-safetensors")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    assert not (tmp_path / "evil.json").exists()


@pytest.mark.parametrize("size,want", [(10, 10), ("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500mb", 5 * 10**8),
                                       ("1.5KB", 1500), ("100", 100)])
def test_parse_size(size: Any, want: int) -> None:
    assert parse_size(size) == want


@pytest.mark.parametrize("size", [0, -1, "5XB", "", "GB", True])
def test_bad_sizes(size: Any) -> None:
    with pytest.raises(ValueError, match="shard size"):
        parse_size(size)


def test_shard_size_only_for_hf(tmp_path: Path) -> None:
    src = tmp_path / "m.ckpt"
    ckptfmt.save(src, {"w": np.ones(2)})
    with pytest.raises(ValueError, match="shard_size"):
        export(src, tmp_path / "x.safetensors", to="safetensors", shard_size="1GB")
    assert main(["export", str(src), str(tmp_path / "x"), "--to", "torch", "--shard-size", "1GB"]) == 2
