"""Hugging Face model directories: torch.save weights (single or sharded by an index) and JSON side files.

A directory holds ``pytorch_model.bin`` or shards named by ``pytorch_model.bin.index.json``
(``{"metadata": {...}, "weight_map": {tensor name: shard file}}``); each shard's format is told by its
content (a torch.save file, or safetensors). The side files of :data:`SIDE_FILES` (``config.json``,
``generation_config.json``, tokenizer files) are kept in the checkpoint's user metadata under
:data:`SIDE_KEY`, JSON files parsed, text files as str. Everything here is hostile: the index and side
files are size- and depth-capped, shard and side file names are plain names of files inside the
directory (after following links), and nothing is unpickled beyond what :mod:`._torch` allows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from ._errors import CorruptSourceError, UnknownFormatError, UnsupportedSourceError
from ._hubcache import hub_blob

__all__ = ["MAX_INDEX", "MAX_SIDE_FILE", "MAX_SIDE_TOTAL", "SIDE_FILES", "SIDE_KEY", "TORCH_WEIGHTS",
           "find_torch_index", "index_shard_format", "inside", "is_torch_dir", "read_index",
           "read_side_files", "read_torch_sharded"]

#: the single-file weights name of a torch model directory (transformers' WEIGHTS_NAME)
TORCH_WEIGHTS = "pytorch_model.bin"
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_INDEX_SUFFIXES = tuple(f"{s}.index.json" for s in _TORCH_SUFFIXES)
#: side files kept, in this order (JSON parsed; .txt as text); others in the directory are not read
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "tokenizer.json", "vocab.json", "merges.txt", "vocab.txt",
              "preprocessor_config.json", "chat_template.json")
#: user-metadata key of the side files: ``{file name: parsed JSON or text}``
SIDE_KEY = "hf_files"
MAX_INDEX = 64 << 20
MAX_SIDE_FILE = 64 << 20
#: stays under the reader's default metadata cap (256 MiB) with room for the rest
MAX_SIDE_TOTAL = 160 << 20
_MAX_DEPTH = 48


def inside(directory: str, name: str, *, what: str, cited: str) -> str:
    """The path of file ``name`` in ``directory``; :class:`CorruptSourceError` if it could reach elsewhere.

    ``name`` must be a plain file name (no separator, not ``.``/``..``), and its real path (links
    followed) must lie in the directory's real path, or, for a snapshot of the Hugging Face hub cache,
    be a regular file in that cache repo's ``blobs`` folder (:func:`hub_blob`).
    """
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name) or (os.altsep and os.altsep in name)):
        raise CorruptSourceError(cited, f"{what} {name!r} is not a plain file name in {directory}")
    root = os.path.realpath(directory)
    full = os.path.realpath(os.path.join(directory, name))
    if hub_blob(root, full):
        return full
    if os.path.dirname(full) != root:
        raise CorruptSourceError(cited, f"{what} {name!r} lies outside {directory} (a link to {full})")
    return full


def _depth_ok(obj: Any) -> bool:
    stack = [(obj, 0)]
    while stack:
        o, d = stack.pop()
        if d > _MAX_DEPTH:
            return False
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return True


def _load_json(path: str, cap: int, what: str) -> Any:
    size = os.path.getsize(path)
    if size > cap:
        raise UnsupportedSourceError(path, f"{what} is {size} bytes, over the cap of {cap}")
    with open(path, "rb") as f:
        raw = f.read(cap + 1)
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptSourceError(path, f"{what} is not valid JSON ({e})") from None
    except RecursionError:
        raise CorruptSourceError(path, f"{what} nests too deeply") from None
    if not _depth_ok(value):
        raise CorruptSourceError(path, f"{what} nests deeper than {_MAX_DEPTH}")
    return value


def read_index(path: str) -> tuple[dict[str, str], dict[str, Any]]:
    """(weight_map, metadata) of an index file, checked: an object, str → str map, object metadata."""
    index = _load_json(path, MAX_INDEX, "index file")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CorruptSourceError(path, "index: no \"weight_map\" object")
    weight_map = index["weight_map"]
    if not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptSourceError(path, "index: weight_map must map tensor names to shard file names (str)")
    meta = index.get("metadata") or {}
    if not isinstance(meta, dict):
        raise CorruptSourceError(path, "index: metadata is not an object")
    return weight_map, meta


def find_torch_index(directory: str) -> str | None:
    """The one ``*.bin.index.json`` (or ``.pt``/``.pth``) of ``directory``, None if there is none."""
    found = sorted(n for n in os.listdir(directory) if n.endswith(_INDEX_SUFFIXES)
                   and os.path.isfile(os.path.join(directory, n)))
    if len(found) > 1:
        raise UnknownFormatError(directory, f"several torch index files ({', '.join(found)}); pass the one to convert")
    return os.path.join(directory, found[0]) if found else None


#: ``detect(path) -> format name``: the content sniffer of ``_detect``, passed in (it imports this module).
Detect = Callable[[str], str]


def _shard_format(path: str, detect: Detect) -> str | None:
    try:
        fmt = detect(path)
    except (UnknownFormatError, CorruptSourceError, OSError):
        return None
    return fmt if fmt in ("torch-zip", "torch-legacy", "safetensors") else None


def is_torch_dir(directory: str, detect: Detect) -> bool:
    """True if ``directory`` has a torch index, or a ``pytorch_model.bin`` that is a torch.save file by content."""
    if find_torch_index(directory) is not None:
        return True
    weights = os.path.join(directory, TORCH_WEIGHTS)
    return os.path.isfile(weights) and _shard_format(weights, detect) in ("torch-zip", "torch-legacy")


def index_shard_format(path: str, detect: Detect) -> str | None:
    """"torch-sharded" or "safetensors-sharded" for an index file, by the content of its first shard found."""
    try:
        weight_map, _ = read_index(path)
    except (CorruptSourceError, UnsupportedSourceError, OSError):
        return None
    directory = os.path.dirname(os.path.abspath(path))
    names = sorted(set(weight_map.values()))
    for name in names:
        try:
            file = inside(directory, name, what="shard", cited=path)
        except CorruptSourceError:
            continue
        if os.path.isfile(file):
            fmt = _shard_format(file, detect)
            if fmt is not None:
                return "safetensors-sharded" if fmt == "safetensors" else "torch-sharded"
    if names and all(n.endswith(_TORCH_SUFFIXES) for n in names):
        return "torch-sharded"
    return "safetensors-sharded"  # the reader reports missing or broken shards


def read_torch_sharded(path: str, *, allow_pickle: bool, detect: Detect) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge the shards of a torch model directory (or index file) into one state dict, and its metadata.

    Order: shards by file name, each shard's tensors in its own order. Tensors sharing storage inside a
    shard (tied embeddings) still share it. The metadata holds the index's ``metadata`` and the shards'
    state-dict versions.
    """
    from ._safetensors import add_shard, check_weight_map, read_safetensors
    from ._torch import STATE_DICT_METADATA, load_torch

    if os.path.isdir(path):
        directory, index_path = path, find_torch_index(path)
    else:
        directory, index_path = os.path.dirname(os.path.abspath(path)), path
    cited = index_path or path
    meta: dict[str, Any] = {}
    weight_map: dict[str, str] | None = None
    if index_path is not None:
        weight_map, index_meta = read_index(index_path)
        meta.update(index_meta)
        shards = sorted(set(weight_map.values()))
    else:
        if not os.path.isfile(os.path.join(directory, TORCH_WEIGHTS)):
            raise UnknownFormatError(path, f"no {TORCH_WEIGHTS} and no *.bin.index.json")
        shards = [TORCH_WEIGHTS]
    state: dict[str, Any] = {}
    where: dict[str, str] = {}
    versions: dict[str, Any] = {}
    for shard in shards:
        file = inside(directory, shard, what="shard", cited=cited)
        if not os.path.isfile(file):
            raise CorruptSourceError(cited, f"shard {shard!r} is missing")
        fmt = _shard_format(file, detect)
        if fmt is None:
            raise CorruptSourceError(file, f"shard {shard!r} is neither a torch.save file nor a safetensors file")
        if fmt == "safetensors":
            part, _ = read_safetensors(file)
        else:
            part, shard_meta = load_torch(file, fmt, allow_pickle=allow_pickle)
            for k, v in shard_meta.get(STATE_DICT_METADATA, {}).items():
                versions.setdefault(k, v)
        if not isinstance(part, dict):
            raise CorruptSourceError(file, f"shard {shard!r} holds a {type(part).__name__}, not a state dict")
        add_shard(state, where, part, shard, file)
    if weight_map is not None:
        check_weight_map(weight_map, where, cited)
    if versions:
        meta[STATE_DICT_METADATA] = versions
    return state, meta


def read_side_files(directory: str) -> dict[str, Any]:
    """``{name: content}`` of the :data:`SIDE_FILES` present in ``directory`` (JSON parsed, text as str)."""
    out: dict[str, Any] = {}
    total = 0
    for name in SIDE_FILES:
        if not os.path.lexists(os.path.join(directory, name)):
            continue
        file = inside(directory, name, what="side file", cited=directory)
        if not os.path.isfile(file):
            continue
        total += os.path.getsize(file)
        if total > MAX_SIDE_TOTAL:
            raise UnsupportedSourceError(directory, f"the side files up to {name} hold over {MAX_SIDE_TOTAL} bytes, "
                                                    "more than the checkpoint metadata should carry")
        if name.endswith(".json"):
            out[name] = _load_json(file, MAX_SIDE_FILE, f"side file {name}")
        else:
            size = os.path.getsize(file)
            if size > MAX_SIDE_FILE:
                raise UnsupportedSourceError(file, f"side file {name} is {size} bytes, over the cap of {MAX_SIDE_FILE}")
            with open(file, "rb") as f:
                raw = f.read(MAX_SIDE_FILE + 1)
            try:
                out[name] = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorruptSourceError(file, f"side file {name} is not UTF-8 text ({e})") from None
    return out
