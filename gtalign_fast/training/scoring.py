"""The scoring stage of a GRPO step: reward functions -> rewards -> group advantages, and their metrics.

:class:`RewardSpec` describes one reward function (weight, name, whether it gives U and L);
:func:`reward_specs` builds and checks the list once. :func:`score_completions` calls every
function with TRL's arguments (:func:`call_reward_funcs`: a failure scores NaN, it never stops
training). :func:`batch_advantages` turns the GLOBAL batch's rewards into advantages:

* one Cobb-Douglas reward of weight 1 (the GTAlign case): U and L go to the fused
  ``ops.welfare_advantages``, which computes ``W = U^alpha L^(1-alpha)`` and the group statistics
  in one launch;
* anything else: the weighted sum ``sum_i w_i r_i`` gets a plain group advantage,
  :func:`group_advantages` (float64 statistics, so shifting one group's rewards changes nothing
  elsewhere).
"""

from __future__ import annotations

import logging
import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch

from .. import ops, reference

logger = logging.getLogger("gtalign_fast.trainer")

__all__ = [
    "RewardSpec", "reward_specs", "single_welfare", "reward_name", "is_welfare_reward", "RewardScores",
    "score_completions", "call_reward_funcs", "GroupAdvantages", "group_advantages", "batch_advantages",
    "check_judge_failure_rate",
]


# ---------------------------------------------------------------------------------------------
# Reward functions


@dataclass(frozen=True)
class RewardSpec:
    """One reward function and how it enters the advantages.

    Attributes
    ----------
    func : callable
        TRL's signature ``f(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]``.
    weight : float
        Its weight ``w_i`` in ``sum_i w_i r_i`` (``GRPOConfig.reward_weights``).
    name : str
        Its name in the metrics (``rewards/<name>/mean``).
    is_welfare : bool
        Whether its U and L feed the Cobb-Douglas welfare op (:func:`is_welfare_reward`).
    """

    func: Callable
    weight: float
    name: str
    is_welfare: bool

    @classmethod
    def of(cls, func: Callable, weight: float = 1.0) -> "RewardSpec":
        return cls(func, float(weight), reward_name(func), is_welfare_reward(func))


def reward_specs(
    funcs: Callable | Sequence[Callable], weights: Sequence[float] | None, alpha: float
) -> list[RewardSpec]:
    """The trainer's rewards from ``reward_funcs`` and ``GRPOConfig.reward_weights`` (None: all 1).

    Raises for an empty list, a non-callable (a reward model given by name), a weight count that
    does not match, and a welfare reward whose own ``alpha`` differs from the config's (the welfare
    op uses the config's).
    """
    funcs = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]
    if not funcs:
        raise ValueError("GRPOTrainer: reward_funcs is empty")
    for func in funcs:
        if isinstance(func, str) or not callable(func):
            raise TypeError(
                f"GRPOTrainer: reward function {func!r} is not callable (reward models given by name are "
                "not supported; wrap the model in a function)"
            )
    weights = [1.0] * len(funcs) if weights is None else list(weights)
    if len(weights) != len(funcs):
        raise ValueError(f"GRPOTrainer: {len(weights)} reward_weights for {len(funcs)} reward functions")
    specs = [RewardSpec.of(func, weight) for func, weight in zip(funcs, weights)]
    for spec in specs:
        if spec.is_welfare and getattr(spec.func, "alpha", alpha) != alpha:
            raise ValueError(
                f"GRPOTrainer: reward {spec.name!r} has alpha={spec.func.alpha} but GRPOConfig.alpha="
                f"{alpha}; the welfare op uses the config's alpha, make them equal"
            )
    return specs


def single_welfare(specs: Sequence[RewardSpec]) -> bool:
    """The common GTAlign case: one Cobb-Douglas reward of weight 1, so W and its advantages come
    from U and L in one fused launch."""
    return len(specs) == 1 and specs[0].is_welfare and specs[0].weight == 1.0


