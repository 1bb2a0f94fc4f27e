"""Triton kernel for ``welfare_advantages``: Cobb-Douglas welfare, group statistics, advantages
and their scatter over each completion's tokens, in one launch.

Layout contract (shared with the C++ kernels): ``user``, ``llm``, ``welfare`` and ``advantages``
are contiguous float32 ``[N]``; groups are contiguous row ranges given either by a fixed size
(``offsets`` is None) or by int64 offsets ``[G+1]`` (0 first, N last, non-decreasing: checked
here, invalid ones set the error flag and are clamped into the rows); ``group_mean``,
``group_std`` (float32) and ``group_all_equal`` (bool) are ``[G]``; the optional mask ``[N, T]`` is
read with its strides, ``token_advantages`` is contiguous ``[N, T]``.

Maths, per completion i in group g (only valid, i.e. non-NaN, rewards enter the statistics):
``W_i = exp(alpha log U_i + (1 - alpha) log L_i)`` (a zero exponent drops its factor; NaN where U or
L is NaN; -inf marks a negative or infinite U or L, which sets the error flag: see
gtalign_fast.ops._device_checks);
``mean_g``, ``std_g`` (population or Bessel, 0 below two valid rewards), ``all_equal_g`` (the valid
rewards are all the same number: exact min == max, vacuous below two);
``A_i = (W_i - mean_g) / (std + eps)`` with the group's or the batch's std, or ``W_i - mean_g``;
``A_i = 0`` for missing rewards and all-equal groups.

Work split: a program owns a tile of ``ROWS`` consecutive groups and walks their members in
``[ROWS, COLS]`` chunks (several small groups per program, so groups of 8 do not waste a program
each; one group per program with a long loop when groups are large). The grid is 1-D over tiles
(axis 0 allows 2^31 - 1 programs, so G can be in the millions). ``scale="batch"`` needs the batch
std before any advantage can be written and a Triton grid has no barrier, so it runs as a single
program that visits every tile twice (still one launch; slower on a GPU at very large N).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gtalign_fast.ops import _device_checks as device_checks
from gtalign_fast.ops import _welfare_constants as constants

# The scale modes are defined once, in gtalign_fast/ops/_welfare_constants.py (the C++ and CUDA kernels
# read them from csrc/welfare_advantages_common.h). Triton reads a global inside @triton.jit code
# only when it is a tl.constexpr.
SCALE_BATCH = tl.constexpr(constants.SCALE_BATCH)
SCALE_NONE = tl.constexpr(constants.SCALE_NONE)
# Elements of one [ROWS, COLS] chunk and of one block of the token scatter.
TILE_ELEMENTS = 1024
BLOCK_TOKENS = 1024


@triton.jit
def _welfare(u, lm, alpha):
    """Cobb-Douglas welfare in log space (see the module docstring for NaN / -inf)."""
    log_u = tl.where(alpha > 0, alpha * tl.log(u), 0.0)
    log_l = tl.where(alpha < 1, (1.0 - alpha) * tl.log(lm), 0.0)
    w = tl.exp(log_u + log_l)
    w = tl.where((u != u) | (lm != lm), float("nan"), w)
    invalid = (u < 0) | (lm < 0) | (u == float("inf")) | (lm == float("inf"))
    return tl.where(invalid, float("-inf"), w)


@triton.jit
def _tile_groups(tile, offsets_ptr, error_ptr, G, N, group_size, FIXED: tl.constexpr, ROWS: tl.constexpr,
                 ERR_GROUP_OFFSETS: tl.constexpr):
    """The groups of one tile: ids, which exist, their first row and their length.

    Offsets are clamped so that every group's rows ``[start, start + len)`` lie in ``[0, N)``
    whatever the offsets hold (a direct call of the low-level op with offsets past N or decreasing
    must not read or write outside the buffers): ``start`` into ``[0, N]``, the end into
    ``[start, N]``. A no-op for valid offsets; invalid ones (not 0 first, N last, non-decreasing)
    also set ``ERR_GROUP_OFFSETS`` in the error flag, which the wrapper reports (no host sync).
    """
    groups = tl.arange(0, ROWS).to(tl.int64) + tile * ROWS  # tile * ROWS <= G + ROWS: no int32 overflow
    live = groups < G
    if FIXED:
        starts = groups * group_size
        lens = tl.where(live, group_size, 0).to(tl.int64)
    else:
        starts = tl.load(offsets_ptr + groups, mask=live, other=0).to(tl.int64)
        ends = tl.load(offsets_ptr + groups + 1, mask=live, other=0).to(tl.int64)
        bad = live & ((ends < starts) | ((groups == 0) & (starts != 0)) | ((groups == G - 1) & (ends != N)))
        tl.atomic_or(error_ptr, ERR_GROUP_OFFSETS, mask=tl.max(bad.to(tl.int32), axis=0) > 0)
        starts = tl.minimum(tl.maximum(starts, 0), N)
        ends = tl.minimum(tl.maximum(ends, starts), N)
        lens = tl.where(live, ends - starts, 0)
    return groups, live, starts, lens


@triton.jit
def _chunk_welfare(user_ptr, llm_ptr, starts, lens, c0, alpha, COLS: tl.constexpr):
    """W of one [ROWS, COLS] chunk of the tile's members, their flat index and which are real."""
    cols = c0 + tl.arange(0, COLS).to(tl.int64)
    in_group = cols[None, :] < lens[:, None]
    index = starts[:, None] + cols[None, :]
    u = tl.load(user_ptr + index, mask=in_group, other=0.0)
    lm = tl.load(llm_ptr + index, mask=in_group, other=0.0)
    return _welfare(u, lm, alpha), index, in_group


