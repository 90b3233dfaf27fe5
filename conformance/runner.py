"""Check a backend against every conformance manifest: ``python -m conformance --backend numpy``.

Reads ``conformance/manifest.json`` (golden files: must load, with the described content) and, when
present, ``conformance/corrupt/manifest.json`` (files that must fail with a given error class).
Prints one line per file and, with ``--json``, writes a report; exits 1 if any file fails.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import ckptfmt
from ckptfmt import errors
from conformance.describe import describe, numpy_array_leaf, numpy_leaf, tensor

HERE = Path(__file__).resolve().parent
MANIFESTS = (HERE / "manifest.json", HERE / "corrupt" / "manifest.json")
BACKENDS = ("numpy", "torch", "cupy")


class Skip(Exception):
    """The backend cannot run here (framework missing, no GPU)."""


def leaf_describer(backend: str) -> Any:
    """A function describing one loaded array of ``backend`` (None for anything else)."""
    if backend == "numpy":
        return numpy_array_leaf
    if backend == "torch":
        try:
            import torch
        except ImportError:
            raise Skip("torch is not installed") from None
        if not hasattr(torch, "Tensor"):  # a directory named torch (e.g. tests/torch) on the path
            raise Skip("torch is not installed (found a namespace package)")

        def tleaf(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return None
            t = x.detach().cpu().contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            return tensor(str(t.dtype).removeprefix("torch."), tuple(t.shape), raw)
        return tleaf
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise Skip("no CUDA device")
    except ImportError:
        raise Skip("cupy is not installed") from None
    except Exception as e:  # cupy raises its own runtime errors without a driver
        raise Skip(f"no usable CUDA device ({type(e).__name__})") from None

    def cleaf(x: Any) -> Any:
        if isinstance(x, cupy.ndarray):
            return numpy_leaf(cupy.asnumpy(x))
        if isinstance(x, np.ndarray | np.generic):
            return numpy_leaf(x, scalar=isinstance(x, np.generic))
        return None
    return cleaf


def _no_scalars(node: Any) -> Any:
    """Frameworks without array scalars return 0-d tensors for them."""
    if isinstance(node, dict):
        return {("tensor" if k == "scalar" else k): _no_scalars(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_no_scalars(v) for v in node]
    return node


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if type(a) is not type(b):
        return f"{where or '/'}: expected {json.dumps(a)[:200]}, got {json.dumps(b)[:200]}"
    if isinstance(a, dict):
        for k in a.keys() | b.keys():
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}/{k}")
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where or '/'}: expected {len(a)} items, got {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{where}/{i}")
    return f"{where or '/'}: expected {json.dumps(a)[:200]}, got {json.dumps(b)[:200]}"


def run_corrupt_case(case: dict[str, Any], base: Path, backend: str) -> dict[str, Any]:
    """Check one entry of ``corrupt/manifest.json`` (``make_corrupt.py``): ``load`` names the error class, or
    is null for a file that must load; ``limits`` are the reader caps to open it with, ``keys`` the keys to load."""
    path = base / case["file"]
    want = case.get("load")
    out: dict[str, Any] = {"file": case["file"], "expect": "load" if want is None else "error",
                           "rule": case.get("rule")}
    limits = ckptfmt.Limits(**case["limits"]) if case.get("limits") else None
    device = "cuda" if backend == "cupy" else None
    try:
        ckptfmt.load(path, keys=case.get("keys"), backend=backend, device=device, limits=limits)
    except ckptfmt.CheckpointError as e:
        cls = getattr(errors, str(want), None)
        ok = cls is not None and isinstance(e, cls)
        return {**out, "ok": ok, "got": type(e).__name__,
                "detail": "" if ok else f"expected {want or 'a load'}, got {type(e).__name__}: {e}"}
    return {**out, "ok": want is None, "detail": "" if want is None else f"loaded, expected {want}"}


def run_case(case: dict[str, Any], base: Path, backend: str, leaf: Any) -> dict[str, Any]:
    """Check one manifest entry; returns its report line."""
    if "expect" not in case and "load" in case:  # the corrupt-file manifest's entry shape
        return run_corrupt_case(case, base, backend)
    path = base / case["file"]
    out: dict[str, Any] = {"file": case["file"], "expect": case.get("expect", "load")}
    device = "cuda" if backend == "cupy" else None
    try:
        loaded = ckptfmt.load(path, backend=backend, device=device)
        with ckptfmt.open(path) as ckpt:
            meta = ckpt.metadata
            producer, created = ckpt.producer, ckpt.created
    except ckptfmt.CheckpointError as e:
        if out["expect"] == "load":
            return {**out, "ok": False, "detail": f"{type(e).__name__}: {e}"}
        want = case.get("error") or case.get("exception")
        cls = getattr(errors, str(want), None)
        ok = cls is not None and isinstance(e, cls)
        return {**out, "ok": ok, "got": type(e).__name__, "rule": case.get("rule"),
                "detail": "" if ok else f"expected {want}, got {type(e).__name__}: {e}"}
    if out["expect"] != "load":
        return {**out, "ok": False, "detail": f"loaded, expected {case.get('error') or case.get('exception')}"}
    expected = case["tree"] if backend == "numpy" else _no_scalars(case["tree"])
    got = describe(loaded, leaf)
    if got != expected:
        return {**out, "ok": False, "detail": "tree differs: " + _first_difference(expected, got)}
    if "metadata" in case:
        from conformance.generate import _plain

        if {k: _plain(v) for k, v in meta.items()} != case["metadata"]:
            return {**out, "ok": False, "detail": "user metadata differs"}
    if "producer" in case and (producer, created) != (case["producer"], case["created"]):
        return {**out, "ok": False, "detail": f"producer/created {producer}, {created} differ"}
    return {**out, "ok": True}


def run(backend: str, manifests: tuple[Path, ...] = MANIFESTS) -> dict[str, Any]:
    """Run every case of every manifest present; returns the JSON report."""
    start = time.perf_counter()
    report: dict[str, Any] = {"backend": backend, "ckptfmt": ckptfmt.__version__,
                              "format": f"{ckptfmt.FORMAT_MAJOR}.{ckptfmt.FORMAT_MINOR}", "results": []}
    try:
        leaf = leaf_describer(backend)
    except Skip as e:
        return {**report, "skipped": str(e), "ok": True, "passed": 0, "failed": 0}
    for manifest in manifests:
        if not manifest.exists():
            continue
        cases = json.loads(manifest.read_text(encoding="utf-8"))
        cases = cases["cases"] if isinstance(cases, dict) else cases
        for case in cases:
            report["results"].append(run_case(case, manifest.parent, backend, leaf))
    failed = sum(not r["ok"] for r in report["results"])
    report.update(ok=failed == 0, passed=len(report["results"]) - failed, failed=failed,
                  seconds=round(time.perf_counter() - start, 3))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance", description="Run the ckptfmt conformance suite.")
    p.add_argument("--backend", choices=BACKENDS, default="numpy")
    p.add_argument("--json", metavar="REPORT", help="write the JSON report here ('-' for stdout)")
    args = p.parse_args(argv)
    report = run(args.backend)
    if args.json == "-":
        print(json.dumps(report, indent=1))
    else:
        for r in report["results"]:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['file']}" + (f"  {r['detail']}" if r.get("detail") else ""))
        summary = report.get("skipped") or "{passed} passed, {failed} failed".format(**report)
        print(f"{args.backend}: {summary}")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0 if report["ok"] else 1
