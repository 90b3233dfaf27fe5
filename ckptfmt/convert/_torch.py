"""torch.save sources: the zip format (torch >= 1.6) and the legacy pickle and tar formats.

Files are loaded with ``torch.load(weights_only=True)``: its unpickler builds tensors, containers and
a fixed list of plain types, and refuses every other global instead of running it. Zip files are
also memory-mapped (``mmap=True``), so their tensors are views of the file that the writer streams
from the page cache; legacy files are read into memory. ``torch.load`` gives tensors that shared a
storage in the file one storage again, which ckptfmt then stores once.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import warnings
from collections.abc import Iterator
from typing import Any

from ..errors import MissingDependencyError
from ._errors import CorruptSourceError, UnsafePickleError, UnsupportedSourceError

__all__ = ["import_torch", "load_torch", "torch_load_bytes", "unsafe_globals"]

_GLOBAL_RE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*) was not an allowed global")
_UNSAFE_HINT = ("pass allow_pickle=True (`ckptfmt convert --allow-pickle`) to load it with the full pickle "
                "module instead. UNSAFE: that runs code named by the file; do it only for files you trust")


def import_torch() -> Any:
    """The torch module, or :class:`MissingDependencyError` naming the extra to install."""
    try:
        import torch
    except ImportError as e:
        raise MissingDependencyError("converting torch files needs torch: pip install 'ckptfmt[torch]'") from e
    return torch


def unsafe_globals(torch: Any, source: Any) -> list[str]:
    """The globals of a zip file's pickle outside weights_only's allowlist ([] if torch cannot tell)."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return []
    try:
        return sorted(finder(source))
    except Exception:  # older zip layouts, TorchScript: torch.load reports those itself
        return []


def _refusal(path: str, e: BaseException) -> UnsafePickleError:
    """An :class:`UnsafePickleError` from torch's weights_only error, naming what it refused."""
    text = str(e)
    names = sorted(set(_GLOBAL_RE.findall(text)))
    if names:
        return UnsafePickleError(path, f"the pickle needs {', '.join(names)}, which torch.load(weights_only=True) "
                                       f"does not allow; {_UNSAFE_HINT}", globals=names)
    detail = next((line.strip() for line in text.splitlines() if "WeightsUnpickler error" in line), text.strip())
    return UnsafePickleError(path, f"torch.load(weights_only=True) refused the file ({detail}); {_UNSAFE_HINT}")


@contextlib.contextmanager
def _translated(path: str, fmt: str) -> Iterator[None]:
    """torch's load errors as ckptfmt conversion errors."""
    try:
        yield
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower() or "weights_only" in str(e):
            raise _refusal(path, e) from None
        raise CorruptSourceError(path, f"{fmt}: the pickle is broken ({e})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) and "legacy .tar" in str(e):
            raise UnsupportedSourceError(path, f"{fmt}: torch cannot read the legacy .tar format with "
                                               f"weights_only=True; {_UNSAFE_HINT}") from None
        raise CorruptSourceError(path, f"{fmt}: torch.load failed ({type(e).__name__}: {msg})") from None


def load_torch(path: str, fmt: str, *, allow_pickle: bool) -> Any:
    """The object saved in a torch file (zip: memory-mapped)."""
    torch = import_torch()
    zip_file = fmt == "torch-zip"
    if zip_file and not allow_pickle:
        names = unsafe_globals(torch, path)
        if names:
            raise UnsafePickleError(path, f"the pickle needs {', '.join(names)}, which torch.load(weights_only=True) "
                                          f"does not allow; {_UNSAFE_HINT}", globals=names)
    if zip_file:
        _refuse_torchscript(path)
    with _translated(path, fmt), warnings.catch_warnings():
        # torch warns when weights_only=False is passed explicitly (an informed choice here)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=zip_file)


def _refuse_torchscript(path: str) -> None:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CorruptSourceError(path, f"torch-zip: not a readable zip archive ({e})") from None
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        raise UnsupportedSourceError(path, "this is a TorchScript archive (torch.jit.save), not a torch.save file; "
                                           "load it with torch.jit.load and save its state_dict()")


def torch_load_bytes(torch: Any, data: io.RawIOBase | io.BytesIO, *, path: str, what: str, allow_pickle: bool) -> Any:
    """``torch.load`` of an in-file record (a DCP item), with the same refusals as :func:`load_torch`."""
    if not allow_pickle:
        names = unsafe_globals(torch, data)
        data.seek(0)
        if names:
            raise UnsafePickleError(path, f"{what}: the pickle needs {', '.join(names)}, which torch.load("
                                          f"weights_only=True) does not allow; {_UNSAFE_HINT}", globals=names)
    with _translated(path, what), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.load(data, map_location="cpu", weights_only=not allow_pickle)
