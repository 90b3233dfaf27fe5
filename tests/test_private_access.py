"""No module reaches into :class:`ckptfmt.Checkpoint`'s private attributes: its public methods are the door."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import ckptfmt.backends

import ckptfmt
from ckptfmt._reader import Checkpoint

ROOT = Path(ckptfmt.__file__).resolve().parent
BACKENDS = Path(ckptfmt.backends.__file__).resolve().parent


def _private_names() -> set[str]:
    """Checkpoint's private methods and the private attributes its methods set on ``self``."""
    names = {n for n in vars(Checkpoint) if n.startswith("_") and not n.startswith("__")}
    tree = ast.parse((ROOT / "_reader.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Checkpoint":
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self" \
                        and sub.attr.startswith("_") and not sub.attr.startswith("__"):
                    names.add(sub.attr)
    return names


def _checkpoint_names(tree: ast.AST) -> set[str]:
    """Names a module binds to checkpoints: parameters annotated ``Checkpoint``, ``with ... as ckpt`` and
    ``ckpt = ...open(...)``/``Checkpoint(...)``, and the conventional ``ckpt``/``checkpoint``."""
    names = {"ckpt", "checkpoint"}
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None and \
                re.search(r"\bCheckpoint\b", ast.unparse(node.annotation)):
            names.add(node.arg)
        if isinstance(node, ast.withitem) and isinstance(node.optional_vars, ast.Name) and \
                isinstance(node.context_expr, ast.Call) and \
                any(w in ast.unparse(node.context_expr.func) for w in ("open", "Checkpoint")):
            names.add(node.optional_vars.id)
    return names


def test_no_module_reads_checkpoint_private_attributes() -> None:
    private = _private_names()
    assert {"_check_open", "_map", "_dtype", "_key_of"} <= private
    found = []
    for path in sorted([*ROOT.rglob("*.py"), *BACKENDS.rglob("*.py")]):
        if path.name == "_reader.py" and path.parent == ROOT:
            continue
        tree = ast.parse(path.read_text())
        holders = _checkpoint_names(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or node.attr not in private:
                continue
            base = node.value
            name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
            if name in holders or name in ("_ckpt", "ckpt"):
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_metadata_bytes_and_row_key(tmp_path: Path) -> None:
    import msgpack
    import numpy as np

    ckptfmt.save(tmp_path / "a.ckpt", {"w": np.arange(4), "s": "x"})
    with ckptfmt.open(tmp_path / "a.ckpt") as ckpt:
        meta = msgpack.unpackb(ckpt.metadata_bytes(), raw=False, strict_map_key=False)
        assert "tree" in meta and ckpt.row_key(0) == "w" and ckpt.row_key(5) == "#5"
