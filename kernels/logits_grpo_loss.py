"""Triton kernel of ``logits_grpo_loss`` / ``linear_grpo_loss``: the logits gradient of a loss
that reaches the logits only through the target log-probs.

A GRPO loss from logits is three steps, each one pass over what it reads:

1. per row, the online log-sum-exp, the target log-prob and the entropy (``token_logprobs``'
   forward kernel, which also saves ``(m, log s)`` per row: ``m = max z / T``,
   ``log s = log sum exp(z / T - m)``);
2. the GRPO loss terms and ``g = d loss / d logp`` per token from ``[B, T]``-sized inputs
   (``grpo_loss``' kernels: tiny next to the ``[N, V]`` logits);
3. this kernel: per row, ``dz_j = g / T * (1[j = target] - exp((z_j / T - m) - log s))``, written
   to a strided ``[D0, D1, V]`` view that may be the logits themselves (the in-place backward:
   each element is read, then written, by the same program, and read by no one afterwards).

Layout contract (shared with the C++ kernel ``logits_grpo_grad``): logits and the output are
strided ``[D0, D1, V]`` views of one shape (``N = D0 * D1`` rows; the ``[:, :-1]`` slice of
``[B, T+1, V]`` logits is one, read and written in place); targets, ``g`` contiguous ``[N]``;
stats contiguous ``[N, 2]``. Rows whose target is ``ignore_index`` get zeros. One program per row:
a 1-D grid (its x dimension takes up to 2^31 - 1 programs; no grid dimension grows past 65535).

A target outside ``[0, V)`` (other than ``ignore_index``) matches no column, and the program
sets ``ERR_TARGET_RANGE`` in the device's error flag (``gtalign_fast.ops._device_checks``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gtalign_fast.kernels.softmax_grad import block_v, check_rows, num_warps, row_inputs, softmax_grad_row
from gtalign_fast.ops import _device_checks
from gtalign_fast.ops import _token_logprobs_constants as constants

ERR_TARGET_RANGE = tl.constexpr(_device_checks.ERR_TARGET_RANGE)


@triton.jit
def _logits_grad_kernel(
    logits_ptr, targets_ptr, g_ptr, stats_ptr, out_ptr, flag_ptr,
    D1, s0, s1, sv, o0, o1, ov, V,
    inv_temperature, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    in_row_ptr = logits_ptr + (row // D1) * s0 + (row % D1) * s1
    out_row_ptr = out_ptr + (row // D1) * o0 + (row % D1) * o1
    inv_t = tl.cast(inv_temperature, tl.float32)
    target, valid, g, row_max, log_sum = row_inputs(targets_ptr, g_ptr, stats_ptr, row, ignore_index, inv_t)
    bad = valid & ((target < 0) | (target >= V))
    if bad:
        tl.atomic_or(flag_ptr, ERR_TARGET_RANGE)
    softmax_grad_row(in_row_ptr, sv, in_row_ptr, out_row_ptr, ov, V, inv_t, target, valid, g, 0.0, 0.0, row_max,
                     log_sum, HAS_BIAS=False, HAS_GRAD_ENTROPY=False, OVERWRITES_NARROWER=False, BLOCK_V=BLOCK_V)


def logits_grpo_grad(
    logits3d: torch.Tensor,
    targets: torch.Tensor,
    grad_logp: torch.Tensor,
    stats: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    out3d: torch.Tensor,
) -> None:
    """Launch the gradient kernel (the arguments are those of the C++ kernel): writes every
    element of ``out3d``, which may be ``logits3d`` itself. The layout is checked here (metadata
    only, as the C++ kernel checks it): the kernel indexes targets, ``grad_logp`` and ``stats`` by row."""
    if out3d.shape != logits3d.shape or out3d.dtype != logits3d.dtype or out3d.device != logits3d.device:
        raise ValueError("logits_grpo_loss: out3d must be a [D0, D1, V] view like logits3d (dtype, device)")
    d0, d1, vocab = logits3d.shape
    n_rows = d0 * d1
    check_rows("logits_grpo_loss", logits3d, targets, (grad_logp, n_rows),
               (stats, n_rows * constants.NUM_SOFTMAX_STATS))
    if n_rows == 0 or vocab == 0:
        return
    block = block_v(vocab)
    _logits_grad_kernel[(n_rows,)](
        logits3d, targets, grad_logp, stats, out3d, _device_checks.error_flag(logits3d.device),
        d1, *logits3d.stride(), *out3d.stride(), vocab, inv_temperature, ignore_index,
        BLOCK_V=block, num_warps=num_warps(block),
    )
