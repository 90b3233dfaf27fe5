"""Storage behaviour without ranks: retries with backoff, failed attempts removed, errors in async futures."""

from __future__ import annotations

import errno
import os

import pytest

from ckptfmt.distributed._store import is_transient, retry

torch = pytest.importorskip("torch")
import ckptfmt  # noqa: E402
import ckptfmt.distributed as cd  # noqa: E402


def test_transient_errors_are_retried_with_backoff():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.ETIMEDOUT, "timed out")
        return "ok"

    assert retry(flaky, attempts=4, backoff=0.001) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(ConnectionResetError):
        retry(lambda: (calls.append(1), (_ for _ in ()).throw(ConnectionResetError()))[1], attempts=2, backoff=0.001)
    assert len(calls) == 2


def test_permanent_errors_are_not_retried():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        retry(missing, attempts=4, backoff=0.001)
    assert len(calls) == 1
    assert not is_transient(PermissionError()) and is_transient(TimeoutError())
    assert is_transient(OSError("An error occurred (SlowDown) when calling PutObject"))


def test_failed_save_leaves_previous_and_no_attempt(tmp_path):
    path = tmp_path / "c"
    cd.save({"w": torch.ones(3), "step": 1}, path)
    with pytest.raises(cd.DistributedCheckpointError, match="only None, bool"):
        cd.save({"w": torch.zeros(3), "step": object()}, path)
    assert cd.consolidate(path)["step"] == 1 and cd.verify(path).ok
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_async_save_error_surfaces_in_future(tmp_path):
    ok = cd.async_save({"w": torch.ones(4), "n": 3}, tmp_path / "a")
    assert ok.result(60) == str(tmp_path / "a")
    bad = cd.async_save({"w": torch.ones(4), "n": {1, 2}}, tmp_path / "b")
    with pytest.raises(cd.DistributedCheckpointError, match="set"):
        bad.result(60)
    assert sorted(os.listdir(tmp_path)) == ["a"]
    t = {"w": torch.zeros(4), "n": 0}
    cd.load(t, tmp_path / "a")
    assert t["n"] == 3 and torch.equal(t["w"], torch.ones(4))


def test_options_select_and_rng(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cd.save({"model": model, "optim": opt, "extra": 5}, tmp_path / "m",
            options=cd.SaveOptions(model_only=True, rng_state=True, metadata={"epoch": 3}, name="m1"))
    s = cd.inspect(tmp_path / "m")
    keys = {t["key"] for t in s["tensors"]} | {v["key"] for v in s["values"]}
    assert any(k.startswith("model.") for k in keys) and not any(k.startswith(("optim", "extra")) for k in keys)
    assert any(k.startswith("rng_state.rank0") for k in keys)
    assert s["metadata"] == {"epoch": 3} and s["name"] == "m1"
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    cd.save({"model": model}, tmp_path / "r", options=cd.SaveOptions(rng_state=True))
    torch.manual_seed(0)
    model2 = torch.nn.Linear(2, 2)
    cd.load({"model": model2}, tmp_path / "r", options=cd.LoadOptions(rng_state=True))
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(model2.weight, model.weight)


def test_compressed_writer_under_plain_dcp(tmp_path):
    """dcp.save with Writer(compression=...) and DCP's default planner; dcp.load with Reader."""
    import warnings

    import torch.distributed.checkpoint as dcp

    p = str(tmp_path / "z")
    w = torch.linspace(0, 1, 300_000).reshape(600, 500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": w, "n": 5}, storage_writer=cd.Writer(p, compression="balanced"), no_dist=True)
        t = {"w": torch.zeros(600, 500), "n": 0}
        dcp.load(t, storage_reader=cd.Reader(p), no_dist=True)
    assert torch.equal(t["w"], w) and t["n"] == 5
    assert os.path.getsize(os.path.join(p, "rank00000.ckpt")) < w.nbytes // 2


def test_plain_dcp_default_planners_no_pickle_and_plan_caching(tmp_path, monkeypatch):
    """dcp.save/load with our Writer/Reader and DCP's own planners: values are msgpack; torch.load is never
    called; with plan caching the second save (new path) still commits its own files."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    state = {"w": torch.arange(6.0), "cfg": {"betas": (0.9, 0.99)}, "n": 4}
    planner = cd.SavePlanner(enable_plan_caching=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is disabled ... single process"
        dcp.save(state, storage_writer=cd.Writer(tmp_path / "a"), planner=planner)
        state["n"] = 5
        dcp.save(state, storage_writer=cd.Writer(tmp_path / "b"), planner=planner)
        dcp.save(state, storage_writer=cd.Writer(tmp_path / "c"), planner=DefaultSavePlanner())

        def no_unpickling(*a, **k):
            raise AssertionError("torch.load called on the load path")

        monkeypatch.setattr(torch, "load", no_unpickling)
        for name, n in (("a", 4), ("b", 5), ("c", 5)):
            t = {"w": torch.zeros(6), "cfg": {"betas": None}, "n": 0}
            dcp.load(t, storage_reader=cd.Reader(tmp_path / name))  # DCP's DefaultLoadPlanner
            assert t["n"] == n and t["cfg"]["betas"] == (0.9, 0.99) and torch.equal(t["w"], torch.arange(6.0))


def test_save_converts_stateful_and_restores_dcp_logger(tmp_path):
    """The convenience save calls state_dict() of Stateful values itself (DCP's inner save, no per-key
    log wrapper) and leaves DCP's logger at the level it found."""
    from torch.distributed.checkpoint.logger import _dcp_logger

    from ckptfmt.distributed import _api

    class Counter:
        def __init__(self, n: int) -> None:
            self.n = n

        def state_dict(self) -> dict:
            return {"n": self.n, "t": torch.full((3,), float(self.n))}

        def load_state_dict(self, sd: dict) -> None:
            self.n = sd["n"]

    assert _api._inner_save() is not None  # this torch has the inner save and load with the expected parameters
    assert _api._inner("state_dict_loader", "_load_state_dict", frozenset({"state_dict", "planner"})) is not None
    level = _dcp_logger.level
    p = str(tmp_path / "s")
    cd.save({"counter": Counter(5), "w": torch.ones(4)}, p)
    assert _dcp_logger.level == level
    c = Counter(0)
    cd.load({"counter": c, "w": torch.zeros(4)}, p)
    assert c.n == 5 and _dcp_logger.level == level
    assert ckptfmt.load(p)["counter"]["t"].tolist() == [5.0, 5.0, 5.0]
