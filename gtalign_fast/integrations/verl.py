"""verl plugin: our fused GRPO loss and group advantages inside verl, and GTAlign's reward in verl's signature.

verl 0.9 imports every setuptools entry point of group ``verl.plugins`` when ``verl`` is imported (driver and Ray
workers alike; ``VERL_USE_EXTERNAL_PLUGINS=none`` turns that off). Installing ``gtalign_fast`` declares one pointing
at this module, which then registers, in ``verl.trainer.ppo.core_algos``:

- policy loss ``gtalign_fast`` (``actor_rollout_ref.actor.policy_loss.loss_mode=gtalign_fast``): verl's ``vanilla``
  loss -- clipped surrogate with clip-higher (``clip_ratio_low`` / ``clip_ratio_high``), dual clip for negative
  advantages (``clip_ratio_c``), log-ratio clamped to +-20 -- computed by one :func:`gtalign_fast.ops.grpo_loss`
  call, for every ``loss_agg_mode`` (token-mean, token-sum, seq-mean-token-sum, seq-mean-token-sum-norm,
  seq-mean-token-mean) with verl's global-batch normalisers (``dp_size``, ``batch_num_tokens``,
  ``global_batch_size``, ``loss_scale_factor``) and rollout-correction weights;
- policy loss ``gtalign_fast_gspo``: verl's ``gspo`` loss (GSPO-token: the sequence-level ratio on each token, no
  dual clip) the same way;
- advantage estimator ``gtalign_welfare`` (``algorithm.adv_estimator=gtalign_welfare``): the GRPO group advantage
  of the welfare ``W`` by :func:`gtalign_fast.ops.welfare_advantages` in one kernel, groups by ``uid`` in any order.

verl hands a custom estimator only ``token_level_rewards`` (one scalar per response), not U and L, so the
Cobb-Douglas welfare ``W = U^alpha L^(1 - alpha)`` is computed by :func:`compute_score` and arrives as that scalar;
the estimator then runs the fused kernel with ``alpha = 1`` (W passes through) for the group statistics.

The reward (``reward.custom_reward_function.path=pkg://gtalign_fast.integrations.verl``):

- :func:`compute_score` ``(data_source, solution_str, ground_truth, extra_info=None, **settings) -> dict``:
  ``score`` (= W), ``user_reward`` (U), ``llm_reward`` (L), ``answer_reward``, ``format_reward``, ``format`` (F),
  ``payoff_diversity`` (P), ``utility``, ``reward_gap``, ``hard_failure`` and ``judge_failed`` (0/1);
- :func:`compute_score_async`: the same as a coroutine, run on a thread pool, so verl's reward loop keeps many
  judge calls in flight at once;
- :func:`compute_score_batch`: verl's ``batch`` reward manager signature (``data_sources, solution_strs,
  ground_truths, extra_infos``); one judge call per data source, its requests concurrent.

Each sample is routed by ``data_source`` to its task judge (:func:`gtalign_fast.recipes.gtalign_task_judges`:
``math-hard``, ``medium``, ``wildguard``, ``ambig_qa``, anything else the default). The judge is an
OpenAI-compatible server set by ``reward_kwargs`` (verl's ``custom_reward_function.reward_kwargs``) or, for each
one not given, an environment variable:

==================== ============================= =====================================================
reward_kwargs         environment variable          meaning
==================== ============================= =====================================================
``judge_url``         ``GTALIGN_JUDGE_URL``         base URL, e.g. ``http://127.0.0.1:30000/v1`` (see below)
``judge_model``       ``GTALIGN_JUDGE_MODEL``       the request's ``model`` (see below)
``judge_api_key``     ``GTALIGN_JUDGE_API_KEY``     bearer token (default: none)
``judge_timeout``     ``GTALIGN_JUDGE_TIMEOUT``     deadline of one request in seconds (default 60)
``judge_concurrency`` ``GTALIGN_JUDGE_CONCURRENCY`` requests in flight per batch (default 8)
``judge_max_retries`` ``GTALIGN_JUDGE_MAX_RETRIES`` retries of a failed request (default 3)
``math_model_judge``  ``GTALIGN_MATH_MODEL_JUDGE``  1: the judge re-checks math answers the rule missed
==================== ============================= =====================================================

``judge_max_tokens`` and ``judge_extra_body`` (a dict, e.g. ``{"chat_template_kwargs": {"enable_thinking":
false}}``), ``alpha`` and ``variant`` (of :class:`~gtalign_fast.game.GTAlignReward`) are ``reward_kwargs`` only. The
judge's ``{prompt}`` (the user's question) is read from ``extra_info["question"]`` (else ``prompt``, ``query``,
``problem``): verl does not pass the prompt to a reward function.

No judge is needed for rule-judged rows: ``math-hard`` (the ``\\boxed{}`` rule, unless ``math_model_judge`` is on)
is scored without any server. ``judge_url`` and ``judge_model`` are required only when a row whose data source needs
a model judge arrives; that row raises "no judge configured".

A judge failure follows verl's own convention for a reward that could not be computed (verl 0.9.1's ``limited`` and
``prime`` reward managers score a timeout or an exception 0.0 and flag it in the extra info): ``score`` is the
welfare with the answer terms 0 and ``judge_failed`` is 1 (a column of verl's reward extra info, so its mean is the
step's failure rate). It is not NaN: verl's ``grpo`` estimator would make the whole group NaN. Nothing a completion
or the judge does raises.

Deliberate differences from verl's own code (the README's "verl plugin: differences from verl" lists them too): a
batch without any loss token gives loss 0 (verl: NaN); the GSPO log-ratio is clamped to +-20 (verl: at most 10); a
group with a single response gets advantage 0 (verl's ``grpo``: ``score / (1 + eps)``); a NaN reward is a missing
one, advantage 0 and left out of its group's statistics, with a warning (verl's ``grpo``: the whole group NaN).
Unknown ``global_batch_info`` keys raise ``TypeError`` as in verl, and ``actor/pg_clipfrac`` is verl's, rollout
weights of 0 included.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib.util
import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from gtalign_fast._grpo_objective import cached_objective
from gtalign_fast.ops import grpo_loss, welfare_advantages

__all__ = [
    "ADV_ESTIMATOR",
    "JUDGE_ENV",
    "LOSS_AGG_MODES",
    "POLICY_LOSS",
    "POLICY_LOSS_GSPO",
    "compute_gtalign_welfare_advantage",
    "compute_policy_loss_gtalign_fast",
    "compute_policy_loss_gtalign_fast_gspo",
    "compute_score",
    "compute_score_async",
    "compute_score_batch",
    "register",
]

POLICY_LOSS = "gtalign_fast"
POLICY_LOSS_GSPO = "gtalign_fast_gspo"
ADV_ESTIMATOR = "gtalign_welfare"
logger = logging.getLogger("gtalign_fast.integrations.verl")

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


# ---------------------------------------------------------------------------------------------
# Advantage estimator


def _group_layout(index: Sequence[Any], n_rows: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(the row order that makes each group contiguous, or None when it already is the identity; the groups'
    int64 offsets [G+1] in that order). Groups are numbered in order of first appearance."""
    if len(index) != n_rows:
        raise ValueError(f"gtalign_welfare: index has {len(index)} entries but token_level_rewards has {n_rows} rows")
    ids: dict[Any, int] = {}
    group_of = np.fromiter((ids.setdefault(uid, len(ids)) for uid in index), dtype=np.int64, count=n_rows)
    order = np.argsort(group_of, kind="stable")
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(group_of, minlength=len(ids)), out=offsets[1:])
    return (None if np.array_equal(order, np.arange(n_rows)) else order), offsets


