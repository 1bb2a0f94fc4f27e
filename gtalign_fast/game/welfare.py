"""Mutual welfare of one completion: U (user), L (LLM) and W, exactly as the GTAlign reference.

:func:`score_completion` is the single place the formulas live; the batch reward
(:class:`gtalign_fast.game.reward.GTAlignReward`) and everything else call it.

Definitions (one generated text ``full``)::

    resp   = inner text of <response>;  reason = everything before the first "<response>"
    Lg(text; lo, hi, k=0.005) = sigmoid(k (n - lo)) * sigmoid(k (hi - n)),  n = len(text.split())
    R      = exp(-len(reason) / 500)                                          (characters)
    U      = eps + 0.5 A_user + 0.2 Lg(resp; 20, 500) + 0.3 R
    L      = eps + 0.2 F + 0.2 P + 0.4 A_llm + 0.2 Lg(full; 500, 1000)
    W      = U^alpha L^(1 - alpha)                       ("cobb", alpha = 0.5: sqrt(U L))

with ``eps = 1e-4``. Variants: ``linear`` (U + L) / 2, ``user`` U, ``llm`` L, and the ablation
``pareto``: L = eps + 0.2 pareto + 0.2 P + 0.2 F + 0.35 A_llm + 0.05 Lg(full; 500, 1000), combined
like ``cobb``. Hard failure (``<response>`` or ``<payoff>`` missing, or the payoff does not parse):
every logged field is 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .chain import Chain, split_chain
from .payoff import PayoffMatrix

__all__ = [
    "VARIANTS",
    "LOGGED_FIELDS",
    "WelfareWeights",
    "DEFAULT_WEIGHTS",
    "ScoreResult",
    "sigmoid",
    "length_window",
    "reasoning_efficiency",
    "user_welfare",
    "llm_welfare",
    "llm_welfare_pareto",
    "combine_welfare",
    "score_completion",
    "score_chain",
]

VARIANTS: tuple[str, ...] = ("cobb", "linear", "user", "llm", "pareto")
"""Welfare variants: Cobb-Douglas (GTAlign), linear mean, user-only, LLM-only, Pareto ablation."""

LOGGED_FIELDS: tuple[str, ...] = (
    "score", "answer_reward", "format_reward", "user_reward", "llm_reward", "utility", "reward_gap",
)
"""The per-sample fields the reference logs, in its order."""

_PARETO_VALUES = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class WelfareWeights:
    """Weights and constants of U and L; the defaults are the reference's.

    Attributes
    ----------
    eps : float
        Added to U and L so that W > 0 (1e-4).
    user_answer, user_length, user_reasoning : float
        U = eps + user_answer A_user + user_length Lg(resp) + user_reasoning R  (0.5, 0.2, 0.3).
    llm_format, llm_diversity, llm_answer, llm_length : float
        L = eps + llm_format F + llm_diversity P + llm_answer A_llm + llm_length Lg(full)
        (0.2, 0.2, 0.4, 0.2).
    pareto_judge, pareto_diversity, pareto_format, pareto_answer, pareto_length : float
        The ablation L: eps + 0.2 pareto + 0.2 P + 0.2 F + 0.35 A_llm + 0.05 Lg(full).
    response_words : tuple of float
        ``(lo, hi)`` of the response length window, in words (20, 500).
    full_words : tuple of float
        ``(lo, hi)`` of the whole-text length window, in words (500, 1000).
    length_k : float
        Steepness of both length windows (0.005).
    reasoning_scale : float
        R = exp(-len(reason) / reasoning_scale), characters (500).
    log_format_f, log_format_p : float
        The logged ``format_reward`` = log_format_f F + log_format_p P (0.1, 0.15).
    """

    eps: float = 1e-4
    user_answer: float = 0.5
    user_length: float = 0.2
    user_reasoning: float = 0.3
    llm_format: float = 0.2
    llm_diversity: float = 0.2
    llm_answer: float = 0.4
    llm_length: float = 0.2
    pareto_judge: float = 0.2
    pareto_diversity: float = 0.2
    pareto_format: float = 0.2
    pareto_answer: float = 0.35
    pareto_length: float = 0.05
    response_words: tuple[float, float] = (20.0, 500.0)
    full_words: tuple[float, float] = (500.0, 1000.0)
    length_k: float = 0.005
    reasoning_scale: float = 500.0
    log_format_f: float = 0.1
    log_format_p: float = 0.15


DEFAULT_WEIGHTS = WelfareWeights()


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


def sigmoid(x: float) -> float:
    """Numerically safe logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def length_window(text_or_words: str | int, lo: float, hi: float, k: float = 0.005) -> float:
    """Lg = sigmoid(k (n - lo)) sigmoid(k (hi - n)), n = ``len(text.split())`` or the given count."""
    n = text_or_words if isinstance(text_or_words, int) else len(text_or_words.split())
    return sigmoid(k * (n - lo)) * sigmoid(k * (hi - n))


