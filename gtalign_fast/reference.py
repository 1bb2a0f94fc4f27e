"""Pure-PyTorch specification of every op.

These functions are the truth the kernels are tested against: written for clarity, not speed,
they materialise whatever they need and are differentiable through autograd. Run them in
float64 to get reference values. Each takes the same arguments as the public op in
:mod:`gtalign_fast.ops` (minus ``backend``).
"""

from __future__ import annotations

import torch

from .ops._grpo_constants import (
    LOG_RATIO_LIMIT,
    LOSS_NORMALISERS,
    NORM_LENGTH,
    NORM_NUM_ITEMS,
    NORM_ROW_TOKENS,
    NORM_ROWS,
    NORM_ROWS_LENGTH,
    NORM_TOKENS,
    VESPO_METRIC,
    VESPO_MIN_LAMBDA,
    VESPO_MIN_LOG_WEIGHT,
)
from .ops._seeds import philox_uniform  # the noise every sample_ backend draws (its specification)
from .ops._welfare_constants import SCALES

__all__ = [
    "token_logprobs",
    "linear_token_logprobs",
    "welfare_advantages",
    "cobb_douglas",
    "grpo_loss",
    "GRPO_LOSS_TYPES",
    "sample",
    "philox_uniform",
    "decode_linear",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (reference values); every other float type is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# token_logprobs


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each target token (and the entropy) under ``softmax(logits / T)``.

    Parameters
    ----------
    logits : Tensor, shape ``[..., V]``, any float dtype
    targets : Tensor, shape ``[...]``, int64
        Token ids in ``[0, V)``, or ``ignore_index``.
    temperature : float
        ``T > 0``; the logits are divided by it before the log-sum-exp.
    with_entropy : bool
        Also return the entropy of the temperature-scaled distribution.
    ignore_index : int
        Positions whose target equals it give 0 (log-prob and entropy) and no gradient.

    Returns
    -------
    logp : Tensor, shape ``[...]``
        ``z_t / T - logsumexp(z / T)``; float64 for float64 logits, float32 otherwise.
    entropy : Tensor, shape ``[...]``, or None
        ``-sum_j p_j log p_j``, with ``0 log 0 = 0``.
    """
    scaled = logits.to(compute_dtype(logits.dtype)) / temperature
    log_norm = torch.logsumexp(scaled, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    target_logit = scaled.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, target_logit - log_norm, torch.zeros_like(log_norm))
    if not with_entropy:
        return logp, None
    probs = torch.softmax(scaled, dim=-1)
    # -inf logits have p = 0 and contribute nothing; keep them out of the product (0 * -inf = nan).
    finite_scaled = torch.where(probs > 0, scaled, torch.zeros_like(scaled))
    entropy = log_norm - (probs * finite_scaled).sum(dim=-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


# ---------------------------------------------------------------------------------------------
# grpo_loss

GRPO_LOSS_TYPES = tuple(LOSS_NORMALISERS)  # the normaliser of each: _grpo_constants.LOSS_NORMALISERS


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    dual_clip: float | None = None,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch=None,
    kl_clamp: float | None = None,
    use_bias_correction_kl: bool = False,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    importance_sampling_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate GRPO / PPO policy loss with k3 KL, written plainly from TRL and verl.

    Parameters
    ----------
    logp, old_logp, ref_logp : Tensor, shape ``[B, T]``
        Per-token log-probs of the policy, of the sampling policy (None: on-policy,
        ``old = logp.detach()``) and of the reference model.
    advantages : Tensor, shape ``[B]`` or ``[B, T]``
    mask : Tensor, shape ``[B, T]``; nonzero = the token counts.
    importance_sampling_ratio : Tensor, shape ``[B]``, ``[B, 1]`` or ``[B, T]``, optional
        Weights of the policy term (TRL's vLLM IS ratio); VESPO adds their logs to its sequence weight.
    Other arguments: see :func:`gtalign_fast.ops.grpo_loss`.

    Returns
    -------
    loss : Tensor, 0-dim; float64 for float64 inputs, float32 otherwise.
    metrics : dict of 0-dim Tensors
        ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``,
        ``ratio_mean`` (``vespo/phi_seq_mean`` instead of these four for ``loss_type="vespo"``) and,
        when ``ref_logp`` is given, ``kl``.
    """
    dtype = compute_dtype(logp.dtype)
    logp = logp.to(dtype)
    old = logp.detach() if old_logp is None else old_logp.to(dtype)
    valid = mask != 0
    weight = valid.to(dtype)
    batch, length = logp.shape
    adv = advantages.to(dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high

    # Importance ratio (verl clamps the log-ratio to [-20, 20] before exp).
    log_ratio = logp - old
    row_tokens = weight.sum(-1).clamp(min=1.0)
    if importance_sampling_level == "sequence":
        # GSPO as TRL: the exp of the masked mean log-ratio of the sequence, shape [B, 1].
        log_ratio = ((log_ratio * weight).sum(-1) / row_tokens).unsqueeze(-1)
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))

    # Clipped surrogate: coef_2 is clipped from the raw ratio, delta caps coef_1 (TRL's order).
    coef_1 = ratio if delta is None else torch.clamp(ratio, max=delta)
    coef_2 = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if loss_type == "sapo":
        # TRL's SAPO: a soft gate -sigmoid(tau (r - 1)) * 4 / tau * A instead of the clip.
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg).to(dtype)
        per_token_loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    high_bound = 1 + epsilon_high
    if loss_type == "cispo":
        # TRL's CISPO: the ratio capped at epsilon_high itself (ScaleRL's eps_max, not 1 + eps) and
        # detached, times A log p: the gradient is -min(r, eps_high) A whatever r is.
        high_bound = epsilon_high
        per_token_loss = -torch.clamp(ratio, max=epsilon_high).detach() * adv * logp
    is_ratio = None
    if importance_sampling_ratio is not None:  # [B, 1] per sequence, or [B, T]
        is_ratio = importance_sampling_ratio.detach().to(dtype).reshape(batch, -1)
    if loss_type == "vespo":
        phi = _vespo_phi(logp - old, weight, adv, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg,
                         is_ratio)
        per_token_loss = -phi * adv * logp
    if dual_clip is not None:
        # verl's dual clip: for A < 0 the loss is capped at -A * c.
        per_token_loss = torch.where(adv < 0, torch.min(-adv * dual_clip, per_token_loss), per_token_loss)
    if is_ratio is not None and loss_type != "vespo":
        # TRL's vLLM IS correction (verl's rollout IS weights): the policy term times the ratio, before the KL.
        per_token_loss = per_token_loss * torch.where(valid, is_ratio, 0.0)  # masked-out ratios are never read
    per_token_loss = per_token_loss.expand(batch, length)

    if ref_logp is not None:
        # k3, log-ratio clamped to [-20, 20]; the estimate is TRL's (unclamped) unless kl_clamp is
        # given (verl's "low_var_kl" clamps it to [-10, 10]).
        kl_log_ratio = torch.clamp(ref_logp.to(dtype) - logp, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        per_token_kl = torch.exp(kl_log_ratio) - kl_log_ratio - 1
        if kl_clamp is not None:
            per_token_kl = torch.clamp(per_token_kl, -kl_clamp, kl_clamp)
        if use_bias_correction_kl:
            # TRL's importance-sampling correction of the KL: times the raw ratio (before delta).
            per_token_kl = per_token_kl * ratio
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * per_token_kl

    masked_loss = per_token_loss * weight
    total_tokens = weight.sum().clamp(min=1.0)
    norm_length = length if max_completion_length is None else max_completion_length
    normaliser = LOSS_NORMALISERS.get(loss_type)
    if normaliser == NORM_ROW_TOKENS:
        loss = (masked_loss.sum(-1) / row_tokens).mean()
    elif normaliser == NORM_TOKENS:
        loss = masked_loss.sum() / total_tokens
    elif normaliser == NORM_ROWS_LENGTH:
        loss = masked_loss.sum() / (batch * norm_length)
    elif normaliser == NORM_NUM_ITEMS:
        num_items = total_tokens if num_items_in_batch is None else num_items_in_batch
        if isinstance(num_items, torch.Tensor):
            num_items = num_items.to(dtype).reshape(())
        loss = masked_loss.sum() / num_items
    elif normaliser == NORM_ROWS:
        loss = masked_loss.sum(-1).mean()
    elif normaliser == NORM_LENGTH:
        loss = masked_loss.sum() / norm_length
    else:
        raise ValueError(f"grpo_loss: unknown loss_type {loss_type!r}; choose one of {GRPO_LOSS_TYPES}")

    # Metrics (TRL): low clip only where A < 0, high clip only where A > 0; token means, or
    # means over sequences when the ratio and the advantage are both per sequence.
    with torch.no_grad():
        is_low = ((coef_1 < 1 - epsilon_low) & (adv < 0)).to(dtype)
        is_high = ((coef_1 > high_bound) & (adv > 0)).to(dtype)  # cispo: TRL's cispo_clip_ratio
        is_region = torch.maximum(is_low, is_high)

        def batch_mean(x: torch.Tensor) -> torch.Tensor:
            if x.shape[1] == 1:
                return x.mean()
            return (x.expand(batch, length) * weight).sum() / total_tokens

        metrics = {
            "clip_ratio/low_mean": batch_mean(is_low),
            "clip_ratio/high_mean": batch_mean(is_high),
            "clip_ratio/region_mean": batch_mean(is_region),
            "ratio_mean": batch_mean(ratio if is_low.shape[1] == 1 else ratio.expand(batch, length)),
        }
        if loss_type == "vespo":  # TRL logs its mean Gamma weight, no clip ratio
            metrics = {VESPO_METRIC: batch_mean(phi)}
        if ref_logp is not None:
            metrics["kl"] = (per_token_kl * weight).sum() / total_tokens
    return loss, metrics


def _vespo_phi(log_ratio, weight, adv, k_pos, lambda_pos, k_neg, lambda_neg, is_ratio=None) -> torch.Tensor:
    """TRL's VESPO Gamma weight (``GRPOTrainer.get_gamma_weights``), detached: ``phi = exp(lambda +
    k log w - lambda w)`` with ``log w`` the sequence's masked sum of per-token log-ratios (each
    clamped to [-20, 20]) plus the logs of the IS ratio (each clamped to [ln 1e-8, 20]; masked tokens
    excluded), clamped to [ln 1e-8, 20]; ``(k, lambda)`` the ``_pos`` pair where ``A >= 0``;
    ``[B, 1]`` for per-sequence advantages, else ``[B, T]``."""
    log_ratio = log_ratio.detach()
    seq_log_ratio = (torch.clamp(log_ratio, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT) * weight).sum(-1, keepdim=True)
    if is_ratio is not None:
        log_is = torch.clamp(torch.log(is_ratio), VESPO_MIN_LOG_WEIGHT, LOG_RATIO_LIMIT)
        if log_is.shape[1] != 1:  # per token: the masked sum (a masked-out ratio is never read)
            log_is = torch.where(weight != 0, log_is, 0.0).sum(-1, keepdim=True)
        seq_log_ratio = seq_log_ratio + log_is
    log_w = torch.clamp(seq_log_ratio, VESPO_MIN_LOG_WEIGHT, LOG_RATIO_LIMIT)
    nonneg = adv >= 0
    k = torch.where(nonneg, k_pos, k_neg).to(log_w.dtype)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).to(log_w.dtype).clamp(min=VESPO_MIN_LAMBDA)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