def compute_gtalign_welfare_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence[Any] | None = None,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool | None = None,
    config: Any = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator ``gtalign_welfare``: GRPO group advantages of the welfare by the fused kernel.

    Parameters
    ----------
    token_level_rewards : Tensor, shape ``[B, T]``, float
        The welfare ``W >= 0`` of each response on its tokens (verl places :func:`compute_score`'s ``score`` on
        the last one); summed over T, as verl's ``grpo`` does.
    response_mask : Tensor, shape ``[B, T]``
    index : sequence of hashables, length B
        verl's ``uid`` per response: responses to the same prompt share it (in any order in the batch).
    epsilon : float, default 1e-6
        ``A = (W - mean_g) / (std_g + epsilon)``, Bessel-corrected std, as verl's ``grpo``.
    norm_adv_by_std_in_grpo : bool, optional
        False: ``A = W - mean_g`` (Dr. GRPO). Default: ``config.norm_adv_by_std_in_grpo``, else True.
    config : verl ``AlgoConfig``, optional

    Returns
    -------
    (advantages, returns) : Tensors, shape ``[B, T]``, the same values (outcome supervision), 0 off the mask.

    Notes
    -----
    A NaN reward is a missing one: advantage 0, left out of its group's mean and std, with a warning (verl's
    ``grpo`` makes the whole group NaN). :func:`compute_score` never returns NaN; a failed judge scores 0.

    Raises
    ------
    ValueError
        No ``index``, a length mismatch, a negative or infinite reward (the welfare is defined for ``W >= 0``: use
        verl's KL *loss*, not ``algorithm.use_kl_in_reward``, which subtracts a KL from the reward).
    """
    if index is None:
        raise ValueError("gtalign_welfare: index (verl's uid per response) is required to form the groups")
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(_setting(config, "norm_adv_by_std_in_grpo", True))
    scores = token_level_rewards.detach().sum(dim=-1).to(torch.float32)
    # verl's grpo would turn a NaN reward's whole group NaN; here it is a missing reward (advantage 0, the group's
    # statistics over the others). Said once per step (the estimator runs once per step, on the driver).
    missing = int(scores.isnan().sum())
    if missing:
        logger.warning(
            "gtalign_welfare: %d of %d rewards are NaN; treated as missing (advantage 0, left out of their group's "
            "statistics), where verl's grpo would make the whole group NaN", missing, scores.numel(),
        )
    order, offsets = _group_layout(index, scores.shape[0])
    if order is not None:
        order_t = torch.from_numpy(order).to(scores.device)
        scores = scores.index_select(0, order_t)
    # alpha = 1: W = U^1 L^0 = U, so the kernel only does the group statistics of the welfare it is given.
    result = welfare_advantages(
        scores, scores, torch.from_numpy(offsets).to(scores.device), alpha=1.0,
        scale="group" if norm_adv_by_std_in_grpo else "none", eps=float(epsilon), unbiased=True,
    )
    advantages = result.advantages
    if order is not None:
        advantages = torch.empty_like(advantages).index_copy_(0, order_t, advantages)
    advantages = advantages.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return advantages, advantages


# ---------------------------------------------------------------------------------------------
# Registration (run when verl loads the plugin; a no-op where verl is not installed)


def register() -> bool:
    """Register the two policy losses and the advantage estimator with verl; False when verl is not installed.

    Safe to call again. A *different* estimator already registered as ``gtalign_welfare`` makes verl raise.
    """
    if importlib.util.find_spec("verl") is None:
        return False
    from verl.trainer.ppo import core_algos

    core_algos.register_policy_loss(POLICY_LOSS)(compute_policy_loss_gtalign_fast)
    core_algos.register_policy_loss(POLICY_LOSS_GSPO)(compute_policy_loss_gtalign_fast_gspo)
    existing = core_algos.ADV_ESTIMATOR_REGISTRY.get(ADV_ESTIMATOR)
    ours = compute_gtalign_welfare_advantage
    if existing is not None and (existing.__module__, existing.__qualname__) == (ours.__module__, ours.__qualname__):
        core_algos.ADV_ESTIMATOR_REGISTRY[ADV_ESTIMATOR] = ours  # this module imported again (a reload)
    else:
        core_algos.register_adv_est(ADV_ESTIMATOR)(ours)
    return True


# ---------------------------------------------------------------------------------------------
# Reward: settings


JUDGE_ENV = {
    "judge_url": "GTALIGN_JUDGE_URL",
    "judge_model": "GTALIGN_JUDGE_MODEL",
    "judge_api_key": "GTALIGN_JUDGE_API_KEY",
    "judge_timeout": "GTALIGN_JUDGE_TIMEOUT",
    "judge_concurrency": "GTALIGN_JUDGE_CONCURRENCY",
    "judge_max_retries": "GTALIGN_JUDGE_MAX_RETRIES",
    "math_model_judge": "GTALIGN_MATH_MODEL_JUDGE",
}
"""``reward_kwargs`` name -> the environment variable read when it is not given."""

_CONFIG_ONLY = ("judge_max_tokens", "judge_extra_body", "alpha", "variant")
# What verl itself may add to a reward function's kwargs (when a reward model is configured); not ours.
_VERL_KWARGS = ("reward_router_address", "reward_model_tokenizer")
_QUESTION_KEYS = ("question", "prompt", "query", "problem")


@dataclass(frozen=True)
class _Settings:
    """The resolved reward settings; hashable, so one reward (and one HTTP client) serves each setting."""

    url: str | None  # None: no judge configured, rule-judged rows only
    model: str | None
    api_key: str | None
    timeout: float
    concurrency: int
    max_retries: int
    math_model_judge: bool
    max_tokens: int | None
    extra_body: str  # JSON, sorted keys
    alpha: float
    variant: str


def _raw(config: Mapping[str, Any], name: str) -> tuple[Any, str]:
    """(value, where it came from) for a setting: ``reward_kwargs`` first, then its environment variable."""
    if config.get(name) is not None:
        return config[name], f"reward_kwargs[{name!r}]"
    env = JUDGE_ENV.get(name)
    if env is not None and os.environ.get(env, "").strip():
        return os.environ[env].strip(), env
    return None, name


def _number(config: Mapping[str, Any], name: str, kind: type, default: Any, low: float) -> Any:
    value, where = _raw(config, name)
    if value is None:
        return default
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"gtalign_fast compute_score: {where} must be a {kind.__name__}, got {value!r}") from None
    if not (math.isfinite(number) and number >= low):
        raise ValueError(f"gtalign_fast compute_score: {where} must be finite and >= {low}, got {value!r}")
    return number


def _flag(config: Mapping[str, Any], name: str) -> bool:
    value, where = _raw(config, name)
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"gtalign_fast compute_score: {where} must be a boolean (1/0, true/false), got {value!r}")


_NO_JUDGE = (
    "gtalign_fast compute_score: no judge configured: set GTALIGN_JUDGE_URL and GTALIGN_JUDGE_MODEL (or "
    "reward_kwargs judge_url / judge_model) to an OpenAI-compatible server, e.g. http://127.0.0.1:30000/v1"
)


def _check_judge_needed(settings: _Settings, data_sources: Sequence[Any]) -> None:
    """The "no judge configured" error for the first row whose data source needs a model judge, when none is
    configured; rule-judged rows (``math-hard`` without ``math_model_judge``) need none."""
    from gtalign_fast.recipes.tasks import RULE_JUDGED_TASKS, needs_model_judge

    if settings.url is not None:
        return
    for source in data_sources:
        if needs_model_judge(source, math_model_judge=settings.math_model_judge):
            why = ("math_model_judge is on" if settings.math_model_judge else
                   f"only {list(RULE_JUDGED_TASKS)} are scored without one")
            raise ValueError(f"{_NO_JUDGE}; data source {source!r} needs a model judge ({why})")


def _settings(config: Mapping[str, Any]) -> _Settings:
    unknown = sorted(set(config) - set(JUDGE_ENV) - set(_CONFIG_ONLY) - set(_VERL_KWARGS))
    if unknown:
        raise TypeError(
            f"gtalign_fast compute_score: unknown reward_kwargs {unknown}; "
            f"known: {sorted((*JUDGE_ENV, *_CONFIG_ONLY))}"
        )
    url, _ = _raw(config, "judge_url")
    model, _ = _raw(config, "judge_model")
    if bool(url) != bool(model):  # half a judge is a configuration error even before a model-judged row arrives
        raise ValueError(_NO_JUDGE + " (only one of the two is set)")
    api_key, _ = _raw(config, "judge_api_key")
    extra_body = config.get("judge_extra_body") or {}
    if not isinstance(extra_body, Mapping):
        raise TypeError(f"gtalign_fast compute_score: judge_extra_body must be a mapping, got {type(extra_body)}")
    max_tokens = config.get("judge_max_tokens")
    return _Settings(
        url=str(url) if url else None, model=str(model) if model else None,
        api_key=None if api_key is None else str(api_key),
        timeout=_number(config, "judge_timeout", float, 60.0, 1e-3),
        concurrency=_number(config, "judge_concurrency", int, 8, 1),
        max_retries=_number(config, "judge_max_retries", int, 3, 0),
        math_model_judge=_flag(config, "math_model_judge"),
        max_tokens=None if max_tokens is None else _number(config, "judge_max_tokens", int, None, 1),
        extra_body=json.dumps(_plain(extra_body), sort_keys=True),
        alpha=_number(config, "alpha", float, 0.5, 0.0),
        variant=str(config.get("variant") or "cobb"),
    )


def _plain(value: Any) -> Any:
    """An OmegaConf / nested mapping as plain dicts and lists (JSON-serialisable)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_REWARDS: dict[_Settings, Any] = {}
_REWARDS_LOCK = threading.Lock()


def _reward_for(settings: _Settings) -> Any:
    """One :class:`~gtalign_fast.game.GTAlignReward` over the task judges per setting (and per process)."""
    with _REWARDS_LOCK:
        reward = _REWARDS.get(settings)
        if reward is None:
            from gtalign_fast.game.judges import OpenAIJudge
            from gtalign_fast.recipes.tasks import gtalign_reward

            judge = None if settings.url is None else OpenAIJudge(
                settings.url, settings.model, api_key=settings.api_key, timeout=settings.timeout,
                concurrency=settings.concurrency, max_retries=settings.max_retries, max_tokens=settings.max_tokens,
                extra_body=json.loads(settings.extra_body),
            )
            reward = gtalign_reward(
                judge, math_model_judge=judge if settings.math_model_judge else None,
                alpha=settings.alpha, variant=settings.variant, name="gtalign",
            )
            _REWARDS[settings] = reward
        return reward


# ---------------------------------------------------------------------------------------------
# Reward: the functions verl calls


def _question(extra_info: Mapping[str, Any]) -> Any:
    for key in _QUESTION_KEYS:
        if extra_info.get(key) is not None:
            value = extra_info[key]
            return value.tolist() if hasattr(value, "tolist") else value  # a numpy array from parquet
    return None


def _row(fields: Mapping[str, Any]) -> dict[str, float]:
    """verl's result dict: numbers only (verl turns each key into a per-sample column and averages it)."""
    return {
        "score": float(fields["score"]),
        "user_reward": float(fields["user_reward"]),
        "llm_reward": float(fields["llm_reward"]),
        "answer_reward": float(fields["answer_reward"]),
        "format_reward": float(fields["format_reward"]),
        "format": float(fields["F"]),
        "payoff_diversity": float(fields["P"]),
        "utility": float(fields["utility"]),
        "reward_gap": float(fields["reward_gap"]),
        "hard_failure": float(bool(fields["hard_failure"])),
        "judge_failed": float(bool(fields["judge_failed"])),
    }


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Mapping[str, Any] | None] | None = None,
    **settings: Any,
) -> list[dict[str, float]]:
    """GTAlign's reward for a batch (verl's ``batch`` reward manager signature); one result dict per sample.

    The samples of each ``data_source`` go to their task judge in one call, whose requests run concurrently
    (``judge_concurrency`` at a time). ``settings`` are the ``reward_kwargs`` of the module docstring.
    """
    from gtalign_fast.recipes.data import reference_text

    n = len(solution_strs)
    extras = [None] * n if extra_infos is None else list(extra_infos)
    if len(data_sources) != n or len(ground_truths) != n or len(extras) != n:
        raise ValueError(
            f"gtalign_fast compute_score_batch: {len(data_sources)} data_sources, {n} solution_strs, "
            f"{len(ground_truths)} ground_truths and {len(extras)} extra_infos must have the same length"
        )
    resolved = _settings(settings)
    _check_judge_needed(resolved, data_sources)
    reward = _reward_for(resolved)
    extras = [dict(e) if isinstance(e, Mapping) else {} for e in extras]
    batch = reward(
        prompts=[_question(e) for e in extras], completions=[str(s) for s in solution_strs],
        data_source=list(data_sources), ground_truth=[reference_text(g) for g in ground_truths], extra_info=extras,
    )
    return [_row(fields) for fields in batch.fields]


