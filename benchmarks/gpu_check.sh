#!/usr/bin/env bash
# One GPU check, under 8 minutes on an H100/H200: the compiled-kernel tests, the kernel benchmark (with torch's
# bsr_dense_mm column) and a short bf16 end-to-end training benchmark, then one summary.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # OUT_DIR (default: $OUT, else gpu_check_out) gets logs and JSON
#
# Needs only what such a machine has (torch, triton, transformers, pytest, setuptools): the package is installed
# without its dependencies and nothing here imports datasets or evaluate. Offline is fine.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the compiled kernels, not the interpreter

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
  || { echo "install failed: see $out/install.log"; tail -5 "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"

status=0
echo "== CUDA kernel tests"
timeout 150 python3 -m pytest tests/kernels -q -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -15
tests_rc=${PIPESTATUS[0]}; [ "$tests_rc" = 0 ] || status=1

echo "== kernel benchmark (bf16, block 64, densities 0.2/0.1; ratio = cuBLAS time / ours)"
timeout 120 python3 benchmarks/bench_kernels.py --dtype bf16 --quick 2>&1 | tee "$out/bench_kernels.log"
kernels_rc=${PIPESTATUS[0]}; [ "$kernels_rc" = 0 ] || status=1

echo "== end-to-end training (GPT-2-small width, bf16 autocast, full topology cycles)"
timeout 150 python3 benchmarks/bench_training.py --device cuda --bf16 --densities 0.2 0.1 --rounds 2 \
  --output "$out/bench_training_gpu.json" 2>&1 | tee "$out/bench_training.log"
training_rc=${PIPESTATUS[0]}; [ "$training_rc" = 0 ] || status=1

echo
echo "== summary"
cat "$out/gpu.txt"
echo "tests (rc $tests_rc): $(grep -E '[0-9]+ (passed|failed)' "$out/tests.log" | tail -1)"
echo "kernels (rc $kernels_rc), fwd+bwd ratio and bsr_dense_mm column:"
grep -E '^ *[0-9]+->' "$out/bench_kernels.log" || echo "  (no rows)"
echo "training (rc $training_rc):"
grep -E '^\|' "$out/bench_training.log" || echo "  (no table)"
exit $status