# ---------------------------------------------------------------------------------------------
# welfare_advantages

def _check_scale(op: str, scale: str) -> None:
    if scale not in SCALES:  # the public scale names, defined once in ops/_welfare_constants.py
        raise ValueError(f"{op}: scale must be one of {tuple(SCALES)}, got {scale!r}")


def _group_bounds(group, n: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of every group, from a fixed size or an offsets tensor."""
    if isinstance(group, torch.Tensor):
        edges = [int(x) for x in group.tolist()]
        return list(zip(edges[:-1], edges[1:]))
    return [(start, start + group) for start in range(0, n, group)]


def _std(deviation_sq_sum: torch.Tensor, count: int, unbiased: bool) -> torch.Tensor:
    """Standard deviation from the sum of squared deviations; 0 for fewer than 2 values."""
    if count < 2:
        return torch.zeros_like(deviation_sq_sum)
    return torch.sqrt(deviation_sq_sum / (count - 1 if unbiased else count))


def cobb_douglas(user: torch.Tensor, llm: torch.Tensor, alpha: float) -> torch.Tensor:
    """``W = U^alpha * L^(1 - alpha)`` in log space; NaN where U or L is NaN (reward missing).

    A zero exponent drops its factor (``0^0 = 1``): alpha = 0 gives ``W = L``, alpha = 1 gives ``W = U``;
    otherwise U = 0 or L = 0 gives W = 0. Inputs must be >= 0 (or NaN); this function does not check.
    """
    log_w = torch.zeros_like(user)
    if alpha > 0:
        log_w = log_w + alpha * torch.log(user)
    if alpha < 1:
        log_w = log_w + (1 - alpha) * torch.log(llm)
    welfare = torch.exp(log_w)
    missing = torch.isnan(user) | torch.isnan(llm)
    return torch.where(missing, torch.full_like(welfare, float("nan")), welfare)


def group_advantages(values: torch.Tensor, group, scale: str = "group", eps: float = 1e-6, unbiased: bool = True):
    """GRPO group advantages of rewards (NaN marks a missing one) and the group statistics: the one
    implementation of them (``welfare_advantages`` here, the trainer's plain rewards in
    :func:`gtalign_fast.training.scoring.group_advantages`).

    ``group``, ``scale``, ``eps`` and ``unbiased`` as in :func:`welfare_advantages`, whose Notes
    state the rules. Returns ``(advantages [N], group_mean [G], group_std [G], group_all_equal [G]
    bool)`` in the rewards' dtype.
    """
    _check_scale("group_advantages", scale)
    dtype, device = values.dtype, values.device
    valid = ~torch.isnan(values)
    bounds = _group_bounds(group, values.numel())
    zero = torch.zeros((), dtype=dtype, device=device)

    means, stds, all_equal = [], [], []
    for start, end in bounds:
        rewards = values[start:end][valid[start:end]]
        count = rewards.numel()
        mean = rewards.mean() if count > 0 else zero
        equal = count < 2 or bool(rewards.min() == rewards.max())
        std = zero if equal else _std(((rewards - mean) ** 2).sum(), count, unbiased)
        means.append(mean)
        stds.append(std)
        all_equal.append(equal)
    group_mean = torch.stack(means) if means else torch.zeros(0, dtype=dtype, device=device)
    group_std = torch.stack(stds) if stds else torch.zeros(0, dtype=dtype, device=device)

    batch_rewards = values[valid]
    batch_std = _std(((batch_rewards - batch_rewards.mean()) ** 2).sum(), batch_rewards.numel(), unbiased)

    advantages = torch.zeros_like(values)
    for g, (start, end) in enumerate(bounds):
        if all_equal[g]:
            continue
        centred = values[start:end] - group_mean[g]
        if scale == "group":
            denominator = group_std[g] + eps
        elif scale == "batch":
            denominator = batch_std + eps
        else:
            denominator = torch.ones((), dtype=dtype, device=device)
        scaled = centred / denominator if bool(denominator > 0) else torch.zeros_like(centred)
        advantages[start:end] = torch.where(valid[start:end], scaled, zero)

    group_all_equal = torch.tensor(all_equal, dtype=torch.bool, device=device).reshape(len(bounds))
    return advantages, group_mean, group_std, group_all_equal


def welfare_advantages(
    user: torch.Tensor,
    llm: torch.Tensor,
    group,
    alpha: float = 0.5,
    scale: str = "group",
    eps: float = 1e-6,
    unbiased: bool = True,
    mask: torch.Tensor | None = None,
):
    """Cobb-Douglas welfare and GRPO group advantages, written plainly one group at a time.

    Parameters
    ----------
    user, llm : Tensor, shape ``[N]``, float32 or float64
        U and L per completion, ``>= 0``; NaN marks a missing reward.
    group : int or Tensor
        A fixed group size dividing N, or int64 offsets ``[G+1]`` (0 first, N last, non-decreasing).
    alpha : float in [0, 1]
    scale : {"group", "batch", "none"}
        Divide ``W - group mean`` by the group std + eps, by the batch std + eps, or not at all.
    eps : float >= 0
    unbiased : bool
        Bessel-corrected (``n - 1``) or population (``n``) standard deviations.
    mask : Tensor, shape ``[N, T]``, optional
        Where non-zero, ``token_advantages[i, t] = advantages[i]``; 0 elsewhere.

    Returns
    -------
    tuple ``(welfare [N], advantages [N], group_mean [G], group_std [G], group_all_equal [G] bool,
    token_advantages [N, T] or None)``; float64 for float64 inputs, float32 otherwise.

    Notes
    -----
    Statistics use only the valid (non-NaN) rewards of a group. A group with no valid reward has
    mean 0; a group with fewer than 2 valid rewards has std 0. ``group_all_equal`` is True when the
    valid rewards of a group are all exactly equal (vacuously for fewer than 2); such groups, and
    missing rewards, get advantage 0 (and std 0). The batch std of ``scale="batch"`` is taken over
    every valid reward of the batch. A zero denominator (std + eps == 0) gives advantage 0.
    """
    _check_scale("welfare_advantages", scale)
    dtype = compute_dtype(user.dtype)
    u, lm = user.to(dtype), llm.to(dtype)
    bad = (u < 0) | (lm < 0) | torch.isinf(u) | torch.isinf(lm)
    if bool(bad.any()):
        raise ValueError("welfare_advantages: user and llm rewards must be finite and >= 0 (NaN = missing)")
    welfare = cobb_douglas(u, lm, alpha)
    advantages, group_mean, group_std, group_all_equal = group_advantages(welfare, group, scale, eps, unbiased)
    token_advantages = None
    if mask is not None:
        token_advantages = torch.where(mask != 0, advantages[:, None], torch.zeros((), dtype=dtype, device=u.device))
    return welfare, advantages, group_mean, group_std, group_all_equal, token_advantages


# ---------------------------------------------------------------------------------------------
# sample_ (the fused sampling kernel): the sampling specification (its noise: ops._seeds.philox_uniform)

def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    bias_ids: torch.Tensor | None,
    bias_values: torch.Tensor | None,
    forced: torch.Tensor,
    seeds: torch.Tensor,
    uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Specification of ``sample_`` (not in place): sort-based filters and a Gumbel-max draw.

    Per row ``b`` (all per-row arguments are ``[B]`` tensors here):

    1. biases: ``z[b, id] = round_to_dtype(float32(z[b, id]) + bias)`` for each id ``>= 0``;
    2. temperature: ``y = z / T`` (``T = 0`` is greedy and uses ``T = 1`` for the log-probs);
    3. top-k (``0 < k < V``): keep ``y >= `` the k-th largest value (ties with it are all kept);
    4. top-p (``p < 1``): of what top-k kept, keep ``y >= tau`` for the largest row value ``tau``
       whose kept mass ``sum(exp(y) for y >= tau)`` is ``>= p`` times the top-k mass (ties kept);
    5. min-p (``> 0``): keep ``exp(y - max y) >= min_p``;
    6. a forced token (``forced[b] >= 0``) replaces the kept set by that one token;
    7. token: the forced one, else the argmax over kept tokens of ``y + g`` (``g = -log(-log u)``,
       Gumbel noise from ``uniform``; no noise when greedy); ties go to the lowest index.

    Parameters
    ----------
    logits : Tensor ``[B, V]``, any float dtype (read only)
    temperature, top_p, min_p : Tensor ``[B]``, float
    top_k, forced, seeds : Tensor ``[B]``, int64 (``top_k = 0``: off; ``forced = -1``: none)
    bias_ids, bias_values : Tensor ``[B, K]`` (int64, ``-1`` = padding; float) or None
    uniform : Tensor ``[B, V]``, float32, optional
        The noise; default :func:`philox_uniform` of ``seeds`` (what every backend uses).

    Returns
    -------
    tokens : Tensor ``[B]``, int64
    logprobs : Tensor ``[B]``, float64
        Log-prob of the token under the processed distribution (0 for a forced token).
    raw_logprobs : Tensor ``[B]``, float64
        Log-prob of the token under ``softmax(z_original / T)`` (no bias, no filter).
    processed : Tensor ``[B, V]``, logits' dtype
        What ``sample_`` leaves in the buffer: ``y`` where kept, ``-inf`` elsewhere.
    """
    batch, vocab = logits.shape
    rows = torch.arange(batch, device=logits.device)
    biased = logits.clone()
    if bias_ids is not None:
        valid = bias_ids >= 0
        row_index = rows[:, None].expand_as(bias_ids)[valid]
        col_index = bias_ids[valid]
        add_dtype = torch.promote_types(logits.dtype, torch.float32)
        biased[row_index, col_index] = (
            biased[row_index, col_index].to(add_dtype) + bias_values[valid].to(add_dtype)
        ).to(logits.dtype)

    greedy = temperature == 0
    inv_t = torch.where(greedy, 1.0, 1.0 / temperature.double().clamp_min(1e-300))[:, None]
    raw_y = logits.double() * inv_t
    raw_lse = torch.logsumexp(raw_y, dim=-1)
    y = biased.double() * inv_t
    row_max = y.max(dim=-1, keepdim=True).values
    weights = torch.exp(y - row_max)

    ordered = y.sort(dim=-1, descending=True).values
    minus_inf = torch.full((batch,), float("-inf"), dtype=torch.float64, device=logits.device)
    k_active = (top_k > 0) & (top_k < vocab)
    kth = ordered.gather(1, (top_k.clamp(1, vocab) - 1)[:, None]).squeeze(1)
    tau_k = torch.where(k_active, kth, minus_inf)
    ordered_weights = torch.exp(ordered - row_max) * (ordered >= tau_k[:, None])
    cumulative = ordered_weights.cumsum(dim=-1)
    target = top_p.double() * cumulative[:, -1]
    first_enough = (cumulative < target[:, None]).sum(dim=-1).clamp_max(vocab - 1)
    tau_p = torch.where(top_p < 1, ordered.gather(1, first_enough[:, None]).squeeze(1), minus_inf)
    tau = torch.maximum(tau_k, tau_p)
    log_min_p = torch.where(min_p > 0, torch.log(min_p.double().clamp_min(1e-300)), minus_inf)
    keep = (y >= tau[:, None]) & ((y - row_max) >= log_min_p[:, None])
    is_forced = forced >= 0
    forced_hot = torch.arange(vocab, device=logits.device)[None, :] == forced[:, None]
    keep = torch.where(is_forced[:, None], forced_hot, keep)

    if uniform is None:
        uniform = philox_uniform(seeds, vocab)
    gumbel = -torch.log(-torch.log(uniform.double()))
    noisy = torch.where(greedy[:, None], y, y + gumbel)
    score = torch.where(keep, noisy, float("-inf"))
    tokens = torch.where(is_forced, forced, score.argmax(dim=-1))

    kept_mass = (weights * keep).sum(dim=-1)
    y_token = y.gather(1, tokens[:, None]).squeeze(1)
    logprobs = torch.where(is_forced, 0.0, y_token - row_max.squeeze(1) - torch.log(kept_mass))
    raw_logprobs = raw_y.gather(1, tokens[:, None]).squeeze(1) - raw_lse
    processed = torch.where(keep, y, float("-inf")).to(logits.dtype)
    return tokens, logprobs, raw_logprobs, processed


# ---------------------------------------------------------------------------------------------
# linear_token_logprobs


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`token_logprobs` of the LM-head logits ``hidden @ weight.T + bias``.

    Parameters
    ----------
    hidden : Tensor, shape ``[..., H]``; weight : Tensor, shape ``[V, H]``; bias : Tensor ``[V]`` or None
        Any float dtype; the logits are formed in float64 for float64 inputs and in float32
        otherwise (never rounded to a half dtype).
    targets, temperature, with_entropy, ignore_index
        As in :func:`token_logprobs`.

    Returns
    -------
    (logp, entropy) as in :func:`token_logprobs` (this materialises the ``[..., V]`` logits).
    """
    dtype = compute_dtype(hidden.dtype)
    logits = torch.nn.functional.linear(
        hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    )
    return token_logprobs(logits, targets, temperature, with_entropy, ignore_index)


# ---------------------------------------------------------------------------------------------
# decode_linear


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` in float64: the specification of :func:`gtalign_fast.ops.decode_linear`.

    Parameters
    ----------
    x : Tensor ``[M, K]``; weight : Tensor ``[N, K]``; bias : Tensor ``[N]`` or None

    Returns
    -------
    Tensor ``[M, N]`` float64
    """
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()
