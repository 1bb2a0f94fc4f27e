"""The verl advantage estimator ``gtalign_welfare``: group advantages by
:func:`gtalign_fast.ops.welfare_advantages` (see the package docstring)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from gtalign_fast.ops import welfare_advantages

from .loss import _setting

logger = logging.getLogger("gtalign_fast.integrations.verl")


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
