"""Writes the Orbax checkpoints of tests/convert/test_orbax.py with the real orbax-checkpoint and tensorstore.

    JAX_PLATFORMS=cpu python generate.py OUT_DIR

OUT_DIR/zarr2: PyTreeCheckpointHandler(use_ocdbt=False) (zarr 2, zstd); OUT_DIR/zarr3: the same with
use_zarr3=True (zarr 3, sharding_indexed + zstd + crc32c index); OUT_DIR/ocdbt: the default OCDBT layout (zarr
2 arrays as keys of one database); OUT_DIR/ocdbt3: OCDBT with zarr 3 (large values out of line in the
per-process data files); OUT_DIR/kv: a bare tensorstore OCDBT database with 200 keys and tiny nodes (a B+tree
of height > 1, inline and out-of-line values; see ``kv_expected()``); OUT_DIR/codecs and OUT_DIR/codecs3:
use_ocdbt=False checkpoints (zarr 2, zarr 3) some of whose arrays tensorstore then rewrites with other codecs
and chunkings (zlib, gzip, none, F order, big-endian, many chunks); OUT_DIR/blosc: one array rewritten with
blosc (refused).
Values are deterministic: see ``expected()``, which the test imports.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def expected() -> dict:
    """The pytree every checkpoint here holds (numpy values; the test compares against it)."""
    return {
        "params": {"dense": {"kernel": np.arange(12, dtype=np.float32).reshape(4, 3) / 7,
                             "bias": np.array([1, -2, 3], np.float32)},
                   "embed": np.arange(6, dtype=np.float32).reshape(2, 3)},  # written as bfloat16
        "layers": [{"w": np.full((2, 2), 0.5, np.float16)}, {"w": np.array([True, False])}],
        "big": np.arange(300, dtype=np.int64).reshape(10, 30) * 3,
        "noise": (np.arange(600, dtype=np.uint64) * 2654435761 % 4294967291).astype(np.uint32),  # incompressible
        "sharded": np.arange(32, dtype=np.float32).reshape(4, 8),  # written as a jax.Array over 4 devices
        "step": 42, "lr": 0.25, "count": np.int32(7), "name": "run", "nothing": None,
    }


def kv_expected() -> dict[str, bytes]:
    """The keys and values of OUT_DIR/kv."""
    return {f"k{i:04d}/x": (f"v{i}" * (i % 13)).encode() for i in range(200)}


def _rewrite(ts, path: str, value: np.ndarray, **spec) -> None:
    """Rewrite the zarr 2 array at ``path`` with tensorstore, with the metadata fields of ``spec``."""
    import shutil

    shutil.rmtree(path)
    if "codecs" in spec:  # zarr 3
        metadata = {"shape": list(value.shape), "data_type": str(value.dtype), "codecs": spec["codecs"],
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": spec["chunks"]}}}
        driver = "zarr3"
    else:
        metadata = {"shape": list(value.shape), "chunks": spec.pop("chunks", list(value.shape) or []),
                    "dtype": spec.pop("dtype", value.dtype.str), **spec}
        driver = "zarr"
    store = ts.open({"driver": driver, "kvstore": {"driver": "file", "path": path}, "metadata": metadata},
                    create=True).result()
    store.write(value).result()


def _legacy(out: str) -> None:
    """OUT_DIR/legacy: the layout of older Orbax, which the installed one still restores: no ``_METADATA``, and a
    ``checkpoint`` msgpack file (orbax's own msgpack_utils) holding the tree, small leaves aggregated in it and
    the others as ``PLACEHOLDER://<name>`` of their zarr arrays (those of a use_ocdbt=False save)."""
    import shutil

    import orbax.checkpoint as ocp
    from orbax.checkpoint import msgpack_utils

    dst = os.path.join(out, "legacy")
    shutil.copytree(os.path.join(out, "zarr2"), dst)
    for name in ("_METADATA", "_strings.json", "count", "lr", "step", "layers.1.w"):
        p = os.path.join(dst, name)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    want = expected()
    tree = {"params": {"dense": {"kernel": "PLACEHOLDER://params.dense.kernel",
                                 "bias": "PLACEHOLDER://params.dense.bias"}, "embed": "PLACEHOLDER://params.embed"},
            "layers": {"0": {"w": "PLACEHOLDER://layers.0.w"}, "1": {"w": want["layers"][1]["w"]}},
            "big": "PLACEHOLDER://big", "noise": "PLACEHOLDER://noise", "sharded": "PLACEHOLDER://sharded",
            "step": 42, "lr": 0.25, "count": np.int32(7), "name": "run", "nothing": None}
    with open(os.path.join(dst, "checkpoint"), "wb") as f:
        f.write(msgpack_utils.msgpack_serialize(tree))
    restored = ocp.PyTreeCheckpointer().restore(dst)  # orbax itself reads it back
    assert np.array_equal(restored["big"], want["big"]) and restored["count"] == 7 and restored["name"] == "run"
    assert np.array_equal(restored["layers"]["1"]["w"], want["layers"][1]["w"])


def main(out: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # before jax starts: 4 CPU devices
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    import tensorstore as ts
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    tree = expected()
    tree["params"]["embed"] = jnp.asarray(tree["params"]["embed"], dtype=jnp.bfloat16)
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))  # each device writes its own chunk: a grid of 1 x 4 chunks
    tree["sharded"] = jax.device_put(tree["sharded"], NamedSharding(mesh, PartitionSpec(None, "x")))
    for name, kwargs in (("zarr2", {"use_ocdbt": False}), ("zarr3", {"use_ocdbt": False, "use_zarr3": True}),
                         ("ocdbt", {}), ("ocdbt3", {"use_zarr3": True}), ("codecs", {"use_ocdbt": False}),
                         ("codecs3", {"use_ocdbt": False, "use_zarr3": True}), ("blosc", {"use_ocdbt": False})):
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**kwargs))
        ckptr.save(os.path.join(out, name), args=ocp.args.PyTreeSave(tree))
    want = expected()
    codecs = os.path.join(out, "codecs")
    _rewrite(ts, os.path.join(codecs, "big"), want["big"], chunks=[3, 7], compressor={"id": "zlib", "level": 6},
             order="F")
    _rewrite(ts, os.path.join(codecs, "params.dense.kernel"), want["params"]["dense"]["kernel"],
             compressor=None, dtype=">f4", chunks=[3, 2])
    _rewrite(ts, os.path.join(codecs, "params.dense.bias"), want["params"]["dense"]["bias"],
             compressor={"id": "zstd", "level": 3}, chunks=[2])
    _rewrite(ts, os.path.join(codecs, "layers.1.w"), want["layers"][1]["w"], compressor={"id": "gzip"})
    codecs3 = os.path.join(out, "codecs3")
    _rewrite(ts, os.path.join(codecs3, "big"), want["big"], chunks=[4, 30],
             codecs=[{"name": "bytes", "configuration": {"endian": "big"}}, {"name": "gzip"}])
    _rewrite(ts, os.path.join(codecs3, "params.dense.kernel"), want["params"]["dense"]["kernel"], chunks=[2, 2],
             codecs=[{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd"}, {"name": "crc32c"}])
    _rewrite(ts, os.path.join(out, "blosc", "layers.0.w"), want["layers"][0]["w"], compressor={"id": "blosc"})
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{os.path.abspath(out)}/kv/",
                          "config": {"max_decoded_node_bytes": 256, "max_inline_value_bytes": 16}}).result()
    txn = ts.Transaction()
    for key, value in kv_expected().items():
        kv.with_transaction(txn)[key] = value
    txn.commit_async().result()
    _legacy(out)
    for leftover in ("commit_success.txt",):  # it records the absolute path written to
        for name in ("zarr2", "zarr3", "ocdbt", "ocdbt3", "codecs", "codecs3", "blosc", "legacy"):
            p = os.path.join(out, name, leftover)
            if os.path.exists(p):
                os.remove(p)


if __name__ == "__main__":
    main(sys.argv[1])
