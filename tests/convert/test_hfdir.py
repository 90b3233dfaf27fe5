"""Hugging Face model directories written by huggingface_hub and torch: .bin and .safetensors, single and sharded."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import ckptfmt
from ckptfmt.convert import CorruptSourceError, UnknownFormatError, UnsupportedSourceError, convert, detect
from ckptfmt.convert._hfdir import MAX_SIDE_FILE

torch = pytest.importorskip("torch")
hub = pytest.importorskip("huggingface_hub")

CONFIG = {"architectures": ["TinyLM"], "hidden_size": 8, "vocab_size": 16, "tie_word_embeddings": True,
          "rope_scaling": None, "torch_dtype": "float32", "layer_norm_eps": 1e-05}
GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 3], "temperature": 0.7}
TOKENIZER_CONFIG = {"model_max_length": 2048, "added_tokens_decoder": {"0": {"content": "<pad>", "special": True}}}


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(16, 8)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        self.norm = torch.nn.LayerNorm(8)
        self.lm_head = torch.nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.embed.weight  # tied


def side_files(d: Path) -> None:
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "generation_config.json").write_text(json.dumps(GENERATION))
    (d / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    (d / "merges.txt").write_text("#version: 0.2\nh e\n")
    (d / "training_args.bin").write_bytes(b"not read: not a side file")


def check(dst: Path, want: dict[str, Any], fmt: str, report: Any) -> dict[str, Any]:
    assert report.source_format == fmt
    got = ckptfmt.torch.load(dst)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    with ckptfmt.open(dst) as ckpt:
        files = ckpt.metadata["hf_files"]
    assert files == {"config.json": CONFIG, "generation_config.json": GENERATION,
                     "tokenizer_config.json": TOKENIZER_CONFIG, "merges.txt": "#version: 0.2\nh e\n"}
    return got


def test_single_pytorch_model_bin_keeps_tied_embeddings_tied(tmp_path: Path) -> None:
    import ckptfmt.torch

    d = tmp_path / "model"
    d.mkdir()
    model = TinyLM()
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # what transformers' save_pretrained(safe=False) does
    side_files(d)
    assert detect(d) == "torch-sharded"
    report = convert(d, tmp_path / "m.ckpt")
    got = check(tmp_path / "m.ckpt", model.state_dict(), "torch-sharded", report)
    assert got["lm_head.weight"].untyped_storage().data_ptr() == got["embed.weight"].untyped_storage().data_ptr()
    with ckptfmt.open(tmp_path / "m.ckpt") as ckpt:
        assert len(ckpt) == len(model.state_dict()) - 1  # the tied weight's bytes are stored once
    reloaded = TinyLM()
    reloaded.load_state_dict(got)


def test_sharded_bin_written_by_huggingface_hub(tmp_path: Path) -> None:
    d = tmp_path / "sharded"
    state = {k: v.clone() for k, v in TinyLM().state_dict().items() if k != "lm_head.weight"}
    d.mkdir()
    hub.save_torch_state_dict(state, d, safe_serialization=False, max_shard_size=400)
    side_files(d)
    index = json.loads((d / "pytorch_model.bin.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert detect(d) == "torch-sharded" == detect(d / "pytorch_model.bin.index.json")
    report = convert(d, tmp_path / "m.ckpt")
    check(tmp_path / "m.ckpt", state, "torch-sharded", report)
    with ckptfmt.open(tmp_path / "m.ckpt") as ckpt:
        assert ckpt.metadata["total_size"] == index["metadata"]["total_size"]
    report = convert(d / "pytorch_model.bin.index.json", tmp_path / "m2.ckpt")  # the index names the same model
    check(tmp_path / "m2.ckpt", state, "torch-sharded", report)


@pytest.mark.parametrize("shard_size", [400, "5GB"])
def test_safetensors_directories_keep_side_files(tmp_path: Path, shard_size: Any) -> None:
    d = tmp_path / "st"
    state = {k: v.clone() for k, v in TinyLM().state_dict().items() if k != "lm_head.weight"}
    d.mkdir()
    hub.save_torch_state_dict(state, d, max_shard_size=shard_size)
    side_files(d)
    report = convert(d, tmp_path / "m.ckpt")
    check(tmp_path / "m.ckpt", state, "safetensors-sharded", report)


def test_a_conversion_never_replaces_a_file_of_its_own_source(tmp_path: Path) -> None:
    d = tmp_path / "st"
    d.mkdir()
    hub.save_torch_state_dict({"a": torch.ones(64), "b": torch.zeros(64)}, d, max_shard_size=300)
    side_files(d)
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    shard = next(n for n in files if n.endswith(".safetensors"))
    for victim in (shard, "model.safetensors.index.json", "config.json"):
        for src in (d, d / "model.safetensors.index.json"):
            with pytest.raises(ckptfmt.convert.SameFileError, match=r"is the source|a file of the source"):
                convert(src, d / victim)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == files
    convert(d, d / "model.ckpt")  # a new file beside the source is fine, and so is replacing it
    convert(d, d / "model.ckpt")
    assert ckptfmt.load(d / "model.ckpt")["a"].sum() == 64
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.name != "model.ckpt"} == files


def test_a_single_file_takes_no_side_files(tmp_path: Path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    torch.save(TinyLM().state_dict(), d / "pytorch_model.bin")
    side_files(d)
    convert(d / "pytorch_model.bin", tmp_path / "m.ckpt")
    with ckptfmt.open(tmp_path / "m.ckpt") as ckpt:
        assert "hf_files" not in ckpt.metadata


def _sharded(tmp_path: Path) -> Path:
    d = tmp_path / "sharded"
    d.mkdir()
    hub.save_torch_state_dict({"a": torch.ones(64), "b": torch.zeros(64)}, d, safe_serialization=False,
                              max_shard_size=300)
    return d


@pytest.mark.parametrize("shard", ["../outside.bin", "/etc/passwd", "sub/x.bin", "..", ""])
def test_index_names_cannot_leave_the_directory(tmp_path: Path, shard: str) -> None:
    d = _sharded(tmp_path)
    (tmp_path / "outside.bin").write_bytes((d / "pytorch_model-00001-of-00002.bin").read_bytes())
    index_path = d / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["a"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptSourceError, match=r"plain file name|outside"):
        convert(d, tmp_path / "m.ckpt")


def test_a_link_out_of_the_directory_is_refused(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    target = tmp_path / "elsewhere.bin"
    os.replace(d / "pytorch_model-00001-of-00002.bin", target)
    os.symlink(target, d / "pytorch_model-00001-of-00002.bin")
    with pytest.raises(CorruptSourceError, match="outside"):
        convert(d, tmp_path / "m.ckpt")
    os.symlink("/etc/hostname", d / "config.json")
    os.replace(target, d / "pytorch_model-00001-of-00002.bin.tmp")
    os.unlink(d / "pytorch_model-00001-of-00002.bin")
    os.replace(d / "pytorch_model-00001-of-00002.bin.tmp", d / "pytorch_model-00001-of-00002.bin")
    with pytest.raises(CorruptSourceError, match=r"side file .config\.json.*outside"):
        convert(d, tmp_path / "m.ckpt")


@pytest.mark.parametrize("text,match", [
    ("[" * 100_000 + "]" * 100_000, "nests"),
    ("{\"weight_map\": [1]}", "weight_map"),
    ("{\"weight_map\": {\"a\": 3}}", "weight_map"),
    ("{\"weight_map\": {\"a\": \"pytorch_model-00001-of-00002.bin\"}, \"metadata\": 5}", "metadata"),
    ("{\"weight_map\": {\"zzz\": \"pytorch_model-00001-of-00002.bin\", \"a\": \"pytorch_model-00001-of-00002.bin\","
     " \"b\": \"pytorch_model-00002-of-00002.bin\"}}", "zzz"),
    ("{\"weight_map\": {\"a\": \"pytorch_model-00002-of-00002.bin\", \"b\": \"pytorch_model-00001-of-00002.bin\"}}",
     "weight_map puts"),
], ids=["deep", "map-not-object", "shard-not-str", "metadata-not-object", "name-not-in-shard", "wrong-shard"])
def test_hostile_indexes_raise_typed_errors(tmp_path: Path, text: str, match: str) -> None:
    d = _sharded(tmp_path)
    (d / "pytorch_model.bin.index.json").write_text(text)
    with pytest.raises((CorruptSourceError, UnknownFormatError), match=match):
        convert(d, tmp_path / "m.ckpt")


def test_hostile_side_files(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    (d / "config.json").write_text("{" * 50_000)
    with pytest.raises(CorruptSourceError, match=r"config\.json"):
        convert(d, tmp_path / "m.ckpt")
    (d / "config.json").write_text("[" * 60 + "]" * 60)
    with pytest.raises(CorruptSourceError, match="nests deeper"):
        convert(d, tmp_path / "m.ckpt")
    with open(d / "config.json", "wb") as f:
        f.truncate(MAX_SIDE_FILE + 1)  # sparse: no disk used
    with pytest.raises(UnsupportedSourceError, match="over the cap"):
        convert(d, tmp_path / "m.ckpt")
    (d / "config.json").unlink()
    (d / "merges.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(CorruptSourceError, match="UTF-8"):
        convert(d, tmp_path / "m.ckpt")


def test_a_missing_shard_and_unknown_directories(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CorruptSourceError, match="missing"):
        convert(d, tmp_path / "m.ckpt")
    e = tmp_path / "empty"
    e.mkdir()
    (e / "pytorch_model.bin").write_bytes(b"garbage that is no torch file")
    with pytest.raises(UnknownFormatError, match="model directory"):
        detect(e)


def test_shards_are_told_by_content_and_unsafe_shards_refused(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    torch.save({"a": torch.ones(64), "evil": TinyLM}, d / "pytorch_model-00001-of-00002.bin")
    with pytest.raises(ckptfmt.convert.UnsafePickleError, match="TinyLM"):
        convert(d, tmp_path / "m.ckpt")


def test_progress_is_reported(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    seen: list[int] = []
    report = convert(d, tmp_path / "m.ckpt", progress=seen.append)
    assert seen and all(n > 0 for n in seen) and sum(seen) == report.bytes == 2 * 64 * 4


def test_a_hub_cache_snapshot_links_into_its_blobs(tmp_path: Path) -> None:
    """huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>; a link elsewhere is still refused."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    model = TinyLM()
    torch.save(model.state_dict(), repo / "blobs" / "aaa")
    (repo / "blobs" / "bbb").write_text(json.dumps(CONFIG))
    os.symlink("../../blobs/aaa", snap / "pytorch_model.bin")
    os.symlink("../../blobs/bbb", snap / "config.json")
    convert(snap, tmp_path / "m.ckpt")
    with ckptfmt.open(tmp_path / "m.ckpt") as ckpt:
        assert ckpt.metadata["hf_files"] == {"config.json": CONFIG}
    (tmp_path / "elsewhere.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere.json", snap / "generation_config.json")
    with pytest.raises(CorruptSourceError, match="outside"):
        convert(snap, tmp_path / "m2.ckpt")


