"""Convert checkpoints of other formats to ckptfmt, streaming and without unpickling untrusted code.

    >>> import ckptfmt.convert
    >>> ckptfmt.convert.detect("pytorch_model.bin")
    'torch-zip'
    >>> report = ckptfmt.convert("pytorch_model.bin", "model.ckpt")   # the module itself is callable
    >>> report = ckptfmt.convert.convert("model_dir/", "model.ckpt")  # a sharded safetensors model

Sources (told apart by content, see :func:`detect`): ckptfmt itself, torch.save files (zip and
legacy; numpy values allowed by name), TorchScript archives, PyTorch Lightning checkpoints, safetensors
files, Hugging Face model directories (safetensors or torch shards, with their JSON side files), numpy
.npy/.npz, HDF5, torch.distributed.checkpoint directories, GGUF files, Keras 3 ``.keras`` archives,
Flax msgpack files, Orbax checkpoint directories (OCDBT or per-array zarr) and TensorFlow checkpoints
(TF1 ``Saver``, TF2 ``tf.train.Checkpoint``).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ._convert import ConversionReport, ProgressLike, convert
from ._detect import FORMATS, detect
from ._errors import (
    ConversionError,
    CorruptSourceError,
    DiskFullError,
    SameFileError,
    UnknownFormatError,
    UnsafePickleError,
    UnsupportedSourceError,
)
from ._lazy import FileArray, LazyArray

__all__ = [
    "FORMATS",
    "ConversionError",
    "ConversionReport",
    "CorruptSourceError",
    "DiskFullError",
    "FileArray",
    "LazyArray",
    "ProgressLike",
    "SameFileError",
    "UnknownFormatError",
    "UnsafePickleError",
    "UnsupportedSourceError",
    "convert",
    "detect",
]


class _CallableModule(types.ModuleType):
    """``ckptfmt.convert(src, dst)`` calls :func:`convert`; the module's names stay reachable."""

    def __call__(self, *args: Any, **kwargs: Any) -> ConversionReport:
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
