"""The torch backend (CPU) against the backend contract, and what is particular to torch."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from contract import (
    ITEMSIZE,
    ML_DTYPES,
    BackendContract,
    from_bytes,
    leaf_kinds,
    ml_dtypes,
    np_dtype,
    pattern,
    same_bits,
)
from frameworks import TorchHooks, to_torch, torch_bytes, torch_to_numpy

torch = pytest.importorskip("torch")

from ckptfmt.backends.torch import TORCH_DTYPES  # noqa: E402

import ckptfmt  # noqa: E402
import ckptfmt.torch  # noqa: E402

requires_ml_dtypes = pytest.mark.skipif(ml_dtypes is None, reason="needs ml_dtypes")

COMPLEX128_BUG = (
    "BUG: backends/torch.py:31/73 _RAW has no 16-byte entry, so host_view raises a bare KeyError(16) for every "
    "complex128 CPU tensor (empty ones too): torch complex128 cannot be saved at all. It should be viewed as "
    "e.g. torch.complex128 -> float64 pairs (t.view(torch.float64).numpy().view('<c16')) and saved")


class TorchContract(TorchHooks, BackendContract):
    """The contract on CPU tensors."""

    known_bugs: ClassVar[dict[str, str]] = {}


class TestTorchContract(TorchContract):
    pass


class TestTorchContractThroughTheTorchModule(TorchContract):
    """``ckptfmt.torch.save``/``load`` (default device "cpu"), on a few dtypes."""

    dtypes: ClassVar[tuple[str, ...]] = ("bool", "bfloat16", "float32", "uint64", "float8_e5m2")

    def load(self, path: Path, **kw: Any) -> Any:
        return ckptfmt.torch.load(path, **kw)

    def save(self, path: Path, obj: Any, **kw: Any) -> None:
        ckptfmt.torch.save(path, obj, durable=False, **kw)


# ---------------------------------------------------------------- dtypes and tensor kinds


def xfail_complex128(names: list[str]) -> list[Any]:
    return [pytest.param(n) if n == "complex128"
            else n for n in names]


@pytest.mark.parametrize("name", xfail_complex128(list(TORCH_DTYPES)))
def test_every_torch_dtype_round_trips_bit_exactly(tmp_ckpt: Path, name: str) -> None:
    tdt = TORCH_DTYPES[name]
    rng = np.random.default_rng(7)
    state = {}
    for key, shape in {"zero_d": (), "empty": (0, 4), "vec": (37,), "mat": (3, 5, 2)}.items():
        data = rng.integers(0, 256, size=int(np.prod(shape)) * ITEMSIZE[name], dtype=np.uint8)
        state[key] = to_torch(from_bytes(name, shape, data.tobytes()), name)
    state["strided"] = state["mat"].transpose(0, 2)[:, ::2]
    ckptfmt.torch.save(tmp_ckpt, state, durable=False)
    with ckptfmt.open(tmp_ckpt) as ckpt:
        for key in state:
            assert ckpt.info(key).dtype == name
    for mmap in (True, False):
        got = ckptfmt.torch.load(tmp_ckpt, mmap=mmap)
        for key, want in state.items():
            assert got[key].dtype == tdt and got[key].shape == want.shape, key
            assert got[key].device.type == "cpu"
            assert torch_bytes(got[key]) == torch_bytes(want), key
    assert got["zero_d"].dim() == 0 and len(torch_bytes(got["zero_d"])) == ITEMSIZE[name]


def test_unsupported_torch_dtypes_are_refused_naming_the_key(tmp_ckpt: Path) -> None:
    with pytest.raises(ckptfmt.UnsupportedDTypeError, match=r"'a/b'.*float8_e4m3fnuz"):
        ckptfmt.torch.save(tmp_ckpt, {"a": {"b": torch.zeros(2, dtype=torch.float8_e4m3fnuz)}})
    assert not tmp_ckpt.exists()


def test_parameters_are_saved_as_their_data(tmp_ckpt: Path) -> None:
    p = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16), requires_grad=False)
    ckptfmt.torch.save(tmp_ckpt, {"p": p, "data": p.data, "frozen": frozen, "list": [p]}, durable=False)
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert len(ckpt) == 2  # p and p.data are one allocation, one view: one row
    got = ckptfmt.torch.load(tmp_ckpt)
    assert type(got["p"]) is torch.Tensor and not got["p"].requires_grad
    assert got["p"] is got["data"] is got["list"][0]
    assert torch.equal(got["p"], p.detach()) and torch.equal(got["frozen"], frozen.detach())
    assert got["frozen"].dtype == torch.bfloat16


def test_tensors_with_autograd_state_are_saved_detached(tmp_ckpt: Path) -> None:
    leaf = torch.linspace(-1, 1, 5, requires_grad=True)
    computed = leaf * 3  # has a grad_fn
    computed.retain_grad()
    computed.sum().backward()
    state = {"leaf": leaf, "computed": computed, "grad": leaf.grad}
    ckptfmt.torch.save(tmp_ckpt, state, durable=False)
    got = ckptfmt.torch.load(tmp_ckpt)
    for k, v in state.items():
        assert not got[k].requires_grad and got[k].grad_fn is None, k
        assert torch.equal(got[k], v.detach()), k
    assert leaf.requires_grad and computed.grad_fn is not None  # the caller's tensors are untouched


def test_zero_d_tensors_load_as_zero_d_tensors_not_scalars(tmp_ckpt: Path) -> None:
    state = {"f": torch.tensor(3.5), "b": torch.tensor(True), "bf": torch.tensor(-2.0, dtype=torch.bfloat16),
             "from_vec": torch.arange(4)[2], "py": 1.5}
    ckptfmt.torch.save(tmp_ckpt, state, durable=False)
    kinds = leaf_kinds(tmp_ckpt)
    assert kinds["f"] == kinds["b"] == kinds["bf"] == kinds["from_vec"] == "tensor" and kinds["py"] == "value"
    got = ckptfmt.torch.load(tmp_ckpt)
    for k in ("f", "b", "bf", "from_vec"):
        assert type(got[k]) is torch.Tensor and got[k].dim() == 0 and got[k].dtype == state[k].dtype, k
        assert got[k].item() == state[k].item(), k
    assert type(got["py"]) is float


def test_conj_and_neg_bit_tensors_are_saved_resolved(tmp_ckpt: Path) -> None:
    z = torch.tensor([1 + 2j, -3 - 0.5j], dtype=torch.complex64)
    state = {"conj": z.conj(), "imag_of_conj": z.conj().imag, "neg": torch._neg_view(torch.tensor([1.0, -2.0]))}
    assert state["conj"].is_conj() and state["imag_of_conj"].is_neg() and state["neg"].is_neg()
    ckptfmt.torch.save(tmp_ckpt, state, durable=False)
    got = ckptfmt.torch.load(tmp_ckpt)
    for k, v in state.items():
        assert not got[k].is_conj() and not got[k].is_neg(), k
        assert torch.equal(got[k], v.resolve_conj().resolve_neg()), k


@pytest.mark.parametrize("case", ["conj_of_saved", "imag_of_conj", "neg_view"])
def test_conj_and_neg_views_of_a_saved_tensor_keep_their_values(tmp_ckpt: Path, case: str) -> None:
    z = torch.tensor([1 + 2j, -3 - 0.5j], dtype=torch.complex64)
    r = torch.tensor([1.0, -2.0, 3.0])
    state = {"conj_of_saved": {"z": z, "v": z.conj()},
             "imag_of_conj": {"z": z, "v": z.conj().imag},
             "neg_view": {"z": r, "v": torch._neg_view(r)}}[case]
    ckptfmt.torch.save(tmp_ckpt, state, durable=False)
    got = ckptfmt.torch.load(tmp_ckpt)
    assert torch.equal(got["z"], state["z"])
    assert torch.equal(got["v"], state["v"].resolve_conj().resolve_neg()), (got["v"], state["v"])


def test_tensors_over_distinct_storages_at_one_address(tmp_ckpt: Path) -> None:
    x = np.arange(10.0)
    short, full = torch.from_numpy(x[:3]), torch.from_numpy(x)
    state = {"a": short[1:], "b": full[2:5]}
    ckptfmt.torch.save(tmp_ckpt, state, durable=False)
    got = ckptfmt.torch.load(tmp_ckpt)
    assert got["a"].tolist() == [1.0, 2.0] and got["b"].tolist() == [2.0, 3.0, 4.0]


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "meta"])
def test_sparse_and_meta_tensors_are_refused_before_writing(tmp_ckpt: Path, kind: str) -> None:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        bad = {"sparse_coo": lambda: torch.eye(3).to_sparse(), "sparse_csr": lambda: torch.eye(3).to_sparse_csr(),
               "meta": lambda: torch.empty(3, device="meta")}[kind]()
    with pytest.raises(ckptfmt.UnsupportedObjectError, match=r"sparse|meta"):
        ckptfmt.torch.save(tmp_ckpt, {"ok": torch.ones(2), "model": {"layer/1": [bad]}})
    assert list(tmp_ckpt.parent.iterdir()) == []


@pytest.mark.parametrize("kind", ["sparse_coo", "meta"])
def test_sparse_and_meta_refusals_name_the_key_path(tmp_ckpt: Path, kind: str) -> None:
    bad = torch.eye(3).to_sparse() if kind == "sparse_coo" else torch.empty(3, device="meta")
    with pytest.raises(ckptfmt.UnsupportedObjectError, match=r"model/layer~11/0"):
        ckptfmt.torch.save(tmp_ckpt, {"ok": torch.ones(2), "model": {"layer/1": [bad]}})


# ---------------------------------------------------------------- a real model


def tied_model() -> Any:
    torch.manual_seed(0)

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.norm = torch.nn.LayerNorm(16)
            self.head = torch.nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight  # tied
            self.register_buffer("pos", torch.arange(8))

        def forward(self, ids: Any) -> Any:
            return self.head(self.norm(self.emb(ids)))

    return LM()


def test_state_dict_with_tied_weights_round_trips_tied(tmp_ckpt: Path) -> None:
    model = tied_model()
    sd = model.state_dict()
    assert sd["emb.weight"].data_ptr() == sd["head.weight"].data_ptr()
    ckptfmt.torch.save(tmp_ckpt, {"model": sd, "step": 3}, durable=False)
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert ckpt.info("model/emb.weight").offset == ckpt.info("model/head.weight").offset
        assert len(ckpt) == len(sd) - 1  # the tied weight is stored once
    for mmap in (True, False):
        got = ckptfmt.torch.load(tmp_ckpt, mmap=mmap)
        assert list(got["model"]) == list(sd) and got["step"] == 3
        for k, v in sd.items():
            assert got["model"][k].dtype == v.dtype and torch.equal(got["model"][k], v), k
        w, h = got["model"]["emb.weight"], got["model"]["head.weight"]
        assert w.untyped_storage().data_ptr() == h.untyped_storage().data_ptr()
        fresh = tied_model()
        with torch.no_grad():
            fresh.emb.weight.zero_()
        fresh.load_state_dict(got["model"])
        assert fresh.head.weight is fresh.emb.weight
        ids = torch.tensor([[1, 2, 3]])
        assert torch.equal(fresh(ids), model(ids))


def test_transposed_tie_is_a_view(tmp_ckpt: Path) -> None:
    w = torch.randn(6, 4)
    state = {"w": w, "wt": w.t(), "bias_slice": w[:, 0]}
    ckptfmt.torch.save(tmp_ckpt, state, durable=False)
    assert leaf_kinds(tmp_ckpt) == {"w": "tensor", "wt": "view", "bias_slice": "view"}
    got = ckptfmt.torch.load(tmp_ckpt)
    assert got["wt"].stride() == (1, 4) and torch.equal(got["wt"], w.t()) and torch.equal(got["bias_slice"], w[:, 0])
    got["w"][0, 0] = 42.0  # writes show through every view, as before the save
    assert got["wt"][0, 0] == 42.0 and got["bias_slice"][0] == 42.0


def test_expanded_and_channels_last_tensors(tmp_ckpt: Path) -> None:
    b = torch.arange(3.0)
    state = {"b": b, "expanded": b.expand(4, 3), "alone": torch.ones(2, 1).expand(2, 5),
             "cl": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)}
    ckptfmt.torch.save(tmp_ckpt, state, durable=False)
    assert leaf_kinds(tmp_ckpt) == {"b": "tensor", "expanded": "view", "alone": "tensor", "cl": "tensor"}
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert ckpt.info("alone").nbytes == 40  # materialized in C order
    got = ckptfmt.torch.load(tmp_ckpt)
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    assert got["expanded"].stride() == (0, 1)
    assert got["expanded"].untyped_storage().data_ptr() == got["b"].untyped_storage().data_ptr()


# ---------------------------------------------------------------- CPU loads: writable, copy-on-write


def file_mappings(path: Path) -> list[tuple[int, int, str]]:
    """(start, end, perms) of this process's mappings of ``path`` (Linux)."""
    real = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].rstrip("\n") == real:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end, parts[1]))
    return out


