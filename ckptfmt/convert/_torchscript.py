"""TorchScript archives (``torch.jit.save``): parameters, buffers and constants, without running the archive.

A TorchScript zip holds ``<name>/data.pkl`` (the module objects and their attributes), ``constants.pkl``
(the tensors the code uses as constants), ``data/<key>`` and ``constants/<key>`` (their storages' bytes)
and ``code/`` (the TorchScript source of each class). The pickles are replayed by an unpickler that
builds only tensors (views of the archive's stored members, memory-mapped copy-on-write: nothing is
read until written), containers and inert module stand-ins; every other global is refused. The code
is never executed: only its ``__parameters__ = [...]`` and ``__buffers__ = [...]`` lines are read, as
literals, to tell which tensor attributes belong in the state dict.

The tree is a flat dict keyed like ``torch.jit.load(path).state_dict()`` (per module: parameters,
then buffers, then submodules, in attribute order), plus each constant ``i`` of ``constants.pkl`` at key
``CONSTANTS.c<i>`` (the name the code gives it).
"""

from __future__ import annotations

import ast
import io
import math
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Any

import numpy as np

from ._errors import CorruptSourceError, UnsupportedSourceError
from ._pickle_scan import Stub

__all__ = ["CONSTANT_PREFIX", "is_torchscript", "read_torchscript"]

#: key prefix of the archive's constants in the converted tree
CONSTANT_PREFIX = "CONSTANTS.c"
_MAX_PICKLE = 256 << 20
_MAX_CODE = 16 << 20
_CLASS_RE = re.compile(r"^class ([A-Za-z_]\w*)\(")
_NAMES_RE = re.compile(r"^\s+(__parameters__|__buffers__) = (\[.*\])\s*$")
_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
_LIST_BUILDERS = ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist")


def is_torchscript(names: list[str]) -> bool:
    """True for the member names of a TorchScript archive: ``data.pkl``, ``constants.pkl`` and ``code/``."""
    return (any(n.endswith("/data.pkl") for n in names) and any(n.endswith("/constants.pkl") for n in names)
            and any("/code/" in n for n in names))


class _Module(Stub):
    """A TorchScript object (``__torch__.*``) as its class name and attribute dict."""


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _Archive:
    """The zip, its member prefix, and the storages read from it."""

    def __init__(self, path: str, zf: zipfile.ZipFile) -> None:
        self.path = path
        self.zf = zf
        pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        self.prefix = pkl[: -len("data.pkl")]
        self.storages: dict[str, Any] = {}
        self.code: dict[str, dict[str, dict[str, list[str]]]] = {}

    def member(self, name: str, cap: int) -> bytes:
        info = self.zf.NameToInfo.get(self.prefix + name)
        if info is None:
            raise CorruptSourceError(self.path, f"torchscript: the archive has no {name!r}")
        if info.file_size > cap:
            raise UnsupportedSourceError(self.path, f"torchscript: {name} is {info.file_size} bytes, over the cap "
                                                    f"of {cap}")
        return self.zf.read(info)

    def storage(self, folder: str, key: str, dtype: str, numel: int) -> Any:
        """A 1-d tensor over stored member ``<folder>/<key>``, memory-mapped copy-on-write."""
        import torch

        hit = self.storages.get(f"{folder}/{key}")
        if hit is not None:
            return hit
        info = self.zf.NameToInfo.get(f"{self.prefix}{folder}/{key}")
        if info is None:
            raise CorruptSourceError(self.path, f"torchscript: storage {key!r} is not in the archive")
        tdtype = getattr(torch, dtype)
        itemsize = torch.empty(0, dtype=tdtype).element_size()
        if type(numel) is not int or numel < 0 or numel * itemsize > info.file_size:
            raise CorruptSourceError(self.path, f"torchscript: storage {key!r} claims {numel!r} elements of {dtype}, "
                                                f"but its member has {info.file_size} bytes")
        if info.compress_type != zipfile.ZIP_STORED:
            raise UnsupportedSourceError(self.path, f"torchscript: storage {key!r} is compressed; torch.jit.save "
                                                    "stores them uncompressed")
        if numel == 0:
            t = torch.empty(0, dtype=tdtype)
        else:
            self.zf.fp.seek(info.header_offset)  # type: ignore[union-attr]
            local = self.zf.fp.read(30)  # type: ignore[union-attr]
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise CorruptSourceError(self.path, f"torchscript: storage {key!r} has a broken local header")
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
                int.from_bytes(local[28:30], "little")
            raw = np.memmap(self.path, dtype=np.uint8, mode="c", offset=start, shape=(numel * itemsize,))
            t = torch.from_numpy(raw).view(tdtype)
        self.storages[f"{folder}/{key}"] = t
        return t

    def class_names(self, qualified: str) -> dict[str, list[str]] | None:
        """``{"__parameters__": [...], "__buffers__": [...]}`` of a class, read from its code; None if not a module."""
        module, _, name = qualified.rpartition(".")
        if not module.startswith("__torch__"):
            return None
        classes = self.code.get(module)
        if classes is None:
            source = self.member(f"code/{module.replace('.', '/')}.py", _MAX_CODE).decode("utf-8", "replace")
            classes = {}
            current: dict[str, list[str]] | None = None
            for line in source.splitlines():
                m = _CLASS_RE.match(line)
                if m:
                    current = classes.setdefault(m.group(1), {})
                    continue
                m = _NAMES_RE.match(line)
                if m and current is not None:
                    try:
                        names = ast.literal_eval(m.group(2))
                    except (ValueError, SyntaxError, RecursionError, MemoryError):
                        raise CorruptSourceError(self.path, f"torchscript: {module}: bad {m.group(1)} line") from None
                    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                        raise CorruptSourceError(self.path, f"torchscript: {module}: bad {m.group(1)} line")
                    current[m.group(1)] = names
            self.code[module] = classes
        found = classes.get(name)
        return found if found is not None and "__parameters__" in found else None