def reward_name(func: Any) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


def is_welfare_reward(func: Any) -> bool:
    """Whether the reward's U and L feed the Cobb-Douglas welfare op directly.

    True for :class:`~gtalign_fast.game.GTAlignReward` with a Cobb-Douglas variant and no per-source
    normalisation (its scalar is then exactly ``U^alpha L^(1-alpha)``), and for any callable that
    declares ``welfare_reward = True`` and returns an object with ``.user`` and ``.llm`` lists.
    Other variants are used through their scalar.
    """
    if getattr(func, "welfare_reward", False):
        return True
    try:
        from ..game.reward import GTAlignReward
    except ImportError:  # the game module is optional for plain float rewards
        return False
    return (
        isinstance(func, GTAlignReward)
        and getattr(func, "variant", "cobb") in ("cobb", "pareto")
        and getattr(func, "normalize", "none") == "none"
    )


# ---------------------------------------------------------------------------------------------
# Calling them


@dataclass
class RewardScores:
    """Rewards of one batch on this process.

    per_func : ``[N, F]`` float32, NaN where a function returned None or failed, or its judge failed.
    user, llm : ``[N]`` float32 or None, U and L of the first welfare reward function.
    failures : completions each function could not score (None, an exception, a failed judge), by name.
    extra : batch means of the welfare reward's logged fields (``RewardBatch.metrics()``).
    judge_failures : completions whose judge failed in some function (``RewardBatch.judge_failed``).
    failed_judges : those failures per judge (its repr), for the error that stops a run.
    """

    per_func: torch.Tensor
    user: torch.Tensor | None
    llm: torch.Tensor | None
    failures: dict[str, int]
    extra: dict[str, float]
    judge_failures: int = 0
    failed_judges: dict[str, int] = field(default_factory=dict)


def score_completions(
    specs: Sequence[RewardSpec], tokenizer: Any, prompts: list, rows: list[dict], completion_ids: list[list[int]],
    group_size: int, device: torch.device, step: int | None = None,
) -> RewardScores:
    """Score this process's completions (prompt-major, ``group_size`` per prompt) with TRL's arguments:
    decoded completions (as assistant messages when the prompts are chats), each prompt and each extra
    dataset column repeated once per completion."""
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    conversational = not isinstance(prompts[0], str)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    repeated_prompts = [p for p in prompts for _ in range(group_size)]
    names = [key for key in dict.fromkeys(k for row in rows for k in row) if key != "prompt"]
    for i, row in enumerate(rows):
        for key in names:
            if key not in row:  # the trainer checks every dataset row once, at construction
                raise ValueError(f"score_completions: row {i} of the batch has no column {key!r} (other rows have it)")
    columns = {key: [row[key] for row in rows for _ in range(group_size)] for key in names}
    return call_reward_funcs(
        specs, prompts=repeated_prompts, completions=completions, completion_ids=completion_ids, columns=columns,
        device=device, step=step,
    )