def in_mapping(ptr: int, maps: list[tuple[int, int, str]]) -> bool:
    return any(start <= ptr < end for start, end, _ in maps)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_cpu_loads_are_writable_copy_on_write_views_of_the_file(tmp_ckpt: Path) -> None:
    w = torch.arange(5000, dtype=torch.float32)  # spans several pages
    state = {"w": w, "row": w[4096:4100], "bf": torch.ones(3, dtype=torch.bfloat16)}
    ckptfmt.torch.save(tmp_ckpt, state, durable=False)
    before = tmp_ckpt.read_bytes()
    got = ckptfmt.torch.load(tmp_ckpt)  # mmap=True is the default
    other = ckptfmt.torch.load(tmp_ckpt)
    maps = file_mappings(tmp_ckpt)
    assert maps, "the load did not map the file"
    for k in state:
        assert in_mapping(got[k].data_ptr(), maps), f"{k} is not a view of the file mapping"
    assert all(perms.endswith("p") for _, _, perms in maps)  # private mappings
    got["w"].mul_(-1)  # no warning, no error: writable
    got["row"][0] = 0.5
    got["bf"].add_(1)
    assert got["w"][4096] == 0.5 and got["w"][1] == -1.0 and got["bf"].tolist() == [2.0, 2.0, 2.0]
    assert tmp_ckpt.read_bytes() == before  # private pages: the file never changed
    assert ckptfmt.verify(tmp_ckpt).ok
    assert torch.equal(other["w"], w) and torch.equal(ckptfmt.torch.load(tmp_ckpt)["w"], w)
    assert torch.equal(ckptfmt.torch.load(tmp_ckpt, mmap=False)["row"], w[4096:4100])
    del got, other


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_mmap_false_loads_own_their_memory(tmp_ckpt: Path) -> None:
    w = torch.arange(3000.0)
    ckptfmt.torch.save(tmp_ckpt, {"w": w, "v": w[10:20]}, durable=False)
    got = ckptfmt.torch.load(tmp_ckpt, mmap=False)
    assert not in_mapping(got["w"].data_ptr(), file_mappings(tmp_ckpt))
    got["w"].zero_()
    assert got["v"].sum() == 0  # still one storage
    assert torch.equal(ckptfmt.torch.load(tmp_ckpt, mmap=False)["w"], w)


