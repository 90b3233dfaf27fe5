"""Orbax checkpoint directories (Flax/JAX ``PyTreeCheckpointHandler`` / ``StandardCheckpointer``), read without JAX.

An Orbax pytree directory holds ``_METADATA`` (JSON: ``tree_metadata`` maps each leaf's key tuple to its
``key_metadata``, a list of ``{"key", "key_type"}`` with key type 1 a sequence index and 2 a dict key,
and its ``value_metadata.value_type``), ``_CHECKPOINT_METADATA`` (JSON: timestamps, metrics, custom
metadata), ``_strings.json`` (the string leaves, by parameter name) and one array per array or scalar
leaf, named by its parameter name (the keys joined by ``.``). Layouts read here:

- OCDBT (``use_ocdbt=True``, Orbax's default): one key-value database for all arrays
  (``manifest.ocdbt``, ``d/`` data files, ``ocdbt.process_*/`` per-process databases it refers to),
  read by :mod:`._ocdbt`; the arrays are zarr arrays under the keys ``<parameter name>/...``;
- ``use_ocdbt=False``: each array a zarr directory of its own;
- either way zarr format 2 (``.zarray``) or 3 (``zarr.json``, ``use_zarr3=True``), read by :mod:`._zarr`;
- leaf types: ``np.ndarray`` / ``jax.Array`` (arrays), ``scalar`` (a numpy scalar), ``string``,
  and the empty ``None`` / ``Dict`` / ``List`` / ``Tuple`` markers;
- older Orbax's aggregate ``checkpoint`` file (msgpack, read by :mod:`._flax`): the tree with small
  values kept in it and the others as ``PLACEHOLDER://<parameter name>``; without ``_METADATA`` it is
  the tree (sequences then stay ``{"0": ...}`` dicts, as Flax's state dicts have them).

CheckpointManager step directories (pass the item directory) and unfinished saves are refused.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .._dtypes import numpy_dtype
from .._tree import walk
from ._errors import CorruptSourceError, UnsupportedSourceError
from ._flax import read_flax
from ._lazy import LazyArray
from ._ocdbt import MANIFEST, read_ocdbt
from ._zarr import Store, ZarrArray, open_zarr, parse_json_file

__all__ = ["AGGREGATE", "CHECKPOINT_METADATA", "METADATA", "ORBAX_KEY", "PLACEHOLDER", "is_orbax_dir", "read_orbax"]

METADATA = "_METADATA"
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
STRINGS = "_strings.json"
#: the msgpack file of older Orbax: the tree, each leaf a value or ``PLACEHOLDER://<parameter name>``
AGGREGATE = "checkpoint"
PLACEHOLDER = "PLACEHOLDER://"
#: user-metadata key of the checkpoint's own metadata: ``{"checkpoint": _CHECKPOINT_METADATA, "custom": ...}``
ORBAX_KEY = "orbax"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_SEQUENCE, _DICT = 1, 2
#: keys a leaf may be below the root (the tree is rebuilt recursively)
_MAX_DEPTH = 200
_ARRAYS = ("np.ndarray", "jax.Array", "scalar")
_EMPTY = {"None": None, "Dict": dict, "List": list, "Tuple": list}


def is_orbax_dir(path: str) -> bool:
    """True if ``path`` is an Orbax checkpoint directory: a ``_METADATA`` or ``_CHECKPOINT_METADATA`` file, or
    an aggregate ``checkpoint`` file that is a msgpack tree with placeholders or arrays (older Orbax)."""
    if os.path.isfile(os.path.join(path, METADATA)) or os.path.isfile(os.path.join(path, CHECKPOINT_METADATA)):
        return True
    file = os.path.join(path, AGGREGATE)
    if not os.path.isfile(file):
        return False
    with open(file, "rb") as f:
        head = f.read(1)
    if not head or not (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return False
    try:
        tree = read_flax(file)
    except (CorruptSourceError, UnsupportedSourceError, OSError):
        return False
    return any(_placeholder(leaf) is not None or isinstance(leaf, (LazyArray, np.generic)) for _, leaf in walk(tree))


def _refuse_layout(path: str, names: list[str]) -> None:
    if path.rstrip(os.sep).endswith(_TMP_SUFFIX):
        raise CorruptSourceError(path, "an unfinished Orbax save (its directory still has the "
                                       f"{_TMP_SUFFIX} suffix); convert a finished checkpoint")
    if METADATA not in names and AGGREGATE not in names:
        items = sorted(n for n in names if os.path.isfile(os.path.join(path, n, METADATA)))
        hint = f"; pass one of its item directories ({', '.join(items)})" if items else ""
        raise UnsupportedSourceError(path, f"an Orbax checkpoint step directory without a pytree {METADATA} file"
                                           f"{hint}")


def _tree_entries(path: str, meta: Any) -> list[tuple[list[tuple[int, str | int]], str]]:
    """[( [(key type, key), ...], value type ), ...] of ``_METADATA``'s ``tree_metadata``, checked."""
    cited = os.path.join(path, METADATA)
    tree = meta.get("tree_metadata") if isinstance(meta, dict) else None
    if not isinstance(tree, dict):
        raise CorruptSourceError(cited, "Orbax _METADATA: no \"tree_metadata\" object")
    out = []
    for name, entry in tree.items():
        keys = entry.get("key_metadata") if isinstance(entry, dict) else None
        value = entry.get("value_metadata") if isinstance(entry, dict) else None
        if not isinstance(keys, list) or not keys or not isinstance(value, dict):
            raise CorruptSourceError(cited, f"Orbax _METADATA: entry {name!r:.80} lacks key_metadata or value_metadata")
        if len(keys) > _MAX_DEPTH:
            raise UnsupportedSourceError(cited, f"Orbax _METADATA: entry {name!r:.80} is {len(keys)} keys deep "
                                                f"(cap {_MAX_DEPTH})")
        path_keys: list[tuple[int, str | int]] = []
        for k in keys:
            key, kind = (k.get("key"), k.get("key_type")) if isinstance(k, dict) else (None, None)
            if not isinstance(key, str) or kind not in (_SEQUENCE, _DICT):
                raise UnsupportedSourceError(cited, f"Orbax _METADATA: entry {name!r:.80} has a key {k!r:.80} that is "
                                                    "neither a dict key nor a sequence index")
            if kind == _SEQUENCE:
                if not key.isdigit() or len(key) > 18:
                    raise CorruptSourceError(cited, f"Orbax _METADATA: sequence index {key!r:.40} in {name!r:.80}")
                path_keys.append((kind, int(key)))
            else:
                path_keys.append((kind, key))
        vtype = value.get("value_type")
        if not isinstance(vtype, str):
            raise CorruptSourceError(cited, f"Orbax _METADATA: entry {name!r:.80} has no value_type")
        out.append((path_keys, vtype))
    return out