def call_reward_funcs(
    specs: Sequence[RewardSpec], *, prompts: list, completions: list, completion_ids: list[list[int]],
    columns: dict[str, list], device: torch.device, step: int | None = None,
) -> RewardScores:
    """Call every reward function with TRL's keyword arguments; never raises for a reward failure.

    A function that raises, or returns the wrong number of values, scores NaN for the whole batch
    (logged with its traceback once per function name); None means "cannot score this one" and
    also becomes NaN, which the advantages exclude (advantage 0). So does a value that is not a
    finite float32 (NaN, +-inf, or past +-3.4e38): it is never clamped to a huge finite number,
    which would swamp its group. So does a completion whose judge failed (a ``judge_failed`` flag
    on the result, as :class:`~gtalign_fast.game.reward.RewardBatch` has): a missing score, not
    a 0, counted in ``judge_failures`` too. Every NaN counts in ``failures``.

    Raises ValueError when a column does not hold one value per completion (a caller's error).
    ``step`` (the trainer's step being made, as logged) is named in the failure warning.
    """
    n = len(completions)
    for name, values in columns.items():
        if len(values) != n:  # the caller's mistake, not the reward function's: say so instead of scoring NaN
            raise ValueError(
                f"call_reward_funcs: column {name!r} has {len(values)} values for {n} completions (one per completion)"
            )
    per_func = torch.full((n, len(specs)), math.nan, dtype=torch.float32)
    user = llm = None
    failures: dict[str, int] = {}
    extra: dict[str, float] = {}
    judge_failed = torch.zeros(n, dtype=torch.bool)
    failed_judges: dict[str, int] = {}
    for j, spec in enumerate(specs):
        try:
            out = spec.func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            per_func[:, j] = torch.tensor(_as_floats(out, n, spec.name))
            failed = _judge_failed(out, n)
            if failed is not None:  # a failed judge is no verdict: missing, not the 0 the reward put there
                per_func[failed, j] = math.nan
                judge_failed |= failed
                for name, count in getattr(out, "failed_judges", {}).items():
                    failed_judges[name] = failed_judges.get(name, 0) + int(count)
            if spec.is_welfare and user is None:
                user = torch.tensor(_as_floats(out.user, n, f"{spec.name}.user"))
                llm = torch.tensor(_as_floats(out.llm, n, f"{spec.name}.llm"))
                if failed is not None:
                    user[failed] = llm[failed] = math.nan
                # no U or no L: no welfare either, so the completion counts as a failure of this function
                per_func[user.isnan() | llm.isnan(), j] = math.nan
                if hasattr(out, "metrics"):
                    extra = {f"welfare/{k}": float(v) for k, v in out.metrics().items()}
        except Exception as error:  # a reward failure must never stop training
            where = "" if step is None else f"step {step}: "
            _warn_once(f"reward:{spec.name}", f"{where}reward function {spec.name!r} failed on a batch of {n} "
                       f"({error!r}); "
                       f"scored as missing (NaN -> advantage 0)\n{traceback.format_exc()}")
            per_func[:, j] = math.nan
            if spec.is_welfare and user is None:
                user = torch.full((n,), math.nan)
                llm = torch.full((n,), math.nan)
        failures[spec.name] = int(per_func[:, j].isnan().sum())

    def to_device(t):
        return None if t is None else t.to(device)

    return RewardScores(to_device(per_func), to_device(user), to_device(llm), failures, extra,
                        int(judge_failed.sum()), failed_judges)


def _judge_failed(out: Any, n: int) -> torch.Tensor | None:
    """The result's per-completion ``judge_failed`` flags as a bool ``[n]`` tensor; None when it has none."""
    flags = getattr(out, "judge_failed", None)
    if flags is None:
        return None
    flags = [bool(f) for f in flags]
    if len(flags) != n:
        raise ValueError(f"judge_failed has {len(flags)} flags for {n} completions")
    return torch.tensor(flags, dtype=torch.bool)


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _as_floats(values: Any, n: int, name: str = "reward") -> list[float]:
    """The rewards as Python floats; None, NaN, +-inf and values float32 cannot hold become NaN (missing)."""
    values = list(values)
    if len(values) != n:
        raise ValueError(f"returned {len(values)} values for {n} completions")
    out = [math.nan if v is None else float(v) for v in values]
    bad = [i for i, v in enumerate(out) if not math.isnan(v) and not abs(v) <= _FLOAT32_MAX]
    if bad:
        _warn_once(f"nonfinite:{name}", f"reward function {name!r} returned {len(bad)} value(s) that are infinite or "
                   f"past float32's range (first: completion {bad[0]}, {out[bad[0]]!r}); scored as missing "
                   "(NaN -> advantage 0, counted as failures)")
        for i in bad:
            out[i] = math.nan
    return out


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        logger.warning(message.splitlines()[0])
    else:
        _warned.add(key)
        logger.warning(message)


