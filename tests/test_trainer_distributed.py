"""Scale out: two processes (gloo, CPU) make the same update as one process on the same data.

Each process gets half of the prompts (whole groups), rewards are gathered for the advantages,
the dapo token count is all-reduced, DDP averages gradients and every micro-batch's loss is
weighted by its share of the global batch; the sum must be exactly the one-process update.

Generation is replaced by a deterministic function of (prompt text, completion index), so both
runs train on the same completions whatever the process layout (sampling seeds depend on the rank).
The optimizer is SGD with lr 1 and no clipping: the parameter change is the gradient itself.

The same comparison runs with ``distributed_strategy="fsdp2"`` (FSDP2 ``fully_shard`` on CPU with
gloo, fused LM head, reference model sharded too), plus its rank-0 full-tensor checkpoint and a
resume that re-shards it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import os
import tempfile
import weakref
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gtalign_fast.training.distributed import full_value, release_ddp_at_exit
from gtalign_fast.training.rollout import pad_rows
from gtalign_fast.training.trainer import Generation
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


def make_trainer(name: str, world: int, output_dir: str, sgd: bool = True, **extra):
    overrides, accumulation = CONFIGS[name]
    per_process = GLOBAL_COMPLETIONS // world
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, seed=0)
    args = toy.toy_config(
        output_dir, STEPS, seed=0, per_device_train_batch_size=per_process // accumulation,
        gradient_accumulation_steps=accumulation, max_grad_norm=0.0, use_fused_lm_head=True, **overrides, **extra,
    )
    trainer = toy.GRPOTrainer(
        model, [toy.ToyWelfareReward(tokenizer)], args=args, train_dataset=toy.build_dataset(32, 0),
        processing_class=tokenizer, optimizers=(torch.optim.SGD(model.parameters(), lr=1.0) if sgd else None, None),
    )
    fixed_generate(trainer)
    return trainer


def parameters(trainer) -> dict[str, torch.Tensor]:
    """Full parameter values (FSDP2 holds DTensor shards)."""
    return {k: full_value(v.detach()).clone() for k, v in trainer.model.named_parameters()}


def train_config(name: str, world: int, output_dir: str, **extra) -> dict[str, torch.Tensor]:
    trainer = make_trainer(name, world, output_dir, **extra)
    trainer.train()
    return parameters(trainer)


def sampled(trainer) -> torch.Tensor:
    """Real sampler completions of the first two prompts (batch 0), through the trainer's generation path."""
    prompts = [toy.build_dataset(32, 0)[i]["prompt"] for i in range(2)]
    return toy.GRPOTrainer._generate(trainer, prompts, 0).completion_ids.cpu()


@functools.lru_cache(maxsize=None)
def one_process(name: str) -> dict[str, torch.Tensor]:
    """The one-process, unsharded update both distributed tests compare with (computed once)."""
    install_missing_ops()
    return train_config(name, 1, tempfile.mkdtemp(prefix=f"gtalign-one-{name}-"))


@contextlib.contextmanager
def _process_group(rank: int, world: int, directory: str):
    """A gloo process group rendezvousing through a file in ``directory``."""
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    try:
        install_missing_ops()
        yield
    finally:
        dist.destroy_process_group()


def _spawn_two_processes(worker, tmp_path, monkeypatch) -> None:
    # torchrun variables from the environment would override the spawned ranks
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    mp.spawn(worker, args=(2, str(tmp_path)), nprocs=2, join=True)


def _worker(rank: int, world: int, directory: str) -> None:
    with _process_group(rank, world, directory):
        results = {}
        for name in CONFIGS:
            trainer = make_trainer(name, world, os.path.join(directory, name))
            trainer.train()
            results[name] = parameters(trainer)
            results[f"{name}/ddp_freed"] = _exit_hook_frees_the_ddp_wrapper(trainer)
        if rank == 0:
            torch.save(results, os.path.join(directory, "two_processes.pt"))


def _exit_hook_frees_the_ddp_wrapper(trainer) -> bool:
    """The trainer's exit hook (release_ddp_at_exit) puts the plain policy back and frees the DDP wrapper."""
    wrapper = weakref.ref(trainer.train_logprobs)
    if not isinstance(wrapper(), torch.nn.parallel.DistributedDataParallel):
        return False
    trainer._release_ddp()
    return wrapper() is None and trainer.train_logprobs is trainer.logprobs


@pytest.mark.timeout(300)
def test_two_processes_make_the_same_update_as_one(tmp_path, monkeypatch):
    _spawn_two_processes(_worker, tmp_path, monkeypatch)
    two = torch.load(tmp_path / "two_processes.pt")
    before = {k: v.detach().clone() for k, v in toy.build_model(toy.build_tokenizer(), seed=0).named_parameters()}
    for name in CONFIGS:
        one = one_process(name)
        moved = max(float((one[k] - before[k]).abs().max()) for k in one)
        assert moved > 1e-4, f"{name}: the update did not move the parameters"
        for key in one:
            torch.testing.assert_close(two[name][key], one[key], atol=2e-6, rtol=1e-4, msg=f"{name}: {key}")
        assert two[f"{name}/ddp_freed"], f"{name}: the exit hook left the DDP wrapper alive"
    # the metrics were written once (rank 0) per step
    with open(tmp_path / "dapo-batch" / "metrics.jsonl") as handle:
        assert len(handle.readlines()) == STEPS