def _assemble(path: str, leaves: list[tuple[list[tuple[int, str | int]], Any]]) -> dict[str, Any]:
    """The nested tree of ``leaves``; sequences become lists (their indices must run 0..n-1)."""
    cited = os.path.join(path, METADATA)
    root: dict[Any, Any] = {}
    kinds: dict[int, int] = {id(root): _DICT}
    holders = [root]
    for keys, value in leaves:
        node = root
        if keys[0][0] != _DICT:
            raise UnsupportedSourceError(cited, "Orbax _METADATA: the tree's root is a sequence; ckptfmt stores a dict")
        for depth, (kind, key) in enumerate(keys):
            if kinds[id(node)] != kind:
                raise CorruptSourceError(cited, f"Orbax _METADATA: {keys!r:.120} uses a node both as a dict and a "
                                                "sequence")
            last = depth == len(keys) - 1
            if last:
                if key in node:
                    raise CorruptSourceError(cited, f"Orbax _METADATA: the leaf {keys!r:.120} is given twice")
                node[key] = value
            else:
                child = node.get(key)
                if child is None:
                    child = {}
                    kinds[id(child)] = keys[depth + 1][0]
                    holders.append(child)
                    node[key] = child
                elif not isinstance(child, dict) or id(child) not in kinds:
                    raise CorruptSourceError(cited, f"Orbax _METADATA: {keys!r:.120} runs through a leaf")
                node = child

    def finish(node: dict[Any, Any]) -> Any:
        items = {k: finish(v) if isinstance(v, dict) and id(v) in kinds else v for k, v in node.items()}
        if kinds[id(node)] == _SEQUENCE:
            if sorted(items) != list(range(len(items))):
                raise CorruptSourceError(cited, f"Orbax _METADATA: sequence indices {sorted(items)[:10]} do not run "
                                                "0..n-1")
            return [items[i] for i in range(len(items))]
        return items

    out = finish(root)
    assert isinstance(out, dict)
    return out


def _scalar(array: ZarrArray) -> Any:
    """A 0-d array leaf Orbax recorded as a scalar: a numpy scalar (0-d lazy array for bfloat16/float8)."""
    if array.shape != ():
        return array
    data = b"".join(bytes(c) for c in array.chunks(1 << 20))
    try:
        return np.frombuffer(data, dtype=numpy_dtype(array.dtype).newbyteorder("<"))[0]
    except (TypeError, ValueError):  # no ml_dtypes: keep the bytes as a 0-d array
        return array


