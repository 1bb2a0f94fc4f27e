#!/usr/bin/env bash
# One GPU session's checks: build the extension with its CUDA kernels, run the kernel tests on CUDA,
# then the benchmark suites. Every phase has its own time limit and writes its log (and the bench
# JSON/PNG, row by row) under $OUT, so a phase that runs out of time loses only itself.
#
# Usage, on the GPU machine from the repository root (wheels for the peers that its image lacks
# in .whl/, see README "Benchmarks on a GPU"):
#     OUT=/some/folder GTALIGN_FAST_COMMIT=$(git rev-parse --short HEAD) bash bench/device_check.sh
# A device lent for minutes takes two calls of at most 10 minutes each (the second leaves `build`
# out: the build stays between calls on a warm machine only; on a fresh one, add `build` back):
#     PHASES="build tests bench"   bash bench/device_check.sh      # about 8 minutes
#     PHASES="lmhead e2e trl"      bash bench/device_check.sh      # about 9 minutes
# Phases: build, tests, bench (the default suite's token_logprobs, grpo_loss with the logits -> GRPO loss
# rows vs Liger, welfare_advantages, sample, steering), lmhead (linear_token_logprobs and linear_grpo_loss
# with their bare GEMMs), e2e (trainer step, generation vs
# HF generate and TRL), trl (TRL's GRPOTrainer step, patched vs not). Limits in seconds: BUILD_S,
# TEST_S, BENCH_S, LMHEAD_S, E2E_S, TRL_S; all phases of one call together: TOTAL_S (580).
set -u
OUT=${OUT:?set OUT to a folder for the logs and results}
PHASES=${PHASES:-build tests bench lmhead e2e trl}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
started=$SECONDS
phase() { echo "== $1 ($((SECONDS - started)) s)"; }
wants() { [[ " $PHASES " == *" $1 "* ]]; }
# One device call runs at most 600 s, and the phase limits of one call add up to more (lmhead + e2e + trl:
# 650 s): each phase gets at most what is left of TOTAL_S, so the last one ends on its own timeout, logged,
# instead of the whole call being killed.
TOTAL_S=${TOTAL_S:-580}
limit() { local left=$((TOTAL_S - (SECONDS - started))); echo $((left < $1 ? (left > 10 ? left : 10) : $1)); }

phase environment
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  nvcc --version | tail -2
  $PY -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-200
} >"$OUT/environment.txt" 2>&1
head -8 "$OUT/environment.txt"

if ls .whl/*.whl >/dev/null 2>&1; then
  phase "peer wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  $PY -c "import trl, liger_kernel; print('trl', trl.__version__, 'liger_kernel ok')" 2>&1 | tail -1
fi

if wants build; then
  phase "editable install with the CUDA kernels (sm_90, limit ${BUILD_S:=200} s)"
  # Editable, as the README says: it also maps the top-level kernels/ to gtalign_fast.kernels.
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) timeout "$(limit "$BUILD_S")" \
    $PY -m pip install --no-deps --no-build-isolation --no-index -e . >"$OUT/build.log" 2>&1
  echo "install exit $?"; grep -E "error|warning: " "$OUT/build.log" | head -20
fi
$PY -c "
import torch, gtalign_fast
print('backends on cuda:', gtalign_fast.available_backends('cuda'), gtalign_fast.__file__)
" 2>&1 | tail -3

if wants tests; then
  phase "kernel tests on CUDA (limit ${TEST_S:=170} s)"
  # test_device_checks runs every op forward and backward under torch.cuda.set_sync_debug_mode("error");
  # test_op_safety feeds out-of-range ids and offsets and checks nothing outside the tensors changed.
  timeout "$(limit "$TEST_S")" $PY -m pytest -q -n 16 -p no:cacheprovider --timeout 120 -o addopts="" -rfE --tb=short \
    tests/test_device_checks.py tests/test_op_safety.py tests/test_op.py \
    tests/test_token_logprobs.py tests/test_linear_token_logprobs.py tests/test_welfare_advantages.py \
    tests/test_grpo_loss.py tests/test_logits_grpo_loss.py tests/test_linear_grpo_loss.py \
    tests/test_sample.py tests/test_rollout_fast.py tests/test_sampler.py tests/test_trainer.py \
    tests/test_prompt_sharing.py \
    >"$OUT/tests.log" 2>&1
  echo "tests exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-200 | head -40; tail -1 "$OUT/tests.log"
fi

if wants bench; then
  phase "bench default suite without the LM-head ops (limit ${BENCH_S:=200} s)"
  timeout "$(limit "$BENCH_S")" $PY bench/run.py --suite default --ops token_logprobs,grpo_loss,welfare_advantages,sample,steering \
    --out "$OUT" >"$OUT/bench-default.log" 2>&1
  echo "bench exit $?"; grep -E "error" "$OUT/bench-default.log" | cut -c1-200 | head -20
fi

if wants lmhead; then
  phase "bench LM-head rows (limit ${LMHEAD_S:=200} s)"
  timeout "$(limit "$LMHEAD_S")" $PY bench/run.py --suite default --ops linear_token_logprobs,linear_grpo_loss \
    --tag lm-head --out "$OUT" >"$OUT/bench-lm-head.log" 2>&1
  echo "lm-head bench exit $?"
  grep -E "bare-gemms|gemm-floor|gtalign_fast\[(triton|cuda)\]|liger|torch-(eager|compile)" "$OUT/bench-lm-head.log" | cut -c1-220
fi

if wants e2e; then
  phase "bench e2e suite (limit ${E2E_S:=300} s)"
  GTALIGN_E2E_TRL_WARMUP_S=${GTALIGN_E2E_TRL_WARMUP_S:-150} timeout "$(limit "$E2E_S")" \
    $PY bench/run.py --suite e2e --out "$OUT" >"$OUT/bench-e2e.log" 2>&1
  echo "e2e exit $?"; tail -14 "$OUT/bench-e2e.log" | cut -c1-250
fi

if wants trl; then
  phase "bench TRL step, patched vs not (limit ${TRL_S:=150} s)"
  timeout "$(limit "$TRL_S")" $PY bench/run.py --suite trl --out "$OUT" >"$OUT/bench-trl.log" 2>&1
  echo "trl exit $?"; tail -8 "$OUT/bench-trl.log" | cut -c1-250
fi
phase done
