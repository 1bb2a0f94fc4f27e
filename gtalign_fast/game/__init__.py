"""GTAlign itself: the reasoning chain, mutual welfare, judges, the batch reward and pricing.

Pure Python (standard library only): importing it needs no compiled extension and no torch.

- :mod:`.chain`: split a completion into its tagged blocks, check their order, the format reward F.
- :mod:`.payoff`: the payoff matrix (:class:`PayoffMatrix`): its keys, parsing, canonical text,
  payoff diversity P, the Pareto frontier.
- :mod:`.literal`: the bounded reader (no ``eval``) of a payoff written as a Python dict literal.
- :mod:`.welfare`: U, L and W of one completion (:func:`score_completion`, the only place the
  formulas live) and the variants.
- :mod:`.judges`: answer judges, one module each: the protocol and :func:`run_judge`
  (``judges.base``), rule-based math (``judges.math_judge``), character BLEU (``judges.bleu``), an
  OpenAI-compatible server (``judges.openai_judge``) and its prompt and verdict mappers
  (``judges.verdicts``), the rule-based Pareto judge
  (``judges.pareto``).
- :mod:`.reward`: :class:`GTAlignReward` for trainers and :func:`normalize_by_source`.
- :mod:`.pricing`: :class:`PricingPolicy` (payoff edits) and :func:`choose_action`.
"""

from .chain import MAX_TEXT_CHARS, TAGS, Chain, extract_tag, format_matches, format_reward, split_chain
from .judges import (
    AnswerScore,
    BleuJudge,
    CompositeJudge,
    Judge,
    JudgeItem,
    JudgeStats,
    MathJudge,
    OpenAIJudge,
    analyze_pareto_score,
    as_judge,
    char_bleu,
    extract_boxed,
    math_answers_equal,
    normalize_math_answer,
    run_judge,
    scaled_verdict,
    wildguard_verdict,
)
from .payoff import (
    ACTIONS,
    MAX_PAYOFF_CHARS,
    PAYOFF_KEYS,
    QUESTION_TYPES,
    Cell,
    PayoffError,
    PayoffMatrix,
    format_payoff,
    make_key,
    pareto_frontier,
    parse_payoff,
    parse_payoff_strict,
    payoff_diversity,
    split_key,
)
from .pricing import DEFAULT_EXPECTED_TOKENS, RULES, ActionChoice, PricingPolicy, choose_action, disagreement_point
from .reward import GTAlignReward, RewardBatch, completion_text, normalize_by_source
from .welfare import (
    DEFAULT_WEIGHTS,
    LOGGED_FIELDS,
    VARIANTS,
    ScoreResult,
    WelfareWeights,
    combine_welfare,
    length_window,
    llm_welfare,
    llm_welfare_pareto,
    reasoning_efficiency,
    score_chain,
    score_completion,
    user_welfare,
)

__all__ = [
    # chain
    "MAX_TEXT_CHARS", "TAGS", "Chain", "extract_tag", "format_matches", "format_reward", "split_chain",
    # payoff
    "ACTIONS", "MAX_PAYOFF_CHARS", "PAYOFF_KEYS", "QUESTION_TYPES", "Cell", "PayoffError", "PayoffMatrix",
    "format_payoff", "make_key", "pareto_frontier", "parse_payoff", "parse_payoff_strict", "payoff_diversity",
    "split_key",
    # welfare
    "DEFAULT_WEIGHTS", "LOGGED_FIELDS", "VARIANTS", "ScoreResult", "WelfareWeights", "combine_welfare",
    "length_window", "llm_welfare", "llm_welfare_pareto", "reasoning_efficiency", "score_chain",
    "score_completion", "user_welfare",
    # judges
    "AnswerScore", "BleuJudge", "CompositeJudge", "Judge", "JudgeItem", "JudgeStats", "MathJudge",
    "OpenAIJudge", "analyze_pareto_score", "as_judge", "char_bleu", "extract_boxed",
    "math_answers_equal", "normalize_math_answer", "run_judge", "scaled_verdict", "wildguard_verdict",
    # reward
    "GTAlignReward", "RewardBatch", "completion_text", "normalize_by_source",
    # pricing
    "DEFAULT_EXPECTED_TOKENS", "RULES", "ActionChoice", "PricingPolicy", "choose_action",
    "disagreement_point",
]
