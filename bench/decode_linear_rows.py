"""How a decode-shaped product's time depends on its rows: weight stream plus FMAs, or the larger?

``decode_linear`` over a model's worth of float32 weights (425 MB, SmolLM2-135M's decoder layers:
more than this machine's L3, so every call streams them from memory) for x of 1, 2, 4, 8 and 16
rows, interleaved rounds; and the same kernel on one L2-resident weight (its compute rate, one
thread). If memory and compute overlapped, the time would stay at the 1-row stream until the FMAs
outgrew it; the rows show instead how much each row adds (README, "Where the time goes").

    python bench/decode_linear_rows.py      # writes bench/results/<device>-decode-linear-rows.json
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ROWS = (1, 2, 4, 8, 16)
WEIGHT_MB = 425
ROUNDS = 3


def _seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    from bench.run import write_side_result
    from gtalign_fast.ops._op import extension_kernel

    linear = extension_kernel("decode_linear", torch.device("cpu"))
    k = 576
    weight = torch.randn(WEIGHT_MB * 10**6 // (4 * k), k)
    stream: dict[int, list[float]] = {m: [] for m in ROWS}
    for _ in range(ROUNDS):
        for m in ROWS:
            x = torch.randn(m, k)
            stream[m].append(_seconds(lambda: linear(x, weight, None), 10))
    rows = []
    for m in ROWS:
        seconds = statistics.median(stream[m])
        rows.append({"rows": m, "ms": seconds * 1e3, "GBps": weight.numel() * 4 / seconds / 1e9,
                     "GFLOPs": 2 * m * weight.numel() / seconds / 1e9})
        print(rows[-1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hot = torch.randn(288, k)  # 663 KB: L2-resident
    hot_gflops = {}
    for m in (8, 16):
        x = torch.randn(m, k)
        hot_gflops[m] = 2 * m * hot.numel() / _seconds(lambda: linear(x, hot, None), 2000) / 1e9
    torch.set_num_threads(threads)
    print("one thread, L2-resident weight, GFLOP/s:", hot_gflops)
    write_side_result("decode-linear-rows", {"weight_MB": WEIGHT_MB, "k": k, "rounds": ROUNDS, "rows": rows,
                                             "hot_one_thread_GFLOPs": hot_gflops})


if __name__ == "__main__":
    main()