def test_loaded_tensors_outlive_the_file(tmp_ckpt: Path) -> None:
    ckptfmt.torch.save(tmp_ckpt, {"w": torch.arange(10.0)}, durable=False)
    got = ckptfmt.torch.load(tmp_ckpt)
    tmp_ckpt.unlink()
    assert got["w"].sum().item() == 45.0


# ---------------------------------------------------------------- entry points


def test_torch_module_load_selects_keys(tmp_ckpt: Path) -> None:
    state = {"model": {"w": torch.ones(2, 3), "b": torch.zeros(3)}, "opt": [{"lr": 0.1}, torch.arange(4)]}
    ckptfmt.torch.save(tmp_ckpt, state, durable=False)
    got = ckptfmt.torch.load(tmp_ckpt, keys=["model/w", "opt/0", "opt/1"])
    assert list(got) == ["model/w", "opt/0", "opt/1"]
    assert torch.equal(got["model/w"], torch.ones(2, 3)) and got["opt/0"] == {"lr": 0.1}
    assert type(got["opt/1"]) is torch.Tensor and got["opt/1"].tolist() == [0, 1, 2, 3]
    sub = ckptfmt.torch.load(tmp_ckpt, keys="model")["model"]
    assert set(sub) == {"w", "b"} and all(type(v) is torch.Tensor for v in sub.values())
    with pytest.raises(ckptfmt.CheckpointKeyError):
        ckptfmt.torch.load(tmp_ckpt, keys=["model/x"])


