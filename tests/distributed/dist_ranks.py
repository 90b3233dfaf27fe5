"""Rank programs for the multi-process tests: real ranks (torch.multiprocessing, gloo on 127.0.0.1)."""

from __future__ import annotations

import atexit
import json
import math
import os
import queue
import socket
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: global shapes: uneven over 2, 3 and 4 ranks; (3, 5) and (2, 5) give some ranks zero rows
SHAPES = {"a": (7, 3), "b": (3, 5), "c": (10,), "d": (2, 5), "big": (1500, 64)}


def full(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The deterministic full value of tensor ``name``."""
    n = math.prod(shape)
    return (torch.arange(n, dtype=torch.float64).reshape(shape) * 0.25 + len(name)).to(dtype)


def plain_state() -> dict[str, Any]:
    return {"w": {k: full(k, s) for k, s in SHAPES.items()}, "h": full("h", (6, 2), torch.bfloat16),
            "bias": full("bias", (4,)), "step": 7, "cfg": {"betas": (0.9, 0.99), "name": "run", "ids": [1, 2]}}


def dtensor_state(mesh: Any) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    st = plain_state()
    st["w"] = {k: distribute_tensor(v, mesh, [Shard(0)], src_data_rank=None) for k, v in st["w"].items()}
    return st


def empty_target(mesh: Any | None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Zeros of the same structure (DTensor Shard(0) on ``mesh``, or plain full tensors)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    w = {k: torch.zeros(s, dtype=dtype) for k, s in SHAPES.items()}
    if mesh is not None:
        w = {k: distribute_tensor(v, mesh, [Shard(0)], src_data_rank=None) for k, v in w.items()}
    return {"w": w, "h": torch.zeros(6, 2, dtype=torch.float32), "bias": torch.zeros(4), "step": 0,
            "cfg": {"betas": None, "name": None, "ids": None}}


def check(target: dict[str, Any], dtype: torch.dtype = torch.float32) -> None:
    """Every value equals the saved one (converted to ``dtype``), whatever the sharding."""
    from torch.distributed.tensor import DTensor

    for k, s in SHAPES.items():
        v = target["w"][k]
        got = v.full_tensor() if isinstance(v, DTensor) else v
        assert got.dtype == dtype, (k, got.dtype)
        assert torch.equal(got, full(k, s).to(dtype)), k
    assert torch.equal(target["h"], full("h", (6, 2), torch.bfloat16).float())
    assert torch.equal(target["bias"], full("bias", (4,)))
    assert target["step"] == 7
    assert target["cfg"] == {"betas": (0.9, 0.99), "name": "run", "ids": [1, 2]}, target["cfg"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(rank: int, world: int, fn: str, args: tuple[Any, ...]) -> dict[str, Any]:
    """One scenario on this rank: its result or its traceback, as JSON (what the parent sees)."""
    try:
        res: dict[str, Any] = {"ok": globals()[fn](rank, world, *args)}
    except BaseException:
        res = {"error": traceback.format_exc()}
    try:
        return dict(json.loads(json.dumps(res)))
    except (TypeError, ValueError) as e:
        return {"error": f"{fn} returned a value that is not JSON: {e}"}


def _serve(rank: int, world: int, port: int, commands: Any, results: Any) -> None:
    """A pooled rank: join the group once, then run scenarios until told to stop (None)."""
    import datetime

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
    except BaseException:
        results.put((None, rank, {"error": traceback.format_exc()}))
        return
    while True:
        item = commands.get()
        if item is None:
            break
        seq, fn, args = item
        results.put((seq, rank, _call(rank, world, fn, args)))
    dist.destroy_process_group()


#: world sizes spawned so far in this process, in order (one per world size unless a scenario broke its pool)
SPAWNED: list[int] = []
#: how long the other ranks may keep running after one rank reported an error (they may wait in a collective)
GRACE = 20.0


class _Pool:
    """``world`` spawned ranks in one gloo group that run scenario after scenario (one spawn per world size).

    A scenario that fails, times out or loses a rank retires the pool: the next scenario gets fresh
    ranks, so one scenario's failure never leaks into another's.
    """

    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        self.commands = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [ctx.Process(target=_serve, args=(r, world, port, self.commands[r], self.results), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()
        self.seq = 0
        SPAWNED.append(world)

    def call(self, fn: str, args: tuple[Any, ...], timeout: float) -> tuple[list[dict[str, Any]], bool]:
        """Each rank's outcome of ``fn`` (``{"exit": code}`` for a rank that died) and whether the pool is intact."""
        self.seq += 1
        for q in self.commands:
            q.put((self.seq, fn, args))
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        intact = True
        while len(got) < self.world:
            try:
                seq, rank, res = self.results.get(timeout=0.2)
            except queue.Empty:
                for r, p in enumerate(self.procs):
                    if r not in got and not p.is_alive():
                        got[r] = {"exit": p.exitcode}
                        intact = False
                if time.monotonic() > deadline:
                    for r in range(self.world):
                        got.setdefault(r, {"error": f"{fn}: rank {r} did not finish within {timeout}s"})
                    return [got[r] for r in range(self.world)], False
                continue
            if seq not in (self.seq, None) or rank in got:
                continue
            got[rank] = res
            if "error" in res:
                intact = False
                deadline = min(deadline, time.monotonic() + GRACE)
        return [got[r] for r in range(self.world)], intact

    def close(self, *, graceful: bool) -> None:
        if graceful:
            for q in self.commands:
                q.put(None)
            for p in self.procs:
                p.join(10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()


_POOLS: dict[int, _Pool] = {}


@atexit.register
def _close_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close(graceful=True)


def run(world: int, fn: str, *args: Any, out: str | None = None, timeout: float = 120,
        allow_exit: bool = False) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks; return each rank's result (or raise its error).

    The ranks are pooled: every scenario of one world size runs in the same spawned process group
    (``out`` is accepted for compatibility and unused). ``allow_exit``: a rank that dies yields
    ``{"exit": code}`` instead of failing the scenario (the pool is then retired).
    """
    pool = _POOLS.get(world)
    if pool is None:
        pool = _POOLS[world] = _Pool(world)
    outcomes, intact = pool.call(fn, args, timeout)
    if not intact:
        del _POOLS[world]
        pool.close(graceful=False)
    results, failures = [], []
    for r, res in enumerate(outcomes):
        if "exit" in res and not allow_exit:
            failures.append(f"{fn}: rank {r} exited with {res['exit']} and no result")
        elif "error" in res:
            failures.append(f"{fn}: rank {r} failed:\n{res['error']}")
        results.append(res if "exit" in res else res.get("ok"))
    if failures:  # every rank's cause, the real tracebacks before the ranks that only timed out
        failures.sort(key=lambda f: "did not finish within" in f)
        raise AssertionError("\n".join(failures))
    return results


def _mesh(world: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


# ---------------------------------------------------------------- rank programs

def save_dtensors(rank: int, world: int, path: str, block_size: int = 1 << 16) -> int:
    """Save the DTensor state (Shard(0) over ``world`` ranks)."""
    import ckptfmt.distributed as cd

    cd.save(dtensor_state(_mesh(world)), path, options=cd.SaveOptions(block_size=block_size, name=f"w{world}"))
    return world


def load_dtensors(rank: int, world: int, path: str) -> dict[str, int]:
    """Load into Shard(0) DTensors over ``world`` ranks (a reshard when the saver had another world size)."""
    import torch.distributed.checkpoint as dcp

    import ckptfmt.distributed as cd

    t = empty_target(_mesh(world))
    reader = cd.Reader(path)
    dcp.load(t, storage_reader=reader, planner=cd.LoadPlanner())
    check(t)
    return {"read": reader.bytes_read, "needed": reader.bytes_needed}


def load_plain(rank: int, world: int, path: str) -> bool:
    """Every rank loads the whole state into plain tensors, float64 (a dtype other than the saved one)."""
    import ckptfmt.distributed as cd

    t = empty_target(None, torch.float64)
    cd.load(t, path)
    check(t, torch.float64)
    return True


def three_to_two_and_more(rank: int, world: int, src3: str, dst2: str, s3: dict[str, Any] | None) -> dict[str, Any]:
    """W=2: reshard 3->2, DTensor->plain, save for 2->3, async saves through one reused stager, S3."""
    import ckptfmt.distributed as cd

    out: dict[str, Any] = {"3to2": load_dtensors(rank, world, src3)}
    load_plain(rank, world, src3)
    mesh = _mesh(world)
    cd.save(dtensor_state(mesh), dst2, options=cd.SaveOptions(block_size=4096))
    # async: two saves through one stager: buffers allocated once
    stager = cd.ReusingStager()
    st = dtensor_state(mesh)
    f1 = cd.async_save(st, dst2 + "-async1", stager=stager)
    f2 = cd.async_save(st, dst2 + "-async2", stager=stager)
    assert f1.result(60) == dst2 + "-async1" and f2.result(60) == dst2 + "-async2"
    assert stager.allocations == 1, stager.allocations
    t = empty_target(mesh)
    cd.load(t, dst2 + "-async2")
    check(t)
    if s3 is not None:
        url = s3["url"]
        opts = {"client_kwargs": {"endpoint_url": s3["endpoint"]}, "key": "test", "secret": "test"}
        cd.save(dtensor_state(mesh), url, options=cd.SaveOptions(storage_options=opts))
        t = empty_target(mesh)
        cd.load(t, url, options=cd.LoadOptions(storage_options=opts))
        check(t)
        out["s3"] = True
    out["fsdp2"] = fsdp2(rank, world, dst2 + "-fsdp2")
    return out


def fsdp2(rank: int, world: int, path: str) -> str:
    """FSDP2 ``fully_shard`` model + Adam state through torch.distributed.checkpoint.state_dict."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import ckptfmt.distributed as cd

    mesh = _mesh(world)

    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        return _fsdp2_model(mesh, seed)

    model, opt = build(0)
    for _ in range(2):
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    cd.save({"model": msd, "optim": osd}, path)
    model2, opt2 = build(1)
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    cd.load(state, path)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for (n1, p1), (_, p2) in zip(model.named_parameters(), model2.named_parameters(), strict=False):
        assert torch.equal(p1.full_tensor(), p2.full_tensor()), n1
    s1, s2 = get_state_dict(model, opt)[1], get_state_dict(model2, opt2)[1]
    for k, v in s1["state"].items():
        for name, x in v.items():
            y = s2["state"][k][name]
            x = x.full_tensor() if hasattr(x, "full_tensor") else x
            y = y.full_tensor() if hasattr(y, "full_tensor") else y
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y)), (k, name)
    assert s1["param_groups"][0]["lr"] == s2["param_groups"][0]["lr"]
    # the next step is the same for both
    x = torch.randn(4, 6)
    model(x).sum().backward()
    model2(x).sum().backward()
    opt.step()
    opt2.step()
    for p1, p2 in zip(model.parameters(), model2.parameters(), strict=False):
        assert torch.equal(p1.full_tensor(), p2.full_tensor())
    return "fsdp2"


