"""conformance/corrupt/: every crafted file meets the reader with the error its manifest names (spec §8, §11).

Also checks that the committed files are what ``conformance/make_corrupt.py`` generates today.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

import ckptfmt
from ckptfmt import errors

ROOT = Path(__file__).resolve().parent.parent / "conformance"
CORRUPT = ROOT / "corrupt"
MANIFEST = json.loads((CORRUPT / "manifest.json").read_text())["cases"]


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("make_corrupt", ROOT / "make_corrupt.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_corrupt"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _exact(name: str) -> type[Exception]:
    cls = getattr(errors, name)
    assert name in errors.__all__ and getattr(ckptfmt, name) is cls
    return cls


def _raises_exactly(name: str, call: Any) -> Exception:
    cls = _exact(name)
    with pytest.raises(errors.CheckpointError) as info:
        call()
    assert type(info.value) is cls, f"expected {name}, got {type(info.value).__name__}: {info.value}"
    return info.value


@pytest.mark.parametrize("case", MANIFEST, ids=[c["file"] for c in MANIFEST])
def test_each_corrupt_file_meets_its_error(case: dict[str, Any]) -> None:
    path = CORRUPT / case["file"]
    limits = ckptfmt.Limits(**case.get("limits", {}))
    keys = case.get("keys")
    if case["open"]:
        err = _raises_exactly(case["open"], lambda: ckptfmt.open(path, limits=limits))
        if isinstance(err, errors.CorruptCheckpointError):
            assert err.path == str(path)  # every message names the file
    else:
        ckptfmt.open(path, limits=limits).close()
    if case["load"]:
        _raises_exactly(case["load"], lambda: ckptfmt.load(path, limits=limits, keys=keys))
        _raises_exactly(case["load"], lambda: ckptfmt.load(path, limits=limits, keys=keys, mmap=False))
    else:
        ckptfmt.load(path, limits=limits, keys=keys)
    if isinstance(case["verify_ok"], str):
        _raises_exactly(case["verify_ok"], lambda: ckptfmt.verify(path, limits=limits))
    else:
        report = ckptfmt.verify(path, limits=limits)
        assert report.ok is case["verify_ok"], report.errors


def test_the_manifest_covers_every_error_class_a_file_can_cause() -> None:
    seen = {c[k] for c in MANIFEST for k in ("open", "load")} | {c["verify_ok"] for c in MANIFEST}
    file_errors = set(errors.__all__) - {"CheckpointError", "CorruptCheckpointError", "UnsupportedObjectError",
                                         "ObjectLimitError", "MissingDependencyError", "CheckpointClosedError",
                                         "DiskFullError"}
    assert file_errors - seen == set()
    assert any(c["file"] == "a_directory.ckpt" for c in MANIFEST) and not (CORRUPT / "missing.ckpt").exists()


def test_the_committed_files_are_what_the_generator_makes(tmp_path: Path) -> None:
    _generator().main(str(tmp_path))
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(p.name for p in CORRUPT.iterdir())
    for name in made:
        if name.endswith(".ckpt") and (tmp_path / name).is_file():
            assert (tmp_path / name).read_bytes() == (CORRUPT / name).read_bytes(), name
    assert json.loads((tmp_path / "manifest.json").read_text()) == json.loads((CORRUPT / "manifest.json").read_text())


def test_the_files_are_small() -> None:
    assert all(p.stat().st_size < 70_000 for p in CORRUPT.glob("*.ckpt") if p.is_file())