def test_generic_load_with_backend_torch(tmp_ckpt: Path) -> None:
    ckptfmt.save(tmp_ckpt, {"a": np.arange(4, dtype=np.int16), "s": np.float32(2.5), "n": [1, "x"]}, durable=False)
    got = ckptfmt.load(tmp_ckpt, backend="torch")
    assert type(got["a"]) is torch.Tensor and got["a"].dtype == torch.int16 and got["a"].tolist() == [0, 1, 2, 3]
    assert type(got["s"]) is torch.Tensor and got["s"].dim() == 0 and got["s"].item() == 2.5
    assert got["n"] == [1, "x"]
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert type(ckpt.get("a", backend="torch")) is torch.Tensor
        assert type(ckpt.get("a", backend=ckptfmt.get_backend("torch"))) is torch.Tensor


def test_device_cpu_0_loads_to_the_cpu(tmp_ckpt: Path) -> None:
    ckptfmt.torch.save(tmp_ckpt, {"w": torch.arange(4.0)}, durable=False)
    got = ckptfmt.torch.load(tmp_ckpt, device="cpu:0")
    assert got["w"].device.type == "cpu" and got["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_negative_stride_views_from_numpy_load_in_torch_as_copies(tmp_ckpt: Path) -> None:
    """Spec §4.7: a view torch cannot represent still loads, as a copy (issue 11 §1)."""
    a = np.arange(12.0).reshape(3, 4)
    ckptfmt.save(tmp_ckpt, {"a": a, "rev": a[::-1], "ok": a[1:]}, durable=False)
    assert leaf_kinds(tmp_ckpt)["rev"] == "view"
    got = ckptfmt.torch.load(tmp_ckpt)
    assert got["rev"].tolist() == a[::-1].tolist()
    assert got["rev"].untyped_storage().data_ptr() != got["a"].untyped_storage().data_ptr()
    assert ckptfmt.load(tmp_ckpt, backend="torch", keys=["rev"])["rev"].tolist() == a[::-1].tolist()
    # representable views still share memory
    assert got["ok"].tolist() == a[1:].tolist() and got["ok"].untyped_storage().data_ptr() == \
        got["a"].untyped_storage().data_ptr()
    same_bits(ckptfmt.load(tmp_ckpt, keys=["rev"])["rev"], a[::-1])


# ---------------------------------------------------------------- across backends


CROSS_DTYPES = ["bool", "int8", "uint16", "uint32", "uint64", "float16", "float32", "complex128",
                "bfloat16", "float8_e4m3fn", "float8_e5m2"]


@requires_ml_dtypes
@pytest.mark.parametrize("name", xfail_complex128(CROSS_DTYPES))
def test_torch_written_files_load_in_numpy(tmp_ckpt: Path, name: str) -> None:
    want = pattern(name, (3, 5))
    t = to_torch(want, name)
    ckptfmt.torch.save(tmp_ckpt, {"x": t, "t": t.T, "z": t[1, 2]}, durable=False)
    for mmap in (True, False):
        got = ckptfmt.load(tmp_ckpt, mmap=mmap)
        assert got["x"].dtype == np_dtype(name)
        if name in ML_DTYPES:
            assert got["x"].dtype == np.dtype(getattr(ml_dtypes, name))
        same_bits(got["x"], want, "x")
        same_bits(got["t"], want.T, "t")
        same_bits(got["z"], want[1, 2], "z")
        assert np.shares_memory(got["t"], got["x"])


@pytest.mark.parametrize("name", CROSS_DTYPES)
def test_numpy_written_files_load_in_torch(tmp_ckpt: Path, name: str) -> None:
    if name in ML_DTYPES and ml_dtypes is None:
        pytest.skip("numpy writes bfloat16/float8 only through ml_dtypes")
    a = pattern(name, (3, 5))
    ckptfmt.save(tmp_ckpt, {"x": a, "t": a.T, "row": a[2], "s": a[0, 0]}, durable=False)
    got = ckptfmt.torch.load(tmp_ckpt)
    for k, v in {"x": a, "t": a.T, "row": a[2], "s": np.asarray(a[0, 0])}.items():
        assert got[k].dtype == TORCH_DTYPES[name], k
        same_bits(torch_to_numpy(got[k]), v, k)
    assert got["t"].untyped_storage().data_ptr() == got["x"].untyped_storage().data_ptr()


BYTE_IDENTICAL = ["bool", "int64", "uint16", "float16", "float32", "complex64", "bfloat16", "float8_e4m3fn"]


@pytest.mark.parametrize("name", BYTE_IDENTICAL)
def test_numpy_and_torch_write_byte_identical_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    name: str) -> None:
    if name in ML_DTYPES and ml_dtypes is None:
        pytest.skip("numpy writes bfloat16/float8 only through ml_dtypes")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    a, b, c = pattern(name, (4, 6)), pattern(name, (0, 3), 1), pattern(name, (), 2)
    step = 10

    def state(conv: Any) -> dict[str, Any]:
        return {"w": conv(a), "opt": [conv(b), {"step": step, "lr": 1e-3}], "z": conv(c), "t": (conv(a[::2]),)}

    np_path, torch_path = tmp_path / "n.ckpt", tmp_path / "t.ckpt"
    ckptfmt.save(np_path, state(np.array), durable=False, metadata={"run": name})
    ckptfmt.torch.save(torch_path, state(lambda x: to_torch(x, name)), durable=False, metadata={"run": name})
    assert np_path.read_bytes() == torch_path.read_bytes()
    assert ckptfmt.open(np_path).created == "1970-01-01T00:00:00Z"


