"""torch.distributed.checkpoint directories written here by two gloo ranks, consolidated into one file."""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from convert_testlib import assert_same_tensor, assert_trees_equal, free_port

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import ckptfmt  # noqa: E402
import ckptfmt.torch  # noqa: E402
from ckptfmt.convert import CorruptSourceError, UnsafePickleError, convert, detect  # noqa: E402
from ckptfmt.convert._dcp import RestrictedUnpickler, read_dcp_metadata  # noqa: E402

WORLD = 2


class Custom:
    """A value DCP pickles, and torch.load(weights_only=True) refuses."""

    def __init__(self, value: int) -> None:
        self.value = value


def full_state() -> dict[str, Any]:
    """The whole state both ranks hold (deterministic), before sharding."""
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "w": torch.randn(5, 3, generator=g),  # Shard(0), uneven: 3 + 2 rows
            "emb": torch.randn(8, 4, generator=g).to(torch.bfloat16),  # Shard(0), even
            "wide": torch.randn(4, 6, generator=g).to(torch.bfloat16),  # Shard(1): assembled in memory
            "bias": torch.arange(6, dtype=torch.int64),  # a plain tensor, the same on both ranks
            "scalar": torch.tensor(1.25, dtype=torch.float64),
            "empty": torch.zeros(0, 3),
        },
        "optim": {"state": {"0": {"step": torch.tensor(3.0), "exp_avg": torch.randn(5, 3, generator=g)}},
                  "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": ["w"]}]},
        "step": 7,
        "config": {"name": "tiny", "dropout": 0.0, "tags": ["a", "b"], "none": None},
        "mixed": [torch.ones(2, dtype=torch.float16), 3, "x"],
    }


SHARDED = {("model", "w"): 0, ("model", "emb"): 0, ("model", "wide"): 1, ("optim", "state", "0", "exp_avg"): 0}


def _rank(rank: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (WORLD,))
        state = full_state()
        for keys, dim in SHARDED.items():
            node = state
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]] = distribute_tensor(node[keys[-1]], mesh, [Shard(dim)], src_data_rank=None)
        dcp.save(state, checkpoint_id=path)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DCP checkpoint saved by two gloo ranks (forked: they need not import torch again)."""
    import torch.distributed.checkpoint
    import torch.distributed.device_mesh
    import torch.distributed.tensor  # noqa: F401 (imported before the fork, not in each rank)
    import torch.multiprocessing as mp

    path = tmp_path_factory.mktemp("dcp") / "step-7"
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a process with threads may deadlock; the ranks only save
        warnings.simplefilter("ignore", DeprecationWarning)
        mp.start_processes(_rank, args=(free_port(), str(path)), nprocs=WORLD, join=True, start_method="fork")
    return path


def test_detected(dcp_dir: Path) -> None:
    assert sorted(n for n in os.listdir(dcp_dir) if n.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert detect(dcp_dir) == "dcp"


def test_consolidated(dcp_dir: Path, tmp_path: Path) -> None:
    report = convert(dcp_dir, tmp_path / "full.ckpt")
    assert report.source_format == "dcp" and report.tensors == 9
    got = ckptfmt.torch.load(tmp_path / "full.ckpt")
    # DCP stores values whole and tensors by chunk; both come back where they were, whole (in DCP's key order)
    assert_trees_equal(got, full_state(), ordered=False)
    assert ckptfmt.open(tmp_path / "full.ckpt").metadata == {"converted_from": {"format": "dcp", "path": "step-7"}}


def test_matches_torch_consolidation(dcp_dir: Path, tmp_path: Path) -> None:
    """The same tree as torch's own dcp_to_torch_save (which unpickles values without restriction)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(dcp_dir, tmp_path / "torch.pt")
    want = torch.load(tmp_path / "torch.pt", weights_only=True)
    convert(dcp_dir, tmp_path / "full.ckpt")
    assert_trees_equal(ckptfmt.torch.load(tmp_path / "full.ckpt"), want)


def test_slabs_stream_one_chunk_at_a_time(dcp_dir: Path) -> None:
    from ckptfmt.convert._dcp import DcpTensor, read_dcp

    state = read_dcp(str(dcp_dir), allow_pickle=False)
    w, wide = state["model"]["w"], state["model"]["wide"]
    assert isinstance(w, DcpTensor) and w._slabs() and len(w.parts) == 2
    assert isinstance(wide, DcpTensor) and not wide._slabs()
    for lazy, want in ((w, full_state()["model"]["w"]), (wide, full_state()["model"]["wide"])):
        data = b"".join(c.tobytes() for c in lazy.chunks(8))
        assert data == want.contiguous().view(torch.uint8).numpy().tobytes()


def test_metadata_unpickler_refuses_code(dcp_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "evil"
    shutil.copytree(dcp_dir, bad)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    (bad / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafePickleError, match=r"(posix|nt|os)\.system") as e:
        convert(bad, tmp_path / "out.ckpt")
    assert e.value.globals and e.value.globals[0].endswith(".system")
    assert not marker.exists() and not (tmp_path / "out.ckpt").exists()
    # the real metadata passes, and only DCP's classes were resolved
    meta = read_dcp_metadata(str(dcp_dir))
    assert type(meta).__module__ == "torch.distributed.checkpoint.metadata"
    with open(dcp_dir / ".metadata", "rb") as f:
        assert type(RestrictedUnpickler(f, path="x").load()) is type(meta)


def test_refused_value_and_allow_pickle(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "single"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP warns when saving without a process group
        dcp.save({"w": torch.ones(3), "obj": {"x": Custom(1)}}, checkpoint_id=path)
    with pytest.raises(UnsafePickleError, match=r"value 'obj\.x'.*Custom") as e:
        convert(path, tmp_path / "out.ckpt")
    assert e.value.globals == [f"{Custom.__module__}.Custom"]
    with pytest.raises(ckptfmt.UnsupportedObjectError, match=r"'obj/x'.*Custom"):
        convert(path, tmp_path / "out.ckpt", allow_pickle=True)
    assert not (tmp_path / "out.ckpt").exists()


def test_damaged_directories(dcp_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "truncated"
    shutil.copytree(dcp_dir, broken)
    part = broken / "__1_0.distcp"
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(CorruptSourceError, match="truncated"):
        convert(broken, tmp_path / "out.ckpt")
    missing = tmp_path / "missing"
    shutil.copytree(dcp_dir, missing)
    (missing / "__0_0.distcp").unlink()
    with pytest.raises(CorruptSourceError, match="missing"):
        convert(missing, tmp_path / "out.ckpt")
    garbled = tmp_path / "garbled"
    shutil.copytree(dcp_dir, garbled)
    (garbled / ".metadata").write_bytes((garbled / ".metadata").read_bytes()[:50])
    with pytest.raises(CorruptSourceError, match="not a well-formed pickle"):
        convert(garbled, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


def test_tensor_values_equal_source_chunks(dcp_dir: Path, tmp_path: Path) -> None:
    """Each rank's saved chunk is the matching slice of the consolidated tensor."""
    convert(dcp_dir, tmp_path / "full.ckpt")
    got = ckptfmt.torch.load(tmp_path / "full.ckpt")
    meta = read_dcp_metadata(str(dcp_dir))
    chunks = meta.state_dict_metadata["model.w"].chunks
    assert [tuple(c.sizes) for c in chunks] == [(3, 3), (2, 3)]
    for c in chunks:
        sl = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))
        assert_same_tensor(got["model"]["w"][sl], full_state()["model"]["w"][sl], "model/w")
