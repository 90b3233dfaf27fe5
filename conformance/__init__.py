"""The ckptfmt conformance suite: golden files, corrupt files, their manifests, and a runner.

Run from the repository root: ``python -m conformance --backend numpy|torch|cupy [--json REPORT]``
(spec/CONFORMANCE.md).
"""
