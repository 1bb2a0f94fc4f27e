"""Helper of tests/test_integration_trl_distributed.py: train TRL's GRPOTrainer, patched and unpatched, and save what
the step did. Run by that test, once as one plain process and once under ``accelerate launch --multi_gpu
--num_processes 2`` (two CPU processes, gloo, DDP as TRL sets it up); not a test module itself.

    python tests/trl_distributed_run.py MODEL_DIR OUT_DIR

Every process writes ``OUT_DIR/rank<r>.pt``: per configuration and per side (``"trl"``, ``"ours"``), the parameters
before and after training, the gradients the optimizer saw at each step, the prompts this process generated for,
the per-step logs, how often our ops ran, and the type of ``trainer.model_wrapped``.

Both layouts see the same global batch of 8 completions per optimizer step (2 prompts x 4 generations): one process
takes ``per_device_train_batch_size = 8 / gradient_accumulation_steps``, two take half that, and TRL's accelerate
data loader gives each of the two processes one whole prompt group of the generation batch. The rollout does not
depend on the layout: completions and the perturbation of the old log-probs are functions of (prompt, completion,
occurrence) only, never of a random stream that the layout would split differently.
"""

from __future__ import annotations

import gc
import os
import sys
import zlib
from collections import Counter

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

# Run as a script from the repository root: make `tests` and the worktree's gtalign_fast importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gtalign_fast import ops  # noqa: E402
from gtalign_fast.integrations import trl as integration  # noqa: E402
from tests.test_integration_trl import (  # noqa: E402
    COMPLETION_LEN,
    GENERATIONS,
    VOCAB,
    _dataset,
    _distinct_tokens,
    _perturb_reference,
    _tokenizer,
)

GLOBAL_BATCH = 8  # completions per optimizer step, all processes together: 2 prompts x GENERATIONS
STEPS = 2  # optimizer steps; with num_iterations=2 both train on one generation batch (the second is off-policy)

SALT = 0  # part of every seed; with it the two prompt groups differ in token count (the test asserts it)
# name -> (GRPOConfig overrides, gradient_accumulation_steps)
CONFIGS: dict[str, tuple[dict, int]] = {
    # the global token count (num_items_in_batch) normalises; the KL and the reference model's fused head; two
    # micro-batches per step, so DDP must skip the reduction of the first (no_sync) and reduce the sum once
    "dapo-token-kl-accum2": (dict(loss_type="dapo", importance_sampling_level="token", beta=0.1), 2),
    # GSPO: sequence-level ratios, per-sequence means averaged over the batch
    "grpo-sequence": (dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.0), 1),
    # bnpo divides by the tokens of each process's micro-batch: TRL's own 2-process step is not its 1-process
    # step; patched and unpatched must still agree with each other
    "bnpo-token-kl": (dict(loss_type="bnpo", importance_sampling_level="token", beta=0.1), 1),
}


def _seed(*parts) -> int:
    """A seed from the content, the same in every process and every layout."""
    return zlib.crc32(repr((SALT, *parts)).encode())


def _fixed_generation(trainer, seen: list):
    """Completions as a function of (prompt ids, occurrence of that prompt in the call, call number)."""
    calls = [0]

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        calls[0] += 1
        seen.extend(tuple(ids) for ids in prompt_ids)
        occurrence: Counter = Counter()
        completions = []
        for ids in prompt_ids:
            key = tuple(int(i) for i in ids)
            rng = torch.Generator().manual_seed(_seed(key, occurrence[key], calls[0]))
            occurrence[key] += 1
            n = int(torch.randint(1, COMPLETION_LEN + 1, (1,), generator=rng))
            out = torch.randint(1, VOCAB - 1, (n,), generator=rng).tolist()
            if n < COMPLETION_LEN and bool(torch.rand((), generator=rng) < 0.5):
                out.append(VOCAB - 1)
            completions.append(out)
        return completions, None

    trainer._generate_single_turn = generate


