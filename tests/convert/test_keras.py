"""Keras 3 .keras archives written by Keras (torch backend, in a child process); converted without Keras."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptfmt
from ckptfmt.convert import CorruptSourceError, UnsupportedSourceError, convert, detect

pytest.importorskip("h5py")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("keras") is None or importlib.util.find_spec("torch") is None,
                                reason="needs keras and torch (its backend here) to write the files")

WRITER = """
import sys, numpy as np, keras
d = sys.argv[1]
m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d1"), keras.layers.BatchNormalization(name="bn"),
                      keras.layers.Dense(2, name="d2", dtype="float64")])
m.compile(optimizer="adam", loss="mse")
m.fit(np.ones((8, 4)), np.ones((8, 2)), epochs=1, verbose=0)
m.save(d + "/model.keras")
m.save_weights(d + "/model.weights.h5")
np.savez(d + "/want.npz", **{f"{l.name}.{i}": np.asarray(w) for l in m.layers for i, w in enumerate(l.get_weights())})
"""


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keras")
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    subprocess.run([sys.executable, "-c", WRITER, str(d)], check=True, env=env, timeout=300, capture_output=True)
    return d


def flat(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}/").items()}
    return {prefix[:-1]: tree}


def test_a_keras_archive_converts_layer_paths_as_keys(keras_files: Path, tmp_path: Path) -> None:
    src = keras_files / "model.keras"
    assert detect(src) == "keras"
    convert(src, tmp_path / "k.ckpt")
    got = ckptfmt.load(tmp_path / "k.ckpt", backend="numpy")
    want = np.load(keras_files / "want.npz")
    layers = {"d1": "layers/dense/vars", "bn": "layers/batch_normalization/vars", "d2": "layers/dense_1/vars"}
    tensors = flat(got)
    for key in want.files:
        layer, i = key.split(".")
        t = tensors[f"{layers[layer]}/{i}"]
        assert t.dtype == want[key].dtype and np.array_equal(t, want[key]), key
    assert tensors["layers/dense_1/vars/0"].dtype == np.float64
    assert any(k.startswith("optimizer/vars/") for k in tensors)
    with ckptfmt.open(tmp_path / "k.ckpt") as ckpt:
        meta = ckpt.metadata["keras"]
    assert meta["names"]["layers/dense/vars"] == "d1" and meta["names"]["optimizer/vars"] == "adam"
    with zipfile.ZipFile(src) as zf:
        assert meta["config"] == json.loads(zf.read("config.json"))
        assert meta["metadata"]["keras_version"] == json.loads(zf.read("metadata.json"))["keras_version"]


def test_the_archive_and_the_weights_file_give_the_same_tree(keras_files: Path, tmp_path: Path) -> None:
    convert(keras_files / "model.keras", tmp_path / "a.ckpt")
    convert(keras_files / "model.weights.h5", tmp_path / "b.ckpt")  # through the HDF5 converter
    a, b = (flat(ckptfmt.load(tmp_path / n, backend="numpy")) for n in ("a.ckpt", "b.ckpt"))
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _rezip(src: Path, dst: Path, *, compress: int = zipfile.ZIP_STORED,
           replace: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compress) as zout:
        for info in zin.infolist():
            data = (replace or {}).get(info.filename, zin.read(info))
            zout.writestr(info.filename, data, compress_type=compress)


def test_broken_archives(keras_files: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.keras"
    _rezip(keras_files / "model.keras", bad, compress=zipfile.ZIP_DEFLATED)
    with pytest.raises(UnsupportedSourceError, match="compressed"):
        convert(bad, tmp_path / "o.ckpt")
    _rezip(keras_files / "model.keras", bad, replace={"config.json": b"{" * 100_000})
    with pytest.raises(CorruptSourceError, match=r"config\.json"):
        convert(bad, tmp_path / "o.ckpt")
    _rezip(keras_files / "model.keras", bad, replace={"model.weights.h5": b"not hdf5 at all" * 100})
    with pytest.raises(CorruptSourceError, match="HDF5"):
        convert(bad, tmp_path / "o.ckpt")
    assert not (tmp_path / "o.ckpt").exists()