def _fsdp_worker(rank: int, world: int, directory: str) -> None:
    with _process_group(rank, world, directory):
        results = {}
        for name in CONFIGS:
            output_dir = os.path.join(directory, name)
            trainer = make_trainer(name, world, output_dir, distributed_strategy="fsdp2", save_steps=STEPS)
            trainer.train()
            results[name] = parameters(trainer)
            results[f"{name}/sampled"] = sampled(trainer)  # generation with the whole model gathered
        # resume: a fresh sharded trainer loads the rank-0 checkpoint and holds the trained weights again
        resumed = make_trainer("dapo-batch", world, os.path.join(directory, "resumed"), distributed_strategy="fsdp2")
        resumed._load_checkpoint(os.path.join(directory, "dapo-batch", f"checkpoint-{STEPS}"))
        results["resumed"] = parameters(resumed)
        # AdamW (sharded state): resuming from step 1 and training step 2 equals the uninterrupted run
        adam_dir = os.path.join(directory, "adam")
        uninterrupted = make_trainer("dapo-batch", world, adam_dir, sgd=False, distributed_strategy="fsdp2",
                                     save_steps=1)
        uninterrupted.train()
        results["adam"] = parameters(uninterrupted)
        again = make_trainer("dapo-batch", world, os.path.join(directory, "adam2"), sgd=False,
                             distributed_strategy="fsdp2")
        again.train(resume_from_checkpoint=os.path.join(adam_dir, "checkpoint-1"))
        results["adam_resumed"] = parameters(again)
        if rank == 0:
            torch.save(results, os.path.join(directory, "fsdp.pt"))


@pytest.mark.timeout(300)
def test_fsdp2_two_processes_make_the_same_update_as_one(tmp_path, monkeypatch):
    _spawn_two_processes(_fsdp_worker, tmp_path, monkeypatch)
    two = torch.load(tmp_path / "fsdp.pt")
    for name in CONFIGS:
        one = one_process(name)
        for key in one:
            torch.testing.assert_close(two[name][key], one[key], atol=2e-6, rtol=1e-4, msg=f"fsdp2 {name}: {key}")
        # rank 0's sampling seeds are the first rows' seeds of one process: the same completions
        plain = make_trainer(name, 1, str(tmp_path / f"plain-{name}"))
        plain.model.load_state_dict(one)
        assert torch.equal(two[f"{name}/sampled"], sampled(plain)), name
    # rank 0 wrote full tensors (not shards), and resuming re-sharded them
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "dapo-batch" / f"checkpoint-{STEPS}" / "model.safetensors"))
    for key, value in two["dapo-batch"].items():
        assert saved[key].shape == value.shape, key
        torch.testing.assert_close(saved[key], value, atol=0, rtol=0, msg=f"checkpoint: {key}")
        torch.testing.assert_close(two["resumed"][key], value, atol=0, rtol=0, msg=f"resumed: {key}")
    for key, value in two["adam"].items():
        torch.testing.assert_close(two["adam_resumed"][key], value, atol=1e-6, rtol=1e-5, msg=f"adam resume: {key}")


def test_the_exit_hook_frees_the_wrapper_and_holds_the_trainer_weakly(monkeypatch):
    hooks = []
    monkeypatch.setattr(atexit, "register", hooks.append)

    class Wrapper(torch.nn.Module):  # in a reference cycle, as DDP is: only the collector frees it
        def __init__(self, module):
            super().__init__()
            self.module, self.cycle = module, [self]

    class Trainer:
        def __init__(self):
            self.logprobs = torch.nn.Linear(2, 2)
            self.train_logprobs = Wrapper(self.logprobs)

    trainer = Trainer()
    release = release_ddp_at_exit(trainer)
    assert hooks == [release]
    wrapper = weakref.ref(trainer.train_logprobs)
    release()
    assert trainer.train_logprobs is trainer.logprobs and wrapper() is None
    owner = weakref.ref(trainer)
    del trainer
    gc.collect()
    assert owner() is None  # the registered hook keeps no trainer alive ...
    release()  # ... and does nothing once it is gone


def test_fsdp2_needs_an_initialised_process_group(tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    install_missing_ops(monkeypatch)
    with pytest.raises(ValueError, match="fsdp2.*torch.distributed initialised"):
        make_trainer("dapo-batch", 1, str(tmp_path), distributed_strategy="fsdp2")
    with pytest.raises(ValueError, match="distributed_strategy must be one of"):
        toy.toy_config(str(tmp_path), 1, distributed_strategy="fsdp")
