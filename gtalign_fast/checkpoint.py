"""Checkpoints of a GRPO run: the ``checkpoint-<step>`` folders, what they hold, and how to read them back.

A checkpoint folder holds the model (``save_pretrained``: safetensors, full tensors even under
FSDP2), the tokenizer, ``trainer_state.pt`` (step, NaN streak, optimizer, scheduler, a pending
rollout, RNG states) and a readable ``trainer_state.json``. Only rank 0 writes; under FSDP2 the full
model and optimizer states are gathered to it first, and every process re-shards them on load.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from torch import nn

__all__ = [
    "CHECKPOINT_PREFIX", "TRAINER_STATE", "folder", "latest_checkpoint", "rotate_checkpoints",
    "write_trainer_state", "read_trainer_state", "rng_state", "restore_rng_state", "full_model_state",
    "optimizer_state", "load_optimizer_state", "load_model_weights", "read_model_weights",
]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.pt"


# ---------------------------------------------------------------------------------------------
# Folders


def folder(output_dir: str, step: int) -> str:
    """The folder of the checkpoint written after optimizer step ``step``."""
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")


def latest_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-<step>`` folder with the largest step in ``output_dir``, or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = [
        int(m.group(1)) for name in os.listdir(output_dir)
        if (m := re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name))
        and os.path.isfile(os.path.join(output_dir, name, TRAINER_STATE))
    ]
    return folder(output_dir, max(steps)) if steps else None


def rotate_checkpoints(output_dir: str, keep: int | None) -> None:
    """Delete the oldest checkpoints beyond ``keep`` (``save_total_limit``)."""
    if not keep:
        return
    found = sorted(
        (int(m.group(1)), name) for name in os.listdir(output_dir)
        if (m := re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name))
    )
    for _, name in found[:-keep]:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The trainer's state


def write_trainer_state(path: str, state: dict, summary: dict) -> None:
    """``state`` to ``trainer_state.pt`` and a readable ``summary`` to ``trainer_state.json``."""
    torch.save(state, os.path.join(path, TRAINER_STATE))
    with open(os.path.join(path, "trainer_state.json"), "w") as handle:
        json.dump(summary, handle, indent=1)


def read_trainer_state(path: str, device: torch.device) -> dict:
    state_file = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"GRPOTrainer: {path} is not a checkpoint (no {TRAINER_STATE})")
    return torch.load(state_file, map_location=device, weights_only=True)


def rng_state() -> dict:
    """The CPU and CUDA generators' states (for a resumed run to draw what the uninterrupted one did)."""
    return {
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["rng_cpu"].cpu())
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])


# ---------------------------------------------------------------------------------------------
# Model and optimizer states (full tensors under FSDP2)


def full_model_state(model: nn.Module) -> dict:
    """FSDP2: the full model state on rank 0's CPU (empty elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    """The optimizer state to save. DDP keeps it identical on every process; FSDP2 gathers the
    shards into full tensors on rank 0's CPU (a collective: every process must call it)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict, fsdp: bool) -> None:
    """Load a saved optimizer state; under FSDP2 every process reads the full state and keeps its shards."""
    if not fsdp:
        optimizer.load_state_dict(saved)
        return
    if not saved["state"]:  # no tensors to shard (SGD without momentum): the hyper-parameters only
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def load_model_weights(model: nn.Module, directory: str, fsdp: bool = False) -> None:
    """Load the weights ``save_pretrained`` wrote into ``model`` in place (exactly, no dtype change).

    Keys missing from the files must be tied to a loaded tensor (``save_pretrained`` writes a tied
    LM head once); anything else missing or unexpected is an error. With ``fsdp`` every process
    reads the full tensors and keeps its shards (``set_model_state_dict``).
    """
    state = read_model_weights(directory)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        result = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"GRPOTrainer: checkpoint {directory} has unexpected weights {result.unexpected_keys[:5]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[name]) for name in state if name in params}
    untied = [k for k in result.missing_keys if k not in params or id(params[k]) not in loaded]
    if untied:
        raise RuntimeError(f"GRPOTrainer: checkpoint {directory} lacks weights {untied[:5]}")


def read_model_weights(directory: str) -> dict[str, torch.Tensor]:
    """The full state ``save_pretrained`` wrote to ``directory`` (single or sharded safetensors)."""
    from safetensors.torch import load_file

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        state = load_file(single)
    elif os.path.isfile(index):
        with open(index) as handle:
            shard_names = sorted(set(json.load(handle)["weight_map"].values()))
        state = {}
        for name in shard_names:
            state.update(load_file(os.path.join(directory, name)))
    else:
        raise FileNotFoundError(f"GRPOTrainer: no model.safetensors(.index.json) in {directory}")
    return state
