"""The index of a checkpoint directory (``index.json``), readable without torch (``ckptfmt ls``)."""

from __future__ import annotations

import json
import os
from typing import Any

from .errors import CorruptCheckpointError

INDEX = "index.json"


def read_index(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The entries of a checkpoint directory's index, oldest first ([] if there is none)."""
    path = os.path.join(os.fspath(directory), INDEX)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(path, f"checkpoint index is unreadable: {e}") from None
    entries = doc.get("checkpoints") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise CorruptCheckpointError(path, "checkpoint index has no 'checkpoints' list")
    return entries