def reasoning_efficiency(reason: str | int, scale: float = 500.0) -> float:
    """R = exp(-len(reason) / scale), length in characters (or the given count)."""
    n = reason if isinstance(reason, int) else len(reason)
    return math.exp(-n / scale)


def _unit(value: Any) -> float:
    """Clamp an answer score into [0, 1]; NaN, None and non-numbers count as 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    if math.isnan(number):
        return 0.0
    return min(max(number, 0.0), 1.0)


def user_welfare(a_user: float, response: str, reason: str, weights: WelfareWeights = DEFAULT_WEIGHTS) -> float:
    """U = eps + 0.5 A_user + 0.2 Lg(resp; 20, 500) + 0.3 R (weights configurable)."""
    lo, hi = weights.response_words
    return (
        weights.eps
        + weights.user_answer * _unit(a_user)
        + weights.user_length * length_window(response, lo, hi, weights.length_k)
        + weights.user_reasoning * reasoning_efficiency(reason, weights.reasoning_scale)
    )


def llm_welfare(
    format_f: float, diversity: float, a_llm: float, full: str, weights: WelfareWeights = DEFAULT_WEIGHTS
) -> float:
    """L = eps + 0.2 F + 0.2 P + 0.4 A_llm + 0.2 Lg(full; 500, 1000) (weights configurable)."""
    lo, hi = weights.full_words
    return (
        weights.eps
        + weights.llm_format * format_f
        + weights.llm_diversity * diversity
        + weights.llm_answer * _unit(a_llm)
        + weights.llm_length * length_window(full, lo, hi, weights.length_k)
    )


def llm_welfare_pareto(
    pareto: float, format_f: float, diversity: float, a_llm: float, full: str,
    weights: WelfareWeights = DEFAULT_WEIGHTS,
) -> float:
    """Ablation L = eps + 0.2 pareto + 0.2 P + 0.2 F + 0.35 A_llm + 0.05 Lg(full; 500, 1000)."""
    lo, hi = weights.full_words
    return (
        weights.eps
        + weights.pareto_judge * pareto
        + weights.pareto_diversity * diversity
        + weights.pareto_format * format_f
        + weights.pareto_answer * _unit(a_llm)
        + weights.pareto_length * length_window(full, lo, hi, weights.length_k)
    )


def combine_welfare(user: float, llm: float, variant: str = "cobb", alpha: float = 0.5) -> float:
    """W from U and L: ``cobb``/``pareto`` U^alpha L^(1-alpha), ``linear`` (U+L)/2, ``user`` U, ``llm`` L."""
    if variant in ("cobb", "pareto"):
        return (user ** alpha) * (llm ** (1.0 - alpha))
    if variant == "linear":
        return (user + llm) / 2.0
    if variant == "user":
        return user
    if variant == "llm":
        return llm
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


# --------------------------------------------------------------------------------------------
# One completion
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreResult:
    """The reward of one completion.

    Attributes
    ----------
    score : float
        W of the chosen variant (the scalar reward).
    answer_reward : float
        A_llm (the judge's answer score used by L; equals A_user for single-judge tasks).
    format_reward : float
        0.1 F + 0.15 P (the reference's logged value; not the F that enters L).
    user_reward, llm_reward : float
        U and L.
    utility : float
        sqrt(U L), whatever the variant (the reference logs it under this name).
    reward_gap : float
        |U - L|.
    F : float
        Format reward (0 or 1).
    P : float
        Payoff diversity (0 when there is no matrix; reported even on a hard failure when the
        matrix parsed, although the logged fields are then 0).
    matrix : PayoffMatrix or None
        The parsed payoff matrix.
    hard_failure : bool
        ``<response>``/``<payoff>`` missing or the payoff does not parse: the logged fields are 0.
    variant : str
    """

    score: float
    answer_reward: float
    format_reward: float
    user_reward: float
    llm_reward: float
    utility: float
    reward_gap: float
    F: float  # noqa: N815 - the paper's name
    P: float  # noqa: N815 - the paper's name
    matrix: PayoffMatrix | None
    hard_failure: bool
    variant: str = "cobb"

    @property
    def user(self) -> float:
        """U (alias of ``user_reward``)."""
        return self.user_reward

    @property
    def llm(self) -> float:
        """L (alias of ``llm_reward``)."""
        return self.llm_reward

    def logged(self) -> dict[str, float]:
        """The reference's logged fields as a dict (floats only)."""
        return {name: getattr(self, name) for name in LOGGED_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """Every field; the matrix as a plain dict (or ``None``)."""
        out = asdict(self)
        out["matrix"] = self.matrix.to_dict() if self.matrix is not None else None
        return out


def _check_variant(variant: str, pareto: float | None, alpha: float) -> float | None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if variant != "pareto":
        return None
    if pareto is None or float(pareto) not in _PARETO_VALUES:
        raise ValueError(f"variant 'pareto' needs pareto in {{0, 0.5, 1}}, got {pareto!r}")
    return float(pareto)


def _hard_failure(chain: Chain, variant: str) -> ScoreResult:
    return ScoreResult(
        score=0.0, answer_reward=0.0, format_reward=0.0, user_reward=0.0, llm_reward=0.0,
        utility=0.0, reward_gap=0.0, F=0.0, P=chain.P, matrix=chain.matrix, hard_failure=True,
        variant=variant,
    )


def score_chain(
    chain: Chain,
    a_user: float,
    a_llm: float | None = None,
    *,
    variant: str = "cobb",
    pareto: float | None = None,
    alpha: float = 0.5,
    weights: WelfareWeights = DEFAULT_WEIGHTS,
) -> ScoreResult:
    """:func:`score_completion` for a chain that is already split (avoids splitting twice)."""
    pareto_value = _check_variant(variant, pareto, alpha)
    if chain.hard_failure:
        return _hard_failure(chain, variant)
    a_user = _unit(a_user)
    a_llm = a_user if a_llm is None else _unit(a_llm)
    format_f, diversity = chain.F, chain.P
    assert chain.response is not None  # not a hard failure
    user = user_welfare(a_user, chain.response, chain.reason, weights)
    if pareto_value is None:
        llm = llm_welfare(format_f, diversity, a_llm, chain.text, weights)
    else:
        llm = llm_welfare_pareto(pareto_value, format_f, diversity, a_llm, chain.text, weights)
    return ScoreResult(
        score=combine_welfare(user, llm, variant, alpha),
        answer_reward=a_llm,
        format_reward=weights.log_format_f * format_f + weights.log_format_p * diversity,
        user_reward=user,
        llm_reward=llm,
        utility=math.sqrt(user * llm),
        reward_gap=abs(user - llm),
        F=format_f,
        P=diversity,
        matrix=chain.matrix,
        hard_failure=False,
        variant=variant,
    )


def score_completion(
    text: Any,
    a_user: float,
    a_llm: float | None = None,
    *,
    variant: str = "cobb",
    pareto: float | None = None,
    alpha: float = 0.5,
    weights: WelfareWeights = DEFAULT_WEIGHTS,
) -> ScoreResult:
    """Score one GTAlign completion.

    Parameters
    ----------
    text : str
        The generated text (``<thinking>...</response>``). Hostile text is fine: parsing is bounded
        and never raises; a non-str is a hard failure.
    a_user : float
        Answer quality for the user, in [0, 1] (clamped; NaN counts as 0).
    a_llm : float, optional
        Answer quality for the LLM term; defaults to ``a_user``.
    variant : {"cobb", "linear", "user", "llm", "pareto"}
        How U and L combine into the score (and, for ``pareto``, which L).
    pareto : {0, 0.5, 1}, optional
        The Pareto judge's verdict; required by (and only used by) ``variant="pareto"``.
    alpha : float
        Cobb-Douglas exponent of U (``cobb`` and ``pareto``): W = U^alpha L^(1 - alpha).
    weights : WelfareWeights
        Weights, windows and epsilon; the defaults are the reference's.

    Returns
    -------
    ScoreResult

    Raises
    ------
    ValueError
        Unknown ``variant``, ``alpha`` outside [0, 1], or a missing/invalid ``pareto`` (caller
        errors, never caused by the text).
    """
    return score_chain(
        split_chain(text), a_user, a_llm, variant=variant, pareto=pareto, alpha=alpha, weights=weights
    )
