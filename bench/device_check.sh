#!/usr/bin/env bash
# One GPU session's checks, in one command: build the extension with its CUDA kernels, run the
# kernel tests on CUDA, then the default and e2e benchmark suites. Every phase has its own time
# limit and writes its log (and the bench JSON/PNG, row by row) under $OUT, so a phase that runs
# out of time loses only itself.
#
# Usage, on the GPU machine from the repository root (wheels for the peers that its image lacks
# in .whl/, see README "Benchmarks on a GPU"):
#     OUT=/some/folder GTALIGN_FAST_COMMIT=$(git rev-parse --short HEAD) bash bench/device_check.sh
# Phase limits in seconds can be changed with BUILD_S, TEST_S, BENCH_S and E2E_S.
set -u
OUT=${OUT:?set OUT to a folder for the logs and results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
started=$SECONDS
phase() { echo "== $1 ($((SECONDS - started)) s)"; }

phase environment
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  nvcc --version | tail -2
  $PY -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-200
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt" | head -8

if ls .whl/*.whl >/dev/null 2>&1; then
  phase "peer wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  $PY -c "import trl, liger_kernel; print('trl', trl.__version__, 'liger_kernel ok')" 2>&1 | tail -1
fi
phase "editable install with the CUDA kernels (sm_90, limit ${BUILD_S:=200} s)"
# Editable, as the README says: it also maps the top-level kernels/ to gtalign_fast.kernels.
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) timeout "$BUILD_S" \
  $PY -m pip install --no-deps --no-build-isolation --no-index -e . >"$OUT/build.log" 2>&1
echo "install exit $?"; grep -E "error|warning: " "$OUT/build.log" | head -20
$PY -c "
import torch, gtalign_fast
print('backends on cuda:', gtalign_fast.available_backends('cuda'), gtalign_fast.__file__)
" 2>&1 | tail -3

phase "kernel tests on CUDA (limit ${TEST_S:=150} s)"
timeout "$TEST_S" $PY -m pytest -q -n 16 -p no:cacheprovider --timeout 120 -o addopts="" -rfE --tb=short \
  tests/test_token_logprobs.py tests/test_linear_token_logprobs.py tests/test_welfare_advantages.py \
  tests/test_grpo_loss.py tests/test_sample.py tests/test_sampler.py tests/test_trainer.py \
  >"$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-200 | head -40; tail -1 "$OUT/tests.log"

phase "bench default suite (limit ${BENCH_S:=200} s)"
timeout "$BENCH_S" $PY bench/run.py --suite default --out "$OUT" >"$OUT/bench-default.log" 2>&1
echo "bench exit $?"; grep -E "error" "$OUT/bench-default.log" | cut -c1-200 | head -20

phase "bench e2e suite (limit ${E2E_S:=60} s)"
timeout "$E2E_S" $PY bench/run.py --suite e2e --out "$OUT" >"$OUT/bench-e2e.log" 2>&1
echo "e2e exit $?"; tail -12 "$OUT/bench-e2e.log" | cut -c1-250
phase done
