"""Pricing policies (edits of the payoff matrix) and action-choice rules.

A :class:`PricingPolicy` is data: uniform shifts and per-action bonuses for each player, plus an
optional per-token price that a player pays for the expected tokens of each action. Applying it to
a :class:`~gtalign_fast.game.payoff.PayoffMatrix` gives the edited matrix that the steering sampler
writes back into the chain. :func:`choose_action` picks the cell the assistant should play.

For a cell (question type q, action a) with payoffs (LLM, user)::

    LLM'  = LLM  + llm_shift  + llm_bonus[a]  - llm_price_per_token  * expected_tokens[a]
    user' = user + user_shift + user_bonus[a] - user_price_per_token * expected_tokens[a]

then, if ``decimals`` is set, each value is ``round(value', decimals)`` (Python's ``round``), and the
policy in ``then`` (if any) is applied to the result.

Presets
-------
- :meth:`PricingPolicy.subscription`: the user does not pay per token, so asking is cheap for them:
  the user gains ``clarify_bonus`` for CQ and ``followup_bonus`` for AQ; optionally the provider
  bears the compute cost (``provider_price`` per expected token, on the LLM side).
- :meth:`PricingPolicy.per_token_api`: the user pays ``price`` per expected token, which favours
  short direct answers; optionally the provider earns a share of it.
- :meth:`PricingPolicy.reference`: the reference's two transforms, exactly (see its docstring).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .payoff import ACTIONS, PAYOFF_KEYS, QUESTION_TYPES, Cell, PayoffMatrix, make_key, pareto_frontier, split_key

__all__ = [
    "DEFAULT_EXPECTED_TOKENS",
    "RULES",
    "PricingPolicy",
    "ActionChoice",
    "choose_action",
    "disagreement_point",
]

DEFAULT_EXPECTED_TOKENS: Mapping[str, float] = {"AQ": 250.0, "CQ": 400.0, "DA": 200.0}
"""Rough expected tokens per action for a whole exchange: a direct answer (DA ~200), an answer plus
one question (AQ ~250), and a clarifying question, which costs a second round trip before the
answer arrives (CQ ~400). Override them with measured lengths for your model."""

RULES: tuple[str, ...] = ("nash", "reference_nash", "welfare", "pareto")
"""Action-choice rules; see :func:`choose_action`."""

_REFERENCE_USER_BONUS = {"DA": 0.0, "AQ": 1.0, "CQ": 0.5}  # with the reference's LLM shift
_REFERENCE_LLM_BONUS = {"DA": 1.0, "AQ": 0.5, "CQ": 0.0}  # with the reference's user shift


def _per_action(
    values: Mapping[str, float] | Sequence[tuple[str, float]] | None, what: str
) -> tuple[tuple[str, float], ...]:
    """Validate a per-action mapping and store it as ``((action, value), ...)`` in ACTIONS order."""
    if values is None:
        return ()
    items = dict(values.items() if isinstance(values, Mapping) else values)
    unknown = set(items) - set(ACTIONS)
    if unknown:
        raise ValueError(f"{what}: unknown actions {sorted(unknown)} (expected {ACTIONS})")
    out = []
    for action in ACTIONS:
        if action in items:
            value = float(items[action])
            if not math.isfinite(value):
                raise ValueError(f"{what}[{action}] must be finite")
            out.append((action, value))
    return tuple(out)


@dataclass(frozen=True)
class PricingPolicy:
    """An edit of the payoff matrix (immutable, hashable data).

    Attributes
    ----------
    llm_shift, user_shift : float
        Added to every cell of that player.
    llm_bonus, user_bonus : mapping action -> float
        Added to the cells of an action (missing actions: 0). Stored as sorted pairs.
    llm_price_per_token, user_price_per_token : float
        Price a player pays per expected token of the action (negative: earns).
    expected_tokens : mapping action -> float
        Expected tokens per action; defaults to :data:`DEFAULT_EXPECTED_TOKENS` when a price is set.
    decimals : int, optional
        Round every value of the result (Python ``round``).
    then : PricingPolicy, optional
        Applied to the result of this one.
    name : str
        A label for logs.
    """

    llm_shift: float = 0.0
    user_shift: float = 0.0
    llm_bonus: Any = ()
    user_bonus: Any = ()
    llm_price_per_token: float = 0.0
    user_price_per_token: float = 0.0
    expected_tokens: Any = ()
    decimals: int | None = None
    then: "PricingPolicy | None" = None
    name: str = "custom"

    def __post_init__(self) -> None:
        for attr in ("llm_shift", "user_shift", "llm_price_per_token", "user_price_per_token"):
            value = float(getattr(self, attr))
            if not math.isfinite(value):
                raise ValueError(f"{attr} must be finite")
            object.__setattr__(self, attr, value)
        object.__setattr__(self, "llm_bonus", _per_action(self.llm_bonus, "llm_bonus"))
        object.__setattr__(self, "user_bonus", _per_action(self.user_bonus, "user_bonus"))
        tokens = self.expected_tokens
        if not tokens and (self.llm_price_per_token or self.user_price_per_token):
            tokens = DEFAULT_EXPECTED_TOKENS
        object.__setattr__(self, "expected_tokens", _per_action(tokens, "expected_tokens"))
        if self.decimals is not None and (not isinstance(self.decimals, int) or isinstance(self.decimals, bool)):
            raise ValueError("decimals must be an int or None")
        if self.then is not None and not isinstance(self.then, PricingPolicy):
            raise TypeError("then must be a PricingPolicy or None")

    # -- presets --------------------------------------------------------------------------------

    @classmethod
    def identity(cls) -> "PricingPolicy":
        """The policy that changes nothing."""
        return cls(name="identity")

    @classmethod
    def subscription(
        cls,
        clarify_bonus: float = 0.5,
        followup_bonus: float = 0.25,
        *,
        provider_price: float = 0.0,
        expected_tokens: Mapping[str, float] | None = None,
        decimals: int | None = None,
    ) -> "PricingPolicy":
        """Subscription pricing: tokens cost the user nothing, so clarifying questions are cheap.

        The user gains ``clarify_bonus`` on CQ cells and ``followup_bonus`` on AQ cells; the provider
        (LLM) pays ``provider_price`` per expected token (its compute cost; 0 by default).
        """
        return cls(
            user_bonus={"CQ": clarify_bonus, "AQ": followup_bonus},
            llm_price_per_token=provider_price,
            expected_tokens=expected_tokens or (DEFAULT_EXPECTED_TOKENS if provider_price else None),
            decimals=decimals,
            name="subscription",
        )

    @classmethod
    def per_token_api(
        cls,
        price: float,
        *,
        expected_tokens: Mapping[str, float] | None = None,
        provider_share: float = 0.0,
        decimals: int | None = None,
    ) -> "PricingPolicy":
        """Per-token API pricing: the user pays ``price`` x expected tokens of each action.

        With the default token counts (DA < AQ < CQ) this favours short direct answers. The provider
        (LLM) earns ``provider_share`` of what the user pays (0 by default: only the user's payoff
        moves). ``price`` is in payoff units per token (e.g. 0.005 makes a 200-token DA cost 1.0).
        """
        if price < 0:
            raise ValueError("price must be >= 0")
        return cls(
            user_price_per_token=price,
            llm_price_per_token=-price * provider_share,
            expected_tokens=expected_tokens or DEFAULT_EXPECTED_TOKENS,
            decimals=decimals,
            name="per_token_api",
        )

    @classmethod
    def reference(
        cls, scale_llm: float = 0.0, scale_user: float = 0.0, *, combine: str = "reference"
    ) -> "PricingPolicy":
        """The reference's payoff transforms (GTAlign ``transform_payoffs``), exactly.

        - LLM shift (``scale_llm != 0``): LLM += scale_llm in every cell;
          user += {DA: 0, AQ: +1, CQ: +0.5}.
        - user shift (``scale_user != 0``): user += scale_user in every cell;
          LLM += {DA: +1, AQ: +0.5, CQ: 0}.
        - Every value of the result is ``round(value + delta, 1)`` (one decimal, Python ``round``),
          also when both scales are 0 (then the policy only rounds).

        Parameters
        ----------
        scale_llm, scale_user : float
        combine : {"reference", "both"}
            ``"reference"`` (default) does what the reference code does when both scales are
            non-zero: it is an ``if``/``elif``, so only the LLM shift is applied and ``scale_user``
            is ignored. ``"both"`` applies the LLM shift, then the user shift to its (rounded)
            result.
        """
        if combine not in ("reference", "both"):
            raise ValueError("combine must be 'reference' or 'both'")
        llm_policy = cls(llm_shift=scale_llm, user_bonus=_REFERENCE_USER_BONUS, decimals=1, name="reference_llm_shift")
        user_policy = cls(
            user_shift=scale_user, llm_bonus=_REFERENCE_LLM_BONUS, decimals=1, name="reference_user_shift"
        )
        if scale_llm != 0:
            if combine == "both" and scale_user != 0:
                return cls(llm_shift=scale_llm, user_bonus=_REFERENCE_USER_BONUS, decimals=1, then=user_policy,
                           name="reference_both_shifts")
            return llm_policy
        if scale_user != 0:
            return user_policy
        return cls(decimals=1, name="reference_round")

    # -- use ----------------------------------------------------------------------------------

    @property
    def is_identity(self) -> bool:
        """True when :meth:`apply` returns the matrix unchanged for every input."""
        own = (
            self.llm_shift == 0.0 and self.user_shift == 0.0
            and all(v == 0.0 for _, v in self.llm_bonus) and all(v == 0.0 for _, v in self.user_bonus)
            and (self.llm_price_per_token == 0.0 or all(t == 0.0 for _, t in self.expected_tokens))
            and (self.user_price_per_token == 0.0 or all(t == 0.0 for _, t in self.expected_tokens))
            and self.decimals is None
        )
        return own and (self.then is None or self.then.is_identity)

    def _tokens(self, action: str) -> float:
        return dict(self.expected_tokens).get(action, 0.0)

    def llm_delta(self, action: str) -> float:
        """What this policy adds to the LLM payoff of ``action`` (before rounding and ``then``)."""
        return self.llm_shift + dict(self.llm_bonus).get(action, 0.0) - self.llm_price_per_token * self._tokens(action)

    def user_delta(self, action: str) -> float:
        """What this policy adds to the user payoff of ``action`` (before rounding and ``then``)."""
        price = self.user_price_per_token * self._tokens(action)
        return self.user_shift + dict(self.user_bonus).get(action, 0.0) - price

    def apply(self, matrix: PayoffMatrix) -> PayoffMatrix:
        """The edited matrix (``matrix`` itself when the policy is the identity)."""
        if self.is_identity:
            return matrix
        deltas = {a: (self.llm_delta(a), self.user_delta(a)) for a in ACTIONS}

        def edit(key: str, cell: Cell) -> Cell:
            d_llm, d_user = deltas[split_key(key)[1]]
            llm, user = cell.llm + d_llm, cell.user + d_user
            if self.decimals is not None:
                llm, user = round(llm, self.decimals), round(user, self.decimals)
            return Cell(llm, user)

        edited = matrix.map(edit)
        return self.then.apply(edited) if self.then is not None else edited

    __call__ = apply


# --------------------------------------------------------------------------------------------
# Action choice
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionChoice:
    """The chosen cell.

    Attributes
    ----------
    key : str
        e.g. ``"DQ_DA"``.
    question_type, action : str
    rule : str
    value : float
        The rule's objective at the chosen cell (product, welfare sum...).
    tied : tuple of str
        Every key that tied at the top before the tie-break (``(key,)`` when there was no tie).
    """

    key: str
    question_type: str
    action: str
    rule: str
    value: float
    tied: tuple[str, ...]

    def __str__(self) -> str:
        return self.key


def disagreement_point(
    matrix: PayoffMatrix, keys: Sequence[str] = PAYOFF_KEYS, margin: float = 1.0
) -> tuple[float, float]:
    """Default Nash disagreement point ``(d_llm, d_user)``: the minimum payoff of each player over
    ``keys`` minus ``margin``. With ``margin > 0`` every cell is strictly above it, so the Nash
    product is positive and well defined for negative payoffs too."""
    return (min(matrix[k].llm for k in keys) - margin, min(matrix[k].user for k in keys) - margin)


def _top(scored: list[tuple[str, tuple[float, ...]]], atol: float) -> list[str]:
    """Keys tied at the top of a lexicographic maximum (each coordinate compared within atol)."""
    scores = dict(scored)
    tied = [key for key, _ in scored]
    for position in range(len(scored[0][1])):
        best = max(scores[k][position] for k in tied)
        tied = [k for k in tied if scores[k][position] >= best - atol]
    return tied


def choose_action(
    matrix: PayoffMatrix,
    rule: str = "nash",
    question_type: str | None = None,
    *,
    disagreement: tuple[float, float] | Cell | None = None,
    margin: float = 1.0,
    tie_break: str = "first",
    rng: random.Random | int | None = None,
    atol: float = 1e-9,
) -> ActionChoice:
    """Pick the cell to play.

    Parameters
    ----------
    matrix : PayoffMatrix
    rule : {"nash", "reference_nash", "welfare", "pareto"}
        - ``nash``: maximise the Nash / Cobb-Douglas product ``(user - d_user) (LLM - d_llm)``.
          The disagreement point d is ``disagreement`` if given, else the minimum payoff of each
          player over the candidate cells minus ``margin`` (:func:`disagreement_point`), so negative
          payoffs are well defined. A cell not strictly above d in both coordinates gets product 0.
        - ``reference_nash``: the reference's raw product ``user * LLM`` (ill-defined for negative
          payoffs: two negatives make a large positive product; kept for comparison). With
          ``tie_break="random"`` it draws uniformly among the distinct *actions* of the tied keys,
          as the reference does, then returns the first tied key with that action.
        - ``welfare``: max ``LLM + user``, then max user, then max LLM (the reference prompt's rule).
        - ``pareto``: the Pareto frontier, then the ``welfare`` tie-breaks among it.
    question_type : {"DQ", "VQ"}, optional
        Only consider that row (the model has classified the question); default: all six cells.
    disagreement : (d_llm, d_user) or Cell, optional
        Nash disagreement point.
    margin : float
        Margin of the default disagreement point.
    tie_break : {"first", "random"}
        Remaining ties: ``first`` takes the first tied key in canonical order (deterministic);
        ``random`` draws with ``rng``.
    rng : random.Random or int, optional
        Generator (or seed) for ``tie_break="random"``; ``None`` uses the ``random`` module.
    atol : float
        Values within ``atol`` tie.

    Returns
    -------
    ActionChoice
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if tie_break not in ("first", "random"):
        raise ValueError("tie_break must be 'first' or 'random'")
    if question_type is None:
        keys: tuple[str, ...] = PAYOFF_KEYS
    elif question_type in QUESTION_TYPES:
        keys = tuple(make_key(question_type, a) for a in ACTIONS)
    else:
        raise ValueError(f"question_type must be one of {QUESTION_TYPES} or None, got {question_type!r}")

    if rule == "nash":
        d_llm, d_user = _disagreement(matrix, keys, disagreement, margin)
        scored = [(k, (_nash_product(matrix[k], d_llm, d_user),)) for k in keys]
    elif rule == "reference_nash":
        scored = [(k, (matrix[k].user * matrix[k].llm,)) for k in keys]
    else:
        candidates = keys if rule == "welfare" else pareto_frontier(matrix, question_type=question_type)
        scored = [(k, (matrix[k].llm + matrix[k].user, matrix[k].user, matrix[k].llm)) for k in candidates]

    tied = _top(scored, atol)
    key = _break_tie(tied, rule, tie_break, rng)
    question, action = split_key(key)
    return ActionChoice(
        key=key, question_type=question, action=action, rule=rule, value=dict(scored)[key][0], tied=tuple(tied)
    )


def _disagreement(
    matrix: PayoffMatrix, keys: Sequence[str], disagreement: tuple[float, float] | Cell | None, margin: float
) -> tuple[float, float]:
    if disagreement is None:
        return disagreement_point(matrix, keys, margin)
    if isinstance(disagreement, Cell):
        return disagreement.llm, disagreement.user
    d_llm, d_user = disagreement
    return float(d_llm), float(d_user)


def _nash_product(cell: Cell, d_llm: float, d_user: float) -> float:
    gain_llm, gain_user = cell.llm - d_llm, cell.user - d_user
    if gain_llm <= 0 or gain_user <= 0:
        return 0.0
    return gain_llm * gain_user


def _break_tie(tied: list[str], rule: str, tie_break: str, rng: random.Random | int | None) -> str:
    if len(tied) == 1 or tie_break == "first":
        return tied[0]
    generator: Any = random.Random(rng) if isinstance(rng, int) else (rng if rng is not None else random)
    if rule == "reference_nash":
        actions = list(dict.fromkeys(split_key(k)[1] for k in tied))  # distinct, in order
        action = generator.choice(actions)
        return next(k for k in tied if split_key(k)[1] == action)
    return generator.choice(tied)