def _perturbed_old_logps(trainer, lengths: list):
    """Shift the old log-probs (per token and per sequence) so the clip bites; the shift depends on the row's ids."""
    original = trainer._generate_and_score_completions

    def wrapped(batch):
        out = original(batch)
        lengths.extend(out["completion_mask"].sum(1).tolist())
        old = out["old_per_token_logps"]  # num_iterations=2: TRL computes them
        noise = torch.zeros_like(old)
        for row in range(old.shape[0]):
            prompt = out["prompt_ids"][row][out["prompt_mask"][row].bool()].tolist()
            completion = out["completion_ids"][row][out["completion_mask"][row].bool()].tolist()
            rng = torch.Generator().manual_seed(_seed(prompt, completion))
            per_token = torch.randn(COMPLETION_LEN, generator=rng, dtype=old.dtype) * 0.3
            noise[row] = per_token[: old.shape[1]] + torch.randn((), generator=rng, dtype=old.dtype) * 0.3
        out["old_per_token_logps"] = old + noise
        return out

    trainer._generate_and_score_completions = wrapped


def _counting(name: str, counts: Counter):
    """Wrap ops.<name> (what the patch calls) with a call counter."""
    original = getattr(ops, name)

    def counted(*args, **kwargs):
        counts[name] += 1
        return original(*args, **kwargs)

    return original, counted


def run(model_dir: str, output_dir: str, name: str, *, patch: bool) -> dict:
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    overrides, accumulation = CONFIGS[name]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = GRPOConfig(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // (world * accumulation),
        gradient_accumulation_steps=accumulation, num_generations=GENERATIONS, max_completion_length=COMPLETION_LEN,
        num_iterations=2, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, lr_scheduler_type="constant",
        report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True,
        epsilon_high=0.28, bf16=False, use_bias_correction_kl=False, **overrides,
    )
    assert args.generation_batch_size == GLOBAL_BATCH and args.steps_per_generation == accumulation, args
    trainer = GRPOTrainer(model=model_dir, reward_funcs=_distinct_tokens, args=args, train_dataset=_dataset(),
                          processing_class=_tokenizer())
    trainer.remove_callback(PrinterCallback)
    if trainer.ref_model is not None:
        _perturb_reference(trainer)
    if patch:
        integration.patch_grpo_trainer(trainer)
    seen: list = []
    _fixed_generation(trainer, seen)
    lengths: list = []
    _perturbed_old_logps(trainer, lengths)

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    grads: list[dict] = []

    def capture(optimizer, args, kwargs):
        grads.append({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

    counts: Counter = Counter()
    originals = {op: _counting(op, counts) for op in ("linear_token_logprobs", "grpo_loss")}
    for op, (_, counted) in originals.items():
        setattr(ops, op, counted)
    handle = register_optimizer_step_pre_hook(capture)
    try:
        trainer.train()
    finally:
        handle.remove()
        for op, (original, _) in originals.items():
            setattr(ops, op, original)
    return {
        "world": trainer.accelerator.num_processes,
        "wrapper": type(trainer.model_wrapped).__name__,
        "before": before,
        "after": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        "grads": grads,
        "seen": seen,
        "lengths": lengths,
        "logs": [dict(entry) for entry in trainer.state.log_history if "loss" in entry],
        "counts": dict(counts),
        "path": getattr(trainer, "gtalign_logprob_path", None),
    }


def main(model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    results = {name: {side: run(model_dir, os.path.join(out_dir, f"{name}-{side}"), name, patch=side == "ours")
                      for side in ("trl", "ours")}
               for name in CONFIGS}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # Free the last trainer's DDP wrapper (in reference cycles) while Python still runs: alive at
    # finalisation it can abort the process (gtalign_fast.training.distributed.release_ddp_at_exit).
    gc.collect()


if __name__ == "__main__":
    main(*sys.argv[1:3])