def _aggregate(path: str) -> dict[Any, Any] | None:
    """The tree of the aggregate ``checkpoint`` msgpack file (older Orbax), None if there is none."""
    file = os.path.join(path, AGGREGATE)
    if not os.path.isfile(file):
        return None
    try:
        return read_flax(file)
    except CorruptSourceError as e:
        raise CorruptSourceError(file, f"Orbax aggregate file: {e}") from None


def _placeholder(value: Any) -> str | None:
    """The parameter name of a ``PLACEHOLDER://<name>`` leaf (the value is stored as an array of that name)."""
    if isinstance(value, str) and value.startswith(PLACEHOLDER):
        return value[len(PLACEHOLDER) :]
    return None


def _aggregated(aggregate: dict[Any, Any] | None, keys: list[tuple[int, str | int]]) -> tuple[bool, Any]:
    """(found, value) of the leaf at ``keys`` in the aggregate tree (sequence indices are str keys there)."""
    node: Any = aggregate
    for _, key in keys:
        if not isinstance(node, dict) or str(key) not in node:
            return False, None
        node = node[str(key)]
    return (False, None) if _placeholder(node) is not None or isinstance(node, dict) else (True, node)


def _resolve(store: Store, node: Any) -> Any:
    """The aggregate tree with each placeholder replaced by its stored array (no ``_METADATA``: older Orbax).

    The tree is at most as deep as the msgpack reader allows (64).
    """
    if isinstance(node, dict):
        return {k: _resolve(store, v) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(store, v) for v in node]
    name = _placeholder(node)
    return open_zarr(store, name, allow_missing=False) if name is not None else node


def read_orbax(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tree, user metadata) of an Orbax pytree checkpoint directory (OCDBT or per-array zarr)."""
    names = os.listdir(path)
    _refuse_layout(path, names)
    root = os.path.realpath(path)
    aggregate = _aggregate(path)
    meta: Any = {}
    if METADATA in names:
        meta = parse_json_file(os.path.join(path, METADATA), "Orbax _METADATA")
        if not isinstance(meta, dict):
            raise CorruptSourceError(os.path.join(path, METADATA), "Orbax _METADATA is not a JSON object")
    if MANIFEST in names:
        store = Store(root, read_ocdbt(path))
    elif meta.get("use_ocdbt") or any(n.startswith("ocdbt.process_") for n in names):
        raise CorruptSourceError(path, f"an Orbax checkpoint in the OCDBT layout without its {MANIFEST} (an "
                                       "unfinished save, or per-process databases never merged)")
    else:
        store = Store(root)
    user: dict[str, Any] = {}
    if os.path.isfile(os.path.join(path, CHECKPOINT_METADATA)):
        user["checkpoint"] = parse_json_file(os.path.join(path, CHECKPOINT_METADATA), "Orbax _CHECKPOINT_METADATA")
    if meta.get("custom_metadata") is not None:
        user["custom"] = meta["custom_metadata"]
    if METADATA not in names:
        assert aggregate is not None  # _refuse_layout
        return _resolve(store, aggregate), ({ORBAX_KEY: user} if user else {})
    entries = _tree_entries(path, meta)
    strings: dict[str, Any] = {}
    if any(v == "string" for _, v in entries):
        if not os.path.isfile(os.path.join(path, STRINGS)):
            raise CorruptSourceError(path, f"Orbax: string leaves but no {STRINGS}")
        strings = parse_json_file(os.path.join(path, STRINGS), f"Orbax {STRINGS}")
        if not isinstance(strings, dict):
            raise CorruptSourceError(os.path.join(path, STRINGS), f"Orbax {STRINGS} is not a JSON object")
    allow_missing = meta.get("store_array_data_equal_to_fill_value") is False
    leaves: list[tuple[list[tuple[int, str | int]], Any]] = []
    value: Any
    for keys, vtype in entries:
        param = ".".join(str(k) for _, k in keys)
        found, value = _aggregated(aggregate, keys)
        if found:  # a value older Orbax kept in the aggregate file
            leaves.append((keys, value))
            continue
        if vtype in _ARRAYS:
            array = open_zarr(store, param, allow_missing=allow_missing)
            value = _scalar(array) if vtype == "scalar" else array
        elif vtype == "string":
            value = strings.get(param)
            if not isinstance(value, str):
                raise CorruptSourceError(os.path.join(path, STRINGS), f"Orbax: no string for leaf {param!r:.80}")
        elif vtype in _EMPTY:
            factory = _EMPTY[vtype]
            value = factory() if factory is not None else None
        else:
            raise UnsupportedSourceError(path, f"Orbax: leaf {param!r:.80} has value type {vtype!r:.40}, which "
                                               "ckptfmt does not read")
        leaves.append((keys, value))
    tree = _assemble(path, leaves)
    return tree, ({ORBAX_KEY: user} if user else {})