@pytest.mark.parametrize("name", ["float32", "bfloat16", "int8"])
def test_numpy_and_torch_write_byte_identical_files_with_shared_storage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    if name in ML_DTYPES and ml_dtypes is None:
        pytest.skip("numpy writes bfloat16 only through ml_dtypes")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    a = pattern(name, (4, 6))
    t = to_torch(a, name)
    np_base = np.array(a)
    np_state = {"base": np_base, "t": np_base.T, "slice": np_base[1:3, ::2], "row": np_base[2], "again": np_base,
                "parts": [np_base[0, :4], np_base[0, 2:]]}
    torch_state = {"base": t, "t": t.T, "slice": t[1:3, ::2], "row": t[2], "again": t,
                   "parts": [t[0, :4], t[0, 2:]]}
    # and a group without its base: one uint8 blob with views
    other = pattern(name, (10,), 3)
    np_other, t_other = np.array(other), to_torch(other, name)
    np_state["loose"] = (np_other[:6], np_other[4:9])
    torch_state["loose"] = (t_other[:6], t_other[4:9])
    np_path, torch_path = tmp_path / "n.ckpt", tmp_path / "t.ckpt"
    ckptfmt.save(np_path, np_state, durable=False)
    ckptfmt.torch.save(torch_path, torch_state, durable=False)
    kinds = leaf_kinds(np_path)
    assert kinds["t"] == kinds["loose/0"] == kinds["parts/1"] == "view"
    assert np_path.read_bytes() == torch_path.read_bytes()