def compute_score(
    data_source: Any, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None = None,
    **settings: Any,
) -> dict[str, float]:
    """GTAlign's reward for one sample, in verl's ``compute_score`` signature.

    Returns
    -------
    dict
        ``score`` (W), ``user_reward`` (U), ``llm_reward`` (L), ``answer_reward``, ``format_reward``
        (``0.1 F + 0.15 P``), ``format`` (F), ``payoff_diversity`` (P), ``utility``, ``reward_gap``,
        ``hard_failure`` and ``judge_failed`` (0 or 1).

    Raises
    ------
    ValueError, TypeError
        Only for a configuration error (no judge URL / model while ``data_source`` needs a model judge, a bad or
        unknown setting); never for what the model wrote or what the judge answered. ``math-hard`` rows are
        scored by the ``\\boxed{}`` rule without any judge unless ``math_model_judge`` is on.
    """
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info], **settings)[0]


_EXECUTOR: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None
_EXECUTOR_LOCK = threading.Lock()
# Threads that mostly wait on the judge's own event loop: cheap, and more than asyncio's default (cores + 4),
# so that a reward loop firing a whole batch of coroutines keeps that many judge calls in flight.
_ASYNC_WORKERS = 64


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None or _EXECUTOR[0] != os.getpid():  # a forked child gets its own threads
            pool = concurrent.futures.ThreadPoolExecutor(_ASYNC_WORKERS, thread_name_prefix="gtalign-verl-score")
            _EXECUTOR = (os.getpid(), pool)
        return _EXECUTOR[1]


async def compute_score_async(
    data_source: Any, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None = None,
    **settings: Any,
) -> dict[str, float]:
    """:func:`compute_score` as a coroutine (verl's reward loop awaits it): the scoring runs on a thread pool of
    the module, so concurrent calls overlap their judge requests instead of queueing behind each other."""
    call = functools.partial(compute_score, data_source, solution_str, ground_truth, extra_info, **settings)
    return await asyncio.get_running_loop().run_in_executor(_executor(), call)


register()
