"""Triton kernels for ``linear_token_logprobs``: the LM-head matmul fused with the log-prob of the
target token (and the entropy), without ever writing the ``[N, V]`` logits.

Notation: ``hidden`` is ``[N, H]``, ``weight`` is ``[V, H]``, the logits are
``z = hidden @ weight.T + bias`` and ``y = z / T``. Strides are passed explicitly, so views
(e.g. a transposed tied embedding) are read in place.

Forward (:func:`forward_partials`): a grid of (token blocks on axis 0, vocabulary splits on axis 1).
Each program walks the vocabulary tiles of its split; per tile it forms the ``[BLOCK_N, BLOCK_V]``
logits with a K-loop of ``tl.dot`` (float32 accumulation) and folds them into an online
log-sum-exp per row: with ``m`` the running maximum, ``s = sum exp(y - m)``,
``t = sum exp(y - m) * (y - m)`` and the target logit ``y_t`` when the target falls in the split.
The per-split partials ``[splits, N]`` are merged by :func:`merge_partials` (a few ``[splits, N]``
torch ops): ``lse = m + log s``, ``logp = y_t - lse``, ``entropy = log s - t / s``.
The number of splits is bounded (it only serves to fill the GPU), so axis 1 stays small.

Backward (:func:`backward_dz`): for one chunk of rows and vocabulary columns, recompute the logits
tile the same way and write ``dz = (g_logp (onehot - p) - g_H p (y - lse + H)) / T`` into a
chunk buffer; the caller then does the two products ``dhidden += dz @ W_chunk`` and
``dW_chunk = dz^T @ hidden`` with cuBLAS (tensor cores, float32 accumulation). A fully fused
backward would need atomics on a float32 ``[V, H]`` buffer or ``[BLOCK, H]`` accumulators that do
not fit in registers for H = 4096; the chunked second pass keeps memory bounded by one chunk.

Under the CPU interpreter ``tl.dot`` on bf16 / fp16 is wrong, so ``FP32_DOT`` upcasts the tiles
there (on GPU the half-precision tiles go to the tensor cores with float32 accumulation).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Tile sizes: large on GPU (tensor-core friendly), small under the interpreter (it runs every
# program sequentially in numpy, so padding waste costs real time). tl.dot needs every dim >= 16.
GPU_TILES = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3)
INTERPRETER_TILES = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=32, num_warps=4, num_stages=1)
# Under the interpreter a few splits still exercise the merge; on GPU enough programs to fill it.
INTERPRETER_SPLITS = 3
PROGRAMS_PER_SM = 4


def _tiles() -> dict:
    return INTERPRETER_TILES if _interpreted() else GPU_TILES


def _dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 inputs: IEEE products unless the user allowed TF32 for matmuls (torch's own rule);
    half inputs: Triton's default (tensor cores, float32 accumulation)."""
    if dtype != torch.float32:
        return None
    if torch.backends.cuda.matmul.allow_tf32 and not _interpreted():
        return "tf32"
    return "ieee"


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H,
    stride_hn, stride_hk, stride_wv, stride_wk, inv_t,
    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``y = (hidden[rows] @ weight[cols].T + bias[cols]) / T`` as a float32 ``[BLOCK_N, BLOCK_V]``
    tile; columns past V are -inf so they drop out of every max and sum."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        # int64 offsets: V * H can pass 2**31 elements (151936 x 16384).
        a = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_hn + ks[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols.to(tl.int64)[None, :] * stride_wv + ks[:, None] * stride_wk,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if FP32_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = acc * inv_t
    return tl.where(col_ok[None, :], y, float("-inf"))


@triton.jit
def _forward_partials_kernel(
    h_ptr, w_ptr, b_ptr, targets_ptr,
    part_m_ptr, part_s_ptr, part_t_ptr, part_y_ptr,
    N, V, H,
    stride_hn, stride_hk, stride_wv, stride_wk,
    inv_temperature, ignore_index, tiles_per_split,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, FP32_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    split = tl.program_id(1)
    inv_t = tl.cast(inv_temperature, tl.float32)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    y_target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    split_start = split * tiles_per_split * BLOCK_V
    for tile in range(0, tiles_per_split):
        cols = split_start + tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        y = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H,
            stride_hn, stride_hk, stride_wv, stride_wk, inv_t,
            HAS_BIAS, FP32_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K,
        )
        # The target is only compared, never an index; col_ok keeps an id past V (a direct call of
        # the low-level op) off the -inf padding columns of the last tile: it matches nothing.
        is_target = (cols[None, :] == targets[:, None]) & col_ok[None, :]
        y_target += tl.sum(tl.where(is_target, y, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(y, axis=1))
        # While every value seen is -inf (a -inf bias), shift by 0 instead (-inf - -inf is nan).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - m_ref)
        e = tl.exp(y - m_ref[:, None])
        if WITH_ENTROPY:
            shift = tl.where(s > 0, m - m_ref, 0.0)
            centred = tl.where(e > 0, y - m_ref[:, None], 0.0)
            t = rescale * (t + shift * s) + tl.sum(e * centred, axis=1)
        s = s * rescale + tl.sum(e, axis=1)
        m = m_new

    out = split * N + rows
    tl.store(part_m_ptr + out, m, mask=row_ok)
    tl.store(part_s_ptr + out, s, mask=row_ok)
    tl.store(part_y_ptr + out, y_target, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(part_t_ptr + out, t, mask=row_ok)


@triton.jit
def _backward_dz_kernel(
    h_ptr, w_ptr, b_ptr, targets_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr, dz_ptr,
    N, C, H, col_offset,
    stride_hn, stride_hk, stride_wv, stride_wk, stride_dz,
    inv_temperature, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, FP32_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Axis 0: row blocks (can be many); axis 1: column tiles of one bounded vocabulary chunk.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < C
    inv_t = tl.cast(inv_temperature, tl.float32)
    y = _logits_tile(
        h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H,
        stride_hn, stride_hk, stride_wv, stride_wk, inv_t,
        HAS_BIAS, FP32_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K,
    )
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (targets != ignore_index)
    # Fold the 1/T of the chain rule into the incoming gradients; ignored rows get zero gradient.
    g_logp = tl.where(valid, tl.load(g_logp_ptr + rows, mask=row_ok, other=0.0), 0.0) * inv_t
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    centred = y - lse[:, None]
    p = tl.where(valid[:, None], tl.exp(centred), 0.0)
    # Compared, never an index: a target outside the chunk (or outside [0, V)) matches no column.
    is_target = ((cols + col_offset)[None, :] == targets[:, None]) & col_ok[None, :]
    dz = tl.where(is_target, g_logp[:, None], 0.0) - g_logp[:, None] * p
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.where(valid, tl.load(g_entropy_ptr + rows, mask=row_ok, other=0.0), 0.0) * inv_t
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        # p * (log p + H); zero where p == 0 (y = -inf would give 0 * inf).
        dz -= g_entropy[:, None] * p * (tl.where(p > 0, centred, 0.0) + entropy[:, None])
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers (inputs validated and allocated by gtalign_fast._linear_token_logprobs)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_count(n_row_blocks: int, n_col_tiles: int) -> int:
    if _interpreted():
        return min(n_col_tiles, INTERPRETER_SPLITS)
    sms = _sm_count(torch.cuda.current_device())
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, n_row_blocks)
    return max(1, min(n_col_tiles, wanted))


def forward_partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward kernel; return the per-split partials ``(m, s, t, y_target)``.

    Parameters
    ----------
    hidden : Tensor ``[N, H]`` (N >= 1); weight : Tensor ``[V, H]``; bias : Tensor ``[V]`` or None
        Same float dtype (fp16 / bf16 / fp32), any strides (bias contiguous).
    targets : Tensor ``[N]`` int64, contiguous; ids in ``[0, V)`` or ``ignore_index``.

    Returns
    -------
    Four float32 tensors ``[splits, N]`` (``t`` is None without entropy): the running maximum,
    the sum of ``exp(y - m)``, the sum of ``exp(y - m) (y - m)`` and the target logit (0 in the
    splits that do not hold the target).
    """
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    tiles = _tiles()
    n_row_blocks = triton.cdiv(n_rows, tiles["BLOCK_N"])
    n_col_tiles = triton.cdiv(vocab, tiles["BLOCK_V"])
    splits = _split_count(n_row_blocks, n_col_tiles)
    tiles_per_split = triton.cdiv(n_col_tiles, splits)
    splits = triton.cdiv(n_col_tiles, tiles_per_split)  # no empty split
    part = torch.empty((4 if with_entropy else 3, splits, n_rows), dtype=torch.float32, device=hidden.device)
    part_m, part_s, part_y = part[0], part[1], part[2]
    part_t = part[3] if with_entropy else None
    _forward_partials_kernel[(n_row_blocks, splits)](
        hidden, weight, bias if bias is not None else weight, targets,
        part_m, part_s, part_t if with_entropy else part_s, part_y,
        n_rows, vocab, hidden_size,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        inv_temperature, ignore_index, tiles_per_split,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, FP32_DOT=_interpreted(),
        DOT_PRECISION=_dot_precision(hidden.dtype), **tiles,
    )
    return part_m, part_s, part_t, part_y


def merge_partials(part_m, part_s, part_t, part_y):
    """Merge the per-split online log-sum-exp states into ``(lse, log_s, y_target, t_over_s)``, ``[N]``.

    With ``w_k = exp(m_k - m)``: ``s = sum_k w_k s_k`` and
    ``t = sum_k w_k (t_k + (m_k - m) s_k)`` (each split's ``t_k`` is centred on its own ``m_k``).
    """
    m = part_m.amax(dim=0)
    m_ref = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    weights = torch.exp(part_m - m_ref)
    s = (weights * part_s).sum(dim=0)
    log_s = torch.log(s)
    lse = m_ref + log_s
    y_target = part_y.sum(dim=0)
    if part_t is None:
        return lse, log_s, y_target, None
    shift = torch.where(part_s > 0, part_m - m_ref, torch.zeros_like(part_m))
    t = (weights * (part_t + shift * part_s)).sum(dim=0)
    return lse, log_s, y_target, t / s


def backward_dz(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    inv_temperature: float,
    ignore_index: int,
    col_offset: int,
    dz: torch.Tensor,
) -> None:
    """Write ``dz`` ``[R, C]`` (row stride ``dz.stride(0)``, unit column stride) for one chunk.

    ``hidden`` ``[R, H]``, ``targets`` / ``lse`` / ``entropy`` / ``grad_*`` ``[R]`` (contiguous,
    float32) are the chunk's rows; ``weight`` ``[C, H]`` and ``bias`` ``[C]`` its vocabulary rows,
    which start at global column ``col_offset`` (targets hold global ids).
    """
    n_rows, hidden_size = hidden.shape
    n_cols = weight.shape[0]
    tiles = _tiles()
    grid = (triton.cdiv(n_rows, tiles["BLOCK_N"]), triton.cdiv(n_cols, tiles["BLOCK_V"]))
    has_grad_entropy = grad_entropy is not None
    _backward_dz_kernel[grid](
        hidden, weight, bias if bias is not None else weight, targets, lse,
        entropy if has_grad_entropy else lse, grad_logp,
        grad_entropy if has_grad_entropy else grad_logp, dz,
        n_rows, n_cols, hidden_size, col_offset,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
        inv_temperature, ignore_index,
        HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=has_grad_entropy, FP32_DOT=_interpreted(),
        DOT_PRECISION=_dot_precision(hidden.dtype), **tiles,
    )
