"""Benchmark rows for TRL's GRPOTrainer policy update, with and without ``patch_grpo_trainer`` (suite ``trl``).

One row per provider, op ``trl_grpo_update``: ``trainer.compute_loss`` + ``backward`` on one fixed batch (the part
the patch replaces: per-token log-probs with entropy from the LM head, the GRPO loss, their backward through the
model), on the same randomly initialised Qwen2-shaped model, prompts and completions. Generation is replaced by a
fixed draw of full-length completions and done once, untimed. Peak memory is what ``bench/run.py`` measures around
one call (on CUDA, ``max_memory_allocated`` minus what was allocated before: activations, logits chunks, gradients).

Providers: ``trl`` (TRL 1.16's own chunked fused LM head + its loss), ``gtalign_fast[trl-patch]``
(``linear_token_logprobs`` + ``grpo_loss``), ``gtalign_fast[trl-patch,token_logprobs]`` (``fused_lm_head=False``:
the completion rows' logits, then ``token_logprobs``; what soft-capped models run).

CPU: a tiny model (checks the rows run). CUDA: a Qwen2.5-0.5B-shaped model (vocabulary 151936), bf16 autocast,
16 completions of 512 tokens after 64-token prompts, ``loss_type="dapo"``, ``beta=0.04`` (a reference model).
"""

from __future__ import annotations

import random
import tempfile

import torch

from bench.cases_e2e import Setup, _model, _tokenizer, distinct_tokens
from bench.common import Case, missing, skipped

OP = "trl_grpo_update"
PROVIDERS = {"trl": None, "gtalign_fast[trl-patch]": True, "gtalign_fast[trl-patch,token_logprobs]": False}


def _setups(device: torch.device) -> list[Setup]:
    if device.type == "cuda":
        return [Setup("qwen2.5-0.5b-shaped", 896, 24, 14, 2, 4864, 151936, 2, 8, 64, 512, True)]
    return [Setup("tiny", 64, 2, 4, 2, 128, 4096, 2, 4, 16, 32, False)]


def _fixed_generation(setup: Setup):
    """Full-length completions of random tokens (the tokenizer's EOS lies outside the model's vocabulary)."""

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        rng = random.Random(0)
        return [[rng.randrange(1, setup.vocab) for _ in range(setup.completion_len)] for _ in prompt_ids], None

    return generate


def _trainer(setup: Setup, device: torch.device, fused: bool | None):
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from gtalign_fast.integrations.trl import patch_grpo_trainer

    tokenizer = _tokenizer(setup.vocab)
    model_dir = tempfile.mkdtemp(prefix="trl_patch_model_")
    _model(setup, tokenizer).save_pretrained(model_dir)  # beta > 0: TRL loads its reference model from a path
    tokenizer.save_pretrained(model_dir)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_patch_"), max_steps=1, report_to="none", save_strategy="no",
        num_generations=setup.generations, per_device_train_batch_size=setup.completions,
        max_completion_length=setup.completion_len, bf16=setup.bf16, gradient_checkpointing=False,
        use_cpu=device.type == "cpu", seed=0, disable_tqdm=True, loss_type="dapo", beta=0.04,
        use_bias_correction_kl=False,  # not computed by grpo_loss (patch_grpo_trainer refuses it)
    )
    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(1, setup.vocab)}" for _ in range(setup.prompt_len))
               for _ in range(setup.prompts)]
    trainer = GRPOTrainer(model=model_dir, reward_funcs=distinct_tokens, args=args,
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)
    if fused is not None:
        patch_grpo_trainer(trainer, fused_lm_head=fused)
    trainer._generate_single_turn = _fixed_generation(setup)
    return trainer, [{"prompt": p} for p in prompts for _ in range(setup.generations)]


def _update(setup: Setup, device: torch.device, fused: bool | None):
    def make():
        trainer, rows = _trainer(setup, device, fused)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        inputs = trainer._generate_and_score_completions(rows)  # old / ref log-probs, rewards, advantages
        return update_step(trainer, inputs)

    return make


def update_step(trainer, inputs):
    """The timed part of TRL's update: ``compute_loss`` + backward on prepared inputs (grads dropped)."""

    def step():
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        trainer.model.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def cases(device: torch.device, suite: str) -> list[Case]:
    if suite != "trl":
        return []
    out: list[Case] = []
    for setup in _setups(device):
        dtype = "bf16-autocast" if setup.bf16 else "float32"
        tokens = setup.completions * (setup.prompt_len + setup.completion_len)
        reason = missing("trl") or missing("datasets")
        for provider, fused in PROVIDERS.items():
            if reason:
                out.extend(skipped(OP, provider, ["full"], setup.shape(), dtype, reason))
                continue
            out.append(Case(OP, provider, "full", setup.shape(), dtype, _update(setup, device, fused),
                            extra={"tokens_per_step": tokens, "note": "compute_loss + backward on one fixed batch"}))
    return out
