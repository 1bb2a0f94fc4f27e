"""Peak memory of one GRPO step on SmolLM2-135M-Instruct, each trainer in a fresh process.

``bench/run.py --suite real`` reads peak memory as the rise of the process's resident set during
one call, in one process that ran other cases before: pages the allocator kept from earlier calls
hide part of the peak (its ``peak_extra_MiB`` of the real GRPO rows are not comparable). Here each
variant runs in its own process: the trainer is built, one warm-up step runs (the optimizer state
exists after it), the high-water mark is reset (``/proc/self/clear_refs``) and two more steps
run; the row gives the process's absolute peak resident set (``VmHWM``, model, optimizer state and
all) and the two steps' times. Same data and config as the real suite's ``real_grpo_step`` rows.

    python bench/real_peak_rss.py            # writes bench/results/<device>-real-peak-rss.json

Linux only (``/proc``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# ours as the trainer defaults, without gradient checkpointing, without the shared prompt forward; TRL's
VARIANTS = {"gtalign_fast": {}, "gtalign_fast[no-recompute]": {"gradient_checkpointing": False},
            "gtalign_fast[no-share]": {"share_prompt_prefix": False}, "trl": None}


def _measure(variant: str) -> dict:
    import torch

    from bench import cases_real
    from bench.run import _rss_kib

    device = torch.device("cpu")
    extra: dict = {}
    if variant == "trl":
        step = cases_real._trl_step(device, extra)()
    else:
        step = cases_real._our_step(device, extra, **VARIANTS[variant])()
    step()  # warm-up
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _rss_kib("VmRSS")
    seconds = []
    for _ in range(2):
        begin = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - begin)
    peak = _rss_kib("VmHWM")
    return {"provider": variant, "peak_rss_MiB": peak / 1024, "rss_before_MiB": before / 1024,
            "peak_over_before_MiB": (peak - before) / 1024, "step_s": seconds}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--variant":
        print(json.dumps(_measure(sys.argv[2])))
        return
    from bench.cases_real import GRPO
    from bench.run import write_side_result

    rows = []
    for variant in VARIANTS:  # one fresh process each
        out = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    write_side_result("real-peak-rss", {"grpo": GRPO, "rows": rows})


if __name__ == "__main__":
    main()
