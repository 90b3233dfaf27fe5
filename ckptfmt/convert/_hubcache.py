"""The Hugging Face hub cache: which links of a snapshot directory may be followed."""

from __future__ import annotations

import os

__all__ = ["hub_blob"]


def hub_blob(root: str, full: str) -> bool:
    """True if ``full`` is a regular file of the hub-cache repo whose snapshot directory is ``root`` (real paths).

    huggingface_hub's cache keeps each repo as ``models--<org>--<name>/`` holding ``blobs/<hash>`` (the
    files) and ``snapshots/<revision>/<file>`` (relative links ``../../blobs/<hash>``); a link of a
    snapshot may so reach that one repo's ``blobs`` folder, and only a regular file directly in it.
    """
    snapshots = os.path.dirname(root)
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) != "snapshots" or not os.path.basename(repo).startswith("models--"):
        return False
    blobs = os.path.join(repo, "blobs")
    return os.path.isdir(blobs) and not os.path.islink(blobs) and os.path.dirname(full) == blobs \
        and os.path.isfile(full)
