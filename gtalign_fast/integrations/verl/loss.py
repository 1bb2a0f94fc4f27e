"""The verl policy losses ``gtalign_fast`` and ``gtalign_fast_gspo``: one
:func:`gtalign_fast.ops.grpo_loss` call per verl loss, every ``loss_agg_mode`` (see the package docstring)."""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import torch

from gtalign_fast.ops import grpo_loss
from gtalign_fast.ops._grpo_objective import cached_objective

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")

# verl's vanilla loss clamps the log-ratio to +-20 before exp, as our kernels do.
_LOG_RATIO_LIMIT = 20.0


# ---------------------------------------------------------------------------------------------
# Policy loss


def _setting(config: Any, name: str, default: Any = None) -> Any:
    """``config.name`` from verl's ActorConfig (a dataclass with ``get``) or an OmegaConf / plain dict."""
    getter = getattr(config, "get", None)
    value = getter(name, None) if callable(getter) else getattr(config, name, None)
    return default if value is None else value


class _Aggregation(NamedTuple):
    """How one verl ``loss_agg_mode`` maps onto the op: its ``loss_type``, ``num_items_in_batch`` and a factor
    applied to the op's loss (a number or a 0-dim tensor, so nothing is read back from the device)."""

    loss_type: str
    num_items: float | torch.Tensor | None = None
    scale: float | torch.Tensor | None = None


def _positive(value: Any, name: str) -> float:
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"gtalign_fast verl loss: global_batch_info[{name!r}] must be finite and > 0, got {value!r}")
    return number


def _sequences(mask: torch.Tensor, global_batch_size: Any, dp_size: float) -> float | torch.Tensor:
    """verl's sequence count: ``global_batch_size``, else the local rows with at least one token (>= 1)."""
    if global_batch_size is not None:
        return _positive(global_batch_size, "global_batch_size")
    if dp_size > 1:
        raise ValueError("gtalign_fast verl loss: global_batch_info['global_batch_size'] is required when dp_size > 1")
    return (mask.sum(dim=-1) > 0).sum().clamp(min=1).to(torch.float32)


# The keyword arguments of verl's ``agg_loss``, which receives ``**global_batch_info``: any other key makes verl
# raise TypeError, and so do we (a misspelt normaliser must not be ignored).
GLOBAL_BATCH_INFO_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


def _aggregation(loss_agg_mode: str, mask: torch.Tensor, info: Mapping[str, Any]) -> _Aggregation:
    """verl's ``agg_loss`` as our op computes it. Four of the five modes are ``sum(mask * loss) / constant``
    (the op's ``dapo`` with that constant); ``seq-mean-token-mean`` weights each row by ``1 / n_b`` (the op's
    ``seq-mean-token-mean``, which divides by the B rows) and is rescaled to verl's sequence count."""
    unknown = sorted(map(str, set(info) - set(GLOBAL_BATCH_INFO_KEYS)))
    if unknown:
        raise TypeError(
            f"gtalign_fast verl loss: unknown global_batch_info keys {unknown} (verl's agg_loss raises TypeError for "
            f"them too); known: {list(GLOBAL_BATCH_INFO_KEYS)}"
        )
    dp_size = _positive(info.get("dp_size") or 1, "dp_size")
    batch_num_tokens = info.get("batch_num_tokens")
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError(
                    "gtalign_fast verl loss: global_batch_info['batch_num_tokens'] is required when dp_size > 1"
                )
            return _Aggregation("token-mean")
        return _Aggregation("dapo", _positive(batch_num_tokens, "batch_num_tokens") / dp_size)
    if loss_agg_mode == "token-sum":
        return _Aggregation("dapo", 1.0 / dp_size)
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        sequences = _sequences(mask, info.get("global_batch_size"), dp_size)
        norm = 1.0
        if loss_agg_mode == "seq-mean-token-sum-norm":
            factor = info.get("loss_scale_factor")
            norm = _positive(factor, "loss_scale_factor") if factor is not None else float(mask.shape[-1])
        return _Aggregation("dapo", sequences * (norm / dp_size))
    if loss_agg_mode == "seq-mean-token-mean":
        sequences = _sequences(mask, info.get("global_batch_size"), dp_size)
        return _Aggregation("seq-mean-token-mean", scale=(mask.shape[0] * dp_size) / sequences)
    raise ValueError(f"gtalign_fast verl loss: unknown loss_agg_mode {loss_agg_mode!r}; choose one of {LOSS_AGG_MODES}")


