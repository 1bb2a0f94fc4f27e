"""Writing-task judge: character-level sentence BLEU-4 of the response against the reference.

:func:`char_bleu` computes sentence BLEU the way ``nltk.translate.bleu_score.sentence_bleu`` does
on raw strings (every character a token), add-one smoothed by default so that a short answer
without a matching 4-gram does not score 0; :class:`BleuJudge` scores every item with it. GTAlign's
writing task uses it for A_user only (combine with an LLM judge through ``CompositeJudge``).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from .base import AnswerScore, JudgeItem

__all__ = ["char_bleu", "BleuJudge"]


def _ngram_counts(chars: str, n: int) -> Counter:
    return Counter(chars[i : i + n] for i in range(len(chars) - n + 1))


def char_bleu(
    hypothesis: str,
    references: str | Sequence[str],
    *,
    max_n: int = 4,
    smoothing: str = "add-one",
    max_chars: int = 100_000,
    max_references: int = 4,
) -> float:
    """Character-level sentence BLEU (BLEU-4 by default), in [0, 1].

    Tokens are characters, whitespace included: this is what the reference computes by passing raw
    strings to ``nltk.translate.bleu_score.sentence_bleu``. Modified (clipped) n-gram precisions
    p_1..p_N, uniform weights, brevity penalty ``exp(1 - r/c)`` when the hypothesis (``c`` chars)
    is not longer than the closest reference (``r`` chars; ties to the shorter one).

    Smoothing
    ---------
    ``"add-one"`` (default, Lin & Och 2004, "BLEU+1"): for n >= 2, p_n = (m_n + 1) / (l_n + 1),
    where m_n is the clipped match count and l_n the number of hypothesis n-grams; p_1 is not
    smoothed. A hypothesis with no matching character scores 0, and a short hypothesis with no
    matching 4-gram still gets a small positive score instead of 0. ``"none"``: plain BLEU, 0 as
    soon as one precision is 0 (nltk's default then returns ~0 with a warning).

    Inputs longer than ``max_chars`` are cut and only the first ``max_references`` distinct
    non-empty references are used, to bound the cost (a few hundred ms at 100k chars per text).
    """
    if smoothing not in ("add-one", "none"):
        raise ValueError(f"smoothing must be 'add-one' or 'none', got {smoothing!r}")
    refs = [references] if isinstance(references, str) else references
    hyp = (hypothesis or "")[:max_chars]
    if max_chars < 1 or max_references < 1:
        raise ValueError("max_chars and max_references must be >= 1")
    kept: dict[str, None] = {}
    for ref in refs:  # references are consumed lazily: a huge list costs only what is kept
        ref = (ref or "")[:max_chars]
        if ref:
            kept[ref] = None
            if len(kept) >= max_references:
                break
    refs = list(kept)
    if not hyp or not refs:
        return 0.0
    log_sum = 0.0
    for n in range(1, max_n + 1):
        hyp_counts = _ngram_counts(hyp, n)
        max_ref_counts: Counter = Counter()
        for ref in refs:
            for gram, count in _ngram_counts(ref, n).items():
                if count > max_ref_counts[gram]:
                    max_ref_counts[gram] = count
        matches = sum(min(count, max_ref_counts[gram]) for gram, count in hyp_counts.items())
        total = max(len(hyp) - n + 1, 0)
        if smoothing == "add-one" and n > 1:
            matches, total = matches + 1, total + 1
        if matches == 0 or total == 0:
            return 0.0
        log_sum += math.log(matches / total)
    hyp_len = len(hyp)
    ref_len = min((len(r) for r in refs), key=lambda length: (abs(length - hyp_len), length))
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_sum / max_n)


class BleuJudge:
    """A_user = A_llm = character-level BLEU-4 of the response against the reference.

    The writing task of GTAlign uses BLEU for the user only: combine with an LLM judge for A_llm
    through ``CompositeJudge(user=BleuJudge(), llm=OpenAIJudge(...))``.
    """

    def __init__(
        self, *, max_n: int = 4, smoothing: str = "add-one", max_chars: int = 100_000, max_references: int = 4,
    ) -> None:
        self.max_n = max_n
        self.smoothing = smoothing
        self.max_chars = max_chars
        self.max_references = max_references

    def __repr__(self) -> str:
        return "BleuJudge()"

    def judge_batch(self, items: Sequence[JudgeItem]) -> list[AnswerScore]:
        out = []
        for item in items:
            if item.reference is None:
                out.append(AnswerScore.failure("no reference text"))
                continue
            score = char_bleu(
                item.response, str(item.reference), max_n=self.max_n, smoothing=self.smoothing,
                max_chars=self.max_chars, max_references=self.max_references,
            )
            out.append(AnswerScore.both(score))
        return out
