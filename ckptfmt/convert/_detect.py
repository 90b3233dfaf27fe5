"""Which format a source is, told by its content (magic bytes, archive members), never by its name."""

from __future__ import annotations

import os
import struct
import tarfile
import zipfile

from .._header import MAGIC
from ..errors import CheckpointNotFoundError
from ._dcp import METADATA_FILE, is_dcp_dir
from ._errors import CorruptSourceError, UnknownFormatError
from ._flax import looks_like_flax
from ._hfdir import TORCH_WEIGHTS, index_shard_format, is_torch_dir
from ._keras import is_keras
from ._lightning import is_lightning
from ._orbax import is_orbax_dir
from ._safetensors import INDEX_SUFFIX, find_index, sniff_header
from ._tensorflow import find_prefix, looks_like_index
from ._torchscript import is_torchscript

__all__ = ["FORMATS", "detect"]

#: every format :func:`detect` can return, i.e. every source ``convert`` reads
FORMATS = ("ckptfmt", "torch-zip", "torch-legacy", "torchscript", "lightning", "safetensors", "safetensors-sharded",
           "torch-sharded", "npy", "npz", "hdf5", "dcp", "gguf", "keras", "flax-msgpack", "tensorflow", "orbax")

_NPY = b"\x93NUMPY"
_HDF5 = b"\x89HDF\r\n\x1a\n"
_ZIP = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; the end record of an empty archive
_TORCH_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # pickled LONG1 magic number
_SNIFF = 4096


def detect(path: str | os.PathLike[str]) -> str:
    """The format of ``path``: one of :data:`FORMATS`.

    Files are told apart by their bytes (a ``.bin`` that is a torch zip is ``"torch-zip"``); directories
    by what they hold: ``.metadata`` and ``*.distcp`` make ``"dcp"``, ``*.safetensors.index.json`` or
    ``*.safetensors`` files ``"safetensors-sharded"``, ``*.bin.index.json`` or a ``pytorch_model.bin``
    that is a torch.save file ``"torch-sharded"`` (a Hugging Face model directory), an Orbax ``_METADATA``,
    ``_CHECKPOINT_METADATA`` or aggregate ``checkpoint`` msgpack file ``"orbax"``. An index file is
    ``"safetensors-sharded"`` or ``"torch-sharded"`` by the content of its shards. A TensorFlow checkpoint
    is ``"tensorflow"`` when ``path`` is its prefix, its ``.index`` (a LevelDB table starting with the
    bundle header), a data shard, or a directory holding one. Raises
    :class:`UnknownFormatError` for anything else and :class:`CorruptSourceError` for a file that starts
    like a known format but is broken.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        return _detect_dir(p)
    if not os.path.exists(p):
        if find_prefix(p) is not None:  # a TensorFlow prefix: PREFIX.index exists, PREFIX itself does not
            return "tensorflow"
        raise CheckpointNotFoundError(p)
    with open(p, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        head = f.read(_SNIFF)
    if not head:
        raise UnknownFormatError(p, "the file is empty")
    if head.startswith(MAGIC) or MAGIC.startswith(head):  # (a file shorter than the magic: truncated)
        return "ckptfmt"
    if head.startswith(_NPY):
        return "npy"
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.startswith(_ZIP):
        return _detect_zip(p)
    if _is_hdf5(p, head, size):
        return "hdf5"
    if head[:1] == b"\x80" and _TORCH_MAGIC in head[:32]:
        return "torch-legacy"
    if len(head) > 262 and head[257:262] == b"ustar" and _is_torch_tar(p):
        return "torch-legacy"
    if sniff_header(head, size):
        return "safetensors"
    if head.lstrip()[:1] == b"{":
        fmt = index_shard_format(p, detect)
        if fmt is not None:
            return fmt
    if looks_like_flax(p, head, size):
        return "flax-msgpack"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack_from("<Q", head)[0] > size - 8:
        raise CorruptSourceError(p, f"starts like a safetensors file, but its header length "
                                    f"{struct.unpack_from('<Q', head)[0]} runs past the end of the file ({size} "
                                    "bytes): truncated?")
    if find_prefix(p) is not None:  # a TensorFlow PREFIX.index (a table holding a bundle header) or a data shard
        return "tensorflow"
    if looks_like_index(p, head, size):
        raise UnknownFormatError(p, "a LevelDB table like a TensorFlow checkpoint index, but not named PREFIX.index; "
                                    "TensorFlow finds the data shards by that name: rename it or pass the prefix")
    raise UnknownFormatError(p, f"not a format ckptfmt can convert (first bytes {head[:16]!r}); it reads "
                                f"{', '.join(FORMATS)}")


def _detect_dir(p: str) -> str:
    if is_dcp_dir(p):
        return "dcp"
    names = os.listdir(p)
    if find_index(p) is not None or any(n.endswith(".safetensors") for n in names):
        return "safetensors-sharded"
    if is_torch_dir(p, detect):
        return "torch-sharded"
    if is_orbax_dir(p):
        return "orbax"
    if find_prefix(p) is not None:  # the checkpoint its `checkpoint` state file names, or its only PREFIX.index
        return "tensorflow"
    hint = ""
    if METADATA_FILE in names:
        hint = " (it has a .metadata file but no *.distcp files: an incomplete DCP checkpoint?)"
    raise UnknownFormatError(p, "a directory, but neither a torch.distributed.checkpoint (.metadata + *.distcp) nor "
                                f"a model directory (*{INDEX_SUFFIX}, *.safetensors, *.bin.index.json or "
                                f"{TORCH_WEIGHTS}) nor an Orbax checkpoint (_METADATA) nor a TensorFlow checkpoint "
                                f"(PREFIX.index + PREFIX.data-*){hint}")


def _detect_zip(p: str) -> str:
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
            lightning = is_lightning(p, zf)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CorruptSourceError(p, f"a zip archive (torch.save or .npz) that cannot be read, truncated or "
                                    f"corrupt ({e})") from None
    if is_torchscript(names):
        return "torchscript"
    if is_keras(names):
        return "keras"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "lightning" if lightning else "torch-zip"
    if all(n.endswith(".npy") for n in names):  # numpy.savez names every member so (none: an empty savez)
        return "npz"
    raise UnknownFormatError(p, "a zip archive that is neither a torch.save file (no data.pkl) nor an .npz")


def _is_hdf5(p: str, head: bytes, size: int) -> bool:
    """HDF5's superblock signature sits at 0, 512, 1024, 2048, ... (after an optional user block)."""
    if head.startswith(_HDF5):
        return True
    offset = 512
    with open(p, "rb") as f:
        while offset + len(_HDF5) <= size:
            if offset + len(_HDF5) <= len(head):
                found = head[offset : offset + len(_HDF5)]
            else:
                f.seek(offset)
                found = f.read(len(_HDF5))
            if found == _HDF5:
                return True
            offset *= 2
    return False


def _is_torch_tar(p: str) -> bool:
    """The pre-0.4 torch.save layout: a tar archive holding ``pickle`` and ``storages``."""
    try:
        with tarfile.open(p, mode="r:") as tar:
            names = set(tar.getnames())
    except (tarfile.TarError, OSError, EOFError):
        return False
    return {"pickle", "storages"} <= names