def _clipped(advantages: torch.Tensor, ratio: torch.Tensor, epsilon_low: float, epsilon_high: float) -> torch.Tensor:
    """verl's clip test, ``-A clip(r) > -A r``, per token (bool ``[B, T]``)."""
    return torch.gt(-advantages * ratio.clamp(1 - epsilon_low, 1 + epsilon_high), -advantages * ratio)


@torch.no_grad()
def _verl_metrics(old_log_prob, log_prob, advantages, mask, epsilon_low, epsilon_high, dual_clip,
                  rollout_is_weights=None) -> dict:
    """verl's ``actor/ppo_kl`` and ``actor/pg_clipfrac_lower``, which the op does not report (two small [B, T]
    passes; the values stay on the device: verl's ``Metric`` reads them).

    With ``rollout_is_weights`` also ``actor/pg_clipfrac``: the op sees the advantages times the weights, so a
    token of weight 0 (IcePop, rejection) would never count as clipped there, while verl tests clipping on the
    unweighted advantages. One more [B, T] pass, only when weights are given.
    """
    mask = mask.to(torch.float32)
    count = mask.sum().clamp(min=1.0)
    advantages = advantages.to(torch.float32)
    if advantages.dim() == 1:  # one advantage per row
        advantages = advantages.unsqueeze(-1)
    log_ratio = (log_prob.detach() - old_log_prob).to(torch.float32)
    metrics = {}
    if dual_clip is None:  # GSPO: verl reports the unclamped KL and no dual clip
        metrics["actor/ppo_kl"] = -(log_ratio * mask).sum() / count
        metrics["actor/pg_clipfrac_lower"] = torch.zeros_like(count)
        if rollout_is_weights is not None:  # the sequence's ratio on every token, log clamped at 10 as verl does
            seq_log_ratio = (log_ratio * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
            ratio = torch.exp(seq_log_ratio.clamp(max=10.0)).expand_as(log_ratio)
            metrics["actor/pg_clipfrac"] = (_clipped(advantages, ratio, epsilon_low, epsilon_high) * mask).sum() / count
        return metrics
    log_ratio = log_ratio.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    # A < 0: the dual clip binds where max(r, clip(r)) * |A| exceeds clip_ratio_c * |A|.
    lower = (advantages < 0) & (torch.maximum(ratio, ratio.clamp(1 - epsilon_low, 1 + epsilon_high)) > dual_clip)
    metrics["actor/ppo_kl"] = -(log_ratio * mask).sum() / count
    metrics["actor/pg_clipfrac_lower"] = (lower * mask).sum() / count
    if rollout_is_weights is not None:
        metrics["actor/pg_clipfrac"] = (_clipped(advantages, ratio, epsilon_low, epsilon_high) * mask).sum() / count
    return metrics


@torch.no_grad()
def _gspo_token_old_log_prob(old_log_prob, log_prob, mask) -> torch.Tensor:
    """The ``old_log_prob`` that turns the op's token-level ratio into verl's GSPO ratio.

    verl's ``gspo`` uses, per token, ``s_it = sg(s_i) * exp(logp_t - sg(logp_t))``, with ``log s_i`` the masked
    mean log-ratio of the sequence: its value is ``s_i`` and its gradient with respect to ``logp_t`` is ``s_i``
    (GSPO-token; it differs from a gradient through the mean when advantages or weights vary along a sequence).
    ``exp(logp_t - old'_t)`` with ``old'_t = sg(logp_t) - log s_i`` has the same value and gradient, so the
    token-level kernel computes verl's GSPO exactly.
    """
    maskf = mask.to(torch.float32)
    log_ratio = (log_prob.to(torch.float32) - old_log_prob.to(torch.float32)) * maskf
    seq_log_ratio = log_ratio.sum(dim=-1) / maskf.sum(dim=-1).clamp(min=1.0)
    return (log_prob.to(torch.float32) - seq_log_ratio.unsqueeze(-1)).to(log_prob.dtype)


def _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
                 sequence_level: bool):
    if config is None:
        raise ValueError("gtalign_fast verl loss: config (verl's ActorConfig) is required")
    clip_ratio = float(_setting(config, "clip_ratio", 0.2))
    epsilon_low = float(_setting(config, "clip_ratio_low", clip_ratio))
    epsilon_high = float(_setting(config, "clip_ratio_high", clip_ratio))
    dual_clip = None if sequence_level else float(_setting(config, "clip_ratio_c", 3.0))
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"gtalign_fast verl loss: clip_ratio_c must be > 1 (dual-clip PPO), got {dual_clip}")
    aggregation = _aggregation(loss_agg_mode, response_mask, _setting(config, "global_batch_info", {}) or {})
    # verl multiplies each token's loss by its (non-negative) rollout-correction weight w; since w >= 0,
    # w * max(-A r, -A clip(r)) = max(-(wA) r, -(wA) clip(r)) (and likewise for the dual clip): weighting the
    # advantages is the same loss and gradient, without a per-token weight input in the kernel.
    weighted = advantages if rollout_is_weights is None else advantages * rollout_is_weights
    if old_log_prob.dtype != log_prob.dtype:  # verl promotes mixed dtypes; the op wants one
        dtype = torch.promote_types(old_log_prob.dtype, log_prob.dtype)
        old_log_prob, log_prob = old_log_prob.to(dtype), log_prob.to(dtype)
    old_for_op = _gspo_token_old_log_prob(old_log_prob, log_prob, response_mask) if sequence_level else old_log_prob
    objective = cached_objective(epsilon_low=epsilon_low, epsilon_high=epsilon_high, dual_clip=dual_clip,
                                loss_type=aggregation.loss_type)
    loss, metrics = grpo_loss(log_prob, old_for_op.detach(), weighted, response_mask,
                              **objective.op_kwargs(aggregation.num_items))
    if aggregation.scale is not None:
        loss = loss * aggregation.scale
    pg_metrics = {"actor/pg_clipfrac": metrics["clip_ratio/region_mean"]}
    pg_metrics.update(_verl_metrics(
        old_log_prob, log_prob, advantages, response_mask, epsilon_low, epsilon_high, dual_clip, rollout_is_weights
    ))
    return loss, pg_metrics


