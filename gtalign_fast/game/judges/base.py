"""The judge protocol: what a judge sees, what it returns, and the call that never raises.

A judge looks at the ``<response>`` of a completion (plus the prompt, the reference answer and any
dataset columns) and returns an :class:`AnswerScore` with ``user`` and ``llm`` in [0, 1]: the
A_user / A_llm terms of the GTAlign welfare. Anything with a ``judge_batch(items)`` method, or a
plain callable ``fn(item) -> float | (user, llm) | AnswerScore``, can be used (:func:`as_judge`).

Judges must never raise into the training loop: :func:`run_judge` turns every exception, NaN or
out-of-range value into a 0 score flagged ``failed=True`` so the caller can count it.
:class:`CompositeJudge` takes A_user from one judge and A_llm from another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

__all__ = ["JudgeItem", "AnswerScore", "Judge", "as_judge", "run_judge", "CompositeJudge"]


@dataclass(frozen=True)
class JudgeItem:
    """What a judge sees for one completion.

    Attributes
    ----------
    response : str
        Inner text of ``<response>`` (what the user reads).
    completion : str
        The whole completion.
    prompt : str or None
        The user's question (last user message when the prompt was a chat).
    reference : str or None
        Ground truth / reference answer from the dataset, if any.
    data_source : str or None
        The sample's data source (task name).
    columns : Mapping
        The sample's other dataset columns (e.g. ``extra_info``).
    """

    response: str
    completion: str = ""
    prompt: str | None = None
    reference: str | None = None
    data_source: str | None = None
    columns: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AnswerScore:
    """A judge's verdict: answer quality for each player, in [0, 1].

    ``failed`` marks a verdict that could not be obtained (timeout, HTTP error, no tag...): its scores
    are 0 and the caller counts it.
    """

    user: float
    llm: float
    failed: bool = False
    detail: str = ""

    @classmethod
    def both(cls, value: float, detail: str = "") -> "AnswerScore":
        """The same score for both players."""
        return cls(value, value, detail=detail)

    @classmethod
    def failure(cls, detail: str) -> "AnswerScore":
        """A failed verdict (scored 0)."""
        return cls(0.0, 0.0, failed=True, detail=detail)


@runtime_checkable
class Judge(Protocol):
    """Anything that scores a batch of items (one :class:`AnswerScore` per item, in order)."""

    def judge_batch(self, items: Sequence[JudgeItem]) -> list[AnswerScore]:
        ...


class _CallableJudge:
    """Adapts ``fn(item) -> float | (user, llm) | AnswerScore`` to :class:`Judge`."""

    def __init__(self, fn: Callable[[JudgeItem], Any]) -> None:
        self.fn = fn

    def judge_batch(self, items: Sequence[JudgeItem]) -> list[AnswerScore]:
        return [_coerce_score(self.fn(item)) for item in items]

    def __repr__(self) -> str:
        return f"as_judge({self.fn!r})"


def as_judge(judge: Any) -> Judge:
    """Return ``judge`` if it has ``judge_batch``, else wrap a callable ``fn(item)``."""
    if hasattr(judge, "judge_batch"):
        return judge
    if callable(judge):
        return _CallableJudge(judge)
    raise TypeError(f"a judge needs a judge_batch(items) method or must be callable, got {type(judge).__name__}")


def _clean_unit(value: Any) -> tuple[float, bool]:
    """(value clamped to [0, 1], ok); NaN / non-numbers give (0, False)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0, False
    if math.isnan(number):
        return 0.0, False
    return min(max(number, 0.0), 1.0), True


def _coerce_score(value: Any) -> AnswerScore:
    """Turn a judge's return value into a clean AnswerScore (never raises)."""
    if isinstance(value, AnswerScore):
        if value.failed:
            return AnswerScore.failure(value.detail)
        user, ok_user = _clean_unit(value.user)
        llm, ok_llm = _clean_unit(value.llm)
        if not (ok_user and ok_llm):
            return AnswerScore.failure("judge returned a non-number")
        return AnswerScore(user, llm, detail=value.detail)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return _coerce_score(AnswerScore(value[0], value[1]))
    if isinstance(value, bool) or value is None:
        return AnswerScore.failure(f"judge returned {value!r}")
    return _coerce_score(AnswerScore(value, value))


def run_judge(judge: Any, items: Sequence[JudgeItem]) -> list[AnswerScore]:
    """Score ``items`` with ``judge``; never raises.

    The batch is tried first; if it raises (or returns the wrong number of results) each item is
    scored on its own, and an item whose judge call raises gets :meth:`AnswerScore.failure`.
    """
    if not items:
        return []
    try:
        adapted = as_judge(judge)
    except TypeError as exc:
        return [AnswerScore.failure(str(exc)) for _ in items]
    try:
        results = list(adapted.judge_batch(list(items)))
        if len(results) == len(items):
            return [_safe_coerce(r) for r in results]
    except Exception:  # fall back to one call per item so one bad item costs only itself
        pass
    out = []
    for item in items:
        try:
            result = list(adapted.judge_batch([item]))
            out.append(_safe_coerce(result[0]) if len(result) == 1 else AnswerScore.failure("bad batch size"))
        except Exception as exc:
            out.append(AnswerScore.failure(f"judge raised {type(exc).__name__}: {exc}"[:500]))
    return out


def _safe_coerce(value: Any) -> AnswerScore:
    try:
        return _coerce_score(value)
    except Exception as exc:  # e.g. a __float__ that raises
        return AnswerScore.failure(f"bad judge value: {type(exc).__name__}")


class CompositeJudge:
    """A_user from one judge and A_llm from another (e.g. BLEU for the user, an LLM for the LLM).

    A failure of either part marks the item failed; the other part's score is kept.
    """

    def __init__(self, user: Any, llm: Any) -> None:
        self.user_judge = user
        self.llm_judge = llm

    def __repr__(self) -> str:
        return f"CompositeJudge(user={self.user_judge!r}, llm={self.llm_judge!r})"

    def judge_batch(self, items: Sequence[JudgeItem]) -> list[AnswerScore]:
        users = run_judge(self.user_judge, items)
        llms = run_judge(self.llm_judge, items)
        return [
            AnswerScore(
                user.user, llm.llm, failed=user.failed or llm.failed,
                detail="; ".join(filter(None, (user.detail, llm.detail))),
            )
            for user, llm in zip(users, llms)
        ]
