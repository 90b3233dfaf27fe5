"""State dicts come back as they were saved: OrderedDict, ``_metadata``, torch config values (spec §4.8)."""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import ckptfmt  # noqa: E402
import ckptfmt.torch  # noqa: E402
from ckptfmt._types import TYPES_KEY  # noqa: E402


def _model() -> Any:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def test_state_dict_type_and_metadata_round_trip(tmp_path: Path) -> None:
    sd = _model().state_dict()
    ckptfmt.torch.save(tmp_path / "m.ckpt", {"model": sd, "plain": {"a": torch.ones(2)}})
    back = ckptfmt.torch.load(tmp_path / "m.ckpt")
    assert type(back["model"]) is OrderedDict and type(back["plain"]) is dict
    assert list(back["model"]) == list(sd)
    assert back["model"]._metadata == sd._metadata
    assert back["model"]._metadata["1"]["version"] == 2  # BatchNorm's
    # any backend gets the OrderedDict back (it is plain Python); key-selected loads too
    assert ckptfmt.load(tmp_path / "m.ckpt")["model"]._metadata == sd._metadata
    assert ckptfmt.load(tmp_path / "m.ckpt", keys="model", backend="torch")["model"]._metadata == sd._metadata
    with ckptfmt.open(tmp_path / "m.ckpt") as ckpt:
        assert ckpt.metadata == {}  # the type table is not user metadata
        assert type(ckpt.get("plain")) is dict


def test_load_state_dict_receives_the_module_versions(tmp_path: Path) -> None:
    """BatchNorm's _load_from_state_dict reads its version: with it (2), a missing counter is an error."""
    src = _model()
    sd = src.state_dict()
    del sd["1.num_batches_tracked"]  # a version-2 BatchNorm state must have it
    data = ckptfmt.torch.save_bytes(sd)
    loaded = ckptfmt.torch.load_bytes(data)
    seen: list[Any] = []
    dst = _model()
    real = type(dst[1])._load_from_state_dict

    def spy(self: Any, state_dict: Any, prefix: str, local_metadata: Any, *args: Any) -> Any:
        seen.append((prefix, local_metadata.get("version")))
        return real(self, state_dict, prefix, local_metadata, *args)

    dst[1]._load_from_state_dict = spy.__get__(dst[1])
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        dst.load_state_dict(loaded)
    assert seen == [("1.", 2)]
    # the same dict without _metadata is treated as an old (version None) BatchNorm and accepted
    _model().load_state_dict(OrderedDict(loaded))


def test_round_trip_restores_a_trained_batchnorm(tmp_path: Path) -> None:
    src = _model()
    src.train()
    src(torch.randn(8, 3))
    ckptfmt.torch.save(tmp_path / "m.ckpt", src.state_dict())
    dst = _model()
    dst.load_state_dict(ckptfmt.torch.load(tmp_path / "m.ckpt"))
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_torch_config_values_are_kept(tmp_path: Path) -> None:
    cfg = {"shape": torch.Size([2, 3]), "dtype": torch.bfloat16, "device": torch.device("cpu"),
           "devices": [torch.device("cuda", 1), torch.device("meta")], "sizes": (torch.Size([]), torch.Size([4]))}
    ckptfmt.torch.save(tmp_path / "c.ckpt", {"config": cfg})
    back = ckptfmt.torch.load(tmp_path / "c.ckpt")["config"]
    assert back == cfg
    assert type(back["shape"]) is torch.Size and type(back["sizes"][1]) is torch.Size
    assert back["dtype"] is torch.bfloat16 and isinstance(back["device"], torch.device)
    plain = ckptfmt.load(tmp_path / "c.ckpt")["config"]  # numpy: the plain forms, readable anywhere
    assert plain["shape"] == (2, 3) and plain["dtype"] == "torch.bfloat16" and plain["devices"] == ["cuda:1", "meta"]
    assert ckptfmt.torch.load(tmp_path / "c.ckpt", keys="config/dtype")["config/dtype"] is torch.bfloat16


def test_reserved_metadata_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ckptfmt.UnsupportedObjectError, match="reserved"):
        ckptfmt.save(tmp_path / "x.ckpt", {}, metadata={TYPES_KEY: {}})


def test_unplain_module_metadata_is_refused_naming_the_key(tmp_path: Path) -> None:
    sd = OrderedDict(w=torch.ones(1))
    sd._metadata = OrderedDict({"": {"version": object()}})  # type: ignore[attr-defined]
    with pytest.raises(ckptfmt.UnsupportedObjectError, match="_metadata"):
        ckptfmt.save(tmp_path / "x.ckpt", {"m": sd})


def _with_table(table: Any, tree: Any) -> bytes:
    """A valid file whose type table is ``table`` (rewritten through the real writer)."""
    import ckptfmt._api as api

    real = api._prepare

    def patched(*args: Any) -> Any:
        align, what, user, tree = real(*args)
        return align, what, {**user, TYPES_KEY: table}, tree

    api._prepare = patched  # type: ignore[assignment]
    try:
        return ckptfmt.save_bytes(tree)
    finally:
        api._prepare = real  # type: ignore[assignment]


@pytest.mark.parametrize("table", [
    [1], {"a": 1}, {"a": {"type": 3}}, {"a": {"type": "OrderedDict", "metadata": [1]}},
    {"nope": {"type": "OrderedDict"}}, {"a": {"type": "OrderedDict"}}, {"b": {"type": "torch.dtype"}},
    {"b": {"type": "torch.device"}}, {"c": {"type": "torch.Size"}}, {"c/0": {"type": "torch.dtype"}},
])
def test_hostile_type_tables_raise_typed_errors(table: Any) -> None:
    data = _with_table(table, {"a": 1, "b": "torch.notadtype", "c": (1, -2), "d": {}})
    with pytest.raises(ckptfmt.InvalidMetadataError, match=r"ckptfmt\.types"):
        ckptfmt.torch.load_bytes(data)


def test_unknown_kinds_from_newer_writers_are_left_plain() -> None:
    data = _with_table({"a": {"type": "numpy.Future"}}, {"a": [1, 2]})
    assert ckptfmt.torch.load_bytes(data) == {"a": [1, 2]}


def test_save_and_load_bytes_like_safetensors() -> None:
    sd = _model().state_dict()
    data = ckptfmt.torch.save_bytes(sd, metadata={"note": "x"})
    assert isinstance(data, bytes)
    back = ckptfmt.torch.load_bytes(data)
    assert all(torch.equal(sd[k], back[k]) for k in sd)
    assert back["0.weight"].is_contiguous()
    back["0.weight"].add_(1)  # writable
    buf = io.BytesIO()
    ckptfmt.torch.save(buf, sd)
    assert buf.getvalue()[:8] == data[:8]
