"""Where a generation's time goes on SmolLM2-135M-Instruct (CPU): the loop that ``perf`` samples.

Loads the model, warms the sampler up, writes ``/tmp/gtalign_generation_ready`` and then runs
``SteeringSampler.generate`` (8 chat prompts x 64 new tokens, mode off, static cache, the real
suite's prompts) eight times. Profile it from outside once the marker exists (model loading is
left out), as the committed ``bench/results/*-real-generation-perf.txt`` was made:

    rm -f /tmp/gtalign_generation_ready
    python bench/real_generation_profile.py & while [ ! -f /tmp/gtalign_generation_ready ]; do sleep 0.2; done
    perf record -e cpu-clock -F 2000 -p $! -o /tmp/perf.data -- sleep 12
    perf report -i /tmp/perf.data --sort dso,symbol --no-children
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

READY = "/tmp/gtalign_generation_ready"


def main() -> None:
    from bench import cases_real
    from gtalign_fast.recipes import smollm2
    from gtalign_fast.sampling.sampler import SteeringSampler

    tokenizer = smollm2.load_tokenizer()
    sampler = SteeringSampler(smollm2.load_model(), tokenizer, mode="off", cache="static")
    prompts = cases_real._chat_prompts(tokenizer, 8)
    with torch.no_grad():
        sampler.generate(prompts, max_new_tokens=4, temperature=1.0, seed=0)  # warm-up
        with open(READY, "w") as marker:
            marker.write("ready")
        for _ in range(8):
            sampler.generate(prompts, max_new_tokens=cases_real.NEW_TOKENS, temperature=1.0, seed=0)


if __name__ == "__main__":
    main()
