"""Triton kernels for ``grpo_loss``: the clipped-surrogate GRPO / PPO policy loss with k3 KL, its
metrics, and the backward, from per-token log-probs.

Layout contract (shared with the C++ and CUDA kernels): ``logp``, ``old_logp``, ``ref_logp``,
``advantages`` and ``mask`` are strided ``[B, T]`` views (``[B]`` advantages arrive expanded, with
a time stride of 0; the mask is uint8, nonzero = the token counts). ``dlogp`` and ``dref`` are
contiguous ``[B, T]``.

Forward, one launch:

1. ``_grpo_loss_rows_kernel``, one program per sequence (a 1-D grid over B), walks the row in
   blocks of tokens and writes the row's partial sums to ``row_stats[B, NUM_SEQUENCE_STATS]`` (the
   ``STAT_*`` columns of ``gtalign_fast.ops._grpo_constants``). Sequence-level importance sampling
   (GSPO) walks the row twice: once for the masked mean log-ratio, once for the loss.
2. The last program to finish (a persistent zeroed counter, incremented with acquire-release
   semantics) reduces the ``[B]`` partial sums: the per-row loss weights of the aggregation mode
   (they need the global token count), the loss, the metrics; then resets the counter. Without a
   counter this step is a second launch, ``_grpo_loss_finalize_kernel``.

Per token, with ``r`` the importance ratio (``exp`` of the log-ratio clamped to [-20, 20]):
``coef_1 = min(r, delta)``, ``coef_2 = clip(r, 1 - eps_low, 1 + eps_high)``,
``pg = -min(coef_1 * A, coef_2 * A)``, dual clip (A < 0): ``pg = min(pg, -c * A)``;
``kl = clip(exp(d) - d - 1, -kl_clamp, kl_clamp)`` with ``d = clip(ref - logp, -20, 20)`` (no
KL clamp: ``kl_clamp = +inf``);
``loss_t = pg + beta * kl``; the loss is ``sum_b w_b * sum_t mask * loss_t``.

Backward, one launch, one program per row:
``dlogp_t = g * w_b * mask_t * (dpg/dr * dr/dlogp_t - beta * dkl/dref_t)`` and
``dref_t = g * w_b * mask_t * beta * dkl/dref_t``. Every derivative follows torch's conventions
(``clamp`` passes the gradient on the closed interval, ``min`` splits it evenly on ties), so the
kernels agree with autograd through the reference. At sequence level ``dpg/dr * dr/dlogp_t`` is
the same for every token of the row; the forward stores it in ``row_stats[:, STAT_SEQ_GRAD]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from gtalign_fast.kernels.grpo_loss_terms import (
    cispo_grad,
    k3_term,
    load_tokens,
    load_valid,
    loss_params,
    policy_term,
    sequence_ratio,
    token_ratio,
    vespo_log_weight,
    vespo_phi,
)
from gtalign_fast.ops import _device_checks as device_checks
from gtalign_fast.ops import _grpo_constants as constants

# The row_stats columns, aggregation modes, metrics and clamp limits are defined once, in
# gtalign_fast/ops/_grpo_constants.py (documented there; csrc/grpo_loss_common.h holds the same values
# for the C++ and CUDA kernels). Triton reads a global inside @triton.jit code only when it is a
# tl.constexpr, so the kernels see them through these bindings.
STAT_LOSS_SUM = tl.constexpr(constants.STAT_LOSS_SUM)
STAT_TOKENS = tl.constexpr(constants.STAT_TOKENS)
STAT_LOW = tl.constexpr(constants.STAT_LOW)
STAT_HIGH = tl.constexpr(constants.STAT_HIGH)
STAT_REGION = tl.constexpr(constants.STAT_REGION)
STAT_KL_SUM = tl.constexpr(constants.STAT_KL_SUM)
STAT_RATIO_SUM = tl.constexpr(constants.STAT_RATIO_SUM)
STAT_SEQ_GRAD = tl.constexpr(constants.STAT_SEQ_GRAD)
NUM_SEQUENCE_STATS = tl.constexpr(constants.NUM_SEQUENCE_STATS)
MODE_SEQ_MEAN = tl.constexpr(constants.MODE_SEQ_MEAN)
MODE_TOKEN_MEAN = tl.constexpr(constants.MODE_TOKEN_MEAN)
MODE_NORMALISER_TENSOR = tl.constexpr(constants.MODE_NORMALISER_TENSOR)
METRIC_LOW = tl.constexpr(constants.METRIC_LOW)
METRIC_HIGH = tl.constexpr(constants.METRIC_HIGH)
METRIC_REGION = tl.constexpr(constants.METRIC_REGION)
METRIC_KL = tl.constexpr(constants.METRIC_KL)
METRIC_RATIO = tl.constexpr(constants.METRIC_RATIO)
LOG_RATIO_LIMIT = tl.constexpr(constants.LOG_RATIO_LIMIT)

# Tile bounds of the launches (tuning, not part of the layout contract).
MAX_BLOCK_T = 1024
MAX_BLOCK_B = 1024


@triton.jit
def _grpo_loss_rows_kernel(
    logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, is_ptr, stats_ptr,
    num_items_ptr, loss_ptr, metrics_ptr, weights_ptr, error_ptr, counter_ptr,
    T,
    s_lb, s_lt, s_ob, s_ot, s_rb, s_rt, s_ab, s_at, s_mb, s_mt, s_ib, s_it,
    beta, eps_low, eps_high, delta, dual_clip, kl_clamp, tau_pos, tau_neg, vk_pos, vl_pos, vk_neg, vl_neg,
    const_weight,
    ON_POLICY: tl.constexpr,
    HAS_REF: tl.constexpr,
    SEQ_LEVEL: tl.constexpr,
    ROW_METRICS: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    BIAS_KL: tl.constexpr,
    SAPO: tl.constexpr,
    CISPO: tl.constexpr,
    VESPO: tl.constexpr,
    HAS_IS: tl.constexpr,
    IS_ROW: tl.constexpr,
    BLOCK_T: tl.constexpr,
    FUSED: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    ERR_NUM_ITEMS: tl.constexpr,
):
    _grpo_loss_row(logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, is_ptr, stats_ptr, T,
                   s_lb, s_lt, s_ob, s_ot, s_rb, s_rt, s_ab, s_at, s_mb, s_mt, s_ib, s_it,
                   beta, eps_low, eps_high, delta, dual_clip, kl_clamp, tau_pos, tau_neg,
                   vk_pos, vl_pos, vk_neg, vl_neg,
                   ON_POLICY, HAS_REF, SEQ_LEVEL, ROW_METRICS, DUAL_CLIP, BIAS_KL, SAPO, CISPO, VESPO, HAS_IS, IS_ROW,
                   BLOCK_T)
    if FUSED:
        # One launch per forward: the last program to finish reduces every row. The barrier and the
        # release half of the atomic publish this program's row; its acquire half (in the last
        # program) makes every row visible; the last program resets the counter for the next launch.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if arrived == tl.num_programs(0) - 1:
            _grpo_loss_finalize(stats_ptr, num_items_ptr, loss_ptr, metrics_ptr, weights_ptr, error_ptr,
                                tl.num_programs(0), const_weight, MODE, ROW_METRICS, BLOCK_B, ERR_NUM_ITEMS)
            tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def _grpo_loss_row(
    logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, is_ptr, stats_ptr,
    T,
    s_lb, s_lt, s_ob, s_ot, s_rb, s_rt, s_ab, s_at, s_mb, s_mt, s_ib, s_it,
    beta, eps_low, eps_high, delta, dual_clip, kl_clamp, tau_pos, tau_neg, vk_pos, vl_pos, vk_neg, vl_neg,
    ON_POLICY: tl.constexpr,
    HAS_REF: tl.constexpr,
    SEQ_LEVEL: tl.constexpr,
    ROW_METRICS: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    BIAS_KL: tl.constexpr,
    SAPO: tl.constexpr,
    CISPO: tl.constexpr,
    VESPO: tl.constexpr,
    HAS_IS: tl.constexpr,
    IS_ROW: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One sequence's partial sums into row_stats[row] (row = the program id)."""
    row = tl.program_id(0).to(tl.int64)
    beta, low_bound, high_bound, delta, dual_clip = loss_params(beta, eps_low, eps_high, delta, dual_clip, CISPO)
    offsets = tl.arange(0, BLOCK_T)

    # Sequence level (GSPO): first the masked mean log-ratio of the row.
    seq_ratio = tl.cast(1.0, tl.float32)
    seq_dratio = tl.cast(1.0, tl.float32)
    if SEQ_LEVEL:
        seq_ratio, seq_dratio = sequence_ratio(logp_ptr, old_ptr, mask_ptr, row, T, s_lb, s_lt, s_ob, s_ot, s_mb,
                                                s_mt, ON_POLICY, BLOCK_T)
    log_w = tl.cast(0.0, tl.float32)
    w = tl.cast(1.0, tl.float32)
    if VESPO:  # TRL's VESPO: the row's sequence weight first
        log_w, w = vespo_log_weight(logp_ptr, old_ptr, mask_ptr, is_ptr, row, T, s_lb, s_lt, s_ob, s_ot, s_mb, s_mt,
                                    s_ib, s_it, ON_POLICY, HAS_IS, IS_ROW, BLOCK_T)

    loss_acc = tl.zeros([BLOCK_T], tl.float32)
    tokens_acc = tl.zeros([BLOCK_T], tl.float32)
    low_acc = tl.zeros([BLOCK_T], tl.float32)
    high_acc = tl.zeros([BLOCK_T], tl.float32)
    kl_acc = tl.zeros([BLOCK_T], tl.float32)
    ratio_acc = tl.zeros([BLOCK_T], tl.float32)
    dpg_acc = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + offsets
        _, valid = load_valid(mask_ptr, row, s_mb, cols, s_mt, T)
        lp = load_tokens(logp_ptr, row, s_lb, cols, s_lt, valid)
        adv = load_tokens(adv_ptr, row, s_ab, cols, s_at, valid)
        if SEQ_LEVEL:
            ratio = tl.zeros([BLOCK_T], tl.float32) + seq_ratio
        elif ON_POLICY:
            ratio = tl.zeros([BLOCK_T], tl.float32) + 1.0
        else:
            old = load_tokens(old_ptr, row, s_ob, cols, s_ot, valid)
            ratio, _ = token_ratio(lp, old)
        if VESPO:  # -sg(phi) * A * logp: no gradient through the ratio
            phi = vespo_phi(adv, log_w, w, vk_pos, vl_pos, vk_neg, vl_neg)
            pg, dpg, coef_1 = -phi * adv * lp, tl.zeros_like(ratio), ratio
        else:
            pg, dpg, coef_1 = policy_term(ratio, adv, lp, low_bound, high_bound, delta, dual_clip, tau_pos,
                                          tau_neg, DUAL_CLIP, SAPO, CISPO)
            if HAS_IS:  # the IS ratio weights the policy term (VESPO has it in its sequence weight instead)
                is_ratio = load_tokens(is_ptr, row, s_ib, cols, s_it, valid)
                pg = pg * is_ratio
                dpg = dpg * is_ratio
        token_loss = pg
        if HAS_REF:
            ref = load_tokens(ref_ptr, row, s_rb, cols, s_rt, valid)
            kl, _ = k3_term(lp, ref, kl_clamp)
            if BIAS_KL:  # TRL's use_bias_correction_kl: kl * r, whose d / d r (beta * kl) joins dpg
                dpg += beta * kl
                kl = kl * ratio
            kl_acc += tl.where(valid, kl, 0.0)
            token_loss += beta * kl
        loss_acc += tl.where(valid, token_loss, 0.0)
        tokens_acc += tl.where(valid, 1.0, 0.0)
        dpg_acc += tl.where(valid, dpg, 0.0)
        if not ROW_METRICS:
            low_acc += tl.where(valid & (coef_1 < low_bound) & (adv < 0), 1.0, 0.0)
            if VESPO:  # the high slot holds the sum of phi (TRL's vespo/phi_seq_mean)
                high_acc += tl.where(valid, phi, 0.0)
            else:
                high_acc += tl.where(valid & (coef_1 > high_bound) & (adv > 0), 1.0, 0.0)
            ratio_acc += tl.where(valid, ratio, 0.0)

    tokens = tl.sum(tokens_acc, axis=0)
    if ROW_METRICS:
        # Per-sequence ratio and advantage: one 0/1 indicator per row, as TRL's GSPO metrics.
        row_adv = tl.load(adv_ptr + row * s_ab).to(tl.float32)
        row_coef_1 = tl.minimum(seq_ratio, delta)
        low = tl.where((row_coef_1 < low_bound) & (row_adv < 0), 1.0, 0.0)
        high = tl.where((row_coef_1 > high_bound) & (row_adv > 0), 1.0, 0.0)
        region = tl.maximum(low, high)
        ratio_stat = seq_ratio
        if VESPO:  # TRL's phi_seq (the other metrics are not reported for VESPO)
            high = vespo_phi(row_adv, log_w, w, vk_pos, vl_pos, vk_neg, vl_neg)
    else:
        low = tl.sum(low_acc, axis=0)
        high = tl.sum(high_acc, axis=0)
        # low and high exclude each other (they need opposite signs of A).
        region = low + high
        ratio_stat = tl.sum(ratio_acc, axis=0)
    seq_grad = tl.cast(0.0, tl.float32)
    if SEQ_LEVEL:
        seq_grad = tl.sum(dpg_acc, axis=0) * seq_dratio / tl.maximum(tokens, 1.0)
    out = stats_ptr + row * NUM_SEQUENCE_STATS
    tl.store(out + STAT_LOSS_SUM, tl.sum(loss_acc, axis=0))
    tl.store(out + STAT_TOKENS, tokens)
    tl.store(out + STAT_LOW, low)
    tl.store(out + STAT_HIGH, high)
    tl.store(out + STAT_REGION, region)
    tl.store(out + STAT_KL_SUM, tl.sum(kl_acc, axis=0))
    tl.store(out + STAT_RATIO_SUM, ratio_stat)
    tl.store(out + STAT_SEQ_GRAD, seq_grad)