@triton.jit
def _tile_moments(user_ptr, llm_ptr, welfare_ptr, error_ptr, starts, lens, alpha, ROWS: tl.constexpr,
                  COLS: tl.constexpr, ERR_BAD_REWARD: tl.constexpr):
    """Per group: count, mean, sum of squared deviations and all-equal flag; writes W.

    Two passes (mean, then deviations) so the variance has no cancellation; sums in float64. A
    negative or infinite reward (W = -inf) sets ``ERR_BAD_REWARD`` in the error flag.
    """
    max_len = tl.max(lens, axis=0)
    total = tl.zeros([ROWS], tl.float64)
    count = tl.zeros([ROWS], tl.float64)
    lowest = tl.full([ROWS], float("inf"), tl.float32)
    highest = tl.full([ROWS], float("-inf"), tl.float32)
    n_bad = tl.zeros([ROWS, COLS], tl.int32)  # reduced once, after the walk
    for c0 in range(0, max_len, COLS):
        w, index, in_group = _chunk_welfare(user_ptr, llm_ptr, starts, lens, c0, alpha, COLS)
        n_bad += (in_group & (w == float("-inf"))).to(tl.int32)
        tl.store(welfare_ptr + index, w, mask=in_group)
        valid = in_group & (w == w)
        total += tl.sum(tl.where(valid, w, 0.0), axis=1).to(tl.float64)
        count += tl.sum(valid.to(tl.float32), axis=1).to(tl.float64)
        lowest = tl.minimum(lowest, tl.min(tl.where(valid, w, float("inf")), axis=1))
        highest = tl.maximum(highest, tl.max(tl.where(valid, w, float("-inf")), axis=1))
    tl.atomic_or(error_ptr, ERR_BAD_REWARD, mask=tl.max(tl.max(n_bad, axis=1), axis=0) > 0)
    mean = tl.where(count > 0, total / tl.maximum(count, 1.0), 0.0)
    mean32 = mean.to(tl.float32)
    m2 = tl.zeros([ROWS], tl.float64)
    for c0 in range(0, max_len, COLS):
        w, index, in_group = _chunk_welfare(user_ptr, llm_ptr, starts, lens, c0, alpha, COLS)
        deviation = tl.where(in_group & (w == w), w - mean32[:, None], 0.0)
        m2 += tl.sum(deviation * deviation, axis=1).to(tl.float64)
    all_equal = (count < 2) | (lowest == highest)
    return count, mean, m2, all_equal


@triton.jit
def _std(count, m2, UNBIASED: tl.constexpr):
    """Standard deviation from (count, m2); 0 below two values."""
    if UNBIASED:
        divisor = count - 1.0
    else:
        divisor = count
    return tl.where(count >= 2, tl.sqrt(m2 / tl.maximum(divisor, 1.0)), 0.0)


