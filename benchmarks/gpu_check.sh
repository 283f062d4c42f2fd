#!/usr/bin/env bash
# One GPU check, under 8 minutes on an H100/H200: the compiled-kernel tests, the kernel benchmark against cuBLAS and
# the roofline, bf16 end-to-end training of GPT-2 small and medium at the library's update ratio, the other GPU
# benchmarks where they exist (the hook below), then one summary.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # OUT_DIR (default: $OUT, else gpu_check_out) gets logs and JSON
#
# Needs only what such a machine has (torch, triton, transformers, pytest): the package is installed without its
# dependencies, and nothing here imports datasets or evaluate. Offline is fine. Every step runs under a timeout cut
# from one budget (BUDGET_S, 460 s), keeping back the time of the steps after it, so the whole script ends in time.
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd -P)"
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the compiled kernels, not the interpreter
budget=${BUDGET_S:-460}
start=$SECONDS
status=0
declare -A rc took

# Hook scripts (written separately): run if present, each with its own timeout; their time is kept back from ours.
hooks=("bench_generate.py:90" "bench_overhead.py:60")
hook_reserve=0
for hook in "${hooks[@]}"; do [ -f "benchmarks/${hook%%:*}" ] && hook_reserve=$((hook_reserve + ${hook##*:})); done

# run_step NAME CAP RESERVE CMD...: CMD under min(CAP, what the budget leaves after RESERVE s), output in NAME.log
run_step() {
  local name=$1 cap=$2 reserve=$3; shift 3
  local left=$((budget - (SECONDS - start) - reserve)) t0=$SECONDS
  local limit=$((left < cap ? left : cap))
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped, the budget is spent" | tee "$out/$name.log"; rc[$name]=skipped; status=1; return
  fi
  echo "== $name (timeout ${limit} s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  rc[$name]=${PIPESTATUS[0]}
  took[$name]=$((SECONDS - t0))
  case ${rc[$name]} in 124 | 137) echo "== $name: TIMED OUT after ${limit} s" | tee -a "$out/$name.log" ;; esac
  [ "${rc[$name]}" = 0 ] || status=1
}

# The package: an editable install needs setuptools >= 77 (pyproject's build requirement: its license is an SPDX
# string, which older setuptools reject) and, with --no-build-isolation, pip does not fetch it. Without it, or if
# the install fails, the checkout goes on PYTHONPATH: sparse_nlp.kernels finds the top-level kernels/ folder there,
# and the native CPU kernels are compiled at run time either way.
install="editable install"
if "$py" -c "import sys, setuptools; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null; then
  timeout 120 "$py" -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
    || install="pip install failed ($(tail -1 "$out/install.log" | cut -c1-160)); PYTHONPATH"
else
  install="setuptools $("$py" -c 'import setuptools; print(setuptools.__version__)' 2>/dev/null || echo missing) < 77; PYTHONPATH"
fi
if [ "$install" != "editable install" ]; then
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi
where=$(cd / && "$py" -c "import sparse_nlp.kernels, sparse_nlp; print(sparse_nlp.__file__)" 2>&1) \
  || { echo "sparse_nlp does not import ($install): $where"; exit 1; }
case "$where" in "$repo"/*) ;; *) echo "sparse_nlp imports from $where, not from this checkout ($repo)"; exit 1 ;; esac
echo "package: $install ($where)" | tee "$out/gpu.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$out/gpu.txt"
"$py" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$out/gpu.txt"
echo "budget ${budget} s: tests <= 120 s, kernels ~1 min, training ~1.5-2 min (it prints its estimate), hooks <= $hook_reserve s"

run_step tests 120 $((170 + hook_reserve)) "$py" -m pytest tests/kernels -q -p no:cacheprovider
run_step kernels 150 $((110 + hook_reserve)) "$py" benchmarks/bench_kernels.py --device cuda \
  --output "$out/bench_kernels_gpu.json"
run_step training 240 "$hook_reserve" "$py" benchmarks/bench_training.py --device cuda \
  --output "$out/bench_training_gpu.json"

# ---- HOOK: other GPU benchmarks, each run only if its script exists, with its own timeout ----------------------
# benchmarks/bench_generate.py --device cuda (90 s), benchmarks/bench_overhead.py --device cuda (60 s). To add one,
# append "script.py:timeout_s" to `hooks` at the top; it is called as `script.py --device cuda`.
reserve=$hook_reserve
for hook in "${hooks[@]}"; do
  script=${hook%%:*} cap=${hook##*:}
  [ -f "benchmarks/$script" ] || continue
  reserve=$((reserve - cap))
  run_step "${script%.py}" "$cap" "$reserve" "$py" "benchmarks/$script" --device cuda
done
# ---- end of HOOK ------------------------------------------------------------------------------------------------

echo
echo "== summary ($((SECONDS - start)) s in all; logs and JSON in $out)"
cat "$out/gpu.txt"
steps="tests kernels training"
for hook in "${hooks[@]}"; do script=${hook%%:*}; [ -f "benchmarks/$script" ] && steps+=" ${script%.py}"; done
for name in $steps; do echo "  $name: rc ${rc[$name]:-?}, ${took[$name]:-0} s"; done
echo "tests: $(grep -E '[0-9]+ (passed|failed|error)' "$out/tests.log" | tail -1)"
grep -E '^(FAILED|ERROR) ' "$out/tests.log" | sed 's/^/  /'
echo "kernels (ms, floor and % of floor per op: $out/kernels.log):"
grep -E '^(device=|measured now|summary |target)' "$out/kernels.log" | sed 's/^/  /' || echo "  (no summary)"
echo "training:"
grep -E '^(plan:|GPT-2|\||target)' "$out/training.log" | sed 's/^/  /' || echo "  (no table)"
for name in $steps; do
  case $name in tests | kernels | training) continue ;; esac
  echo "$name (last lines of $out/$name.log):"
  tail -n 12 "$out/$name.log" | sed 's/^/  /'
done
exit $status
