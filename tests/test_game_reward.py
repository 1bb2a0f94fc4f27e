"""Tests of gtalign_fast.game.reward: GTAlignReward and per-source batch normalisation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gtalign_fast.game import (
    AnswerScore,
    GTAlignReward,
    MathJudge,
    RewardBatch,
    completion_text,
    normalize_by_source,
    score_completion,
)

MATRIX = (
    '{"DQ_AQ": {"LLM": 2.1, "user": 2.4}, "DQ_CQ": {"LLM": 1.2, "user": 0.8}, "DQ_DA": {"LLM": 3.8, "user": 4.1}, '
    '"VQ_AQ": {"LLM": 1.5, "user": 1.9}, "VQ_CQ": {"LLM": 1.0, "user": 1.3}, "VQ_DA": {"LLM": 2.0, "user": 2.0}}'
)


def chain(response: str, analyze: str = "Choose DQ_DA.") -> str:
    return (
        f"<thinking>The question is clear.</thinking><payoff>{MATRIX}</payoff>"
        f"<analyze>{analyze}</analyze><response>{response}</response>"
    )


# ---------------------------------------------------------------------------------------------
# normalize_by_source
# ---------------------------------------------------------------------------------------------


def test_zscore_by_source_hand_computed():
    scores = [1.0, 2.0, 3.0, 10.0, 10.0]
    sources = ["a", "a", "a", "b", "b"]
    std_a = math.sqrt(((1 - 2) ** 2 + 0 + (3 - 2) ** 2) / 3)  # population std
    expected = [(1 - 2) / (std_a + 1e-6), 0.0, (3 - 2) / (std_a + 1e-6), 0.0, 0.0]  # b: std 0 -> 1
    assert normalize_by_source(scores, sources) == pytest.approx(expected)
    # one group when sources is None
    assert normalize_by_source([1.0, 3.0], None) == pytest.approx([-1 / (1 + 1e-6), 1 / (1 + 1e-6)])
    # std below the threshold is replaced by 1 (not divided by ~0)
    assert normalize_by_source([1.0, 1.0 + 1e-7], None) == pytest.approx([-5e-8, 5e-8], abs=1e-12)


def test_minmax_by_source_hand_computed():
    scores = [1.0, 2.0, 5.0, 4.0, 4.0 + 1e-7]
    sources = [0, 0, 0, 1, 1]
    assert normalize_by_source(scores, sources, "minmax") == pytest.approx([0.0, 0.25, 1.0, 0.0, 0.0])
    assert normalize_by_source(scores, sources, "none") == scores


def test_normalize_errors():
    with pytest.raises(ValueError):
        normalize_by_source([1.0], ["a", "b"])
    with pytest.raises(ValueError):
        normalize_by_source([1.0], None, "robust")
    assert normalize_by_source([], None) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e3, 1e3), st.sampled_from("abc")), min_size=1, max_size=30))
def test_zscore_groups_have_zero_mean(pairs):
    scores, sources = zip(*pairs)
    out = normalize_by_source(scores, sources)
    for source in set(sources):
        group = [o for o, s in zip(out, sources) if s == source]
        assert abs(sum(group) / len(group)) < 1e-6
        assert all(math.isfinite(v) for v in group)


# ---------------------------------------------------------------------------------------------
# GTAlignReward
# ---------------------------------------------------------------------------------------------


class CountingJudge:
    def __init__(self, value=1.0):
        self.value = value
        self.items = []

    def judge_batch(self, items):
        self.items.extend(items)
        return [AnswerScore(self.value, self.value / 2) for _ in items]


def test_reward_matches_score_completion_and_has_logged_fields():
    judge = CountingJudge(1.0)
    reward = GTAlignReward(judge)
    completions = [chain("The answer is \\boxed{720}."), chain("Could you clarify?"), "no tags at all"]
    out = reward(prompts=["q1", "q2", "q3"], completions=completions, answer=["720", "720", "720"])
    assert isinstance(out, RewardBatch) and isinstance(out, list) and len(out) == 3
    for i in range(2):
        expected = score_completion(completions[i], 1.0, 0.5)
        assert out.user[i] == expected.user_reward and out.llm[i] == expected.llm_reward
        assert out.score[i] == expected.score and out[i] == expected.score
        assert out.fields[i]["reward_gap"] == expected.reward_gap
        assert set(out.fields[i]) >= {"score", "answer_reward", "format_reward", "user_reward", "llm_reward",
                                      "utility", "reward_gap", "F", "P", "judge_failed", "hard_failure"}
    assert out[2] == 0.0 and out.fields[2]["hard_failure"] and out.hard_failures == 1
    assert len(judge.items) == 2  # hard failures are not sent to the judge
    assert judge.items[0].response == "The answer is \\boxed{720}." and judge.items[0].prompt == "q1"
    assert judge.items[0].reference == "720"
    assert reward.__name__ == "gtalign"
    columns = out.columns()
    assert columns["score"] == list(out.score) and len(columns["reward_gap"]) == 3
    metrics = out.metrics()
    assert metrics["hard_failures"] == 1.0 and metrics["score"] == pytest.approx(sum(out.score) / 3)


def test_chat_completions_and_prompts():
    judge = CountingJudge()
    reward = GTAlignReward(judge, name="welfare")
    completions = [
        [{"role": "assistant", "content": chain("hello")}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "text", "text": chain("hi")}]}],
    ]
    prompts = [[{"role": "system", "content": "s"}, {"role": "user", "content": "question one"}], "question two"]
    out = reward(prompts=prompts, completions=completions, completion_ids=[[1], [2]], trainer_state=object())
    assert not any(f["hard_failure"] for f in out.fields)
    assert [i.prompt for i in judge.items] == ["question one", "question two"]
    assert [i.response for i in judge.items] == ["hello", "hi"]
    assert reward.__name__ == "welfare"
    assert completion_text({"role": "assistant", "content": "c"}) == "c"
    assert completion_text(None) == "" and completion_text([]) == ""


def test_judge_per_data_source_and_reference_columns():
    math_judge, writing_judge, fallback = CountingJudge(1.0), CountingJudge(0.0), CountingJudge(0.5)
    reward = GTAlignReward({"math-hard": math_judge, "medium": writing_judge, "*": fallback})
    completions = [chain("\\boxed{1}"), chain("essay"), chain("other"), chain("\\boxed{2}")]
    out = reward(
        completions=completions,
        data_source=["math-hard", "medium", "ambig_qa", "math-hard"],
        reward_model=[{"ground_truth": "1"}, {"ground_truth": "ref essay"}, None, {"ground_truth": "2"}],
        extra_info=[{"k": i} for i in range(4)],
    )
    assert [i.reference for i in math_judge.items] == ["1", "2"]
    assert [i.reference for i in writing_judge.items] == ["ref essay"]
    assert [i.data_source for i in fallback.items] == ["ambig_qa"]
    assert fallback.items[0].columns["extra_info"] == {"k": 2}
    assert [f["answer_reward"] for f in out.fields] == [0.5, 0.0, 0.25, 0.5]
    assert [f["data_source"] for f in out.fields] == ["math-hard", "medium", "ambig_qa", "math-hard"]


def test_missing_judge_for_a_source_is_a_config_error():
    reward = GTAlignReward({"math-hard": CountingJudge()})
    with pytest.raises(KeyError):
        reward(completions=[chain("x")], data_source=["medium"])
    with pytest.raises(ValueError):
        GTAlignReward(None)
    with pytest.raises(ValueError):
        GTAlignReward(CountingJudge(), variant="bad")
    with pytest.raises(ValueError):
        GTAlignReward(CountingJudge(), normalize="robust")


def test_judge_failure_scores_zero_and_is_counted_not_raised():
    def judge(item):
        if "crash" in item.response:
            raise TimeoutError("judge timed out")
        return 1.0

    reward = GTAlignReward(judge)
    completions = [chain("fine"), chain("crash please"), chain("fine too")]
    out = reward(completions=completions)
    assert out.judge_failures == 1
    assert [f["judge_failed"] for f in out.fields] == [False, True, False]
    assert out.fields[1]["answer_reward"] == 0.0
    assert out.user[1] == score_completion(completions[1], 0.0).user_reward
    assert out.user[0] == score_completion(completions[0], 1.0).user_reward


def test_math_judge_end_to_end():
    reward = GTAlignReward({"math-hard": MathJudge()})
    out = reward(
        completions=[chain("so \\boxed{\\frac{1}{2}}"), chain("so \\boxed{3}"), chain("no box")],
        data_source=["math-hard"] * 3,
        solution=["... hence $\\boxed{0.5}$"] * 3,
    )
    assert [f["answer_reward"] for f in out.fields] == [1.0, 0.0, 0.0]
    assert out.judge_failures == 0


def test_normalized_output_and_variants():
    reward = GTAlignReward(lambda item: len(item.response) / 10, normalize="zscore")
    completions = [chain("a"), chain("abc"), chain("abcdef"), chain("ab")]
    sources = ["x", "x", "y", "y"]
    out = reward(completions=completions, data_source=sources)
    assert list(out) == pytest.approx(normalize_by_source(out.score, sources))
    assert out.score != list(out)
    linear = GTAlignReward(lambda item: 1.0, variant="linear")(completions=completions[:1])
    assert linear[0] == pytest.approx((linear.user[0] + linear.llm[0]) / 2)
    pareto = GTAlignReward(lambda item: 1.0, variant="pareto")
    out = pareto(completions=[chain("r", "Choose DQ_DA"), chain("r", "Choose VQ_CQ"), "broken"])
    assert out.llm[0] == pytest.approx(
        score_completion(chain("r", "Choose DQ_DA"), 1.0, variant="pareto", pareto=1).llm_reward
    )
    assert out.llm[1] == pytest.approx(
        score_completion(chain("r", "Choose VQ_CQ"), 1.0, variant="pareto", pareto=0).llm_reward
    )
    assert out[2] == 0.0
    snapped = GTAlignReward(lambda item: 1.0, variant="pareto", pareto_judge=lambda text, m: 0.6)
    assert snapped(completions=[chain("r")]).llm[0] == pytest.approx(
        score_completion(chain("r"), 1.0, variant="pareto", pareto=0.5).llm_reward
    )


def test_hostile_batch_never_raises():
    reward = GTAlignReward(lambda item: 1.0)
    hostile = [
        None, 12, "", "<payoff>" + "{" * 100_000, chain("x" * 1_000_000), [{"role": "assistant"}], {"content": 3}
    ]
    out = reward(completions=hostile, data_source=["a"] * len(hostile))
    assert len(out) == len(hostile) and all(math.isfinite(v) for v in out)
    assert out.hard_failures == len(hostile) - 1
    empty = reward(completions=[])
    assert list(empty) == [] and empty.metrics()["score"] == 0.0


def test_unhashable_data_source_is_routed_to_the_fallback():
    seen = []

    def fallback(item):
        seen.append(item.data_source)
        return 1.0

    reward = GTAlignReward({"math": lambda item: 0.0, "*": fallback}, normalize="zscore")
    text = chain("x")
    out = reward(completions=[text, text, text], data_source=[["math"], {"a": 1}, "math"])
    assert len(out.fields) == 3 and out.judge_failures == 0
    assert seen == [["math"], {"a": 1}]
    assert [f["answer_reward"] for f in out.fields] == [1.0, 1.0, 0.0]
    strict = GTAlignReward({"math": lambda item: 0.0})
    with pytest.raises(KeyError):  # no fallback: a config error, as for any unknown source
        strict(completions=[text], data_source=[["math"]])


# ---------------------------------------------------------------------------------------------
# A judge failure is a missing score for the trainer (issue 23.4)
# ---------------------------------------------------------------------------------------------


class _FlakyJudge:
    """1.0 for responses saying "good", a failure for those saying "fail", else 0."""

    def judge_batch(self, items):
        return [AnswerScore.failure("down") if "fail" in item.response else AnswerScore.both(float("good" in
                item.response)) for item in items]

    def __repr__(self):
        return "FlakyJudge(url='http://judge')"


def _flaky_batch():
    reward = GTAlignReward(_FlakyJudge())
    texts = [chain("good"), chain("fail"), chain("bad"), chain("fail")]
    return reward, texts, reward(prompts=["q"] * 4, completions=texts)


def test_reward_batch_flags_judge_failures_per_sample_and_per_judge():
    _, _, out = _flaky_batch()
    assert out.judge_failed == [False, True, False, True]
    assert out.failed_judges == {"FlakyJudge(url='http://judge')": 2} and out.judge_failures == 2
    assert out.fields[1]["answer_reward"] == 0.0  # the reward itself still reports the 0 it scored


def test_call_reward_funcs_makes_a_judge_failure_missing():
    """per_func, U and L are NaN where the judge failed (so the advantages leave them out), counted."""
    import torch

    from gtalign_fast.training.scoring import RewardSpec, call_reward_funcs

    reward, texts, expected = _flaky_batch()
    scores = call_reward_funcs([RewardSpec.of(reward)], prompts=["q"] * 4, completions=texts,
                               completion_ids=[[1]] * 4, columns={}, device=torch.device("cpu"))
    nan = torch.tensor([False, True, False, True])
    assert torch.equal(scores.per_func[:, 0].isnan(), nan)
    assert torch.equal(scores.user.isnan(), nan) and torch.equal(scores.llm.isnan(), nan)
    assert scores.user[0].item() == pytest.approx(expected.user[0]) and scores.user[0] > scores.user[2]
    assert scores.judge_failures == 2 and scores.failures["gtalign"] == 2
    assert scores.failed_judges == {"FlakyJudge(url='http://judge')": 2}


def test_batch_advantages_counts_judge_failures_and_stops_past_the_rate():
    import torch

    from gtalign_fast.training.distributed import Dist
    from gtalign_fast.training.scoring import RewardSpec, batch_advantages, call_reward_funcs

    reward, texts, _ = _flaky_batch()
    specs = [RewardSpec.of(reward)]
    scores = call_reward_funcs(specs, prompts=["q"] * 4, completions=texts, completion_ids=[[1]] * 4, columns={},
                               device=torch.device("cpu"))
    kwargs = dict(group_size=4, alpha=0.5, scale="group", eps=1e-4, backend="reference")
    advantages, metrics = batch_advantages(scores, specs, Dist(use_cpu=True), max_judge_failure_rate=0.5, **kwargs)
    assert metrics["gtalign/judge_failures"] == 2 and metrics["gtalign/judge_failure_rate"] == 0.5
    assert advantages[1] == 0 and advantages[3] == 0 and advantages[0] > 0 > advantages[2]
    assert advantages[0].item() == pytest.approx(-advantages[2].item(), rel=1e-5)  # the group of the two verdicts only
    with pytest.raises(RuntimeError, match=r"2 of 4 completions .*\(50%\).*max_judge_failure_rate = 0\.4.*"
                                           r"FlakyJudge\(url='http://judge'\) \(2 here\)"):
        batch_advantages(scores, specs, Dist(use_cpu=True), max_judge_failure_rate=0.4, **kwargs)


def test_grpo_config_checks_max_judge_failure_rate():
    from gtalign_fast import GRPOConfig

    assert GRPOConfig(max_steps=1).max_judge_failure_rate == 0.5
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="max_judge_failure_rate"):
            GRPOConfig(max_steps=1, max_judge_failure_rate=bad)


def test_normalization_leaves_judge_failures_out_of_the_statistics():
    reward = GTAlignReward(_FlakyJudge(), normalize="zscore")
    texts = [chain("good"), chain("fail"), chain("bad"), chain("fail")]
    out = reward(prompts=["q"] * 4, completions=texts)
    expected = normalize_by_source([out.score[0], out.score[2]], None)
    assert [out[0], out[2]] == pytest.approx(expected)  # the two verdicts' own mean and std
    assert out[1] == out.score[1] and out[3] == out.score[3]  # missing: raw, flagged judge_failed
