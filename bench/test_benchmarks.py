"""The bench/run.py cases, collectable by pytest-benchmark for users who track regressions:

    pip install pytest-benchmark
    pytest bench/ --benchmark-only                 # the default suite
    GTALIGN_BENCH_SUITE=full pytest bench/ --benchmark-only

Never part of the test command (timing is not a pass/fail criterion).
"""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("pytest_benchmark")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.run import collect_cases  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = collect_cases(DEVICE, os.environ.get("GTALIGN_BENCH_SUITE", "default"), None)


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{c.op}-{c.provider}-{c.mode}-{c.shape_text()}-{c.dtype}" for c in CASES]
)
def test_bench(case, benchmark):
    if case.skip:
        pytest.skip(case.skip)
    fn = case.make()
    if DEVICE.type == "cuda":
        def synced():
            result = fn()
            torch.cuda.synchronize()
            return result

        benchmark(synced)
    else:
        benchmark(fn)