@triton.jit
def _tile_statistics(user_ptr, llm_ptr, welfare_ptr, mean_ptr, std_ptr, equal_ptr, error_ptr, groups, live, starts,
                     lens, alpha, UNBIASED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                     ERR_BAD_REWARD: tl.constexpr):
    """Write W and the group statistics (mean, std, all-equal flag) of a tile of groups; returns
    ``(count, mean, m2, all_equal, std)`` (float64 but for the flag) for the advantages."""
    count, mean, m2, all_equal = _tile_moments(user_ptr, llm_ptr, welfare_ptr, error_ptr, starts, lens, alpha, ROWS,
                                               COLS, ERR_BAD_REWARD)
    std = tl.where(all_equal, 0.0, _std(count, m2, UNBIASED))
    tl.store(mean_ptr + groups, mean.to(tl.float32), mask=live)
    tl.store(std_ptr + groups, std.to(tl.float32), mask=live)
    tl.store(equal_ptr + groups, all_equal, mask=live)
    return count, mean, m2, all_equal, std


@triton.jit
def _inverse_denominator(std, eps, SCALE: tl.constexpr):
    """1 / (std + eps) (0 if that is not finite), or 1 for scale="none"; float32."""
    if SCALE == SCALE_NONE:
        inv = tl.full(std.shape, 1.0, tl.float64)
    else:
        denominator = std + eps
        inv = tl.where(denominator > 0, 1.0 / tl.where(denominator > 0, denominator, 1.0), 0.0)
    return inv.to(tl.float32)


@triton.jit
def _tile_advantages(user_ptr, llm_ptr, advantages_ptr, starts, lens, alpha, mean32, inv32, zero_group,
                     COLS: tl.constexpr):
    """A = (W - mean) * inv per member; 0 for missing rewards and for groups flagged zero."""
    max_len = tl.max(lens, axis=0)
    for c0 in range(0, max_len, COLS):
        w, index, in_group = _chunk_welfare(user_ptr, llm_ptr, starts, lens, c0, alpha, COLS)
        keep = (w == w) & (zero_group == 0)[:, None]
        advantage = tl.where(keep, (w - mean32[:, None]) * inv32[:, None], 0.0)
        tl.store(advantages_ptr + index, advantage, mask=in_group)


@triton.jit
def _tile_tokens(advantages_ptr, mask_ptr, tokens_ptr, starts, lens, live, T, mask_stride0, mask_stride1,
                 BLOCK: tl.constexpr):
    """token_advantages[i, t] = A_i where mask[i, t] != 0, for the tile's rows (a contiguous range)."""
    # The A_i were just stored by other threads of this program: make them visible first.
    tl.debug_barrier()
    first_row = tl.min(tl.where(live, starts, 2**62), axis=0)
    end_row = tl.max(tl.where(live, starts + lens, 0), axis=0)
    end = end_row * T
    for f0 in range(first_row * T, end, BLOCK):
        flat = f0 + tl.arange(0, BLOCK).to(tl.int64)
        inside = flat < end
        row = flat // T
        col = flat - row * T
        advantage = tl.load(advantages_ptr + row, mask=inside, other=0.0)
        on = tl.load(mask_ptr + row * mask_stride0 + col * mask_stride1, mask=inside, other=0)
        tl.store(tokens_ptr + flat, tl.where(on != 0, advantage, 0.0), mask=inside)


