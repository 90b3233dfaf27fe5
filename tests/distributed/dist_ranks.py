"""Rank programs for the multi-process tests: real ranks (torch.multiprocessing, gloo on 127.0.0.1)."""

from __future__ import annotations

import json
import math
import os
import socket
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


def _entry(rank: int, world: int, port: int, fn: str, args: tuple[Any, ...], out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    res: dict[str, Any]
    try:
        import datetime

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        res = {"ok": globals()[fn](rank, world, *args)}
    except BaseException:
        res = {"error": traceback.format_exc()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    if dist.is_initialized() and "error" not in res:
        dist.destroy_process_group()


def run(world: int, fn: str, *args: Any, out: str, timeout: float = 120, allow_exit: bool = False) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned ranks; return each rank's result (or raise its error)."""
    ctx = mp.get_context("spawn")
    os.makedirs(out, exist_ok=True)
    for r in range(world):
        p = os.path.join(out, f"rank{r}.json")
        if os.path.exists(p):
            os.unlink(p)
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            raise AssertionError(f"{fn}: a rank did not finish within {timeout}s")
    results = []
    for r in range(world):
        path = os.path.join(out, f"rank{r}.json")
        if not os.path.exists(path):
            if allow_exit:
                results.append({"exit": procs[r].exitcode})
                continue
            raise AssertionError(f"{fn}: rank {r} exited with {procs[r].exitcode} and no result")
        with open(path) as f:
            res = json.load(f)
        if "error" in res:
            raise AssertionError(f"{fn}: rank {r} failed:\n{res['error']}")
        results.append(res["ok"])
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
    from torch.distributed.fsdp import fully_shard

    import ckptfmt.distributed as cd

    mesh = _mesh(world)

    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
        for layer in (m[0], m[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m, torch.optim.Adam(m.parameters(), lr=0.01)

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


def save_dtensors_compressed(rank: int, world: int, path: str, level: str) -> int:
    """Save the DTensor state (Shard(0) over ``world`` ranks) with compression ``level``."""
    import ckptfmt.distributed as cd

    cd.save(dtensor_state(_mesh(world)), path, options=cd.SaveOptions(compression=level, name=f"w{world}-{level}"))
    return world
