"""Tests of gtalign_fast.game.pricing: policies, presets (the reference transforms) and rules."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gtalign_fast.game import (
    DEFAULT_EXPECTED_TOKENS,
    PAYOFF_KEYS,
    ActionChoice,
    Cell,
    PayoffMatrix,
    PricingPolicy,
    choose_action,
    disagreement_point,
    parse_payoff,
)


def matrix(**cells: tuple[float, float]) -> PayoffMatrix:
    """Build a matrix from (LLM, user) pairs; unspecified cells are (0, 0)."""
    data = {k: {"LLM": 0.0, "user": 0.0} for k in PAYOFF_KEYS}
    for key, (llm, user) in cells.items():
        data[key] = {"LLM": llm, "user": user}
    return PayoffMatrix.from_mapping(data)


def pairs(m: PayoffMatrix) -> dict[str, tuple[float, float]]:
    return {k: (c.llm, c.user) for k, c in m.items()}


EXAMPLE = matrix(
    DQ_AQ=(2.2, 1.9), DQ_CQ=(3.1, 3.5), DQ_DA=(4.2, 4.3), VQ_AQ=(2.0, 2.1), VQ_CQ=(1.3, 1.2), VQ_DA=(2.0, 1.8)
)


# ---------------------------------------------------------------------------------------------
# The reference's transforms, with hand-computed numbers
# ---------------------------------------------------------------------------------------------


def test_reference_llm_shift():
    # LLM - 2 everywhere; user + 1 (AQ), + 0.5 (CQ), + 0 (DA); rounded to one decimal
    out = PricingPolicy.reference(scale_llm=-2.0).apply(EXAMPLE)
    assert pairs(out) == {
        "DQ_AQ": (0.2, 2.9), "DQ_CQ": (1.1, 4.0), "DQ_DA": (2.2, 4.3),
        "VQ_AQ": (0.0, 3.1), "VQ_CQ": (-0.7, 1.7), "VQ_DA": (0.0, 1.8),
    }


def test_reference_user_shift():
    # user - 3 everywhere; LLM + 1 (DA), + 0.5 (AQ), + 0 (CQ)
    out = PricingPolicy.reference(scale_user=-3.0).apply(EXAMPLE)
    assert pairs(out) == {
        "DQ_AQ": (2.7, -1.1), "DQ_CQ": (3.1, 0.5), "DQ_DA": (5.2, 1.3),
        "VQ_AQ": (2.5, -0.9), "VQ_CQ": (1.3, -1.8), "VQ_DA": (3.0, -1.2),
    }


def test_reference_both_shifts():
    # The reference code is ``if scale_llm != 0: ... elif scale_user != 0: ...``: the LLM shift wins.
    policy = PricingPolicy.reference(scale_llm=-2.0, scale_user=-3.0)
    assert policy.apply(EXAMPLE) == PricingPolicy.reference(scale_llm=-2.0).apply(EXAMPLE)
    # combine="both": the LLM shift first, then the user shift on its rounded result
    both = PricingPolicy.reference(scale_llm=-2.0, scale_user=-3.0, combine="both").apply(EXAMPLE)
    assert pairs(both) == {
        "DQ_AQ": (0.7, -0.1), "DQ_CQ": (1.1, 1.0), "DQ_DA": (3.2, 1.3),
        "VQ_AQ": (0.5, 0.1), "VQ_CQ": (-0.7, -1.3), "VQ_DA": (1.0, -1.2),
    }
    with pytest.raises(ValueError):
        PricingPolicy.reference(1.0, 1.0, combine="sum")


def test_reference_rounds_to_one_decimal():
    m = matrix(DQ_AQ=(2.25, 1.04), DQ_CQ=(3.46, -0.44), DQ_DA=(0.04, 2.0))
    out = PricingPolicy.reference().apply(m)  # both scales 0: the reference still rounds
    assert pairs(out)["DQ_AQ"] == (2.2, 1.0)  # 2.25 is exact in binary: Python rounds half to even
    assert pairs(out)["DQ_CQ"] == (3.5, -0.4)
    assert pairs(out)["DQ_DA"] == (0.0, 2.0)
    assert not PricingPolicy.reference().is_identity
    assert PricingPolicy.reference().apply(EXAMPLE) == EXAMPLE  # one-decimal input: unchanged
    # the shift is added before rounding (round(v + s, 1)), as in the reference
    assert pairs(PricingPolicy.reference(scale_llm=0.05).apply(m))["DQ_AQ"] == (round(2.25 + 0.05, 1), 2.0)


def test_reference_steering_choice():
    # the reference then keeps the maximal user * LLM product
    shifted = PricingPolicy.reference(scale_user=-3.0).apply(EXAMPLE)
    choice = choose_action(shifted, "reference_nash")
    assert choice.key == "DQ_DA" and choice.value == pytest.approx(5.2 * 1.3)


# ---------------------------------------------------------------------------------------------
# Policies as data
# ---------------------------------------------------------------------------------------------


def test_identity():
    for policy in (PricingPolicy(), PricingPolicy.identity(), PricingPolicy(user_bonus={"DA": 0.0}),
                   PricingPolicy(user_price_per_token=0.0, expected_tokens={"DA": 100})):
        assert policy.is_identity
        assert policy.apply(EXAMPLE) is EXAMPLE
    assert not PricingPolicy(llm_shift=0.1).is_identity
    assert not PricingPolicy(then=PricingPolicy(decimals=1)).is_identity


def test_uniform_shift_bonus_and_call():
    policy = PricingPolicy(llm_shift=1.0, user_shift=-0.5, llm_bonus={"CQ": 2.0}, user_bonus={"AQ": 0.25})
    out = policy(EXAMPLE)
    assert out["DQ_CQ"] == Cell(3.1 + 1.0 + 2.0, 3.5 - 0.5)
    assert out["VQ_AQ"] == Cell(2.0 + 1.0, 2.1 - 0.5 + 0.25)
    assert out["VQ_DA"] == Cell(2.0 + 1.0, 1.8 - 0.5)
    assert policy.llm_delta("CQ") == 3.0 and policy.user_delta("DA") == -0.5


def test_per_token_api_favours_direct_answers():
    policy = PricingPolicy.per_token_api(0.005)
    # the user pays 0.005 x (DA 200, AQ 250, CQ 400) tokens
    assert [policy.user_delta(a) for a in ("DA", "AQ", "CQ")] == pytest.approx([-1.0, -1.25, -2.0])
    assert [policy.llm_delta(a) for a in ("DA", "AQ", "CQ")] == [0.0, 0.0, 0.0]
    m = matrix(DQ_AQ=(2.0, 2.0), DQ_CQ=(2.5, 2.6), DQ_DA=(2.2, 2.3))
    assert choose_action(m, "welfare", "DQ").key == "DQ_CQ"  # 5.1 > 4.5
    out = policy.apply(m)
    assert pairs(out)["DQ_CQ"] == pytest.approx((2.5, 0.6)) and pairs(out)["DQ_DA"] == pytest.approx((2.2, 1.3))
    assert choose_action(out, "welfare", "DQ").key == "DQ_DA"  # 3.5 > 3.1 > 2.75
    shared = PricingPolicy.per_token_api(0.01, provider_share=0.5, expected_tokens={"DA": 100, "AQ": 100, "CQ": 300})
    assert shared.llm_delta("CQ") == pytest.approx(1.5) and shared.user_delta("CQ") == pytest.approx(-3.0)
    with pytest.raises(ValueError):
        PricingPolicy.per_token_api(-1.0)


def test_subscription_makes_clarifying_cheap():
    policy = PricingPolicy.subscription()
    assert [policy.user_delta(a) for a in ("DA", "AQ", "CQ")] == [0.0, 0.25, 0.5]
    m = matrix(DQ_AQ=(2.0, 2.0), DQ_CQ=(2.0, 2.2), DQ_DA=(2.4, 2.2))
    assert choose_action(m, "welfare", "DQ").key == "DQ_DA"  # 4.6 > 4.2
    assert choose_action(policy.apply(m), "welfare", "DQ").key == "DQ_CQ"  # 4.7 > 4.6
    with_cost = PricingPolicy.subscription(provider_price=0.001)
    assert with_cost.llm_delta("CQ") == pytest.approx(-0.4)  # the provider pays for 400 tokens
    assert policy.name == "subscription" and not policy.is_identity


def test_policy_validation_and_hashing():
    with pytest.raises(ValueError):
        PricingPolicy(user_bonus={"XX": 1.0})
    with pytest.raises(ValueError):
        PricingPolicy(llm_shift=float("inf"))
    with pytest.raises(ValueError):
        PricingPolicy(decimals=1.5)
    with pytest.raises(TypeError):
        PricingPolicy(then="x")
    a, b = PricingPolicy(user_bonus={"CQ": 0.5, "AQ": 0.25}), PricingPolicy(user_bonus=[("AQ", 0.25), ("CQ", 0.5)])
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.llm_shift = 1.0  # frozen
    assert dict(PricingPolicy(user_price_per_token=1.0).expected_tokens) == dict(DEFAULT_EXPECTED_TOKENS)


def test_then_composes():
    first = PricingPolicy(llm_shift=1.0)
    second = PricingPolicy(user_shift=2.0, decimals=1)
    composed = PricingPolicy(llm_shift=1.0, then=second)
    assert composed.apply(EXAMPLE) == second.apply(first.apply(EXAMPLE))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-5, 5).map(lambda x: round(x, 1)), min_size=12, max_size=12),
    st.floats(-3, 3),
    st.floats(-3, 3),
)
def test_policy_results_reparse(values, s_llm, s_user):
    m = PayoffMatrix(tuple(Cell(values[2 * i], values[2 * i + 1]) for i in range(6)))
    for policy in (
        PricingPolicy.reference(s_llm, s_user),
        PricingPolicy.per_token_api(0.003),
        PricingPolicy.subscription(),
    ):
        out = policy.apply(m)
        rounded = PayoffMatrix(tuple(Cell(round(c.llm, 6), round(c.user, 6)) for c in out.cells))
        assert parse_payoff(out.to_text()) == rounded


# ---------------------------------------------------------------------------------------------
# Action-choice rules
# ---------------------------------------------------------------------------------------------


def test_nash_default_disagreement_point():
    assert disagreement_point(EXAMPLE) == pytest.approx((1.3 - 1.0, 1.2 - 1.0))
    choice = choose_action(EXAMPLE)
    assert isinstance(choice, ActionChoice) and str(choice) == "DQ_DA"
    assert (choice.question_type, choice.action, choice.rule) == ("DQ", "DA", "nash")
    assert choice.value == pytest.approx((4.2 - 0.3) * (4.3 - 0.2))
    assert choice.tied == ("DQ_DA",)


def test_nash_is_well_defined_for_negative_payoffs():
    # the raw product rewards the cell that is worst for both players
    m = matrix(DQ_AQ=(-3.0, -3.0), DQ_CQ=(1.0, 0.5), DQ_DA=(2.0, 2.0), VQ_AQ=(-1, 0), VQ_CQ=(0, -1), VQ_DA=(0.5, 0.5))
    assert choose_action(m, "reference_nash").key == "DQ_AQ"  # (-3) * (-3) = 9 > 4
    nash = choose_action(m, "nash")
    assert nash.key == "DQ_DA" and nash.value == pytest.approx((2 + 4) * (2 + 4))  # d = (-4, -4)
    assert choose_action(m, "nash", margin=0.5).key == "DQ_DA"


def test_nash_user_disagreement_point():
    choice = choose_action(EXAMPLE, "nash", disagreement=(2.5, 2.0))
    # DQ_AQ, VQ_* are not strictly above d in LLM: product 0; DQ_CQ 0.6 * 1.5; DQ_DA 1.7 * 2.3
    assert choice.key == "DQ_DA" and choice.value == pytest.approx(1.7 * 2.3)
    nobody = choose_action(EXAMPLE, "nash", disagreement=Cell(10.0, 10.0))
    assert nobody.value == 0.0 and nobody.tied == PAYOFF_KEYS and nobody.key == "DQ_AQ"


def test_welfare_tie_breaks():
    m = matrix(DQ_AQ=(1.0, 3.0), DQ_CQ=(3.0, 1.0), DQ_DA=(2.0, 2.0), VQ_AQ=(0.5, 3.5))
    # all four have LLM + user = 4: max user wins
    assert choose_action(m, "welfare").key == "VQ_AQ"
    assert choose_action(m, "welfare", "DQ").key == "DQ_AQ"
    assert choose_action(m, "welfare").value == 4.0


def test_full_ties_first_or_seeded_random():
    m = matrix(DQ_AQ=(2.0, 2.0), DQ_DA=(2.0, 2.0), VQ_CQ=(2.0, 2.0))
    first = choose_action(m, "welfare")
    assert first.key == "DQ_AQ" and first.tied == ("DQ_AQ", "DQ_DA", "VQ_CQ")
    draws = [choose_action(m, "welfare", tie_break="random", rng=seed).key for seed in range(60)]
    assert set(draws) == {"DQ_AQ", "DQ_DA", "VQ_CQ"}
    assert draws == [choose_action(m, "welfare", tie_break="random", rng=seed).key for seed in range(60)]
    generator = random.Random(3)
    again = random.Random(3)
    assert [choose_action(m, "pareto", tie_break="random", rng=generator).key for _ in range(10)] == [
        choose_action(m, "pareto", tie_break="random", rng=again).key for _ in range(10)
    ]
    # values within atol tie
    near = matrix(DQ_AQ=(2.0, 2.0), DQ_DA=(2.0, 2.0 + 1e-12))
    assert choose_action(near, "welfare").tied == ("DQ_AQ", "DQ_DA")
    assert choose_action(near, "welfare", atol=0.0).key == "DQ_DA"


def test_reference_nash_random_ties_draw_actions_like_the_reference():
    # DQ_CQ, DQ_DA and VQ_DA tie on the product: the reference draws among the actions {CQ, DA}
    m = matrix(DQ_CQ=(2.0, 3.0), DQ_DA=(3.0, 2.0), VQ_DA=(1.0, 6.0), VQ_AQ=(1.0, 1.0))
    choice = choose_action(m, "reference_nash")
    assert choice.tied == ("DQ_CQ", "DQ_DA", "VQ_DA") and choice.key == "DQ_CQ"
    rng = random.Random(0)
    counts = Counter(choose_action(m, "reference_nash", tie_break="random", rng=rng).action for _ in range(2000))
    assert set(counts) == {"CQ", "DA"}
    assert 0.45 < counts["CQ"] / 2000 < 0.55  # a uniform draw over keys would give 1/3


def test_pareto_rule():
    m = matrix(DQ_AQ=(1.0, 5.0), DQ_CQ=(5.0, 1.0), DQ_DA=(3.0, 3.0), VQ_AQ=(3.0, 3.0), VQ_CQ=(2, 2), VQ_DA=(0.5, 5.5))
    choice = choose_action(m, "pareto")
    assert choice.key == "VQ_DA"  # frontier: every cell but VQ_CQ, all with sum 6 -> max user 5.5
    assert m.pareto_frontier() == ("DQ_AQ", "DQ_CQ", "DQ_DA", "VQ_AQ", "VQ_DA")
    assert choose_action(m, "pareto", "DQ").key == "DQ_AQ"  # DQ frontier, sums all 6 -> max user
    assert EXAMPLE.best_action("pareto") == choose_action(EXAMPLE, "welfare").key == "DQ_DA"


def test_rule_errors():
    with pytest.raises(ValueError):
        choose_action(EXAMPLE, "borda")
    with pytest.raises(ValueError):
        choose_action(EXAMPLE, "nash", question_type="XQ")
    with pytest.raises(ValueError):
        choose_action(EXAMPLE, "nash", tie_break="last")


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.floats(-5, 5).map(lambda x: round(x, 1)), min_size=12, max_size=12),
    st.sampled_from(["nash", "welfare", "pareto", "reference_nash"]),
)
def test_choices_are_valid_and_welfare_is_on_the_frontier(values, rule):
    m = PayoffMatrix(tuple(Cell(values[2 * i], values[2 * i + 1]) for i in range(6)))
    choice = choose_action(m, rule)
    assert choice.key in PAYOFF_KEYS and choice.key in choice.tied
    if rule in ("nash", "welfare", "pareto"):
        assert choice.key in m.pareto_frontier() or any(m[k] == m[choice.key] for k in m.pareto_frontier())