@triton.jit
def _welfare_advantages_kernel(
    user_ptr, llm_ptr, offsets_ptr, mask_ptr,
    welfare_ptr, advantages_ptr, mean_ptr, std_ptr, equal_ptr, tokens_ptr, error_ptr,
    G, N, group_size, n_tiles, alpha_arg, eps_arg, T, mask_stride0, mask_stride1,
    FIXED: tl.constexpr, SCALE: tl.constexpr, UNBIASED: tl.constexpr, HAS_MASK: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_T: tl.constexpr,
    ERR_GROUP_OFFSETS: tl.constexpr, ERR_BAD_REWARD: tl.constexpr,
):
    alpha = tl.cast(alpha_arg, tl.float32)
    eps = tl.cast(eps_arg, tl.float64)
    if SCALE == SCALE_BATCH:
        # Batch std: the only program. Pass 1 writes W and the group statistics and merges every
        # group into the batch moments (Chan et al.'s parallel merge); pass 2 writes advantages.
        batch_count = tl.cast(0.0, tl.float64)
        batch_mean = tl.cast(0.0, tl.float64)
        batch_m2 = tl.cast(0.0, tl.float64)
        for tile in range(0, n_tiles):
            groups, live, starts, lens = _tile_groups(tile, offsets_ptr, error_ptr, G, N, group_size, FIXED, ROWS,
                                                      ERR_GROUP_OFFSETS)
            count, mean, m2, _, _ = _tile_statistics(user_ptr, llm_ptr, welfare_ptr, mean_ptr, std_ptr, equal_ptr,
                                                     error_ptr, groups, live, starts, lens, alpha, UNBIASED, ROWS,
                                                     COLS, ERR_BAD_REWARD)
            tile_count = tl.sum(count, axis=0)
            tile_mean = tl.sum(count * mean, axis=0) / tl.maximum(tile_count, 1.0)
            tile_m2 = tl.sum(m2 + count * (mean - tile_mean) * (mean - tile_mean), axis=0)
            merged = batch_count + tile_count
            delta = tile_mean - batch_mean
            share = tl.where(merged > 0, tile_count / tl.maximum(merged, 1.0), 0.0)
            batch_mean += delta * share
            batch_m2 += tile_m2 + delta * delta * batch_count * share
            batch_count = merged
        batch_std = _std(batch_count, batch_m2, UNBIASED)
        tl.debug_barrier()  # the group statistics stored above are read back below
        for tile in range(0, n_tiles):
            groups, live, starts, lens = _tile_groups(tile, offsets_ptr, error_ptr, G, N, group_size, FIXED, ROWS,
                                                      ERR_GROUP_OFFSETS)
            mean32 = tl.load(mean_ptr + groups, mask=live, other=0.0)
            all_equal = tl.load(equal_ptr + groups, mask=live, other=1).to(tl.int32)
            inv32 = _inverse_denominator(tl.full([ROWS], 0.0, tl.float64) + batch_std, eps, SCALE)
            _tile_advantages(user_ptr, llm_ptr, advantages_ptr, starts, lens, alpha, mean32, inv32,
                             all_equal | (inv32 == 0).to(tl.int32), COLS)
            if HAS_MASK:
                _tile_tokens(advantages_ptr, mask_ptr, tokens_ptr, starts, lens, live, T, mask_stride0,
                             mask_stride1, BLOCK_T)
    else:
        tile = tl.program_id(0)
        groups, live, starts, lens = _tile_groups(tile, offsets_ptr, error_ptr, G, N, group_size, FIXED, ROWS,
                                                  ERR_GROUP_OFFSETS)
        _, mean, _, all_equal, std = _tile_statistics(user_ptr, llm_ptr, welfare_ptr, mean_ptr, std_ptr, equal_ptr,
                                                      error_ptr, groups, live, starts, lens, alpha, UNBIASED, ROWS,
                                                      COLS, ERR_BAD_REWARD)
        inv32 = _inverse_denominator(std, eps, SCALE)
        _tile_advantages(user_ptr, llm_ptr, advantages_ptr, starts, lens, alpha, mean.to(tl.float32), inv32,
                         (all_equal | (inv32 == 0)).to(tl.int32), COLS)
        if HAS_MASK:
            _tile_tokens(advantages_ptr, mask_ptr, tokens_ptr, starts, lens, live, T, mask_stride0, mask_stride1,
                         BLOCK_T)


