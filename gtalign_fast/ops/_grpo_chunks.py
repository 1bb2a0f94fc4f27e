"""The chunk engine of the fused GRPO ops, ``logits_grpo_loss`` and ``linear_grpo_loss``.

Both handle a chunk of logits in three steps (:class:`ChunkKernels`), each one pass over what it reads:

1. ``stats``: per row, online log-sum-exp, target log-prob and entropy (``token_logprobs``'
   forward kernel; it saves ``(max z/T, log sum exp(z/T - max))`` per row);
2. ``grpo_forward`` / ``grpo_backward``: the loss terms, metrics and ``g = d loss / d logp`` from
   ``[B, T]``-sized inputs (``grpo_loss``' kernels, with the aggregation weights of the whole batch);
3. ``grad``: ``dz = g / T (onehot - p)`` written to any strided view of the logits' shape, the
   logits themselves included (``kernels/logits_grpo_loss.py``, ``csrc/cpu/logits_grpo_loss.cpp``).

This module holds what the two ops share besides the objective (:mod:`gtalign_fast.ops._grpo_objective`):
the kernels of each backend, the masked targets, the temperature check, the reference
log-probs and the entropy metric. Positions where ``mask`` is 0 skip the vocabulary walk (their
target is replaced by :data:`SKIP`): their log-prob is 0 and their gradient row is zero.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch

from .. import reference
from . import _grpo_objective
from ._grpo_constants import NUM_METRICS
from ._grpo_objective import FLOAT_DTYPES, metrics_dict, write_metrics
from ._op import extension_kernel
from ._token_logprobs import MIN_TEMPERATURE, check_target_range

# Kernel target of a masked-out position: the kernels treat it as ignore_index (no vocabulary
# walk, log-prob 0, zero gradient). No real token id can equal it.
SKIP = -(2**63)
ENTROPY_METRIC = "entropy"


# ---------------------------------------------------------------------------------------------
# The per-chunk kernels, by backend


class ChunkKernels(NamedTuple):
    """One backend's launchers, called through the launch adapters of ``token_logprobs`` and
    ``grpo_loss`` (which own their kernels' argument lists and error flags)."""

    stats: Callable  # (logits, flat targets, temperature, logp, entropy, stats): token_logprobs forward
    grpo_forward: Callable  # grpo_loss' forward: (logp, old, ref, adv, mask, num_items, is_ratio, options, *outputs)
    grpo_backward: Callable  # grpo_loss' backward: (grad_loss, row_stats, row_weights, logp, ..., dlogp, dref)
    grad: Callable  # (logits3d, targets, g, stats, inv_t, ignore, out3d): the gradient pass


def chunk_kernels(name: str, device: torch.device) -> ChunkKernels:
    from . import _grpo_loss, _token_logprobs

    if name == "triton":
        from gtalign_fast.kernels import grpo_loss, logits_grpo_loss, token_logprobs

        launchers = (token_logprobs.token_logprobs_forward, grpo_loss.grpo_loss_forward,
                     grpo_loss.grpo_loss_backward, logits_grpo_loss.logits_grpo_grad)
    else:
        launchers = tuple(extension_kernel(kernel, device) for kernel in
                          ("token_logprobs_fwd", "grpo_loss_fwd", "grpo_loss_bwd", "logits_grpo_grad"))
    stats_launch, forward_launch, backward_launch, grad_launch = launchers

    def stats(logits, targets, temperature, logp, entropy, row_stats):
        options = _token_logprobs.TokenLogprobsOptions(temperature, True, SKIP)
        # token_logprobs' launch adapter (its module owns it; it has no public name yet)
        _token_logprobs.forward_kernel(stats_launch, logits, targets, options, logp, entropy, row_stats)

    return ChunkKernels(
        stats,
        functools.partial(_grpo_loss.forward_kernel, forward_launch),
        functools.partial(_grpo_loss.backward_kernel, backward_launch),
        grad_launch,
    )


def kernel_targets(targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Contiguous int64 ``[N]`` targets with :data:`SKIP` where the mask is 0."""
    return torch.where(mask != 0, targets, SKIP).reshape(-1)


def check_targets(op: str, logits_device: torch.device, targets: torch.Tensor, mask: torch.Tensor, vocab: int,
                  backend: str) -> None:
    """Target ids of counted positions (``mask`` nonzero) must be in ``[0, V)``. Checked here on CPU
    tensors (free: no device) and for the reference backend on any device (its gather has no
    device-side check: a bad id would end the CUDA context); the C++ CPU kernels check themselves,
    and on CUDA the Triton kernels set ERR_TARGET_RANGE in the device's error flag instead (no host
    sync; reported by ``check_device_errors``). The masked copy of the targets is only made here."""
    if backend == "reference" or (logits_device.type == "cpu" and backend != "cpu"):
        check_target_range(torch.where(mask != 0, targets, SKIP), vocab, SKIP, op=op)


# ---------------------------------------------------------------------------------------------
# Arguments


def validate_temperature(op: str, temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{op}: temperature must be a Python float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < MIN_TEMPERATURE:
        raise ValueError(f"{op}: temperature must be finite and >= {MIN_TEMPERATURE:.4g}, got {temperature}")


def loss_options(op: str, batch: int, length: int, device: torch.device, old_logp, advantages, mask, ref_logp,
                 options: dict):
    """The GRPO options of a fused op (its ``**options``), resolved by
    :func:`gtalign_fast.ops._grpo_objective.resolve_options` (errors name ``op``; ``old_logp`` /
    ``ref_logp`` may have any float dtype, they are used in float32); returns the float32 old / ref
    log-probs, the normaliser tensor (or None), the IS ratio (or None) and the GrpoLossOptions."""
    converted = []
    for name, value in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if value is not None:
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{op}: {name} must be a tensor, got {type(value).__name__}")
            if value.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{op}: {name} must be a float tensor, got {value.dtype}")
            value = value.detach().to(torch.float32)
        converted.append(value)
    old_logp, ref_logp = converted
    num_items_tensor, grpo, is_ratio = _grpo_objective.resolve_options(
        op, (batch, length), device, "targets are", None, old_logp, advantages, mask, ref_logp, options
    )
    return old_logp, ref_logp, num_items_tensor, is_ratio, grpo


# ---------------------------------------------------------------------------------------------
# Reference and metrics


def reference_logp(logits, targets, mask, temperature, with_entropy=True):
    """float64 (for float64 logits; float32 otherwise) log-probs and entropies, 0 where masked out."""
    valid = mask != 0
    safe = torch.where(valid, targets, 0)
    logp, ent = reference.token_logprobs(logits, safe, temperature, with_entropy, -100)
    return torch.where(valid, logp, 0.0), None if ent is None else torch.where(valid, ent, 0.0)


def entropy_mean(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    valid = (mask != 0).reshape(-1)
    return (entropy * valid).sum() / valid.sum().clamp(min=1)


def metrics_vector(ref_metrics: dict, entropy: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> None:
    """The reference's metrics and the mean entropy into the fused ops' metrics vector."""
    write_metrics(ref_metrics, out)
    out[NUM_METRICS] = entropy_mean(entropy.reshape(-1), mask)


def fused_metrics(metrics: torch.Tensor, has_ref: bool, vespo: bool) -> dict[str, torch.Tensor]:
    """The fused ops' metrics dict: grpo_loss' then ``"entropy"``."""
    return metrics_dict(metrics, has_ref, (ENTROPY_METRIC,), vespo)
