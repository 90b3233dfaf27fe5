"""Write the TensorFlow checkpoints of this folder and ``expected.json``, the values TensorFlow reads back.

Generated with tensorflow-cpu 2.21.0 (Python 3.11) in a venv of its own; ckptfmt never needs TensorFlow:

    python3 -m venv /work/venv-tf && /work/venv-tf/bin/pip install tensorflow-cpu==2.21.0
    /work/venv-tf/bin/python tests/convert/data/tensorflow/make_tf_checkpoints.py

Checkpoints (each a ``PREFIX.index`` plus ``PREFIX.data-0000K-of-0000N`` shards):

- ``tf1/model.ckpt-7``: ``tf.compat.v1.train.Saver(sharded=True)`` over variables on three logical CPU
  devices (so three data shards), one of them partitioned into three slices with
  ``fixed_size_partitioner`` and one partitioned along its second axis, plus the ``checkpoint`` state file.
- ``dtypes/all``: ``tf.raw_ops.SaveV2`` (the op the Saver runs) of every numeric dtype, bool, strings
  (a scalar, a vector, a 2-D array with an empty and a non-UTF-8 string), a bfloat16 tensor written as two
  slices, a 2-D tensor written as four slices (a 2x2 grid), a tensor sliced at row 100 (a two-byte
  number in the slice key) and empty tensors.
- ``tf2/ckpt-1``: ``tf.train.Checkpoint`` of nested ``tf.Module`` objects (Keras-free) with
  ``MaxShardSizePolicy`` forcing several shards and splitting two tensors into slices across shards.

``expected.json`` maps ``checkpoint -> key -> {"dtype", "shape", "hex" | "strings"}`` from
``tf.train.load_checkpoint`` (TensorFlow's own reader, which reassembles partitioned tensors).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
V1 = tf.compat.v1


def tf1(root: str) -> str:
    """A graph-mode Saver checkpoint: three devices, so three shards, and partitioned variables."""
    out = os.path.join(root, "tf1")
    os.makedirs(out, exist_ok=True)
    g = tf.Graph()
    with g.as_default():
        with tf.device("/cpu:0"):
            part = V1.get_variable("encoder/embedding", shape=[10, 3], dtype=tf.float32,
                                   initializer=V1.random_normal_initializer(seed=1),
                                   partitioner=V1.fixed_size_partitioner(3))
            step = V1.Variable(np.int64(7), name="global_step")
        with tf.device("/cpu:1"):
            cols = V1.get_variable("encoder/wide", shape=[2, 5], dtype=tf.float64,
                                   initializer=V1.random_uniform_initializer(seed=2),
                                   partitioner=lambda shape, dtype: [1, 2])
            half = V1.Variable(np.linspace(-2, 2, 6, dtype=np.float16).reshape(2, 3), name="decoder/half")
        with tf.device("/cpu:2"):
            bf = V1.Variable(tf.constant([[1.5, -2.25], [3.0, 0.0078125]], dtype=tf.bfloat16), name="decoder/bf16")
            flag = V1.Variable(np.array([True, False, True]), name="decoder/flags")
            ints = V1.Variable(np.array([-128, 0, 127], dtype=np.int8), name="decoder/int8")
        saver = V1.train.Saver(sharded=True, save_relative_paths=True)
        with V1.Session(graph=g) as sess:
            sess.run(V1.global_variables_initializer())
            del part, step, cols, half, bf, flag, ints
            return saver.save(sess, os.path.join(out, "model.ckpt"), global_step=7, write_meta_graph=False)


def dtypes(root: str) -> str:
    """Every dtype through SaveV2, with slices written by hand (``shape_and_slices`` specs)."""
    out = os.path.join(root, "dtypes")
    os.makedirs(out, exist_ok=True)
    prefix = os.path.join(out, "all")
    rng = np.random.default_rng(0)
    names, specs, tensors = [], [], []

    def add(name: str, value: tf.Tensor, spec: str = "") -> None:
        names.append(name)
        specs.append(spec)
        tensors.append(value)

    for dt in (tf.float16, tf.float32, tf.float64, tf.int8, tf.int16, tf.int32, tf.int64, tf.uint8, tf.uint16,
               tf.uint32, tf.uint64):
        np_dt = dt.as_numpy_dtype
        info = np.finfo(np_dt) if np.issubdtype(np_dt, np.floating) else np.iinfo(np_dt)
        vals = np.array([info.min, info.max, 0, 1, 2, 3], dtype=np_dt).reshape(2, 3)
        add(f"numeric/{dt.name}", tf.constant(vals))
    add("numeric/bool", tf.constant([[True, False], [False, True]]))
    add("numeric/complex64", tf.constant(np.array([1 + 2j, -3.5 - 0.25j], dtype=np.complex64)))
    add("numeric/complex128", tf.constant(np.array([[1e300 + 1j], [-0.0 + 5j]], dtype=np.complex128)))
    add("numeric/bfloat16", tf.constant(rng.standard_normal((3, 4)), dtype=tf.bfloat16))
    add("numeric/scalar_f32", tf.constant(np.float32(3.25)))
    add("empty/f32_0x3", tf.zeros((0, 3), tf.float32))
    add("empty/strings", tf.constant([], dtype=tf.string))
    add("strings/scalar", tf.constant(b"global step 7 as text"))
    add("strings/vector", tf.constant([b"alpha", b"", b"\xff\xfe not utf-8", "héllo".encode()]))
    add("strings/matrix", tf.constant([[b"a", b"bb"], [b"ccc", b"x" * 300]]))
    # a bfloat16 tensor of shape (6, 4) written as two slices along axis 0
    full = tf.constant(rng.standard_normal((6, 4)), dtype=tf.bfloat16)
    add("sliced/bf16", full[:2], "6 4 0,2:-")
    add("sliced/bf16", full[2:], "6 4 2,4:-")
    # an int32 (4, 6) tensor written as a 2x2 grid of slices
    grid = tf.constant(np.arange(24, dtype=np.int32).reshape(4, 6))
    for r0, c0 in ((0, 0), (0, 3), (2, 0), (2, 3)):
        add("sliced/grid", grid[r0:r0 + 2, c0:c0 + 3], f"4 6 {r0},2:{c0},3")
    # a (200, 2) tensor in two slices: a start of 100 takes two bytes in the slice key (OrderedCode)
    tall = tf.constant(np.arange(400, dtype=np.int16).reshape(200, 2))
    add("sliced/tall", tall[:100], "200 2 0,100:-")
    add("sliced/tall", tall[100:], "200 2 100,100:-")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=specs, tensors=tensors)
    return prefix


class Dense(tf.Module):
    """A Keras-free layer: a kernel and a bias."""

    def __init__(self, n_in: int, n_out: int, seed: int, name: str) -> None:
        super().__init__(name=name)
        rng = np.random.default_rng(seed)
        self.kernel = tf.Variable(rng.standard_normal((n_in, n_out)).astype(np.float32), name="kernel")
        self.bias = tf.Variable(np.arange(n_out, dtype=np.float32), name="bias")


class Model(tf.Module):
    """Nested objects: a list of layers, a dict of extras, a step counter."""

    def __init__(self) -> None:
        super().__init__(name="model")
        self.layers = [Dense(4, 8, 1, "l0"), Dense(8, 2, 2, "l1")]
        self.extras = {"scale": tf.Variable(np.float64(0.5)), "table": tf.Variable(np.arange(64, dtype=np.int64))}
        self.step = tf.Variable(np.int64(1))


def tf2(root: str) -> str:
    """tf.train.Checkpoint with a 256-byte shard cap: several shards, the int64 table split across them."""
    out = os.path.join(root, "tf2")
    model = Model()
    opt_like = tf.Module()
    opt_like.momentum = tf.Variable(np.full((2, 2), 0.9, dtype=np.float32))
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt_like)
    options = tf.train.CheckpointOptions(
        experimental_sharding_callback=tf.train.experimental.MaxShardSizePolicy(max_shard_size=256))
    return ckpt.save(os.path.join(out, "ckpt"), options=options)


def expected(prefix: str) -> dict[str, dict[str, object]]:
    """What TensorFlow's own reader returns for every key."""
    reader = tf.train.load_checkpoint(prefix)
    out: dict[str, dict[str, object]] = {}
    for key, dtype in sorted(reader.get_variable_to_dtype_map().items()):
        value = reader.get_tensor(key)
        item: dict[str, object] = {"dtype": dtype.name, "shape": list(np.shape(value))}
        if dtype == tf.string:
            flat = np.asarray(value, dtype=object).reshape(-1)
            item["strings"] = [bytes(s).hex() for s in flat]
        else:
            arr = np.ascontiguousarray(np.asarray(value))
            item["hex"] = arr.astype(arr.dtype.newbyteorder("<")).tobytes().hex()
        out[key] = item
    return out


def main() -> None:
    tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                               [tf.config.LogicalDeviceConfiguration()] * 3)
    for sub in ("tf1", "tf2", "dtypes"):
        shutil.rmtree(os.path.join(HERE, sub), ignore_errors=True)
    prefixes = {"dtypes/all": dtypes(HERE), "tf1/model.ckpt-7": tf1(HERE), "tf2/ckpt-1": tf2(HERE)}
    result = {"tensorflow": tf.__version__, "python": sys.version.split()[0],
              "checkpoints": {name: expected(p) for name, p in prefixes.items()}}
    for name, p in prefixes.items():
        assert os.path.relpath(p, HERE) == name, (p, name)
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
