"""Scale out: two processes (gloo, CPU) make the same update as one process on the same data.

Each process gets half of the prompts (whole groups), rewards are gathered for the advantages,
the dapo token count is all-reduced, DDP averages gradients and every micro-batch's loss is
weighted by its share of the global batch; the sum must be exactly the one-process update.

Generation is replaced by a deterministic function of (prompt text, completion index), so both
runs train on the same completions whatever the process layout (sampling seeds depend on the rank).
The optimizer is SGD with lr 1 and no clipping: the parameter change is the gradient itself.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gtalign_fast._trainer_utils import pad_rows
from gtalign_fast.trainer import Generation
from tests.test_trainer import install_missing_ops, toy

GLOBAL_COMPLETIONS = 32  # 4 prompts x 8 generations per step, all processes together
STEPS = 2
CONFIGS = {
    # name: (overrides, gradient_accumulation_steps)
    "dapo-batch": (dict(loss_type="dapo", scale_rewards="batch"), 2),
    "grpo-group": (dict(loss_type="grpo", scale_rewards="group", beta=0.04), 1),
}


def fixed_generate(trainer):
    """Replace sampling by completions that depend only on (prompt text, index, batch)."""
    vocab = len(toy.VOCAB)
    eos, pad = trainer.processing_class.eos_token_id, trainer.processing_class.pad_token_id
    length = trainer.args.max_completion_length

    def generate(prompts, batch_index):
        prompt_ids, prompt_mask = pad_rows(trainer._tokenize_prompts(prompts), pad, left=True, dtype=torch.long,
                                           device=trainer.device)
        g = trainer.args.num_generations
        ids = torch.full((len(prompts) * g, length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        finished = torch.zeros(len(prompts) * g, dtype=torch.bool)
        for p, prompt in enumerate(prompts):
            for j in range(g):
                row = p * g + j
                rng = torch.Generator().manual_seed(zlib.crc32(f"{prompt}|{j}|{batch_index}".encode()))
                n = int(torch.randint(1, length + 1, (1,), generator=rng))
                ids[row, :n] = torch.randint(2, vocab, (n,), generator=rng)
                if bool(torch.rand((), generator=rng) < 0.5):
                    ids[row, n - 1] = eos
                    finished[row] = True
                mask[row, :n] = 1
        mask = mask.to(trainer.device)
        return Generation(
            prompt_ids.repeat_interleave(g, 0), prompt_mask.repeat_interleave(g, 0), ids.to(trainer.device),
            mask, mask, finished.to(trainer.device), [None] * len(finished),
        )

    trainer._generate = generate


def train_config(name: str, world: int, output_dir: str) -> dict[str, torch.Tensor]:
    overrides, accumulation = CONFIGS[name]
    per_process = GLOBAL_COMPLETIONS // world
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, seed=0)
    args = toy.toy_config(
        output_dir, STEPS, seed=0, per_device_train_batch_size=per_process // accumulation,
        gradient_accumulation_steps=accumulation, max_grad_norm=0.0, **overrides,
    )
    trainer = toy.GRPOTrainer(
        model, [toy.ToyWelfareReward(tokenizer)], args=args, train_dataset=toy.build_dataset(32, 0),
        processing_class=tokenizer, optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None),
    )
    fixed_generate(trainer)
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def _worker(rank: int, world: int, directory: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    try:
        install_missing_ops()
        results = {name: train_config(name, world, os.path.join(directory, name)) for name in CONFIGS}
        if rank == 0:
            torch.save(results, os.path.join(directory, "two_processes.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_processes_make_the_same_update_as_one(tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    two = torch.load(tmp_path / "two_processes.pt")
    install_missing_ops(monkeypatch)
    before = {k: v.detach().clone() for k, v in toy.build_model(toy.build_tokenizer(), seed=0).named_parameters()}
    for name in CONFIGS:
        one = train_config(name, 1, str(tmp_path / f"one-{name}"))
        moved = max(float((one[k] - before[k]).abs().max()) for k in one)
        assert moved > 1e-4, f"{name}: the update did not move the parameters"
        for key in one:
            torch.testing.assert_close(two[name][key], one[key], atol=2e-6, rtol=1e-4, msg=f"{name}: {key}")
    # the metrics were written once (rank 0) per step
    with open(tmp_path / "dapo-batch" / "metrics.jsonl") as handle:
        assert len(handle.readlines()) == STEPS
