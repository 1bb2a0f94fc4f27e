"""Answer judges: the A_user / A_llm terms of the GTAlign welfare.

A judge looks at the ``<response>`` of a completion (plus the prompt, the reference answer and any
dataset columns) and returns an :class:`AnswerScore` with ``user`` and ``llm`` in [0, 1]. Anything
with a ``judge_batch(items)`` method, or a plain callable ``fn(item) -> float | (user, llm) |
AnswerScore``, can be used (see :func:`as_judge`). One concern per module:

- :mod:`.base`: the protocol (:class:`JudgeItem`, :class:`AnswerScore`, :class:`Judge`),
  :func:`as_judge`, :func:`run_judge` and :class:`CompositeJudge` (A_user from one judge, A_llm
  from another, e.g. BLEU + an LLM judge).
- :mod:`.math_judge`: :class:`MathJudge`, a rule-based ``\\boxed{}`` answer match against the
  reference (0/1), and its helpers.
- :mod:`.bleu`: :func:`char_bleu` / :class:`BleuJudge`, character-level sentence BLEU-4 (writing
  task).
- :mod:`.openai_judge`: :class:`OpenAIJudge`, a client for any OpenAI-compatible
  ``/v1/chat/completions`` server that asks a judge model (the ``openai`` SDK's async client,
  optional extra ``gtalign_fast[judge]``).
- :mod:`.verdicts`: what the judge model is asked and how its reply becomes a score: the default
  prompt and verdict pattern, the verdict reader and the verdict mappers.
- :mod:`.pareto`: :func:`analyze_pareto_score`, a rule-based stand-in for the Pareto judge of the
  ablation variant.

Judges must never raise into the training loop: :func:`run_judge` turns every exception, NaN or
out-of-range value into a 0 score flagged ``failed=True`` so the caller can count it.
"""

from __future__ import annotations

from .base import AnswerScore, CompositeJudge, Judge, JudgeItem, as_judge, run_judge
from .bleu import BleuJudge, char_bleu
from .math_judge import MathJudge, extract_boxed, math_answers_equal, normalize_math_answer
from .openai_judge import JudgeStats, OpenAIJudge
from .pareto import analyze_pareto_score
from .verdicts import DEFAULT_JUDGE_PROMPT, DEFAULT_VERDICT_PATTERN, scaled_verdict, wildguard_verdict

__all__ = [
    "JudgeItem",
    "AnswerScore",
    "Judge",
    "as_judge",
    "run_judge",
    "CompositeJudge",
    "extract_boxed",
    "normalize_math_answer",
    "math_answers_equal",
    "MathJudge",
    "char_bleu",
    "BleuJudge",
    "JudgeStats",
    "OpenAIJudge",
    "DEFAULT_JUDGE_PROMPT",
    "DEFAULT_VERDICT_PATTERN",
    "scaled_verdict",
    "wildguard_verdict",
    "analyze_pareto_score",
]
