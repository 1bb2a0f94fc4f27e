"""Benchmark rows for one GRPO training step (suite ``e2e``): our trainer vs TRL's GRPOTrainer.

Same randomly initialised Qwen2-shaped model, prompts, lengths, seed and reward for every
provider. The step is split into its phases, one row each, so the table shows where time goes:

``grpo_step``        one whole optimizer step (generation + scoring + update)
``grpo_generation``  sampling ``num_generations`` completions per prompt (KV cache, SteeringSampler)
``grpo_scoring``     reward functions + the fused welfare / advantage op
``grpo_update``      the micro-batched policy update (fused LM head + GRPO loss, backward, AdamW)
``grpo_decode_step`` the sampler alone (timed: one whole generation); ``extra`` holds one decode
                     step's time (from two generation lengths, so the prefill cancels out) against
                     its floor: the bytes of bf16 weights and of the KV cache read per step over the
                     measured device copy bandwidth (``decode_floor_ms``, ``decode_of_floor``)

Peers: TRL's ``GRPOTrainer`` step (``trl``, one ``trainer.train()`` of one step; its first call,
the warm-up, runs in ``make`` with its own time budget, ``GTALIGN_E2E_TRL_WARMUP_S``, default 240 s,
so a slow warm-up is a row that says so instead of a suite that runs out of time), and
transformers' ``model.generate`` for the generation phase alone (``hf-generate``, the same model,
prompts, lengths and sampling settings). Rows carry ``tokens_per_s`` (median of their timed calls).

Every completion has exactly ``max_completion_length`` tokens (the tokenizer's EOS lies outside the
model's vocabulary, so it is never sampled): ``extra["tokens_per_step"]`` divided by the median
time is the step's throughput in tokens/s. ``flops`` counts model FLOPs (2 N D to generate and
score, 6 N D to train, N = parameters, D = tokens) so the TFLOP/s column is comparable across
providers. Peak memory is what ``bench/run.py`` measures around one call.

CPU: a tiny (hidden 64) and a small (hidden 256) model. CUDA: a Qwen2.5-0.5B-shaped model
(vocabulary 151936), bf16 autocast, 8 prompts x 8 completions of 256 tokens.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from bench.common import Case, missing, skipped

OPS = ("grpo_step", "grpo_generation", "grpo_scoring", "grpo_update")
TRL_WARMUP_S = float(os.environ.get("GTALIGN_E2E_TRL_WARMUP_S", "240"))


@dataclass(frozen=True)
class Setup:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    prompts: int
    generations: int
    prompt_len: int
    completion_len: int
    bf16: bool

    @property
    def completions(self) -> int:
        return self.prompts * self.generations

    def shape(self) -> dict:
        return {"model": self.name, "H": self.hidden, "layers": self.layers, "V": self.vocab,
                "prompts": self.prompts, "G": self.generations, "P": self.prompt_len, "C": self.completion_len}


def _setups(device: torch.device) -> list[Setup]:
    if device.type == "cuda":
        return [Setup("qwen2.5-0.5b-shaped", 896, 24, 14, 2, 4864, 151936, 8, 8, 64, 256, True)]
    return [
        Setup("tiny", 64, 2, 4, 2, 128, 512, 2, 8, 16, 32, False),
        Setup("small", 256, 4, 4, 2, 768, 8192, 2, 8, 32, 48, False),
    ]


# ---------------------------------------------------------------------------------------------
# Shared inputs: tokenizer, model, data, reward


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, **{f"w{i}": i for i in range(1, vocab)}, "<eos>": vocab}  # EOS is never sampled
    core = Tokenizer(WordLevel(words, unk_token="<pad>"))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>")


def _model(setup: Setup, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=setup.vocab, hidden_size=setup.hidden, intermediate_size=setup.intermediate,
        num_hidden_layers=setup.layers, num_attention_heads=setup.heads, num_key_value_heads=setup.kv_heads,
        max_position_embeddings=setup.prompt_len + setup.completion_len + 8, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=None, attn_implementation="sdpa",  # the sampler reads EOS from the tokenizer
    )
    return Qwen2ForCausalLM(config)


def _dataset(setup: Setup, rows: int = 64) -> list[dict]:
    rng = random.Random(0)
    def prompt() -> str:
        return " ".join(f"w{rng.randrange(1, setup.vocab)}" for _ in range(setup.prompt_len))

    return [{"prompt": prompt()} for _ in range(rows)]


def distinct_tokens(completion_ids, **_) -> list[float]:
    """A cheap reward with spread: the fraction of distinct tokens in the completion."""
    return [len(set(ids)) / max(1, len(ids)) for ids in completion_ids]


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _flops(setup: Setup, n_params: int, phase: str) -> float:
    tokens = setup.completions * (setup.prompt_len + setup.completion_len)
    per_phase = {"grpo_generation": 2, "grpo_scoring": 0, "grpo_update": 6, "grpo_step": 8}
    return float(per_phase[phase] * n_params * tokens)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _with_throughput(fn, extra: dict, tokens: int, device: torch.device):
    """``fn`` that also writes ``extra["tokens_per_s"]``: ``tokens`` over the median of its calls."""
    times: list[float] = []

    def timed():
        _sync(device)
        begin = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - begin)
        extra["tokens_per_s"] = tokens / statistics.median(times)
        return result

    return timed


# ---------------------------------------------------------------------------------------------
# Ours


def _our_trainer(setup: Setup, device: torch.device):
    from gtalign_fast import GRPOConfig, GRPOTrainer

    tokenizer = _tokenizer(setup.vocab)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="gtalign_e2e_"), max_steps=10**6, logging_steps=10**6, save_steps=0,
        num_generations=setup.generations, per_device_train_batch_size=setup.completions,
        max_completion_length=setup.completion_len, max_prompt_length=None, bf16=setup.bf16,
        gradient_checkpointing=False, use_cpu=device.type == "cpu", disable_tqdm=True, seed=0,
    )
    return GRPOTrainer(_model(setup, tokenizer), distinct_tokens, args=args, train_dataset=_dataset(setup),
                       processing_class=tokenizer)


def _ours(setup: Setup, device: torch.device, phase: str, extra: dict):
    def make():
        return _with_throughput(_ours_closure(setup, device, phase), extra, _phase_tokens(setup, phase), device)

    return make


def _phase_tokens(setup: Setup, phase: str) -> int:
    """Tokens a phase handles: completions for generation, prompt + completion tokens otherwise."""
    if phase in ("grpo_generation", "grpo_decode_step"):
        return setup.completions * setup.completion_len
    return setup.completions * (setup.prompt_len + setup.completion_len)


def _ours_closure(setup: Setup, device: torch.device, phase: str):
    trainer = _our_trainer(setup, device)
    rows = trainer._process_rows(0)
    prompts = [row["prompt"] for row in rows]

    def step():
        metrics = trainer._training_step()
        trainer.step += 1
        return metrics

    if phase == "grpo_step":
        return step
    if phase == "grpo_generation":
        return lambda: trainer._generate(prompts, 0)
    gen = trainer._generate(prompts, 0)
    completion_ids = [ids[m.bool()].tolist() for ids, m in zip(gen.completion_ids, gen.completion_mask)]
    if phase == "grpo_scoring":
        return lambda: trainer._advantages(trainer._score(prompts, rows, completion_ids))
    step()  # makes the rollout of batch 0 (and trains on it once)
    # every later step reuses that rollout (as with num_iterations > 1, but without old log-probs,
    # like a num_iterations = 1 step): what is timed is the policy update alone
    trainer.args.num_iterations = 10**9
    return step


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Measured device copy bandwidth in bytes/s (a ``copy_`` of ``nbytes``, read + write counted).

    ``nbytes`` defaults to 1 GiB on CUDA and 64 MiB elsewhere (the default suite stays quick); a
    floor for reading data larger than the caches must pass at least that data's size (a CPU's L3
    can hold 64 MiB, which then measures the cache, not memory)."""
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 1 << 26
    source = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    _sync(device)
    times = []
    for _ in range(5):
        begin = time.perf_counter()
        target.copy_(source)
        _sync(device)
        times.append(time.perf_counter() - begin)
    return 2 * nbytes / min(times)