def tile_shape(n_rows: int, n_groups: int) -> tuple[int, int]:
    """(ROWS, COLS): COLS covers an average group in one chunk (up to TILE_ELEMENTS), ROWS fills
    the rest of the tile with further groups. Chosen from the shapes alone (no device sync)."""
    average = -(-n_rows // max(n_groups, 1))
    cols = min(TILE_ELEMENTS, max(2, triton.next_power_of_2(max(average, 1))))
    rows = max(1, min(TILE_ELEMENTS // cols, triton.next_power_of_2(max(n_groups, 1))))
    return rows, cols


def _check_layout(user, llm, offsets, group_size, mask, n_groups, *outputs) -> None:
    """What the kernel indexes with, checked from metadata only (no host sync): the launcher is
    reachable without the public function's validation."""
    device, n_rows = user.device, user.numel()
    for name, tensor in (("user", user), ("llm", llm)):
        if tensor.dtype != torch.float32 or not tensor.is_contiguous() or tensor.numel() != n_rows:
            raise ValueError(f"welfare_advantages: {name} must be contiguous float32 [N]")
    if offsets is not None:
        if offsets.dtype != torch.int64 or not offsets.is_contiguous() or offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError("welfare_advantages: offsets must be contiguous int64 [G+1]")
    elif group_size < 1 or n_rows % group_size != 0:
        raise ValueError(f"welfare_advantages: group size {group_size} must be >= 1 and divide N = {n_rows}")
    if mask is not None and (mask.dim() != 2 or mask.shape[0] != n_rows):
        raise ValueError("welfare_advantages: mask must be [N, T]")
    for tensor in (llm, offsets, mask):
        if tensor is not None and tensor.device != device:
            raise ValueError(f"welfare_advantages: every tensor must be on {device}, got {tensor.device}")
    for out, numel, dtype in outputs:
        if out.dtype != dtype or out.numel() != numel or not out.is_contiguous() or out.device != device:
            raise ValueError(
                f"welfare_advantages: an output must be contiguous {dtype} of {numel} elements on {device}"
            )


def welfare_advantages(
    user: torch.Tensor,
    llm: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
    alpha: float,
    scale_mode: int,
    eps: float,
    unbiased: bool,
    mask: torch.Tensor | None,
    welfare: torch.Tensor,
    advantages: torch.Tensor,
    group_mean: torch.Tensor,
    group_std: torch.Tensor,
    group_all_equal: torch.Tensor,
    token_advantages: torch.Tensor,
    error_flag: torch.Tensor | None = None,
) -> None:
    """Launch the kernel once; fills every output (same contract as the C++ op). Invalid offsets
    and negative or infinite rewards set ``ERR_GROUP_OFFSETS`` / ``ERR_NONFINITE_REWARD`` in
    ``error_flag`` (int32 ``[1]``, see ``gtalign_fast.ops._device_checks``; default: the device's flag).
    The layout is checked here (metadata only), as the C++ kernels check it."""
    n_rows = user.numel()
    n_groups = offsets.numel() - 1 if offsets is not None else (n_rows // group_size if group_size >= 1 else -1)
    _check_layout(user, llm, offsets, group_size, mask, n_groups,
                  (welfare, n_rows, torch.float32), (advantages, n_rows, torch.float32),
                  (group_mean, n_groups, torch.float32), (group_std, n_groups, torch.float32),
                  (group_all_equal, n_groups, torch.bool))
    if n_groups <= 0:
        return
    if error_flag is None:
        error_flag = device_checks.error_flag(user.device)
    rows, cols = tile_shape(n_rows, n_groups)
    n_tiles = triton.cdiv(n_groups, rows)
    has_mask = mask is not None and mask.shape[1] > 0
    if has_mask and (token_advantages.numel() != mask.numel() or not token_advantages.is_contiguous()
                     or token_advantages.dtype != torch.float32 or token_advantages.device != user.device):
        raise ValueError("welfare_advantages: token_advantages must be contiguous float32 [N, T]")
    grid = (1,) if scale_mode == constants.SCALE_BATCH else (n_tiles,)
    _welfare_advantages_kernel[grid](
        user, llm, offsets if offsets is not None else user, mask if has_mask else user,
        welfare, advantages, group_mean, group_std, group_all_equal, token_advantages if has_mask else welfare,
        error_flag, n_groups, n_rows, group_size, n_tiles, alpha, eps,
        mask.shape[1] if has_mask else 0, mask.stride(0) if has_mask else 0, mask.stride(1) if has_mask else 0,
        FIXED=offsets is None, SCALE=scale_mode, UNBIASED=bool(unbiased), HAS_MASK=has_mask,
        ROWS=rows, COLS=cols, BLOCK_T=BLOCK_TOKENS, ERR_GROUP_OFFSETS=device_checks.ERR_GROUP_OFFSETS,
        ERR_BAD_REWARD=device_checks.ERR_NONFINITE_REWARD, num_warps=4,
    )