# ---------------------------------------------------------------------------------------------
# Advantages


class GroupAdvantages(NamedTuple):
    """Result of :func:`group_advantages` (G groups, N completions), float64."""

    advantages: torch.Tensor  # [N]: 0 for missing rewards and all-equal groups
    group_mean: torch.Tensor  # [G]: mean of the valid rewards (0 when there is none)
    group_std: torch.Tensor  # [G]: std of the valid rewards (0 below two, 0 when all equal)
    group_all_equal: torch.Tensor  # [G] bool: the valid rewards are all the same number (vacuous below two)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4, unbiased: bool = True
) -> GroupAdvantages:
    """GRPO group advantages of any float reward, with the statistics of ``ops.welfare_advantages``.

    Parameters
    ----------
    rewards : Tensor ``[N]``
        One reward per completion, prompt-major; NaN marks a missing reward.
    group_size : int
        Completions per prompt; divides N.
    scale : {"group", "batch", "none"}
        ``A = (r - group mean) / (group std + eps)``, ``/ (batch std + eps)`` (the std of every valid
        reward of the batch), or ``r - group mean``.
    eps : float
    unbiased : bool
        Bessel-corrected (``n - 1``) or population (``n``) standard deviations.

    Notes
    -----
    Statistics are float64 over the valid (non-NaN) rewards of each group. A missing reward, a group
    with fewer than two valid rewards and a group whose valid rewards are all equal get advantage 0;
    so does a zero denominator. With ``scale`` "group" or "none" a group's advantages depend on its
    own rewards only, and adding a constant to a group's rewards leaves them unchanged (up to
    float64 rounding). Infinite rewards raise, as they do in the welfare op (the trainer never passes
    one: :func:`call_reward_funcs` stores them as NaN, a counted failure).
    """
    values = rewards.detach().to(torch.float64)
    if values.dim() != 1 or group_size < 1 or values.numel() % group_size:
        raise ValueError(f"group_advantages: rewards must be [N] with N a multiple of {group_size}, got "
                         f"{tuple(values.shape)}")
    if bool(torch.isinf(values).any()):
        raise ValueError("group_advantages: rewards must be finite (NaN = missing)")
    # the statistics of the welfare op's specification, one implementation (reference.group_advantages)
    return GroupAdvantages(*reference.group_advantages(values, group_size, scale, eps, unbiased))