def compute_policy_loss_gtalign_fast(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl policy loss ``gtalign_fast``: verl's ``vanilla`` PPO / GRPO loss through one fused op.

    Parameters
    ----------
    old_log_prob, log_prob : Tensor, shape ``[B, T]``, float
        Log-probs of the sampling policy and of the policy being trained (only ``log_prob`` gets a gradient).
    advantages : Tensor, shape ``[B, T]`` (or ``[B]``), float
    response_mask : Tensor, shape ``[B, T]``, bool / integer / float
    loss_agg_mode : str
        One of :data:`LOSS_AGG_MODES`, with verl's ``config.global_batch_info`` normalisers.
    config : verl ``ActorConfig`` (or a mapping)
        ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high`` (clip-higher), ``clip_ratio_c`` (dual clip, > 1,
        default 3), ``global_batch_info``.
    rollout_is_weights : Tensor, shape ``[B, T]``, optional
        verl's rollout-correction weights (non-negative, as verl computes them).

    Returns
    -------
    loss : Tensor, 0-dim, float32
    metrics : dict of 0-dim Tensors
        ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` (verl's names).

    Raises
    ------
    ValueError
        Unknown ``loss_agg_mode``, missing ``config``, ``clip_ratio_c <= 1``, a missing or non-positive global
        normaliser when ``dp_size > 1``; the op's own checks (shapes, dtypes, devices).
    """
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights, sequence_level=False)


def compute_policy_loss_gtalign_fast_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl policy loss ``gtalign_fast_gspo``: verl's ``gspo`` loss (GSPO-token: the sequence's importance ratio,
    the exp of its masked mean log-ratio, on every token, clipped with ``clip_ratio_low`` / ``clip_ratio_high``; no
    dual clip) through the fused op (see :func:`_gspo_token_old_log_prob`). Same arguments and results as
    :func:`compute_policy_loss_gtalign_fast`."""
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights, sequence_level=True)