@triton.jit
def _grpo_loss_finalize_kernel(
    stats_ptr, num_items_ptr, loss_ptr, metrics_ptr, weights_ptr, error_ptr,
    B, const_weight,
    MODE: tl.constexpr,
    ROW_METRICS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    ERR_NUM_ITEMS: tl.constexpr,
):
    _grpo_loss_finalize(stats_ptr, num_items_ptr, loss_ptr, metrics_ptr, weights_ptr, error_ptr, B, const_weight,
                        MODE, ROW_METRICS, BLOCK_B, ERR_NUM_ITEMS)


@triton.jit
def _grpo_loss_finalize(
    stats_ptr, num_items_ptr, loss_ptr, metrics_ptr, weights_ptr, error_ptr,
    B, const_weight,
    MODE: tl.constexpr,
    ROW_METRICS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    ERR_NUM_ITEMS: tl.constexpr,
):
    """Reduce the [B] row partial sums: per-row loss weights, the loss, the metrics. The rows are
    read volatile (past L1): in the fused forward other programs wrote them."""
    const_weight = tl.cast(const_weight, tl.float32)
    offsets = tl.arange(0, BLOCK_B)
    tokens_acc = tl.zeros([BLOCK_B], tl.float32)
    low_acc = tl.zeros([BLOCK_B], tl.float32)
    high_acc = tl.zeros([BLOCK_B], tl.float32)
    region_acc = tl.zeros([BLOCK_B], tl.float32)
    kl_acc = tl.zeros([BLOCK_B], tl.float32)
    ratio_acc = tl.zeros([BLOCK_B], tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = (start + offsets).to(tl.int64)
        in_batch = rows < B
        base = stats_ptr + rows * NUM_SEQUENCE_STATS
        tokens_acc += tl.load(base + STAT_TOKENS, mask=in_batch, other=0.0, volatile=True)
        low_acc += tl.load(base + STAT_LOW, mask=in_batch, other=0.0, volatile=True)
        high_acc += tl.load(base + STAT_HIGH, mask=in_batch, other=0.0, volatile=True)
        region_acc += tl.load(base + STAT_REGION, mask=in_batch, other=0.0, volatile=True)
        kl_acc += tl.load(base + STAT_KL_SUM, mask=in_batch, other=0.0, volatile=True)
        ratio_acc += tl.load(base + STAT_RATIO_SUM, mask=in_batch, other=0.0, volatile=True)
    total_tokens = tl.maximum(tl.sum(tokens_acc, axis=0), 1.0)
    batch = tl.cast(B, tl.float32)
    metric_count = batch if ROW_METRICS else total_tokens
    tl.store(metrics_ptr + METRIC_LOW, tl.sum(low_acc, axis=0) / metric_count)
    tl.store(metrics_ptr + METRIC_HIGH, tl.sum(high_acc, axis=0) / metric_count)
    tl.store(metrics_ptr + METRIC_REGION, tl.sum(region_acc, axis=0) / metric_count)
    tl.store(metrics_ptr + METRIC_KL, tl.sum(kl_acc, axis=0) / total_tokens)
    tl.store(metrics_ptr + METRIC_RATIO, tl.sum(ratio_acc, axis=0) / metric_count)

    if MODE == MODE_TOKEN_MEAN:
        shared_weight = 1.0 / total_tokens
    elif MODE == MODE_NORMALISER_TENSOR:
        # num_items_in_batch as a device tensor: not finite and > 0 sets the error flag (reported
        # without a host sync) and makes the loss NaN, never a silent -inf or 0.
        num_items = tl.load(num_items_ptr).to(tl.float32)
        bad = ~((num_items > 0) & (num_items < float("inf")))
        tl.atomic_or(error_ptr, ERR_NUM_ITEMS, mask=bad)
        shared_weight = tl.where(bad, float("nan"), 1.0 / num_items)
    else:  # MODE_CONSTANT (MODE_SEQ_MEAN has a weight per row and never reads it)
        shared_weight = const_weight
    loss_acc = tl.zeros([BLOCK_B], tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = (start + offsets).to(tl.int64)
        in_batch = rows < B
        base = stats_ptr + rows * NUM_SEQUENCE_STATS
        if MODE == MODE_SEQ_MEAN:
            tokens = tl.load(base + STAT_TOKENS, mask=in_batch, other=1.0, volatile=True)
            weight = 1.0 / (batch * tl.maximum(tokens, 1.0))
        else:
            weight = tl.zeros([BLOCK_B], tl.float32) + shared_weight
        row_loss = tl.load(base + STAT_LOSS_SUM, mask=in_batch, other=0.0, volatile=True)
        loss_acc += tl.where(in_batch, weight * row_loss, 0.0)
        tl.store(weights_ptr + rows, weight, mask=in_batch)
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0))