def _hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "0" * 40) -> Path:
    """A hub cache repo written with huggingface_hub's own cache functions (what hf_hub_download does after the
    download: the blob under blobs/<sha256>, a relative link from snapshots/<rev>/<file>, refs/main); offline."""
    import hashlib

    from huggingface_hub import file_download as fd

    storage = cache / fd.repo_folder_name(repo_id=repo_id, repo_type="model")
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = Path(fd._get_pointer_path(str(storage), revision, name))
        pointer.parent.mkdir(parents=True, exist_ok=True)
        fd._create_symlink(str(blob), str(pointer), new_blob=True)
    fd._cache_commit_hash_for_specific_revision(str(storage), "main", revision)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(revision)
    return storage / "snapshots" / revision


def test_a_hub_cache_made_by_huggingface_hub_converts(tmp_path: Path) -> None:
    """Sharded safetensors and a torch .bin in a cache huggingface_hub itself recognises (scan_cache_dir)."""
    import huggingface_hub.file_download as fd
    from safetensors.torch import save as st_save

    if not all(hasattr(fd, n) for n in ("_create_symlink", "_get_pointer_path", "repo_folder_name")):
        pytest.skip("this huggingface_hub has no cache-writing helpers")
    cache = tmp_path / "hub"
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(4, dtype=torch.float16)
    index = {"metadata": {"total_size": 32}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                             "b": "model-00002-of-00002.safetensors"}}
    snap = _hub_cache(cache, "org/tiny-st", {
        "model-00001-of-00002.safetensors": st_save({"a": a}), "model-00002-of-00002.safetensors": st_save({"b": b}),
        "model.safetensors.index.json": json.dumps(index).encode(), "config.json": json.dumps(CONFIG).encode()})
    assert {r.repo_id for r in hub.scan_cache_dir(cache).repos} == {"org/tiny-st"}
    assert hub.try_to_load_from_cache("org/tiny-st", "config.json", cache_dir=cache) == str(snap / "config.json")
    assert all(p.is_symlink() for p in snap.iterdir())
    assert detect(snap) == "safetensors-sharded"
    convert(snap, tmp_path / "st.ckpt")
    got = ckptfmt.load(tmp_path / "st.ckpt", backend="torch")
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
    with ckptfmt.open(tmp_path / "st.ckpt") as ckpt:
        assert ckpt.metadata["hf_files"] == {"config.json": CONFIG}
    convert(snap / "model.safetensors.index.json", tmp_path / "st2.ckpt")  # the index file named directly
    blobs = {p.name: p.read_bytes() for p in (snap.parent.parent / "blobs").iterdir()}
    with pytest.raises(ckptfmt.convert.SameFileError, match="a file of the source"):
        convert(snap, snap / "model-00001-of-00002.safetensors")  # a link: the save would replace its blob
    assert {p.name: p.read_bytes() for p in (snap.parent.parent / "blobs").iterdir()} == blobs

    import io

    buf = io.BytesIO()
    torch.save(TinyLM().state_dict(), buf)
    snap_bin = _hub_cache(cache, "org/tiny-bin", {"pytorch_model.bin": buf.getvalue()})
    assert detect(snap_bin) == "torch-sharded"
    convert(snap_bin, tmp_path / "bin.ckpt")
    assert torch.equal(ckptfmt.load(tmp_path / "bin.ckpt", backend="torch")["embed.weight"], TinyLM().embed.weight)