class _Unpickler(pickle.Unpickler):
    def __init__(self, archive: _Archive, data: bytes, what: str, folder: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.what = what
        self.folder = folder
        self.classes: dict[str, type[_Module]] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if module == "__torch__" or module.startswith("__torch__."):
            cls = self.classes.get(full)
            if cls is None:
                cls = type(name, (_Module,), {"global_name": full})
                self.classes[full] = cls
            return cls
        if full == "torch._utils._rebuild_tensor_v2":
            return self._rebuild_tensor
        if full == "collections.OrderedDict":
            return OrderedDict
        if module == "torch" and name in _STORAGES:
            return _StorageType(_STORAGES[name])
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return list
        if full == "torch.jit._pickle.restore_type_tag":
            return _restore_type_tag
        raise UnsupportedSourceError(self.archive.path, f"torchscript: {self.what} needs global {full}, which the "
                                                        "converter does not build (only tensors and containers)")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise CorruptSourceError(self.archive.path, f"torchscript: {self.what}: bad persistent id {pid!r:.200}")
        return self.archive.storage(self.folder, pid[2], pid[1].dtype, pid[4])

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> Any:
        import torch

        if not (isinstance(storage, torch.Tensor) and type(offset) is int and isinstance(size, tuple)
                and isinstance(stride, tuple) and len(size) == len(stride)
                and all(type(d) is int and d >= 0 for d in size) and all(type(s) is int and s >= 0 for s in stride)
                and offset >= 0):
            raise CorruptSourceError(self.archive.path, f"torchscript: {self.what}: a tensor with bad layout (offset "
                                                        f"{offset!r:.50}, size {size!r:.80}, stride {stride!r:.80})")
        if math.prod(size) and offset + sum((d - 1) * s for d, s in zip(size, stride, strict=True)) >= storage.numel():
            raise CorruptSourceError(self.archive.path, f"torchscript: {self.what}: a tensor of size {size} runs past "
                                                        f"its storage of {storage.numel()} elements")
        return storage.as_strided(size, stride, offset)


def _restore_type_tag(value: Any, type_str: Any) -> Any:
    return value


def _attributes(obj: _Module) -> dict[str, Any]:
    state = obj.state
    return state if isinstance(state, dict) else {}


def read_torchscript(path: str) -> dict[str, Any]:
    """The state dict (and constants) of a TorchScript archive, as torch tensors over the mapped file."""
    import torch

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CorruptSourceError(path, f"torchscript: not a readable zip archive ({e})") from None
    with zf:
        archive = _Archive(path, zf)
        try:
            root = _Unpickler(archive, archive.member("data.pkl", _MAX_PICKLE), "data.pkl", "data").load()
            constants = _Unpickler(archive, archive.member("constants.pkl", _MAX_PICKLE), "constants.pkl",
                                  "constants").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
            if isinstance(e, CorruptSourceError | UnsupportedSourceError):
                raise
            raise CorruptSourceError(path, f"torchscript: a pickle is broken ({type(e).__name__}: {e})") from None
        if not isinstance(root, _Module):
            raise CorruptSourceError(path, "torchscript: data.pkl does not hold a module")
        tree: dict[str, Any] = {}
        stack: list[tuple[_Module, str, int]] = [(root, "", 0)]
        seen: set[int] = set()
        while stack:
            module, prefix, depth = stack.pop()
            if id(module) in seen or depth > 256:
                continue
            seen.add(id(module))
            names = archive.class_names(type(module).global_name)
            if names is None:
                continue
            attrs = _attributes(module)
            for kind in ("__parameters__", "__buffers__"):
                listed = set(names.get(kind, []))
                for k, v in attrs.items():
                    if k in listed and isinstance(v, torch.Tensor):
                        tree[prefix + k] = v
            children = [(v, f"{prefix}{k}.", depth + 1) for k, v in attrs.items() if isinstance(v, _Module)]
            stack.extend(reversed(children))
        if not isinstance(constants, tuple):
            raise CorruptSourceError(path, "torchscript: constants.pkl does not hold a tuple")
        for i, c in enumerate(constants):
            if isinstance(c, torch.Tensor) or type(c) in (int, float, bool, str, type(None)):
                tree[f"{CONSTANT_PREFIX}{i}"] = c
    return tree