@triton.jit
def _grpo_loss_bwd_kernel(
    grad_loss_ptr, weights_ptr, stats_ptr,
    logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, is_ptr, dlogp_ptr, dref_ptr,
    T,
    s_lb, s_lt, s_ob, s_ot, s_rb, s_rt, s_ab, s_at, s_mb, s_mt, s_ib, s_it,
    beta, eps_low, eps_high, delta, dual_clip, kl_clamp, tau_pos, tau_neg, vk_pos, vl_pos, vk_neg, vl_neg,
    ON_POLICY: tl.constexpr,
    HAS_REF: tl.constexpr,
    REF_GRAD: tl.constexpr,
    SEQ_LEVEL: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    BIAS_KL: tl.constexpr,
    SAPO: tl.constexpr,
    CISPO: tl.constexpr,
    VESPO: tl.constexpr,
    HAS_IS: tl.constexpr,
    IS_ROW: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    beta, low_bound, high_bound, delta, dual_clip = loss_params(beta, eps_low, eps_high, delta, dual_clip, CISPO)
    row_scale = tl.load(grad_loss_ptr).to(tl.float32) * tl.load(weights_ptr + row)
    seq_grad = tl.load(stats_ptr + row * NUM_SEQUENCE_STATS + STAT_SEQ_GRAD)
    seq_ratio = tl.cast(1.0, tl.float32)
    if SEQ_LEVEL and ((BIAS_KL and HAS_REF) or CISPO):  # r for the KL weight or CISPO: one more pass
        seq_ratio, _ = sequence_ratio(logp_ptr, old_ptr, mask_ptr, row, T, s_lb, s_lt, s_ob, s_ot, s_mb, s_mt,
                                       ON_POLICY, BLOCK_T)
    log_w = tl.cast(0.0, tl.float32)
    w = tl.cast(1.0, tl.float32)
    if VESPO:
        log_w, w = vespo_log_weight(logp_ptr, old_ptr, mask_ptr, is_ptr, row, T, s_lb, s_lt, s_ob, s_ot, s_mb, s_mt,
                                    s_ib, s_it, ON_POLICY, HAS_IS, IS_ROW, BLOCK_T)
    offsets = tl.arange(0, BLOCK_T)
    for start in range(0, T, BLOCK_T):
        cols = start + offsets
        in_row, valid = load_valid(mask_ptr, row, s_mb, cols, s_mt, T)
        lp = load_tokens(logp_ptr, row, s_lb, cols, s_lt, valid)
        if SEQ_LEVEL:
            ratio = tl.zeros([BLOCK_T], tl.float32) + seq_ratio
            dratio = ratio  # unused: the ratio's gradient is in seq_grad
            dloss = tl.zeros([BLOCK_T], tl.float32) + seq_grad
            if CISPO:  # the per-token term outside seq_grad: min(r, eps_high) is detached
                adv = load_tokens(adv_ptr, row, s_ab, cols, s_at, valid)
                direct = cispo_grad(ratio, adv, high_bound)
                if HAS_IS:  # (seq_grad has the ratio in already)
                    direct = direct * load_tokens(is_ptr, row, s_ib, cols, s_it, valid)
                dloss += direct
            if VESPO:  # likewise: phi is detached
                adv = load_tokens(adv_ptr, row, s_ab, cols, s_at, valid)
                dloss -= vespo_phi(adv, log_w, w, vk_pos, vl_pos, vk_neg, vl_neg) * adv
        else:
            adv = load_tokens(adv_ptr, row, s_ab, cols, s_at, valid)
            if ON_POLICY:
                ratio = tl.zeros([BLOCK_T], tl.float32) + 1.0
                dratio = ratio
            else:
                old = load_tokens(old_ptr, row, s_ob, cols, s_ot, valid)
                ratio, dratio = token_ratio(lp, old)
            _, dpg, _ = policy_term(ratio, adv, lp, low_bound, high_bound, delta, dual_clip, tau_pos, tau_neg,
                                     DUAL_CLIP, SAPO, CISPO)
            dloss = dpg * dratio
            if CISPO:
                dloss += cispo_grad(ratio, adv, high_bound)
            if VESPO:  # -phi * A, phi detached (policy_term's clip gradient is not used: VESPO replaces it)
                dloss = -vespo_phi(adv, log_w, w, vk_pos, vl_pos, vk_neg, vl_neg) * adv
            elif HAS_IS:
                dloss = dloss * load_tokens(is_ptr, row, s_ib, cols, s_it, valid)
        if HAS_REF:
            ref = load_tokens(ref_ptr, row, s_rb, cols, s_rt, valid)
            kl, dkl_dref = k3_term(lp, ref, kl_clamp)
            if BIAS_KL:  # d (kl * r): r * dkl, plus kl * dr (at sequence level inside seq_grad)
                if not SEQ_LEVEL:
                    dloss += beta * kl * dratio
                dkl_dref = dkl_dref * ratio
            dloss -= beta * dkl_dref
            if REF_GRAD:
                dref = tl.where(valid, row_scale * beta * dkl_dref, 0.0)
                tl.store(dref_ptr + row * T + cols, dref.to(dref_ptr.dtype.element_ty), mask=in_row)
        dlogp = tl.where(valid, row_scale * dloss, 0.0)
        tl.store(dlogp_ptr + row * T + cols, dlogp.to(dlogp_ptr.dtype.element_ty), mask=in_row)


def _block_t(length: int) -> int:
    return min(MAX_BLOCK_T, triton.next_power_of_2(max(length, 16)))


def _strides(*tensors):
    """Flattened (row, time) strides of [B, T] views; an absent tensor gives (0, 0)."""
    out = []
    for tensor in tensors:
        out.extend(tensor.stride() if tensor is not None else (0, 0))
    return out


def _is_flags(is_ratio) -> dict:
    """HAS_IS, and IS_ROW: a time stride of 0 is one IS ratio per sequence (VESPO adds its log once)."""
    return dict(HAS_IS=is_ratio is not None, IS_ROW=is_ratio is not None and is_ratio.stride(1) == 0)


def _check_layout(logp, *others) -> None:
    """The kernels index every input with logp's [B, T] (launchers reachable without the public
    function's validation, e.g. through ``torch.ops.gtalign_fast.grpo_loss``, check it here: metadata
    only, no host sync)."""
    if logp.dim() != 2:
        raise ValueError(f"grpo_loss: logp must be [B, T], got shape {tuple(logp.shape)}")
    for other in others:
        if other is not None and (other.shape != logp.shape or other.device != logp.device):
            raise ValueError(
                f"grpo_loss: every input must be a [B, T] = {tuple(logp.shape)} view on {logp.device}, got "
                f"{tuple(other.shape)} on {other.device}"
            )


def _check_outputs(logp, *outputs) -> None:
    for out, numel in outputs:
        if out.dtype != torch.float32 or out.numel() != numel or not out.is_contiguous() or out.device != logp.device:
            raise ValueError(f"grpo_loss: a float32 buffer of {numel} elements on {logp.device} was expected, got "
                             f"{out.dtype} {tuple(out.shape)} on {out.device}")


def _float_params(params: Sequence[float]) -> tuple[float, ...]:
    """The kernels' float arguments (beta ... vespo_lambda_neg) from the ops' ``params`` list
    (``_grpo_constants.PARAM_*`` order, as the C++ kernels take it)."""
    if len(params) != constants.NUM_PARAMS:
        raise ValueError(f"grpo_loss: params must hold {constants.NUM_PARAMS} values "
                         f"(gtalign_fast.ops._grpo_loss.kernel_params), got {len(params)}")
    return tuple(params[index] for index in _FLOAT_PARAMS)


# The float parameters in the kernels' argument order.
_FLOAT_PARAMS = (
    constants.PARAM_BETA, constants.PARAM_EPSILON_LOW, constants.PARAM_EPSILON_HIGH, constants.PARAM_DELTA,
    constants.PARAM_DUAL_CLIP, constants.PARAM_KL_CLAMP, constants.PARAM_SAPO_TAU_POS, constants.PARAM_SAPO_TAU_NEG,
    constants.PARAM_VESPO_K_POS, constants.PARAM_VESPO_LAMBDA_POS, constants.PARAM_VESPO_K_NEG,
    constants.PARAM_VESPO_LAMBDA_NEG,
)


def _param_flags(params: Sequence[float]) -> dict[str, bool]:
    """The compile-time switches the parameters select (as the C++ kernels' clip_params)."""
    return {
        "SEQ_LEVEL": params[constants.PARAM_SEQ_LEVEL] != 0, "DUAL_CLIP": params[constants.PARAM_DUAL_CLIP] > 0,
        "BIAS_KL": params[constants.PARAM_BIAS_KL] != 0, "SAPO": params[constants.PARAM_SAPO_TAU_POS] > 0,
        "CISPO": params[constants.PARAM_CISPO] != 0, "VESPO": params[constants.PARAM_VESPO] != 0,
    }


def grpo_loss_forward(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    num_items: torch.Tensor | None,
    is_ratio: torch.Tensor | None,
    params: Sequence[float],
    row_metrics: bool,
    mode: int,
    const_weight: float,
    loss: torch.Tensor,
    metrics: torch.Tensor,
    row_stats: torch.Tensor,
    row_weights: torch.Tensor,
    error_flag: torch.Tensor | None = None,
    finalize_counter: torch.Tensor | None = None,
) -> None:
    """Launch the forward: one launch when ``finalize_counter`` is given (an int32 ``[1]`` tensor
    that is zero, ``gtalign_fast.ops._grpo_loss.finalize_counter``; the last program to finish reduces the rows and
    leaves it at zero), else the row kernel and the finalize kernel. A ``num_items`` tensor that is
    not finite and > 0 sets ``ERR_NUM_ITEMS`` in ``error_flag`` (int32 ``[1]``, see
    ``gtalign_fast.ops._device_checks``; default: the device's flag) and gives a NaN loss."""
    batch, length = logp.shape
    _check_layout(logp, old_logp, ref_logp, advantages, mask, is_ratio)
    _check_outputs(logp, (loss, 1), (metrics, constants.NUM_METRICS), (row_stats, batch * constants.NUM_SEQUENCE_STATS),
                   (row_weights, batch))
    if num_items is not None and (num_items.numel() < 1 or num_items.device != logp.device):
        raise ValueError("grpo_loss: num_items must hold one number on logp's device")
    if error_flag is None:
        error_flag = device_checks.error_flag(logp.device)
    elif error_flag.dtype != torch.int32 or error_flag.numel() < 1 or error_flag.device != logp.device:
        raise ValueError("grpo_loss: error_flag must be an int32 tensor of one element on logp's device")
    fused = finalize_counter is not None
    if fused and (finalize_counter.dtype != torch.int32 or finalize_counter.numel() < 1
                  or finalize_counter.device != logp.device):
        raise ValueError("grpo_loss: finalize_counter must be an int32 tensor of one element on logp's device")
    if batch == 0:
        return
    num_items = num_items if num_items is not None else row_stats
    block_b = min(MAX_BLOCK_B, triton.next_power_of_2(max(batch, 16)))
    _grpo_loss_rows_kernel[(batch,)](
        logp, old_logp if old_logp is not None else logp, ref_logp if ref_logp is not None else logp,
        advantages, mask, is_ratio if is_ratio is not None else logp, row_stats,
        num_items, loss, metrics, row_weights, error_flag, finalize_counter if fused else error_flag,
        length, *_strides(logp, old_logp, ref_logp, advantages, mask, is_ratio), *_float_params(params),
        const_weight, ON_POLICY=old_logp is None, HAS_REF=ref_logp is not None, ROW_METRICS=row_metrics,
        **_param_flags(params), **_is_flags(is_ratio),
        BLOCK_T=_block_t(length),
        FUSED=fused, MODE=mode, BLOCK_B=block_b, ERR_NUM_ITEMS=device_checks.ERR_NUM_ITEMS, num_warps=4,
    )
    if not fused:
        _grpo_loss_finalize_kernel[(1,)](
            row_stats, num_items, loss, metrics, row_weights, error_flag, batch, const_weight,
            MODE=mode, ROW_METRICS=row_metrics, BLOCK_B=block_b, ERR_NUM_ITEMS=device_checks.ERR_NUM_ITEMS,
            num_warps=4,
        )


def grpo_loss_backward(
    grad_loss: torch.Tensor,
    row_weights: torch.Tensor,
    row_stats: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    is_ratio: torch.Tensor | None,
    params: Sequence[float],
    dlogp: torch.Tensor,
    dref: torch.Tensor,
) -> None:
    """Launch the backward kernel: writes every element of ``dlogp`` and, unless it is empty (no
    gradient for ref_logp), of ``dref``. The arguments are those of the C++ kernels."""
    batch, length = logp.shape
    _check_layout(logp, old_logp, ref_logp, advantages, mask, is_ratio)
    _check_outputs(logp, (grad_loss, 1), (row_weights, batch), (row_stats, batch * constants.NUM_SEQUENCE_STATS))
    for out in (dlogp, dref):
        if out.numel() and (out.numel() != batch * length or not out.is_contiguous() or out.dtype != logp.dtype
                            or out.device != logp.device):
            raise ValueError("grpo_loss: dlogp / dref must be contiguous [B, T] in logp's dtype and device")
    if dlogp.numel() != batch * length or (dref.numel() and ref_logp is None):
        raise ValueError("grpo_loss: dlogp must be [B, T]; a dref needs ref_logp")
    _grpo_loss_bwd_kernel[(batch,)](
        grad_loss, row_weights, row_stats,
        logp, old_logp if old_logp is not None else logp, ref_logp if ref_logp is not None else logp,
        advantages, mask, is_ratio if is_ratio is not None else logp, dlogp, dref if dref.numel() > 0 else dlogp,
        length, *_strides(logp, old_logp, ref_logp, advantages, mask, is_ratio), *_float_params(params),
        ON_POLICY=old_logp is None, HAS_REF=ref_logp is not None, REF_GRAD=dref.numel() > 0,
        **_param_flags(params), **_is_flags(is_ratio),
        BLOCK_T=_block_t(length),
        num_warps=4,
    )