def decode_floor_bytes(setup: Setup, n_params: int, context: int) -> float:
    """Bytes one decode step must read at least: the bf16 weights once, and every lane's bf16 KV
    cache over ``context`` columns (K and V, every layer)."""
    head_dim = setup.hidden // setup.heads
    kv = setup.completions * setup.layers * 2 * setup.kv_heads * head_dim * context * 2
    return 2.0 * n_params + kv


def _decode_step(setup: Setup, device: torch.device, extra: dict):
    """The sampler alone; ``extra`` gets the per-step time from two generation lengths and its floor."""
    def make():
        trainer = _our_trainer(setup, device)
        prompts = trainer._tokenize_prompts([row["prompt"] for row in trainer._process_rows(0)])
        sampler, args = trainer.sampler, trainer.args

        def generate(new_tokens: int):
            with trainer._autocast():
                return sampler.generate(prompts, max_new_tokens=new_tokens, temperature=args.temperature,
                                        num_return_sequences=setup.generations, seed=0,
                                        slots=args.max_num_seqs)

        short = max(1, setup.completion_len // 8)
        seconds = {}
        for new_tokens in (short, setup.completion_len, short, setup.completion_len):  # second pair: warm
            _sync(device)
            begin = time.perf_counter()
            generate(new_tokens)
            _sync(device)
            seconds[new_tokens] = time.perf_counter() - begin
        step = (seconds[setup.completion_len] - seconds[short]) / (setup.completion_len - short)
        bandwidth = copy_bandwidth(device)
        n_params = _parameters(trainer.model)
        floor = decode_floor_bytes(setup, n_params, setup.prompt_len + setup.completion_len // 2) / bandwidth
        extra.update(decode_step_ms=step * 1e3, decode_floor_ms=floor * 1e3, decode_of_floor=floor / step,
                     copy_GBps=bandwidth / 1e9, kv_cache="static" if sampler._use_static(device) else "dynamic",
                     cuda_graph=sampler.cuda_graph and device.type == "cuda")
        tokens = _phase_tokens(setup, "grpo_decode_step")
        return _with_throughput(lambda: generate(setup.completion_len), extra, tokens, device)

    return make


# ---------------------------------------------------------------------------------------------
# transformers' generate, the generation phase alone


def _hf_generate(setup: Setup, device: torch.device, extra: dict):
    def make():
        tokenizer = _tokenizer(setup.vocab)
        model = _model(setup, tokenizer).to(device).eval()
        rows = _dataset(setup)[: setup.prompts]
        tokenizer.padding_side = "left"
        encoded = tokenizer([row["prompt"] for row in rows], return_tensors="pt", padding=True).to(device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.bf16)

        @torch.no_grad()
        def generate():
            with autocast:
                return model.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                      num_return_sequences=setup.generations, max_new_tokens=setup.completion_len,
                                      min_new_tokens=setup.completion_len, pad_token_id=0)

        return _with_throughput(generate, extra, _phase_tokens(setup, "grpo_generation"), device)

    return make


# ---------------------------------------------------------------------------------------------
# TRL (when installed): one trainer.train() call of one step on the same model, data and reward


def _trl(setup: Setup, device: torch.device, extra: dict):
    def make():
        import datasets
        from trl import GRPOConfig as TRLConfig
        from trl import GRPOTrainer as TRLTrainer

        tokenizer = _tokenizer(setup.vocab)
        args = TRLConfig(
            output_dir=tempfile.mkdtemp(prefix="trl_e2e_"), max_steps=1, logging_steps=10**6, save_strategy="no",
            report_to="none", num_generations=setup.generations, per_device_train_batch_size=setup.completions,
            max_completion_length=setup.completion_len, bf16=setup.bf16, gradient_checkpointing=False,
            use_cpu=device.type == "cpu", seed=0, disable_tqdm=True,
        )
        trainer = TRLTrainer(model=_model(setup, tokenizer), reward_funcs=distinct_tokens, args=args,
                             train_dataset=datasets.Dataset.from_list(_dataset(setup)), processing_class=tokenizer)
        # With tqdm disabled, transformers prints every log dict to stdout: keep the table readable.
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        _sync(device)
        begin = time.perf_counter()
        trainer.train()  # the warm-up, inside its own budget
        _sync(device)
        warmup = time.perf_counter() - begin
        extra["trl_warmup_s"] = warmup
        if warmup > TRL_WARMUP_S:
            raise TimeoutError(f"TRL's warm-up step took {warmup:.0f} s, over GTALIGN_E2E_TRL_WARMUP_S = "
                               f"{TRL_WARMUP_S:.0f} s: not timed again")
        return _with_throughput(trainer.train, extra, _phase_tokens(setup, "grpo_step"), device)

    return make


def cases(device: torch.device, suite: str) -> list[Case]:
    if suite != "e2e":
        return []
    out: list[Case] = []
    for setup in _setups(device):
        n_params = _parameters(_model(setup, _tokenizer(setup.vocab)))
        dtype = "bf16-autocast" if setup.bf16 else "float32"
        extra = {"tokens_per_step": setup.completions * (setup.prompt_len + setup.completion_len),
                 "completion_tokens_per_step": setup.completions * setup.completion_len, "parameters": n_params}
        for phase in OPS:
            row = dict(extra)
            out.append(Case(phase, "gtalign_fast", "full", setup.shape(), dtype, _ours(setup, device, phase, row),
                            flops=_flops(setup, n_params, phase), extra=row))
        row = dict(extra)
        out.append(Case("grpo_decode_step", "gtalign_fast", "full", setup.shape(), dtype,
                        _decode_step(setup, device, row), flops=_flops(setup, n_params, "grpo_generation"), extra=row))
        row = {**extra, "note": "transformers model.generate, same model, prompts, lengths and sampling"}
        out.append(Case("grpo_generation", "hf-generate", "full", setup.shape(), dtype,
                        _hf_generate(setup, device, row), flops=_flops(setup, n_params, "grpo_generation"), extra=row))
        reason = missing("trl") or missing("datasets")
        if reason:
            out.extend(skipped("grpo_step", "trl", ["full"], setup.shape(), dtype, reason))
        else:
            row = {**extra, "note": "one trainer.train() call with max_steps=1"}
            out.append(Case("grpo_step", "trl", "full", setup.shape(), dtype, _trl(setup, device, row),
                            flops=_flops(setup, n_params, "grpo_step"), extra=row))
    return out