def killed_mid_save(rank: int, world: int, path: str) -> str:
    """Rank 1 dies while writing its container; rank 0 must get one error and remove the attempt."""
    import ckptfmt.distributed as cd
    from ckptfmt.distributed import _storage

    mesh = _mesh(world)
    if rank == 1:
        real = _storage._save_ckpt

        def dying(local: str, *a: Any, **k: Any) -> None:
            with open(local, "wb") as f:
                f.write(b"partial")
            os._exit(17)

        _storage._save_ckpt = dying  # type: ignore[assignment]
        del real
    st = dtensor_state(mesh)
    st["step"] = 8
    try:
        cd.save(st, path, options=cd.SaveOptions(timeout=30))
    except cd.DistributedCheckpointError as e:
        return f"error: {e}"
    return "saved"


def save_then_load(rank: int, world: int, dst: str, src: str) -> dict[str, int]:
    """Save the DTensor state over ``world`` ranks to ``dst``, then load ``src`` (saved by another world size)."""
    save_dtensors(rank, world, dst)
    return load_dtensors(rank, world, src)


# ---------------------------------------------------------------- CheckpointManager with sharded steps

def _fsdp2_model(mesh: Any, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small MLP sharded with FSDP2 ``fully_shard`` (each layer and the root) and its Adam."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    for layer in (m[0], m[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m, torch.optim.Adam(m.parameters(), lr=0.01)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(4, 6, generator=g)).sum().backward()
    opt.step()
    opt.zero_grad()


def _full(model: torch.nn.Module) -> dict[str, list[Any]]:
    """Every parameter's full value (gathered from its shards), as nested lists."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().tolist()
            for n, p in model.named_parameters()}


def manager_fsdp2(rank: int, world: int, directory: str) -> dict[str, Any]:
    """FSDP2 training saved through ``CheckpointManager.save`` on every rank: sharded steps, retention by
    rank 0 after each commit, then ``restore`` into a fresh FSDP2 model and optimizer (same next step)."""
    import torch.distributed.checkpoint.state_dict as dsd

    from ckptfmt.torch import CheckpointManager

    mesh = _mesh(world)
    model, opt = _fsdp2_model(mesh, 0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    manager = CheckpointManager(directory, keep_last=2)
    listed = []
    for step in (1, 2, 3):
        _train(model, opt, step)
        sched.step()
        what = {"scheduler": sched, "loss": 0.5 * step, "config": {"lr": 0.01, "tag": "x"}}
        if step < 3:
            path = manager.save(step, model, opt, **what)
        else:  # in the background: staged now, committed and pruned (by rank 0) later
            path = manager.save(step, model, opt, blocking=False, **what).result(60)
            manager.wait()
            dist.barrier()  # rank 0 pruned before its future completed
        assert path.endswith(f"step-{step:08d}"), path
        listed.append([(e["step"], e["sharded"], e["world_size"]) for e in manager.list()])
    assert manager.latest(verify=True) == 3
    model2, opt2 = _fsdp2_model(mesh, 1)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    ck = CheckpointManager(directory).restore(model2, opt2, scheduler=sched2)
    assert ck is not None and ck.step == 3 and ck.loss == 1.5 and ck.config == {"lr": 0.01, "tag": "x"}, ck
    assert sched2.state_dict()["last_epoch"] == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert _full(model2) == _full(model)
    s1, s2 = dsd.get_optimizer_state_dict(model, opt), dsd.get_optimizer_state_dict(model2, opt2)
    for k, v in s1["state"].items():
        for name, x in v.items():
            y = s2["state"][k][name]
            x = x.full_tensor() if hasattr(x, "full_tensor") else x
            y = y.full_tensor() if hasattr(y, "full_tensor") else y
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y)), (k, name)
    _train(model, opt, 9)
    _train(model2, opt2, 9)
    assert _full(model2) == _full(model)  # the same next step
    return {"listed": listed, "full": _full(model)}


def manager_restore(rank: int, world: int, directory: str) -> dict[str, Any]:
    """Restore the newest sharded step into an FSDP2 model over ``world`` ranks (a reshard when it differs)."""
    from ckptfmt.torch import CheckpointManager

    model, opt = _fsdp2_model(_mesh(world), 5)
    ck = CheckpointManager(directory).restore(model, opt)
    assert ck is not None
    return {"step": ck.step, "full": _full(model)}


# ---------------------------------------------------------------- the pool itself

def fail_on(rank: int, world: int, bad: int) -> int:
    """Raise on rank ``bad`` only (the pool's failure reporting)."""
    if rank == bad:
        raise ValueError(f"boom on rank {rank}")
    return rank


def echo(rank: int, world: int, value: Any) -> list[Any]:
    """Each rank's id and ``value``, after a collective (the group works)."""
    t = torch.tensor([1])
    dist.all_reduce(t)
    assert int(t) == world
    return [rank, value]
def save_dtensors_compressed(rank: int, world: int, path: str, level: str) -> int:
    """Save the DTensor state (Shard(0) over ``world`` ranks) with compression ``level``."""
    import ckptfmt.distributed as cd

    cd.save(dtensor_state(_mesh(world)), path, options=cd.SaveOptions(compression=level, name=f"w{world}-{level}"))
    return world