@pytest.mark.parametrize("target", ["outside", "other_repo", "blob_dir", "not_a_models_repo"])
def test_hub_cache_links_reach_only_their_own_blobs(tmp_path: Path, target: str) -> None:
    """A snapshot link to a file outside the repo, another repo's blob, a directory, or out of a non-models-- tree."""
    from safetensors.torch import save as st_save

    data = st_save({"a": torch.ones(2)})
    cache = tmp_path / "hub"
    snap = _hub_cache(cache, "org/tiny", {"model.safetensors": data})
    other = _hub_cache(cache, "org/other", {"x.safetensors": st_save({"x": torch.zeros(1)})})
    link = snap / "extra.safetensors"
    if target == "outside":
        (tmp_path / "loose.safetensors").write_bytes(data)
        os.symlink(tmp_path / "loose.safetensors", link)
    elif target == "other_repo":
        os.symlink(os.path.realpath(other / "x.safetensors"), link)
    elif target == "blob_dir":
        (snap.parent.parent / "blobs" / "sub").mkdir()
        os.symlink("../../blobs/sub", link)
    else:
        renamed = tmp_path / "plain" / "snapshots" / snap.name
        (tmp_path / "plain").mkdir()
        os.rename(snap.parent.parent / "blobs", tmp_path / "plain" / "blobs")
        os.rename(snap.parent, tmp_path / "plain" / "snapshots")
        snap = renamed
    with pytest.raises(CorruptSourceError, match="outside"):
        convert(snap, tmp_path / "m.ckpt")
    assert not (tmp_path / "m.ckpt").exists()
