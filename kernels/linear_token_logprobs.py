"""Triton kernels for ``linear_token_logprobs``: the two memory-bound passes over one chunk of logits.

The op runs the LM head in chunks of tokens (``gtalign_fast.kernels.linear_token_logprobs_chunked``
beside this file): cuBLAS writes a chunk's logits ``Z = H_c @ W^T`` (float32) into one reused
``[R, V]`` buffer, then one of these kernels passes over it once.

Forward (:func:`chunk_stats`), one program per row, one online log-sum-exp walk over the row: with
``y = (z + b) / T``, the shift ``m`` (the running maximum; 0 while it is infinite), ``s = sum
exp(y - m)`` and ``t = sum exp(y - m) (y - m)``, it writes ``logp = (y_t - m) - log s``,
``entropy = log s - t / s`` and the pair ``(m, log s)`` for the backward (``m + log s`` is never
formed: at ``|y| ~ 1e4`` its float32 rounding alone would be 1e-3).

Backward (:func:`chunk_dlogits`), one program per row: it re-reads the recomputed logits and writes
``dz = (g (onehot_t - p) - g_H p (log p + H)) / T`` over them, in place. For half-precision inputs
``dz`` is stored in that half type (the operand of the two tensor-core GEMMs that follow) into the
first half of each float32 row's bytes: the element-``c`` store lands on bytes ``[2c, 2c + 2)``,
which only the same program has read (in this or an earlier tile), and a barrier between a tile's
load and its store keeps the program's warps from overtaking each other.

The grid is the rows of one chunk (at most ``MAX_CHUNK_ROWS``, far below the 65535 limit of a CUDA
grid axis) whatever N and V are; the vocabulary is walked in tiles inside each program.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gtalign_fast.kernels.linear_token_logprobs_chunked import MAX_CHUNK_ROWS  # rows of a chunk = programs
from gtalign_fast.kernels.softmax_grad import (
    block_v,
    entropy_inputs,
    num_warps,
    row_inputs,
    softmax_grad_row,
    store_row_results,
)
from gtalign_fast.ops import _device_checks as device_checks

# Vocabulary tile under the interpreter: narrow, so that the tests' small vocabularies still take
# several tiles (on GPU: softmax_grad.block_v, wide for a memory-bound pass).
INTERPRETER_BLOCK_V = 32


def _block_v(vocab: int) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return INTERPRETER_BLOCK_V
    return block_v(vocab)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _scaled_tile(z_row, b_ptr, cols, col_ok, inv_t, HAS_BIAS: tl.constexpr):
    """``(z + b) / T`` of one tile, float32; columns past V are -inf (they drop out of every sum)."""
    z = tl.load(z_row + cols, mask=col_ok, other=float("-inf")).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return z * inv_t


@triton.jit
def _chunk_stats_kernel(
    z_ptr, b_ptr, targets_ptr, logp_ptr, entropy_ptr, stats_ptr, error_ptr,
    V, stride_z, inv_temperature, ignore_index,
    ERR_TARGET_RANGE: tl.constexpr, HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    inv_t = tl.cast(inv_temperature, tl.float32)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    # An id outside [0, V): flag it (the wrapper reports it without a host sync), never index with it.
    tl.atomic_or(error_ptr, ERR_TARGET_RANGE, mask=valid & ~in_range)
    v_end = tl.where(valid, V, 0)  # ignored rows (prompt, padding) skip the walk

    m = tl.cast(float("-inf"), tl.float32)
    m_ref = tl.cast(0.0, tl.float32)
    s = tl.cast(0.0, tl.float32)
    t = tl.cast(0.0, tl.float32)
    for start in range(0, v_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        y = _scaled_tile(z_row, b_ptr, cols, cols < V, inv_t, HAS_BIAS)
        m_new = tl.maximum(m, tl.max(y, axis=0))
        # An infinite maximum shifts by 0: -inf - -inf (all -inf so far) would be nan, and a +inf
        # logit must give s = inf (log-sum-exp +inf, log-probs -inf) as on the materialised logits.
        m_ref_new = tl.where((m_new == float("inf")) | (m_new == float("-inf")), 0.0, m_new)
        # Nothing to rescale while s = 0 (exp(0 - m) may overflow, and 0 * inf is nan).
        rescale = tl.where(s > 0, tl.exp(m_ref - m_ref_new), 0.0)
        e = tl.exp(y - m_ref_new)
        if WITH_ENTROPY:
            # p log p with p = 0 (y = -inf) adds nothing (0 * -inf would be nan).
            centred = tl.where(e > 0, y - m_ref_new, 0.0)
            t = rescale * (t + (m_ref - m_ref_new) * s) + tl.sum(e * centred, axis=0)
        s = s * rescale + tl.sum(e, axis=0)
        m = m_new
        m_ref = m_ref_new

    log_s = tl.log(s)
    safe_target = tl.where(valid & in_range, target, 0)
    y_t = tl.load(z_row + safe_target).to(tl.float32)
    if HAS_BIAS:
        y_t += tl.load(b_ptr + safe_target).to(tl.float32)
    logp = (y_t * inv_t - m_ref) - log_s
    logp = tl.where(in_range, logp, float("nan"))  # a flagged row is NaN, never a plausible value
    store_row_results(logp_ptr, entropy_ptr, stats_ptr, row, valid, logp, m_ref, log_s, log_s - t / s, WITH_ENTROPY)


@triton.jit
def _chunk_dlogits_kernel(
    z_ptr, b_ptr, targets_ptr, stats_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr,
    V, stride_z, inv_temperature, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, DZ_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    # dz goes over the row's own bytes: element c of a half-precision dz is bytes [2c, 2c + 2). One
    # pointer, cast here, rather than a second (aliasing) tensor argument.
    narrowing: tl.constexpr = DZ_DTYPE != tl.float32
    dz_row = z_row.to(tl.pointer_type(DZ_DTYPE))
    inv_t = tl.cast(inv_temperature, tl.float32)
    target, valid, g, row_max, log_sum = row_inputs(targets_ptr, g_logp_ptr, stats_ptr, row, ignore_index, inv_t)
    g_h, h = entropy_inputs(g_entropy_ptr, entropy_ptr, row, valid, inv_t, HAS_GRAD_ENTROPY)
    softmax_grad_row(z_row, 1, b_ptr, dz_row, 1, V, inv_t, target, valid, g, g_h, h, row_max, log_sum,
                     HAS_BIAS=HAS_BIAS, HAS_GRAD_ENTROPY=HAS_GRAD_ENTROPY, OVERWRITES_NARROWER=narrowing,
                     BLOCK_V=BLOCK_V)


# ---------------------------------------------------------------------------------------------
# Launchers (inputs validated and allocated by gtalign_fast.ops._linear_token_logprobs)


def launch_grid(n_rows: int) -> tuple[int]:
    """The grid of both kernels: one program per row of the chunk (``n_rows <= MAX_CHUNK_ROWS``)."""
    if not 0 < n_rows <= MAX_CHUNK_ROWS:
        raise ValueError(f"linear_token_logprobs: a chunk has 1 to {MAX_CHUNK_ROWS} rows, got {n_rows}")
    return (n_rows,)


def chunk_stats(logits, bias, targets, inv_temperature, ignore_index, logp, entropy, stats, error_flag) -> None:
    """Log-prob, entropy and ``(m, log s)`` of each row of one chunk of logits.

    Parameters
    ----------
    logits : Tensor ``[R, V]`` float32, unit column stride
        ``H_c @ W^T`` of the chunk (without the bias).
    bias : Tensor ``[V]`` (any float dtype, contiguous) or None
    targets : Tensor ``[R]`` int64, contiguous
        Ids in ``[0, V)`` or ``ignore_index``; another id sets ``ERR_TARGET_RANGE`` in ``error_flag``
        (int32 ``[1]``) and makes its row's ``logp`` NaN.
    logp, entropy, stats : Tensor ``[R]``, ``[R]`` (or None), ``[R, 2]``, float32, contiguous
        Outputs; an ignored row gets zeros.
    """
    n_rows, vocab = logits.shape
    block_v = _block_v(vocab)
    _chunk_stats_kernel[launch_grid(n_rows)](
        logits, bias if bias is not None else logits, targets, logp,
        entropy if entropy is not None else logp, stats, error_flag,
        vocab, logits.stride(0), inv_temperature, ignore_index,
        ERR_TARGET_RANGE=device_checks.ERR_TARGET_RANGE, HAS_BIAS=bias is not None,
        WITH_ENTROPY=entropy is not None, BLOCK_V=block_v, num_warps=num_warps(block_v),
    )


def chunk_dlogits(logits, bias, targets, stats, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index,
                  dz_dtype: torch.dtype) -> torch.Tensor:
    """Overwrite one chunk of logits with ``dz``; return ``dz`` ``[R, V]`` of dtype ``dz_dtype``.

    ``logits`` ``[R, V]`` float32 must be contiguous (its rows' bytes are reused). ``dz_dtype``
    float32: ``dz`` is ``logits`` itself; float16 / bfloat16: ``dz`` is a view of the first half of
    each row's bytes (row stride ``2 V``), the operand of the GEMMs that follow. ``stats``,
    ``entropy``, ``grad_*`` are the chunk's ``[R, 2]`` / ``[R]`` float32 rows (``entropy`` and
    ``grad_entropy`` None without an entropy gradient).
    """
    n_rows, vocab = logits.shape
    if not logits.is_contiguous() or logits.dtype != torch.float32:
        raise ValueError("linear_token_logprobs: the chunk of logits must be contiguous float32")
    block_v = _block_v(vocab)
    has_grad_entropy = grad_entropy is not None
    _chunk_dlogits_kernel[launch_grid(n_rows)](
        logits, bias if bias is not None else logits, targets, stats,
        entropy if has_grad_entropy else grad_logp, grad_logp, grad_entropy if has_grad_entropy else grad_logp,
        vocab, logits.stride(0), inv_temperature, ignore_index,
        HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=has_grad_entropy, DZ_DTYPE=_TL_DTYPES[dz_dtype], BLOCK_V=block_v,
        num_warps=num_warps(block_v),
    )
    return logits.view(dz_dtype)[:, :vocab] if dz_dtype != logits.dtype else logits
