"""Triton kernels for ``token_logprobs``: the log-prob of one target token per row of logits,
with an optional entropy, and the backward that writes dlogits in one pass.

Layout contract (shared with the C++ kernels): the logits are a strided view ``[D0, D1, V]``
(``N = D0 * D1`` rows; the ``[:, :-1]`` slice of ``[B, T+1, V]`` logits is such a view, read in
place), targets and the per-row outputs are contiguous ``[N]``, dlogits is contiguous ``[N, V]``.

Forward, per row, in one pass over the vocabulary (an online log-sum-exp): with ``y = z / T``
and ``m`` the running maximum, keep ``s = sum exp(y - m)`` and ``t = sum exp(y - m) * (y - m)``.
Then ``logp = (y_t - m) - log s`` and ``entropy = log s - t / s``. The pair ``(m, log s)`` is saved
per row for the backward (``lse = m + log s`` is never formed: at |y| ~ 1e4 its float32 rounding
alone would be 1e-3; differences to ``m`` are exact).

Backward, per row: with ``p = exp((y - m) - log s)``,
``dz = (g_logp * (onehot_t - p) - g_entropy * p * (log p + H)) / T``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gtalign_fast.kernels.softmax_grad import (
    block_v,
    check_rows,
    entropy_inputs,
    num_warps,
    row_inputs,
    softmax_grad_row,
    store_row_results,
)
from gtalign_fast.ops import _device_checks as device_checks
from gtalign_fast.ops import _token_logprobs_constants as constants

# One program handles one row; the vocabulary is walked in tiles of softmax_grad.block_v(V) elements.


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    targets_ptr,
    logp_ptr,
    entropy_ptr,
    stats_ptr,
    error_ptr,
    D1,
    stride0,
    stride1,
    stride_v,
    V,
    inv_temperature,
    ignore_index,
    ERR_TARGET_RANGE: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // D1) * stride0 + (row % D1) * stride1
    inv_t = tl.cast(inv_temperature, tl.float32)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    # Ignored rows (prompt tokens, padding) skip the vocabulary walk entirely.
    v_end = tl.where(valid, V, 0)

    # The target's logit is read first, independent of the walk below, so its memory latency hides
    # behind it. A target outside [0, V) reads column 0, not outside the row; it sets the error flag
    # (the wrapper reports it without a host sync, see gtalign_fast/ops/_device_checks.py) and its logp
    # is NaN.
    out_of_range = valid & ((target < 0) | (target >= V))
    tl.atomic_or(error_ptr, ERR_TARGET_RANGE, mask=out_of_range)
    safe_target = tl.where(out_of_range, 0, tl.where(valid, target, 0))
    y_target = tl.load(row_ptr + safe_target * stride_v).to(tl.float32) * inv_t

    # Online log-sum-exp kept per lane (each of the BLOCK_V lanes has its own max m, sum s and
    # entropy sum t over the columns it visits) and merged across lanes once, after the walk: no
    # cross-warp reduction (shared memory and barriers) per block of columns, so the loads of one
    # block do not wait for the reductions of the previous one. One exp per element, as before:
    # exp(-|y - m|) is the new term when y <= m and the rescale of the old sum when y > m.
    m_lane = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s_lane = tl.zeros([BLOCK_V], tl.float32)
    t_lane = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, v_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        y = tl.load(row_ptr + cols * stride_v, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
        d = y - m_lane
        grow = y > m_lane  # a new maximum for this lane (never for y = -inf or NaN)
        # y = -inf adds nothing (d would be NaN when the lane is still at -inf too).
        e = tl.where(y == float("-inf"), 0.0, tl.exp(-tl.abs(d)))
        if WITH_ENTROPY:
            # grow: t = e * (t + (m_old - y) * s), the old terms re-centred (none yet: 0 * inf);
            # else: t += e * (y - m).
            t_lane = tl.where(grow, tl.where(s_lane > 0, e * (t_lane - d * s_lane), 0.0),
                              t_lane + tl.where(e > 0, e * d, 0.0))
        s_lane = tl.where(grow, s_lane * e + 1.0, s_lane + e)
        m_lane = tl.where(grow, y, m_lane)
    m = tl.max(m_lane, axis=0)
    # While every value is -inf, shift by 0 instead (exp(-inf - -inf) would be nan).
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    scale = tl.exp(m_lane - m_ref)  # 0 for the lanes that saw only -inf
    s = tl.sum(s_lane * scale, axis=0)
    t = tl.cast(0.0, tl.float32)
    if WITH_ENTROPY:
        t = tl.sum(tl.where(s_lane > 0, scale * (t_lane + (m_lane - m_ref) * s_lane), 0.0), axis=0)

    # Ignored rows never summed anything; log(1) keeps them free of log(0) warnings.
    s = tl.where(valid, s, 1.0)
    log_s = tl.log(s)
    row_logp = tl.where(out_of_range, float("nan"), (y_target - m) - log_s)
    store_row_results(logp_ptr, entropy_ptr, stats_ptr, row, valid, row_logp, m, log_s, log_s - t / s, WITH_ENTROPY)


@triton.jit
def _token_logprobs_bwd_kernel(
    grad_logp_ptr,
    grad_entropy_ptr,
    logits_ptr,
    targets_ptr,
    stats_ptr,
    entropy_ptr,
    dlogits_ptr,
    D1,
    stride0,
    stride1,
    stride_v,
    V,
    inv_temperature,
    ignore_index,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // D1) * stride0 + (row % D1) * stride1
    inv_t = tl.cast(inv_temperature, tl.float32)
    target, valid, g_logp, row_max, log_sum = row_inputs(targets_ptr, grad_logp_ptr, stats_ptr, row, ignore_index,
                                                         inv_t)
    g_entropy, entropy = entropy_inputs(grad_entropy_ptr, entropy_ptr, row, valid, inv_t, HAS_GRAD_ENTROPY)
    softmax_grad_row(row_ptr, stride_v, row_ptr, dlogits_ptr + row * V, 1, V, inv_t, target, valid, g_logp, g_entropy,
                     entropy, row_max, log_sum, HAS_BIAS=False, HAS_GRAD_ENTROPY=HAS_GRAD_ENTROPY,
                     OVERWRITES_NARROWER=False, BLOCK_V=BLOCK_V)


def token_logprobs_forward(
    logits3d: torch.Tensor,
    targets: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    logp: torch.Tensor,
    entropy: torch.Tensor,
    stats: torch.Tensor,
    error_flag: torch.Tensor | None = None,
) -> None:
    """Launch the forward kernel: fills ``logp`` and (unless it is empty: no entropy) ``entropy``,
    ``[N]``, and the per-row ``stats`` ``[N, NUM_SOFTMAX_STATS]`` = (max of z/T, log of the sum of
    exp(z/T - max)). A target outside ``[0, V)`` that is not ``ignore_index`` gets a NaN ``logp``
    and sets ``ERR_TARGET_RANGE`` in ``error_flag`` (int32 ``[1]``, see
    ``gtalign_fast.ops._device_checks``; default: the device's flag). The arguments are those of the
    C++ kernels, which check the same layout."""
    d0, d1, vocab = logits3d.shape
    n_rows = d0 * d1
    check_rows("token_logprobs", logits3d, targets, (logp, n_rows), (stats, n_rows * constants.NUM_SOFTMAX_STATS),
                *([(entropy, n_rows)] if entropy.numel() > 0 else []))
    if n_rows == 0:
        return
    if error_flag is None:
        error_flag = device_checks.error_flag(logits3d.device)
    block = block_v(vocab)
    s0, s1, sv = logits3d.stride()
    _token_logprobs_fwd_kernel[(n_rows,)](
        logits3d, targets, logp, entropy if entropy.numel() > 0 else logp, stats, error_flag,
        d1, s0, s1, sv, vocab, inv_temperature, ignore_index, ERR_TARGET_RANGE=device_checks.ERR_TARGET_RANGE,
        WITH_ENTROPY=entropy.numel() > 0, BLOCK_V=block, num_warps=num_warps(block),
    )


def token_logprobs_backward(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    logits3d: torch.Tensor,
    targets: torch.Tensor,
    stats: torch.Tensor,
    entropy: torch.Tensor | None,
    inv_temperature: float,
    ignore_index: int,
    dlogits: torch.Tensor,
) -> None:
    """Launch the backward kernel: writes every element of ``dlogits`` (contiguous ``[N, V]``)."""
    d0, d1, vocab = logits3d.shape
    n_rows = d0 * d1
    check_rows("token_logprobs", logits3d, targets, (grad_logp, n_rows), (stats, n_rows * constants.NUM_SOFTMAX_STATS),
                *([(grad_entropy, n_rows), (entropy, n_rows)] if grad_entropy is not None else []))
    if dlogits.numel() != n_rows * vocab or not dlogits.is_contiguous() or dlogits.device != logits3d.device:
        raise ValueError("token_logprobs: dlogits must be contiguous [N, V] on the logits' device")
    if n_rows == 0:
        return
    block = block_v(vocab)
    s0, s1, sv = logits3d.stride()
    has_grad_entropy = grad_entropy is not None
    _token_logprobs_bwd_kernel[(n_rows,)](
        grad_logp, grad_entropy if has_grad_entropy else grad_logp, logits3d, targets, stats,
        entropy if has_grad_entropy else grad_logp, dlogits,
        d1, s0, s1, sv, vocab, inv_temperature, ignore_index,
        HAS_GRAD_ENTROPY=has_grad_entropy, BLOCK_V=block, num_warps=num_warps(block),
    )
