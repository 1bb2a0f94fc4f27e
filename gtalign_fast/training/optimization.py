"""The update stage of a GRPO step: the loss of a micro-batch, its share of the step, and the optimizer.

:func:`policy_loss` computes one micro-batch's loss with the trainer's
:class:`~gtalign_fast.ops._grpo_objective.GrpoObjective` (built once from the config), through
``ops.linear_grpo_loss`` from the last hidden state (the default path) or ``ops.grpo_loss`` on the
log-probs;
:func:`loss_weight` is that micro-batch's share of the global batch's loss (so gradient
accumulation and several processes give the one-process, one-micro-batch update);
:func:`clip_gradients` clips and returns the full gradient norm; :func:`default_optimizer` and
:func:`default_scheduler` are TRL's AdamW and learning-rate schedule (:func:`lr_lambda`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

from .. import ops
from ..ops._grpo_objective import GrpoObjective
from .distributed import full_value
from .grpo_config import LOSS_TYPES, GRPOConfig

if TYPE_CHECKING:
    from .rollout import Rollout

__all__ = [
    "policy_loss", "loss_weight", "clip_gradients", "default_optimizer", "default_scheduler",
    "lr_lambda",
]


def policy_loss(
    module: nn.Module, part: Rollout, global_tokens: torch.Tensor, objective: GrpoObjective, *, fused: bool,
    backend: str | None,
) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """One micro-batch's GRPO loss with ``objective``; returns ``(loss, metrics, entropy)``.

    ``module`` is the trainer's (DDP-wrapped) :class:`~gtalign_fast.training.logprobs.CompletionLogprobs`.
    ``fused``: it runs ``ops.linear_grpo_loss`` on the last hidden state, so neither the logits nor
    a ``[N, C]`` log-prob graph exist and the gradients are computed in the forward (``entropy`` is
    the op's mean over the loss tokens). Otherwise it gives ``logp`` and the per-token entropy
    ``[N, C]`` and ``ops.grpo_loss`` computes the loss. ``global_tokens`` is the loss-token count of
    the whole global batch, which the "global_tokens" normalisers ("dapo") divide by.

    A micro-batch without a loss token gives loss 0, metrics 0 and zero gradients from the op itself
    (every DDP process still runs backward; no host-side check, which would synchronise on a GPU).
    """
    kwargs = objective.op_kwargs(global_tokens if objective.micro_batch_share == "global_tokens" else None)
    ids = (part.prompt_ids, part.prompt_mask, part.completion_ids, part.completion_mask)
    if fused:
        loss, metrics = module(*ids, loss_kwargs=dict(
            advantages=part.advantages, mask=part.loss_mask, old_logp=part.old_logp, ref_logp=part.ref_logp, **kwargs
        ))
        metrics = dict(metrics)
        return loss, metrics, metrics.pop("entropy")
    logp, entropy = module(*ids)
    loss, metrics = ops.grpo_loss(logp, part.old_logp, part.advantages, part.loss_mask, ref_logp=part.ref_logp,
                                  backend=backend, **kwargs)
    return loss, metrics, entropy


def loss_weight(loss_type: str, micro_rows: int, rows: int, micro_batches: int, world: int) -> float:
    """A micro-batch's share of the global-batch loss, times the process count because DDP averages
    gradients over processes (so the sum over every micro-batch everywhere is the loss).

    ``micro_rows`` rows of this process's ``rows``, split into ``micro_batches`` micro-batches.
    """
    kind = LOSS_TYPES[loss_type]
    if kind == "global_tokens":  # the op already divided by the global token count
        return float(world)
    if kind == "sequences":  # world * micro_rows / (rows * world): rows per process are equal
        return micro_rows / rows
    return 1.0 / micro_batches  # local token means, averaged like TRL's bnpo


def clip_gradients(params: Iterable[torch.Tensor], max_grad_norm: float | None) -> torch.Tensor:
    """Clip the gradients to ``max_grad_norm`` (None or <= 0: no clipping); returns the full norm
    before clipping (under FSDP2 over every shard)."""
    max_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else math.inf
    return full_value(torch.nn.utils.clip_grad_norm_(list(params), max_norm))


def default_optimizer(model: nn.Module, args: GRPOConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters with the config's hyper-parameters (TRL's default).

    Fused (one kernel over all parameters, ``fused=True``) where torch has that kernel for every
    parameter, as transformers' default ``optim="adamw_torch_fused"`` is: on the CPU the per-tensor
    loop makes six passes over parameters and states, about 4x the fused step's time (0.41 s vs
    0.10 s for SmolLM2-135M's 135M float32 parameters on 2 cores). The update is the same up to
    float rounding. Sharded (DTensor) parameters keep the per-tensor loop.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        weight_decay=args.weight_decay, fused=_fused_adamw_supported(params) or None,
    )


def _fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes every one of ``params``: plain (not DTensor)
    floating-point tensors on a device type that has the kernel."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return bool(params) and all(
        type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in devices for p in params
    )


def default_scheduler(optimizer: torch.optim.Optimizer, args: GRPOConfig, max_steps: int):
    """The config's learning-rate schedule over ``max_steps`` optimizer steps."""
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler_type, warmup, max_steps))


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the learning rate at optimizer step ``s`` (transformers' schedules)."""

    def schedule(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if kind == "constant_with_warmup":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine

    return schedule
