#!/usr/bin/env bash
# Every GPU check in one go, for the moment a GPU is lent (under 10 minutes on one device):
#   1. the tests marked `gpu` (CUDA loads and saves, torch.open(device="cuda"), slices on the device);
#   2. bench_torch.py --cuda (device load vs the pinned host->device copy limit and vs safetensors).
# Usage: bash benchmarks/gpu_check.sh [output-dir]   (figures and logs land in output-dir, default $OUT or ./gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
status=0

echo "== device" | tee "$out/summary.txt"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true) | tee -a "$out/summary.txt"
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' \
    2>&1 | tee -a "$out/summary.txt"

echo "== gpu tests (timeout 360 s)" | tee -a "$out/summary.txt"
timeout 360 "$py" -m pytest -q -m gpu -rs tests/backends tests/torch tests/test_blockio.py \
    -p no:cacheprovider >"$out/gpu_tests.log" 2>&1
rc=$?
tail -n 15 "$out/gpu_tests.log" | tee -a "$out/summary.txt"
[ "$rc" -eq 0 ] || { echo "gpu tests: exit $rc" | tee -a "$out/summary.txt"; status=1; }

echo "== bench_torch.py --cuda (timeout 200 s)" | tee -a "$out/summary.txt"
timeout 200 "$py" benchmarks/bench_torch.py --cuda --runs 3 >"$out/bench_torch_cuda.log" 2>&1
rc=$?
tail -n 30 "$out/bench_torch_cuda.log" | tee -a "$out/summary.txt"
[ "$rc" -eq 0 ] || { echo "bench_torch --cuda: exit $rc" | tee -a "$out/summary.txt"; status=1; }

echo "== done (status $status); logs in $out" | tee -a "$out/summary.txt"
exit "$status"
