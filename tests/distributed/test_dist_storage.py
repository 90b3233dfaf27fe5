"""ckptfmt as DCP's storage layer, on real ranks: round trips, reshards, DTensor <-> plain, FSDP2, async, S3."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import dist_ranks as R  # noqa: E402

import ckptfmt  # noqa: E402
import ckptfmt.distributed as cd  # noqa: E402


@pytest.fixture(scope="module")
def s3_server() -> Iterator[dict[str, Any] | None]:
    """A moto S3 server on 127.0.0.1 (a real HTTP server, not a client mock) and a fresh bucket URL."""
    try:
        import boto3
        import s3fs  # noqa: F401
        from moto.server import ThreadedMotoServer
    except ImportError:
        pytest.skip("needs moto[server], boto3 and s3fs (pip install 'ckptfmt[dev]')")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    try:
        yield {"endpoint": endpoint, "url": f"s3://{bucket}/run/step-1"}
    finally:
        server.stop()


def _reshard_ratio(res: list[dict[str, int]]) -> float:
    return sum(r["read"] for r in res) / sum(r["needed"] for r in res)


def test_reshards_round_trips_async_fsdp2_s3(tmp_path, s3_server):
    """1->3, 3->2, 2->3, 1->4, 4->1 with uneven and zero-row chunks; DTensor <-> plain; dtype change;
    async saves; FSDP2 model + optimizer; S3. Few spawns: each rank program does several things."""
    c1, c2, c3, c4 = (str(tmp_path / f"c{i}") for i in (1, 2, 3, 4))
    out = str(tmp_path / "res")
    cd.save(R.plain_state(), c1)  # one process, no process group: plain tensors
    R.run(3, "save_then_load", c3, c1, out=out)  # saves c3; 1 -> 3, plain -> DTensor
    res = R.run(2, "three_to_two_and_more", c3, c2, s3_server, out=out)  # 3 -> 2, DTensor -> plain, async, S3
    assert all(r["s3"] for r in res) and all(r["fsdp2"] == "fsdp2" for r in res)
    R.run(4, "save_then_load", c4, c1, out=out)  # saves c4; 1 -> 4
    two_three = R.run(3, "load_dtensors", c2, out=out)  # 2 -> 3 (c2 was saved with 4096-byte blocks)
    assert _reshard_ratio(two_three) <= 1.3, two_three
    # 4 -> 1 outside a process group, into plain tensors of another dtype
    t = R.empty_target(None, torch.float64)
    cd.load(t, c4)
    R.check(t, torch.float64)
    for c in (c1, c2, c3, c4):
        rep = cd.verify(c)
        assert rep.ok and rep.tensors_checked == len(R.SHAPES) + 2, rep
    full = ckptfmt.load(c4)  # a sharded directory loads consolidated, without a process group
    assert full["step"] == 7 and full["cfg"]["betas"] == (0.9, 0.99)
    assert (full["w"]["a"] == R.full("a", (7, 3)).numpy()).all()
    assert sorted(os.path.basename(p) for p in cd.list_checkpoints(tmp_path)) == [
        "c1", "c2", "c2-async1", "c2-async2", "c2-fsdp2", "c3", "c4"]


def test_killed_rank_keeps_previous_checkpoint(tmp_path):
    """A rank killed mid-save: the survivor gets one error; the previous checkpoint at the path stays valid."""
    path = str(tmp_path / "ckpt")
    out = str(tmp_path / "res")
    cd.save(R.plain_state(), path)
    res = R.run(2, "killed_mid_save", path, out=out, allow_exit=True)
    assert res[1] == {"exit": 17}
    assert isinstance(res[0], str) and res[0].startswith("error:"), res[0]
    assert cd.verify(path).ok
    assert cd.consolidate(path)["step"] == 7  # the old one, not the failed step 8
    assert [os.path.basename(p) for p in cd.list_checkpoints(tmp_path)] == ["ckpt"]
    assert not [n for n in os.listdir(tmp_path) if "staging" in n], os.listdir(tmp_path)
