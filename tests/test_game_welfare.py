"""Tests of gtalign_fast.game.welfare: U, L, W, the variants and the hard-failure rule."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gtalign_fast.game import (
    LOGGED_FIELDS,
    ScoreResult,
    WelfareWeights,
    score_completion,
    split_chain,
)
from gtalign_fast.game.welfare import combine_welfare, length_window, score_chain

# ---------------------------------------------------------------------------------------------
# Independent implementation of the formulas (GTAlign section 3), written from the definitions
# ---------------------------------------------------------------------------------------------


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def lg(n_words: int, lo: float, hi: float, k: float = 0.005) -> float:
    return sig(k * (n_words - lo)) * sig(k * (hi - n_words))


def hand_scores(text: str, a_user: float, a_llm: float, F: float, P: float) -> tuple[float, float, float]:
    start = text.index("<response>")
    end = text.index("</response>", start)
    response = text[start + len("<response>") : end].strip()
    reason = text[:start]
    U = 1e-4 + 0.5 * a_user + 0.2 * lg(len(response.split()), 20, 500) + 0.3 * math.exp(-len(reason) / 500)
    L = 1e-4 + 0.2 * F + 0.2 * P + 0.4 * a_llm + 0.2 * lg(len(text.split()), 500, 1000)
    return U, L, math.sqrt(U * L)


# ---------------------------------------------------------------------------------------------
# The worked example of the GTAlign paper (arXiv 2510.08872), section 3: a 400-word completion with an
# 800-character reasoning and a 150-word response, F = P = 1; a correct answer scores U = 0.673, L = 0.872,
# W = 0.766, a wrong one U = 0.173, L = 0.472, W = 0.285
# ---------------------------------------------------------------------------------------------

# P = 1: every cell has user != LLM with a relative gap > 10%
DIVERSE = json.dumps({
    "DQ_AQ": {"LLM": 1.0, "user": 3.0}, "DQ_CQ": {"LLM": 2.0, "user": 2.5}, "DQ_DA": {"LLM": 3.0, "user": 4.2},
    "VQ_AQ": {"LLM": 2.4, "user": 1.0}, "VQ_CQ": {"LLM": -1.0, "user": 1.0}, "VQ_DA": {"LLM": 0.5, "user": 2.0},
})


def worked_example_text() -> str:
    """150-word response, 800-character reasoning, 400 words in all, F = P = 1."""
    head = "<thinking> "
    tail = " </thinking>\n<payoff>" + DIVERSE + "</payoff>\n<analyze>DQ_DA is on the frontier.</analyze> "
    words_needed = 250 - len((head + tail).split())
    chars_needed = 800 - len(head + tail) - (words_needed - 1)  # letters, excluding separating spaces
    size, extra = divmod(chars_needed, words_needed)
    filler = " ".join("w" * (size + (i < extra)) for i in range(words_needed))
    reason = head + filler + tail
    response = " ".join(f"word{i % 10}" for i in range(150))
    return reason + "<response>" + response + "</response>"


def test_worked_example_is_what_it_claims():
    text = worked_example_text()
    c = split_chain(text)
    assert len(c.reason) == 800
    assert len(c.response.split()) == 150
    assert len(text.split()) == 400
    assert c.F == 1.0 and c.P == 1.0


def test_worked_example_correct_answer():
    r = score_completion(worked_example_text(), 1.0)
    assert r.user_reward == pytest.approx(0.673, abs=1e-3)
    assert r.llm_reward == pytest.approx(0.872, abs=1e-3)
    assert r.score == pytest.approx(0.766, abs=1e-3)


def test_worked_example_wrong_answer():
    r = score_completion(worked_example_text(), 0.0)
    assert r.user_reward == pytest.approx(0.173, abs=1e-3)
    assert r.llm_reward == pytest.approx(0.472, abs=1e-3)
    assert r.score == pytest.approx(0.285, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# Realistic chains, checked against the formulas computed by hand
# ---------------------------------------------------------------------------------------------

MATH_CHAIN = (
    "<thinking>The user asks for the sum of the interior angles of a hexagon. The question is DQ: it is "
    "precise and has one answer. DA costs few tokens and carries little risk; CQ would waste the user's time; "
    "AQ adds a follow-up nobody needs.</thinking>\n"
    '<payoff>{"DQ_AQ": {"LLM": 2.1, "user": 2.4}, "DQ_CQ": {"LLM": 1.2, "user": 0.8}, '
    '"DQ_DA": {"LLM": 3.8, "user": 4.1}, "VQ_AQ": {"LLM": 1.5, "user": 1.9}, '
    '"VQ_CQ": {"LLM": 1.0, "user": 1.3}, "VQ_DA": {"LLM": 2.0, "user": 2.0}}</payoff>\n'
    "<analyze>The question is DQ. Pareto frontier: DQ_DA (3.8, 4.1) dominates every other cell. Highest "
    "welfare: DQ_DA. Choose DQ_DA.</analyze>\n"
    "<response>A hexagon has 6 sides, so the sum of its interior angles is (6 - 2) x 180 = 720 degrees. The "
    "answer is \\boxed{720}.</response>"
)

CLARIFY_CHAIN = (
    '<thinking>"Write me something about dogs" is vague: a poem, an essay, a training guide? VQ. A clarifying '
    "question avoids a long answer that misses the point.</thinking>\n"
    "<payoff>{'DQ_AQ': {'LLM': 2.0, 'user': 2.2}, 'DQ_CQ': {'LLM': 1.1, 'user': 1.0}, "
    "'DQ_DA': {'LLM': 2.5, 'user': 2.1}, 'VQ_AQ': {'LLM': 2.6, 'user': 2.9}, "
    "'VQ_CQ': {'LLM': 3.1, 'user': 3.4}, 'VQ_DA': {'LLM': 1.2, 'user': 0.9}}</payoff>\n"
    "\n"
    "<analyze>VQ. Frontier: VQ_CQ (3.1, 3.4). VQ_CQ has the largest sum 6.5. Pick VQ_CQ.</analyze>\n"
    "<response>Happy to help! What kind of piece would you like about dogs: a short poem, an informative "
    "article, or tips for training a puppy?</response>"
)

EQUAL_CELLS_CHAIN = (
    "<thinking>short</thinking><payoff>{\"DQ_AQ\": {\"LLM\": 1, \"user\": 1}, \"DQ_CQ\": {\"LLM\": 2, \"user\": 2}, "
    "\"DQ_DA\": {\"LLM\": 3, \"user\": 3.2}, \"VQ_AQ\": {\"LLM\": 1, \"user\": 1}, "
    "\"VQ_CQ\": {\"LLM\": 0, \"user\": 0}, \"VQ_DA\": {\"LLM\": -1, \"user\": -1}}</payoff>"
    "<analyze>DQ_DA</analyze><response>"
    + " ".join(["long"] * 700)
    + "</response>"
)


@pytest.mark.parametrize(
    "text, a_user, a_llm, F, P",
    [
        (MATH_CHAIN, 1.0, 1.0, 1.0, (5 + 4) / 12),  # VQ_DA equal; DQ_DA gap 0.3/4.1 < 10%
        (CLARIFY_CHAIN, 0.25, 0.75, 1.0, (6 + 3) / 12),
        (EQUAL_CELLS_CHAIN, 0.0, 1.0, 1.0, 1 / 12),  # only DQ_DA differs, by 0.2/3.2 < 10%
    ],
)
def test_realistic_chains_match_hand_computation(text, a_user, a_llm, F, P):
    # P recomputed here cell by cell from the text, independently of the implementation
    matrix = split_chain(text).matrix.to_dict()
    p_hand = 0.0
    for cell in matrix.values():
        u, lm = cell["user"], cell["LLM"]
        p_hand += (1 / 12) * (u != lm) + (1 / 12) * (abs(u - lm) / max(abs(u), abs(lm), 1e-8) > 0.1)
    assert p_hand == pytest.approx(P)
    U, L, W = hand_scores(text, a_user, a_llm, F, P)
    r = score_completion(text, a_user, a_llm)
    assert not r.hard_failure
    assert r.F == F and r.P == pytest.approx(P)
    assert r.user_reward == pytest.approx(U, abs=1e-12)
    assert r.llm_reward == pytest.approx(L, abs=1e-12)
    assert r.score == pytest.approx(W, abs=1e-12)
    assert r.utility == pytest.approx(W, abs=1e-12)
    assert r.reward_gap == pytest.approx(abs(U - L), abs=1e-12)
    assert r.format_reward == pytest.approx(0.1 * F + 0.15 * P)
    assert r.answer_reward == a_llm


def test_realistic_chain_out_of_order_gets_f_zero_but_is_scored():
    text = MATH_CHAIN.replace("<analyze>", "<analyze>X").replace("</payoff>\n", "</payoff>\nnot allowed here\n")
    r = score_completion(text, 1.0)
    assert not r.hard_failure and r.F == 0.0
    U, L, W = hand_scores(text, 1.0, 1.0, 0.0, 9 / 12)
    assert (r.user_reward, r.llm_reward, r.score) == pytest.approx((U, L, W), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Hard failures
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        MATH_CHAIN.replace("<response>", "<answer>").replace("</response>", "</answer>"),  # no response
        MATH_CHAIN.split("<payoff>")[0] + "<analyze>x</analyze><response>r</response>",  # no payoff
        MATH_CHAIN.replace('"DQ_DA"', '"DQ_XX"'),  # payoff does not parse
        MATH_CHAIN.replace("</response>", ""),  # response not closed
        "",
        None,
    ],
)
def test_hard_failures_zero_every_field(text):
    for variant, extra in [("cobb", {}), ("linear", {}), ("user", {}), ("llm", {}), ("pareto", {"pareto": 1})]:
        r = score_completion(text, 1.0, 1.0, variant=variant, **extra)
        assert r.hard_failure
        assert r.logged() == {name: 0.0 for name in LOGGED_FIELDS}
        assert r.F == 0.0


# ---------------------------------------------------------------------------------------------
# Variants, alpha, weights, inputs
# ---------------------------------------------------------------------------------------------


def test_variants():
    U, L, _ = hand_scores(MATH_CHAIN, 0.6, 0.2, 1.0, 9 / 12)
    assert score_completion(MATH_CHAIN, 0.6, 0.2, variant="linear").score == pytest.approx((U + L) / 2)
    assert score_completion(MATH_CHAIN, 0.6, 0.2, variant="user").score == pytest.approx(U)
    assert score_completion(MATH_CHAIN, 0.6, 0.2, variant="llm").score == pytest.approx(L)
    cobb = score_completion(MATH_CHAIN, 0.6, 0.2, alpha=0.3)
    assert cobb.score == pytest.approx(U**0.3 * L**0.7)
    assert cobb.utility == pytest.approx(math.sqrt(U * L))  # logged utility is always sqrt(U L)
    for variant in ("linear", "user", "llm"):
        r = score_completion(MATH_CHAIN, 0.6, 0.2, variant=variant)
        assert (r.user_reward, r.llm_reward) == pytest.approx((U, L))
        assert r.variant == variant


@pytest.mark.parametrize("pareto", [0, 0.5, 1])
def test_pareto_ablation_formula(pareto):
    text = MATH_CHAIN
    F, P, a = 1.0, 9 / 12, 0.7
    L = 1e-4 + 0.2 * pareto + 0.2 * P + 0.2 * F + 0.35 * a + 0.05 * lg(len(text.split()), 500, 1000)
    U, _, _ = hand_scores(text, a, a, F, P)
    r = score_completion(text, a, variant="pareto", pareto=pareto)
    assert r.llm_reward == pytest.approx(L, abs=1e-12)
    assert r.user_reward == pytest.approx(U, abs=1e-12)
    assert r.score == pytest.approx(math.sqrt(U * L), abs=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"variant": "pareto"},
        {"variant": "pareto", "pareto": 0.3},
        {"variant": "nash"},
        {"alpha": 1.5},
        {"variant": "pareto", "pareto": math.nan},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        score_completion(MATH_CHAIN, 1.0, **kwargs)


def test_a_llm_defaults_to_a_user_and_answers_are_clamped():
    assert score_completion(MATH_CHAIN, 0.4) == score_completion(MATH_CHAIN, 0.4, 0.4)
    assert score_completion(MATH_CHAIN, 7.0, -3.0) == score_completion(MATH_CHAIN, 1.0, 0.0)
    assert score_completion(MATH_CHAIN, math.nan).user_reward == score_completion(MATH_CHAIN, 0.0).user_reward
    assert score_completion(MATH_CHAIN, None).answer_reward == 0.0


def test_custom_weights():
    weights = WelfareWeights(eps=0.0, user_answer=1.0, user_length=0.0, user_reasoning=0.0, llm_format=1.0,
                             llm_diversity=0.0, llm_answer=0.0, llm_length=0.0)
    r = score_completion(MATH_CHAIN, 0.5, weights=weights)
    assert (r.user_reward, r.llm_reward) == (0.5, 1.0)
    assert score_completion(MATH_CHAIN, 1.0, weights=WelfareWeights(eps=0.5)).user_reward == pytest.approx(
        score_completion(MATH_CHAIN, 1.0).user_reward + 0.5 - 1e-4
    )


def test_result_object():
    r = score_completion(MATH_CHAIN, 1.0)
    assert isinstance(r, ScoreResult)
    with pytest.raises(AttributeError):
        r.score = 0.0  # frozen
    assert r.user == r.user_reward and r.llm == r.llm_reward
    assert list(r.logged()) == list(LOGGED_FIELDS)
    d = r.to_dict()
    assert d["matrix"]["DQ_DA"] == {"LLM": 3.8, "user": 4.1} and d["F"] == 1.0
    assert r.matrix is not None and r.matrix["DQ_DA"].user == 4.1
    assert score_chain(split_chain(MATH_CHAIN), 1.0) == r


def test_length_window_and_combine():
    assert length_window("a b c", 0, 10) == pytest.approx(sig(0.015) * sig(0.035))
    assert length_window(260, 20, 500) == pytest.approx(sig(1.2) * sig(1.2))
    assert combine_welfare(0.25, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        combine_welfare(0.1, 0.2, "bad")


@settings(max_examples=100, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.integers(0, 1500), st.integers(0, 3000))
def test_bounds_of_u_and_l(a_user, a_llm, response_words, reasoning_chars):
    text = (
        "<thinking>" + "t" * reasoning_chars + "</thinking><payoff>" + DIVERSE
        + "</payoff><analyze>a</analyze><response>" + " ".join(["w"] * response_words) + "</response>"
    )
    r = score_completion(text, a_user, a_llm)
    assert 1e-4 <= r.user_reward <= 1e-4 + 0.5 + 0.2 + 0.3
    assert 1e-4 <= r.llm_reward <= 1e-4 + 1.0
    assert min(r.user_reward, r.llm_reward) <= r.score <= max(r.user_reward, r.llm_reward)