# ---------------------------------------------------------------- backends that are not installed


def test_get_backend_torch() -> None:
    be = ckptfmt.get_backend("torch")
    assert isinstance(be, ckptfmt.ArrayBackend) and be.name == "torch"
    assert be.is_array(torch.ones(1)) and be.is_array(torch.nn.Parameter(torch.ones(1)))
    assert not be.is_array(np.ones(1))


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed")
def test_a_missing_backend_raises_missing_dependency_error(tmp_ckpt: Path) -> None:
    with pytest.raises(ckptfmt.MissingDependencyError, match="pip install") as err:
        ckptfmt.get_backend("cupy")
    assert isinstance(err.value, ImportError) and isinstance(err.value, ckptfmt.CheckpointError)
    assert "cupy" in str(err.value)
    ckptfmt.save(tmp_ckpt, {"w": np.ones(2)}, durable=False)
    with pytest.raises(ImportError, match="pip install"):
        ckptfmt.load(tmp_ckpt, backend="cupy")
    cupy_api = importlib.import_module("ckptfmt.cupy")  # importable without cupy; its loads need the backend
    with pytest.raises(ImportError, match="pip install"):
        cupy_api.load(tmp_ckpt)


@pytest.mark.parametrize("how", [{"compression": "fast"}, {"compression": "balanced", "chunk_bytes": 4096},
                                 {"pack": True}])
def test_torch_save_writes_format_1_1_when_asked(tmp_ckpt: Path, how: dict[str, Any]) -> None:
    if "compression" in how:
        pytest.importorskip("zstandard")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32)).to(torch.bfloat16)
    sd = model.state_dict()
    ckptfmt.torch.save(tmp_ckpt, sd, **how)
    with ckptfmt.open(tmp_ckpt) as ckpt:
        assert ckpt.header.minor == 1
    back = ckptfmt.torch.load(tmp_ckpt)
    assert sd.keys() == back.keys()
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in sd.items())