def weighted_reward(per_func: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i r_i`` (float64) over the functions that scored a completion; NaN when none did."""
    scored = ~per_func.isnan()
    weight = torch.tensor(weights, dtype=torch.float64, device=per_func.device)
    total = (per_func.double().nan_to_num(0.0) * weight).sum(1)
    return torch.where(scored.any(1), total, torch.full_like(total, math.nan))


def batch_advantages(
    scores: RewardScores, specs: Sequence[RewardSpec], dist: Any, *, group_size: int, alpha: float, scale: str,
    eps: float, backend: str | None, max_judge_failure_rate: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Group advantages over the GLOBAL batch, and the reward metrics.

    Rewards are gathered from every process (``dist``: the trainer's process group), so "batch"
    scaling and the metrics see every completion; returns this process's slice of the advantages
    (float32) and the metrics. ``gtalign/judge_failures`` counts the global batch's completions
    whose judge failed; more than ``max_judge_failure_rate`` of them raise
    (:func:`check_judge_failure_rate`), on every process alike.
    """
    per_func = dist.gather_rows(scores.per_func)
    user = llm = welfare = None
    if scores.user is not None:
        user, llm = dist.gather_rows(scores.user), dist.gather_rows(scores.llm)
    if single_welfare(specs):
        out = ops.welfare_advantages(user, llm, group_size, alpha=alpha, scale=scale, eps=eps, backend=backend)
        reward = welfare = out.welfare
    else:  # plain rewards, or a weighted mix: the weighted sum gets a group advantage of its own
        reward = weighted_reward(per_func, [spec.weight for spec in specs])
        out = group_advantages(reward, group_size, scale=scale, eps=eps)
        if user is not None:
            welfare = per_func[:, [spec.is_welfare for spec in specs].index(True)]
    metrics = _reward_metrics(specs, per_func, reward, scores, dist)
    check_judge_failure_rate(metrics["gtalign/judge_failures"], per_func.shape[0], max_judge_failure_rate,
                             scores.failed_judges)
    if user is not None:
        metrics.update({"welfare/U": _nanmean(user), "welfare/L": _nanmean(llm), "welfare/W": _nanmean(welfare)})
    metrics.update({k: v for k, v in scores.extra.items() if k not in metrics})  # main process's batch
    metrics.update(_advantage_metrics(out.advantages.float(), out.group_all_equal))
    return dist.own_rows(out.advantages).float(), metrics


def _reward_metrics(specs: Sequence[RewardSpec], per_func: torch.Tensor, reward: torch.Tensor,
                    scores: RewardScores, dist: Any) -> dict[str, float]:
    metrics = {"reward": _nanmean(reward), "reward_std": _nanstd(reward)}
    for j, spec in enumerate(specs):
        metrics[f"rewards/{spec.name}/mean"] = _nanmean(per_func[:, j])
        metrics[f"rewards/{spec.name}/std"] = _nanstd(per_func[:, j])
    # host counts, one all-reduce for them all (the judge failures ride along: no extra sync)
    counts = [float(scores.failures[spec.name]) for spec in specs] + [float(scores.judge_failures)]
    *per_spec, judge_failures = dist.sum(torch.tensor(counts)).tolist()
    for spec, count in zip(specs, per_spec):
        metrics[f"rewards/{spec.name}/failures"] = count
    metrics["gtalign/judge_failures"] = judge_failures
    metrics["gtalign/judge_failure_rate"] = judge_failures / max(per_func.shape[0], 1)
    return metrics


def check_judge_failure_rate(failures: float, total: int, max_rate: float, judges: dict[str, int]) -> None:
    """Stop a run whose judge fails too often: a dead judge server must not train the model on noise.

    Parameters
    ----------
    failures : float
        Completions of the step (global batch) whose judge failed.
    total : int
        Completions of the step (global batch).
    max_rate : float
        ``GRPOConfig.max_judge_failure_rate``: more than this fraction raises.
    judges : dict of str to int
        This process's failures per judge (its repr), named in the error.

    Raises
    ------
    RuntimeError
        ``failures / total > max_rate``.
    """
    rate = failures / max(total, 1)
    if rate > max_rate:
        named = ", ".join(f"{name} ({count} here)" for name, count in sorted(judges.items())) or "see the logs"
        raise RuntimeError(
            f"GRPOTrainer: the judge failed on {int(failures)} of {total} completions of this step ({rate:.0%}), more "
            f"than GRPOConfig.max_judge_failure_rate = {max_rate:g}; judge: {named}. Is the judge server up and "
            "answering in time? (Failed samples are missing scores, advantage 0; raise max_judge_failure_rate to "
            "tolerate more.)"
        )


def _advantage_metrics(advantages: torch.Tensor, group_all_equal: torch.Tensor) -> dict[str, float]:
    return {
        "advantages/mean": float(advantages.mean()),
        "advantages/std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
        "advantages/abs_mean": float(advantages.abs().mean()),
        "frac_reward_zero_std": float(group_all_equal.float().mean()),
    }


def _nanmean(values: torch.Tensor) -> float:
    valid = values[~values.isnan()].float()
    return float(valid.mean()) if valid.numel() else math.nan


def _nanstd(values: torch.Tensor) -> float:
    valid = values[~values.isnan()].float()
    return float(valid.std()) if valid.numel() > 1 else 0.0
