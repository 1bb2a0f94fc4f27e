"""Per-token and per-row terms of the ``grpo_loss`` Triton kernels (``kernels/grpo_loss.py``): the
policy objectives (clip, SAPO, CISPO, VESPO), the clamped ratio, the k3 KL, the loads of a row's
tokens and the row passes (GSPO's sequence ratio, VESPO's sequence weight). The maths of each is
that of ``gtalign_fast.reference.grpo_loss``; the C++ and CUDA kernels have the same terms
(``csrc/cpu/grpo_loss_terms.h``, ``csrc/cuda/grpo_loss.cu``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from gtalign_fast.ops import _grpo_constants as constants

LOG_RATIO_LIMIT = tl.constexpr(constants.LOG_RATIO_LIMIT)
VESPO_MIN_LOG_WEIGHT = tl.constexpr(constants.VESPO_MIN_LOG_WEIGHT)
VESPO_MIN_LAMBDA = tl.constexpr(constants.VESPO_MIN_LAMBDA)


@triton.jit
def policy_term(ratio, adv, lp, low_bound, high_bound, delta, dual_clip, tau_pos, tau_neg, DUAL_CLIP: tl.constexpr,
                 SAPO: tl.constexpr, CISPO: tl.constexpr):
    """Per-token policy loss ``pg``, its derivative ``d pg / d ratio`` and ``coef_1`` (CISPO's
    gradient, which goes to logp directly, is ``cispo_grad``)."""
    if CISPO:
        # TRL's CISPO: -sg(min(r, eps_high)) * A * logp (high_bound is eps_high itself): no gradient via r.
        return -tl.minimum(ratio, high_bound) * adv * lp, tl.zeros_like(ratio), ratio
    if SAPO:
        # TRL's SAPO: -sigmoid(tau (r - 1)) * 4 / tau * A (tau_pos where A > 0), d / d r = -4 A s (1 - s).
        tau = tl.where(adv > 0, tl.cast(tau_pos, tl.float32), tl.cast(tau_neg, tl.float32))
        s = 1.0 / (1.0 + tl.exp(-tau * (ratio - 1.0)))
        return -s * 4.0 / tau * adv, -4.0 * adv * s * (1.0 - s), ratio
    coef_1 = tl.minimum(ratio, delta)
    gate_1 = tl.where(ratio <= delta, 1.0, 0.0)
    coef_2 = tl.minimum(tl.maximum(ratio, low_bound), high_bound)
    gate_2 = tl.where((ratio >= low_bound) & (ratio <= high_bound), 1.0, 0.0)
    surrogate_1 = coef_1 * adv
    surrogate_2 = coef_2 * adv
    # torch.min splits the gradient evenly between equal arguments (on-policy every token ties).
    gate = tl.where(
        surrogate_1 < surrogate_2, gate_1, tl.where(surrogate_1 > surrogate_2, gate_2, 0.5 * (gate_1 + gate_2))
    )
    pg = -tl.minimum(surrogate_1, surrogate_2)
    dpg = -adv * gate
    if DUAL_CLIP:
        # verl: for A < 0 the loss is capped at -c * A (no gradient once capped).
        cap = -adv * dual_clip
        capped = (adv < 0) & (pg > cap)
        tie = (adv < 0) & (pg == cap)
        pg = tl.where(capped, cap, pg)
        dpg = tl.where(capped, 0.0, tl.where(tie, 0.5 * dpg, dpg))
    return pg, dpg, coef_1


@triton.jit
def cispo_grad(ratio, adv, high_bound):
    """CISPO's ``d pg / d logp = -min(r, eps_high) * A`` (the capped ratio is detached, as TRL's)."""
    return -tl.minimum(ratio, high_bound) * adv


@triton.jit
def k3_term(logp, ref, kl_clamp):
    """k3 KL ``exp(d) - d - 1`` (d = ref - logp clamped to [-20, 20], the value to
    [-kl_clamp, kl_clamp]; kl_clamp = +inf: no clamp) and ``d kl / d ref``."""
    kl_clamp = tl.cast(kl_clamp, tl.float32)
    d = ref - logp
    d_clamped = tl.minimum(tl.maximum(d, -LOG_RATIO_LIMIT), LOG_RATIO_LIMIT)
    e = tl.exp(d_clamped)
    kl = e - d_clamped - 1.0
    gate = (d >= -LOG_RATIO_LIMIT) & (d <= LOG_RATIO_LIMIT) & (kl >= -kl_clamp) & (kl <= kl_clamp)
    kl = tl.minimum(tl.maximum(kl, -kl_clamp), kl_clamp)
    return kl, tl.where(gate, e - 1.0, 0.0)


@triton.jit
def clamped_exp(log_ratio):
    """``exp(clamp(log_ratio, -20, 20))`` and its derivative (0 where the log-ratio is clamped)."""
    ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -LOG_RATIO_LIMIT), LOG_RATIO_LIMIT))
    dratio = tl.where((log_ratio >= -LOG_RATIO_LIMIT) & (log_ratio <= LOG_RATIO_LIMIT), ratio, 0.0)
    return ratio, dratio


@triton.jit
def token_ratio(logp, old):
    """Token-level importance ratio and ``d ratio / d logp`` (0 where the log-ratio is clamped)."""
    return clamped_exp(logp - old)


@triton.jit
def loss_params(beta, eps_low, eps_high, delta, dual_clip, CISPO: tl.constexpr):
    """The float kernel arguments (they arrive as Python floats) as float32, with the epsilons turned
    into the clip bounds: ``(beta, 1 - eps_low, 1 + eps_high, delta, dual_clip)`` (CISPO: its ratio
    cap ``eps_high`` itself as the high bound, TRL's ``cispo_clip_ratio``)."""
    low_bound = 1.0 - tl.cast(eps_low, tl.float32)
    if CISPO:
        high_bound = tl.cast(eps_high, tl.float32)
    else:
        high_bound = 1.0 + tl.cast(eps_high, tl.float32)
    return tl.cast(beta, tl.float32), low_bound, high_bound, tl.cast(delta, tl.float32), tl.cast(dual_clip, tl.float32)


@triton.jit
def load_tokens(ptr, row, stride_b, cols, stride_t, valid):
    """The ``valid`` tokens ``cols`` of row ``row`` of a strided [B, T] view, as float32 (0 elsewhere)."""
    return tl.load(ptr + row * stride_b + cols * stride_t, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def load_valid(mask_ptr, row, s_mb, cols, s_mt, T):
    """``(in_row, valid)`` for the tokens ``cols`` of row ``row``: inside the row, and inside and masked in."""
    in_row = cols < T
    valid = tl.load(mask_ptr + row * s_mb + cols * s_mt, mask=in_row, other=0) != 0
    return in_row, valid


@triton.jit
def sequence_ratio(logp_ptr, old_ptr, mask_ptr, row, T, s_lb, s_lt, s_ob, s_ot, s_mb, s_mt,
                    ON_POLICY: tl.constexpr, BLOCK_T: tl.constexpr):
    """GSPO's ratio of row ``row`` (exp of the masked mean log-ratio, clamped) and its derivative."""
    offsets = tl.arange(0, BLOCK_T)
    lr_acc = tl.zeros([BLOCK_T], tl.float32)
    n_acc = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + offsets
        _, valid = load_valid(mask_ptr, row, s_mb, cols, s_mt, T)
        n_acc += tl.where(valid, 1.0, 0.0)
        if not ON_POLICY:
            lp = load_tokens(logp_ptr, row, s_lb, cols, s_lt, valid)
            old = load_tokens(old_ptr, row, s_ob, cols, s_ot, valid)
            lr_acc += tl.where(valid, lp - old, 0.0)
    mean_lr = tl.sum(lr_acc, axis=0) / tl.maximum(tl.sum(n_acc, axis=0), 1.0)
    return clamped_exp(mean_lr)


@triton.jit
def vespo_log_weight(logp_ptr, old_ptr, mask_ptr, is_ptr, row, T, s_lb, s_lt, s_ob, s_ot, s_mb, s_mt, s_ib, s_it,
                     ON_POLICY: tl.constexpr, HAS_IS: tl.constexpr, IS_ROW: tl.constexpr, BLOCK_T: tl.constexpr):
    """VESPO's sequence weight of row ``row`` as ``(log w, w)``: ``log w`` the masked sum of the
    log-ratios, each clamped to [-20, 20], plus the IS ratio's logs (each clamped to [ln 1e-8, 20];
    one per row when ``IS_ROW``), clamped to [ln 1e-8, 20] (TRL's ``get_gamma_weights``)."""
    offsets = tl.arange(0, BLOCK_T)
    lr_acc = tl.zeros([BLOCK_T], tl.float32)
    if (not ON_POLICY) or (HAS_IS and not IS_ROW):
        for start in range(0, T, BLOCK_T):
            cols = start + offsets
            _, valid = load_valid(mask_ptr, row, s_mb, cols, s_mt, T)
            if not ON_POLICY:
                lp = load_tokens(logp_ptr, row, s_lb, cols, s_lt, valid)
                old = load_tokens(old_ptr, row, s_ob, cols, s_ot, valid)
                lr = tl.minimum(tl.maximum(lp - old, -LOG_RATIO_LIMIT), LOG_RATIO_LIMIT)
                lr_acc += tl.where(valid, lr, 0.0)
            if HAS_IS and not IS_ROW:
                lr_acc += tl.where(valid, _clamped_log(load_tokens(is_ptr, row, s_ib, cols, s_it, valid)), 0.0)
    total = tl.sum(lr_acc, axis=0)
    if HAS_IS and IS_ROW:
        total += _clamped_log(tl.load(is_ptr + row * s_ib).to(tl.float32))
    log_w = tl.minimum(tl.maximum(total, VESPO_MIN_LOG_WEIGHT), LOG_RATIO_LIMIT)
    return log_w, tl.exp(log_w)


@triton.jit
def _clamped_log(x):
    """``clamp(log(x), ln 1e-8, 20)`` (TRL's log of the IS ratio in VESPO; NaN for a negative ratio)."""
    return tl.minimum(tl.maximum(tl.log(x), VESPO_MIN_LOG_WEIGHT), LOG_RATIO_LIMIT)


@triton.jit
def vespo_phi(adv, log_w, w, k_pos, lambda_pos, k_neg, lambda_neg):
    """TRL's VESPO weight ``phi = exp(lambda + k log w - lambda w)`` (``k``, ``lambda``: the ``_pos``
    pair where ``A >= 0``, lambda at least 1e-4), 0 where it is not finite (TRL's ``nan_to_num``)."""
    nonneg = adv >= 0
    k = tl.where(nonneg, tl.cast(k_pos, tl.float32), tl.cast(k_neg, tl.float32))
    lam = tl.where(nonneg, tl.cast(lambda_pos, tl.float32), tl.cast(lambda_neg, tl.float32))
    lam = tl.maximum(lam, VESPO_MIN_LAMBDA)
    phi = tl.exp(lam + k * log_w - lam * w)
    return tl.where(phi <= 3.4028234663852886e38, phi, 0.0)
