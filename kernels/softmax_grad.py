"""The softmax gradient of a row of logits, shared by the three kernels that write dlogits from the
row stats a forward saved: ``token_logprobs``' backward (``token_logprobs.py``),
``linear_token_logprobs``' chunk pass (``linear_token_logprobs.py``) and the fused GRPO ops'
gradient pass (``logits_grpo_loss.py``).

With ``y = z / T`` and the saved ``(m, log s)`` (``m = max y``, ``log s = log sum exp(y - m)``), the
probability is ``p = exp((y - m) - log s)`` and, for upstream gradients ``g`` (of the target's
log-prob) and ``g_H`` (of the entropy ``H``),
``dz = (g (1[j = target] - p) - g_H p (log p + H)) / T``. The ``1 / T`` is folded into ``g`` and
``g_H`` by :func:`row_inputs` / :func:`entropy_inputs`. A row whose target is ``ignore_index`` gets
zeros, whatever its logits (``exp`` may overflow there: its ``p`` is taken as 0).

Also here, once: the forward's store of those stats (:func:`store_row_results`), the stats
columns (:mod:`gtalign_fast.ops._token_logprobs_constants`), the vocabulary tile and warp count of
these row-per-program kernels, and the layout check of their per-row tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gtalign_fast.ops import _token_logprobs_constants as constants

# The columns of the per-row stats are defined once, in gtalign_fast/ops/_token_logprobs_constants.py
# (the C++ and CUDA kernels read them from csrc/token_logprobs_common.h). Triton reads a global
# inside @triton.jit code only when it is a tl.constexpr.
STAT_ROW_MAX = tl.constexpr(constants.STAT_ROW_MAX)
STAT_LOG_SUM = tl.constexpr(constants.STAT_LOG_SUM)
NUM_SOFTMAX_STATS = tl.constexpr(constants.NUM_SOFTMAX_STATS)

# One program handles one row; the vocabulary is walked in tiles of at most this many elements
# (a memory-bound pass: wide tiles, 8 warps from 2048 on).
MAX_BLOCK_V = 4096


def block_v(vocab: int) -> int:
    """The vocabulary tile for a row of ``vocab`` logits (a power of two, 16 to MAX_BLOCK_V)."""
    return min(MAX_BLOCK_V, triton.next_power_of_2(max(vocab, 16)))


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def check_rows(op: str, logits3d: torch.Tensor, targets: torch.Tensor, *row_tensors) -> None:
    """The kernels index targets and the per-row tensors by row: each must hold its rows, on the
    logits' device (a launcher reachable without the public function's validation checks this
    itself: metadata only, no host sync). ``row_tensors``: ``(tensor, numel)`` pairs, float32."""
    if logits3d.dim() != 3:
        raise ValueError(f"{op}: logits must be a [D0, D1, V] view, got shape {tuple(logits3d.shape)}")
    n_rows = logits3d.shape[0] * logits3d.shape[1]
    if targets.numel() != n_rows or targets.dtype != torch.int64 or not targets.is_contiguous():
        raise ValueError(f"{op}: targets must be contiguous int64 with one id per row ({n_rows})")
    for tensor, numel in ((targets, n_rows), *row_tensors):
        if tensor.numel() != numel or tensor.device != logits3d.device or not tensor.is_contiguous():
            raise ValueError(
                f"{op}: a per-row tensor of {numel} contiguous elements on {logits3d.device} was "
                f"expected, got shape {tuple(tensor.shape)} on {tensor.device}"
            )
        if tensor is not targets and tensor.dtype != torch.float32:
            raise ValueError(f"{op}: per-row tensors are float32, got {tensor.dtype}")


@triton.jit
def store_row_results(logp_ptr, entropy_ptr, stats_ptr, row, valid, logp, m, log_s, entropy,
                      WITH_ENTROPY: tl.constexpr):
    """A forward's results for one row: the log-prob, the entropy (WITH_ENTROPY) and the stats
    ``(m, log s)`` this module's gradient reads back; zeros for an ignored row."""
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(stats_ptr + row * NUM_SOFTMAX_STATS + STAT_ROW_MAX, tl.where(valid, m, 0.0))
    tl.store(stats_ptr + row * NUM_SOFTMAX_STATS + STAT_LOG_SUM, tl.where(valid, log_s, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, entropy, 0.0))


@triton.jit
def row_inputs(targets_ptr, g_ptr, stats_ptr, row, ignore_index, inv_t):
    """The row's target, whether it counts, ``g / T`` (0 for an ignored row) and its saved
    ``(m, log s)``."""
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    g = tl.where(valid, tl.load(g_ptr + row), 0.0) * inv_t
    row_max = tl.load(stats_ptr + row * NUM_SOFTMAX_STATS + STAT_ROW_MAX)
    log_sum = tl.load(stats_ptr + row * NUM_SOFTMAX_STATS + STAT_LOG_SUM)
    return target, valid, g, row_max, log_sum


@triton.jit
def entropy_inputs(g_entropy_ptr, entropy_ptr, row, valid, inv_t, HAS_GRAD_ENTROPY: tl.constexpr):
    """``g_H / T`` (0 for an ignored row) and ``H`` of the row; zeros without an entropy gradient."""
    g_h = tl.cast(0.0, tl.float32)
    h = tl.cast(0.0, tl.float32)
    if HAS_GRAD_ENTROPY:
        g_h = tl.where(valid, tl.load(g_entropy_ptr + row), 0.0) * inv_t
        h = tl.load(entropy_ptr + row)
    return g_h, h


@triton.jit
def softmax_grad_row(
    z_row, stride_z, b_ptr, out_row, stride_out, V, inv_t, target, valid, g, g_h, h, row_max, log_sum,
    HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, OVERWRITES_NARROWER: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Write ``dz`` of one row: ``y = (z + b) / T`` read from ``z_row`` (stride ``stride_z``; ``b``
    only when HAS_BIAS), ``dz`` stored in ``out_row``'s element type (stride ``stride_out``).

    ``out_row`` may be ``z_row`` itself (the in-place backward): each element is read, then written,
    by this program only. OVERWRITES_NARROWER: the output is a narrower type over the row's own bytes
    (element ``c`` at bytes ``[2c, 2c + 2)`` of a float32 row), which the program's warps could
    overwrite before another warp loaded them: a barrier separates each tile's load and store.
    """
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        y = tl.load(z_row + cols * stride_z, mask=in_row, other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        log_p = (y * inv_t - row_max) - log_sum
        p = tl.where(valid, tl.exp(log_p), 0.0)
        # The target is compared, never used as an index: an id outside [0, V) matches nothing.
        dz = tl.where(cols == target, g, 0.0) - g * p
        if HAS_GRAD_ENTROPY:
            dz -= g_h * tl.where(p > 0, p * (log_p + h), 0.0)  # p log p = 0 where p = 0
        if OVERWRITES_NARROWER:
            tl.debug_barrier()  # every warp has loaded this tile before any overwrites its bytes
        tl.store(out_row + cols * stride_out, dz.to(out_row.dtype.element_ty), mask=in_row)
