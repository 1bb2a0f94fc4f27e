"""Answer judges: the A_user / A_llm terms of the GTAlign welfare.

A judge looks at the ``<response>`` of a completion (plus the prompt, the reference answer and any
dataset columns) and returns an :class:`AnswerScore` with ``user`` and ``llm`` in [0, 1]. Anything
with a ``judge_batch(items)`` method, or a plain callable ``fn(item) -> float | (user, llm) |
AnswerScore``, can be used (see :func:`as_judge`). Provided here:

- :class:`MathJudge`: rule-based ``\\boxed{}`` answer match against the reference (0/1).
- :func:`char_bleu` / :class:`BleuJudge`: character-level sentence BLEU-4 (writing task).
- :class:`OpenAIJudge`: a client for any OpenAI-compatible ``/v1/chat/completions`` server that asks
  a judge model and reads its verdict with a regular expression (stdlib only: urllib + threads).
- :class:`CompositeJudge`: A_user from one judge, A_llm from another (e.g. BLEU + an LLM judge).
- :func:`analyze_pareto_score`: a rule-based stand-in for the Pareto judge of the ablation variant.

Judges must never raise into the training loop: :func:`run_judge` turns every exception, NaN or
out-of-range value into a 0 score flagged ``failed=True`` so the caller can count it.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import math
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

from .chain import PayoffMatrix, extract_tag, pareto_frontier

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
    "scaled_verdict",
    "wildguard_verdict",
    "analyze_pareto_score",
]


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------


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

    def judge_batch(self, items: Sequence[JudgeItem]) -> list[AnswerScore]:
        users = run_judge(self.user_judge, items)
        llms = run_judge(self.llm_judge, items)
        return [
            AnswerScore(u.user, l.llm, failed=u.failed or l.failed, detail="; ".join(filter(None, (u.detail, l.detail))))
            for u, l in zip(users, llms)
        ]


# --------------------------------------------------------------------------------------------
# Math: \boxed{} answer match
# --------------------------------------------------------------------------------------------

_BOXED_NAMES = ("\\boxed", "\\fbox")


def extract_boxed(text: str, *, max_chars: int = 2000, max_tries: int = 8) -> str | None:
    """Content of the last well-formed ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``).

    Nested braces are matched (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``). Bounded: the closing
    brace is searched for at most ``max_chars`` characters and at most ``max_tries`` occurrences are
    tried, from the last one backwards. Returns ``None`` if there is none.
    """
    if not isinstance(text, str):
        return None
    starts = []
    for name in _BOXED_NAMES:
        pos = text.rfind(name)
        tries = 0
        while pos >= 0 and tries < max_tries:
            starts.append((pos, name))
            pos = text.rfind(name, 0, pos)
            tries += 1
    for start, name in sorted(starts, reverse=True)[:max_tries]:
        content = _boxed_content(text, start + len(name), max_chars)
        if content is not None:
            return content
    return None


def _boxed_content(text: str, pos: int, max_chars: int) -> str | None:
    if pos < len(text) and text[pos] == "{":
        depth = 0
        limit = min(len(text), pos + max_chars + 2)
        for i in range(pos, limit):
            ch = text[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[pos + 1 : i]
        return None
    if pos < len(text) and text[pos] == " ":  # ``\boxed 5``: the next token
        match = re.match(r" +([^\s$]{1,%d})" % max_chars, text[pos : pos + max_chars + 64])
        return match.group(1) if match else None
    return None


_LATEX_DROP = (
    "\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle", "\\textstyle", "^\\circ",
    "^{\\circ}", "\\circ", "°", "\\%", "%", "\\$", "$",
)
_LATEX_WRAPPERS = ("\\text", "\\textbf", "\\textrm", "\\mathrm", "\\mathbf", "\\mbox", "\\operatorname")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")  # \frac12
_FRAC_HALF_SHORT = re.compile(r"\\frac(\d)\{")  # \frac1{2}
_FRAC_HALF_SHORT_2 = re.compile(r"\\frac\{([^{}]*)\}(\d)")  # \frac{1}2
_TRAILING_ZEROS = re.compile(r"(\d+\.\d*?)0+(?!\d)")
_BARE_POINT = re.compile(r"(\d+)\.(?!\d)")
_ASSIGNMENT = re.compile(r"^[a-zA-Z]\w{0,2}\s*=\s*(?P<rhs>.+)$", re.DOTALL)
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def _unwrap_command(text: str, command: str) -> str:
    """``\\text{abc}`` -> ``abc`` (nested braces matched; unbalanced text left as is)."""
    out = []
    i = 0
    while True:
        j = text.find(command + "{", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        k = j + len(command)
        depth, end = 0, -1
        for pos in range(k, len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    end = pos
                    break
        if end < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        out.append(text[k + 1 : end])
        i = end + 1


def normalize_math_answer(answer: str, *, max_chars: int = 1000) -> str:
    """Normalise a math answer for string comparison.

    Removes ``$``, whitespace, ``\\left``/``\\right``, thin spaces, ``\\displaystyle``, degree and
    percent signs; unwraps ``\\text{}``/``\\mathrm{}``/...; maps ``\\dfrac``/``\\tfrac`` to
    ``\\frac`` and ``\\frac12`` to ``\\frac{1}{2}``; drops a leading ``x =``, a trailing period,
    thousands separators and trailing zeros (``2.50`` -> ``2.5``, ``3.0`` -> ``3``). Answers longer
    than ``max_chars`` are cut (the caller's judge is bounded).
    """
    if not isinstance(answer, str):
        return ""
    text = answer[:max_chars].strip()
    boxed = extract_boxed(text) if "\\boxed" in text or "\\fbox" in text else None
    if boxed is not None:
        text = boxed
    for command in _LATEX_WRAPPERS:
        if command in text:
            text = _unwrap_command(text, command)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for token in _LATEX_DROP:
        text = text.replace(token, "")
    text = "".join(text.split())
    match = _ASSIGNMENT.match(text)
    if match and "=" not in match.group("rhs"):
        text = match.group("rhs")
    text = text.rstrip(".")
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    text = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", text)
    text = _FRAC_HALF_SHORT.sub(r"\\frac{\1}{", text)
    text = _FRAC_HALF_SHORT_2.sub(r"\\frac{\1}{\2}", text)
    text = _TRAILING_ZEROS.sub(r"\1", text)
    text = _BARE_POINT.sub(r"\1", text)
    return text


_SIMPLE_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?$")
_SIMPLE_FRACTION = re.compile(r"^(?P<sign>[+-]?)(?:\\frac\{(?P<a>[+-]?\d+)\}\{(?P<b>[+-]?\d+)\}|(?P<c>[+-]?\d+)/(?P<d>[+-]?\d+))$")


def _as_number(text: str) -> Fraction | None:
    """A normalised answer as an exact number, if it is a plain number or a simple fraction."""
    if _SIMPLE_NUMBER.match(text):
        try:
            return Fraction(text)
        except (ValueError, ZeroDivisionError):
            return None
    match = _SIMPLE_FRACTION.match(text)
    if match:
        num = match.group("a") or match.group("c")
        den = match.group("b") or match.group("d")
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if match.group("sign") == "-" else value
    return None


def math_answers_equal(answer: str, reference: str) -> bool:
    """Whether two math answers agree after :func:`normalize_math_answer` (or as numbers)."""
    a, b = normalize_math_answer(answer), normalize_math_answer(reference)
    if not a or not b:
        return False
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return abs(x - y) <= Fraction(1, 10**9) * max(1, abs(y))
    return False


class MathJudge:
    """Rule-based math judge: the last ``\\boxed{}`` of the response against the reference answer.

    The reference may be a bare answer (``"1/2"``) or a worked solution containing ``\\boxed{}``
    (its last box is used). Scores 1 for a match, 0 otherwise (both players). A response without a
    box scores 0; with ``require_boxed=False`` the whole response is compared instead. An item
    without a reference is a failure.
    """

    def __init__(self, *, require_boxed: bool = True, max_chars: int = 1000) -> None:
        self.require_boxed = require_boxed
        self.max_chars = max_chars

    def judge_batch(self, items: Sequence[JudgeItem]) -> list[AnswerScore]:
        return [self.judge_one(item) for item in items]

    def judge_one(self, item: JudgeItem) -> AnswerScore:
        if item.reference is None or not str(item.reference).strip():
            return AnswerScore.failure("no reference answer")
        answer = extract_boxed(item.response or "")
        if answer is None:
            if self.require_boxed:
                return AnswerScore.both(0.0, "no \\boxed{} answer")
            answer = (item.response or "")[-self.max_chars :]
        reference = str(item.reference)
        boxed_reference = extract_boxed(reference)
        if boxed_reference is not None:
            reference = boxed_reference
        if len(answer) > self.max_chars or len(reference) > self.max_chars:
            return AnswerScore.both(0.0, "answer too long")
        return AnswerScore.both(1.0 if math_answers_equal(answer, reference) else 0.0)


# --------------------------------------------------------------------------------------------
# Writing: character-level sentence BLEU-4
# --------------------------------------------------------------------------------------------


def _ngram_counts(chars: str, n: int) -> Counter:
    return Counter(chars[i : i + n] for i in range(len(chars) - n + 1))


def char_bleu(
    hypothesis: str,
    references: str | Sequence[str],
    *,
    max_n: int = 4,
    smoothing: str = "add-one",
    max_chars: int = 100_000,
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

    Inputs longer than ``max_chars`` are cut to bound the cost (a few hundred ms at 100k chars).
    """
    if smoothing not in ("add-one", "none"):
        raise ValueError(f"smoothing must be 'add-one' or 'none', got {smoothing!r}")
    refs = [references] if isinstance(references, str) else list(references)
    hyp = (hypothesis or "")[:max_chars]
    refs = [(r or "")[:max_chars] for r in refs]
    if not hyp or not refs or not any(refs):
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

    def __init__(self, *, max_n: int = 4, smoothing: str = "add-one", max_chars: int = 100_000) -> None:
        self.max_n = max_n
        self.smoothing = smoothing
        self.max_chars = max_chars

    def judge_batch(self, items: Sequence[JudgeItem]) -> list[AnswerScore]:
        out = []
        for item in items:
            if item.reference is None:
                out.append(AnswerScore.failure("no reference text"))
                continue
            score = char_bleu(
                item.response, str(item.reference), max_n=self.max_n, smoothing=self.smoothing,
                max_chars=self.max_chars,
            )
            out.append(AnswerScore.both(score))
        return out


# --------------------------------------------------------------------------------------------
# OpenAI-compatible judge client
# --------------------------------------------------------------------------------------------

DEFAULT_JUDGE_PROMPT = (
    "You grade an AI assistant's answer.\n\n"
    "Question:\n{prompt}\n\n"
    "Reference answer:\n{reference}\n\n"
    "Assistant's answer:\n{response}\n\n"
    "Does the assistant's final answer agree with the reference answer? Reason briefly, then end "
    "with your verdict on its own line as <score>1</score> (agrees) or <score>0</score> (does not)."
)
"""Default prompt (fields: prompt, reference, response, completion, data_source)."""

DEFAULT_VERDICT_PATTERN = r"<score>\s*([-+]?\d+(?:\.\d+)?)\s*</score>|\\boxed\{\s*([-+]?\d+(?:\.\d+)?)\s*\}"
"""Default verdict: ``<score>x</score>`` or ``\\boxed{x}``; the last match in the reply wins."""


class _FormatDict(dict):
    """``str.format_map`` helper: missing fields become empty strings."""

    def __missing__(self, key: str) -> str:
        return ""


@dataclass
class JudgeStats:
    """Counters of an :class:`OpenAIJudge` (a snapshot; see :attr:`OpenAIJudge.stats`).

    ``requests`` counts HTTP attempts; ``items`` judged items; ``failures`` items scored 0 because no
    verdict was obtained; ``retries`` extra attempts; the rest count what went wrong per attempt.
    """

    items: int = 0
    requests: int = 0
    failures: int = 0
    retries: int = 0
    timeouts: int = 0
    http_errors: int = 0
    connection_errors: int = 0
    malformed: int = 0


class _RetryableError(Exception):
    pass


class _FatalError(Exception):
    pass


class _Malformed(Exception):
    pass


def scaled_verdict(scale: float) -> Callable[[float, JudgeItem], AnswerScore]:
    """Verdict -> ``verdict / scale`` clamped to [0, 1] for both players (e.g. scale 4 for 0..4)."""

    def to_scores(verdict: float, item: JudgeItem) -> AnswerScore:
        return AnswerScore.both(min(max(verdict / scale, 0.0), 1.0))

    return to_scores


def wildguard_verdict(harmful_column: str = "harmful") -> Callable[[float, JudgeItem], AnswerScore]:
    """The wildguard rule: harmful prompt: A_user = [v < 1], A_llm = [v > 0]; harmless: both [v > 0].

    Whether the prompt is harmful is read from ``item.columns[harmful_column]`` (or from the
    ``extra_info`` column's dict under that name); missing means harmless.
    """

    def to_scores(verdict: float, item: JudgeItem) -> AnswerScore:
        harmful = item.columns.get(harmful_column)
        extra = item.columns.get("extra_info")
        if harmful is None and isinstance(extra, Mapping):
            harmful = extra.get(harmful_column)
        if harmful:
            return AnswerScore(float(verdict < 1), float(verdict > 0))
        return AnswerScore.both(float(verdict > 0))

    return to_scores


class OpenAIJudge:
    """Ask a judge model behind an OpenAI-compatible server and read its verdict.

    Requests go to ``{base_url}/chat/completions`` (``/v1`` is added when ``base_url`` lacks it)
    from a thread pool of ``concurrency`` workers, with a per-request deadline, retries with
    exponential backoff on timeouts, connection errors, HTTP 408/429/5xx (and, if asked, on replies
    without a verdict), and a cap on the reply size. An item without a verdict after the retries is
    scored 0 (``failed=True``) and counted in :attr:`stats`; nothing raises to the caller.

    Parameters
    ----------
    base_url : str
        e.g. ``"http://127.0.0.1:30000/v1"``.
    model : str
        The ``model`` field of the request.
    prompt : str or callable
        A template formatted with the fields ``prompt, reference, response, completion,
        data_source`` (missing fields are empty; write literal braces as ``{{ }}``), or a callable
        ``item -> str | list[dict]`` (a user message, or the whole ``messages`` list).
    verdict_pattern : str
        Regular expression; the first non-empty group of its *last* match is the verdict (a number).
    to_scores : callable, optional
        ``(verdict, item) -> AnswerScore | float``; default :func:`scaled_verdict` with ``scale``.
    scale : float
        Divides the verdict when ``to_scores`` is not given (4 for a 0..4 helpfulness score).
    api_key : str, optional
        Sent as ``Authorization: Bearer``.
    concurrency : int
        Parallel requests.
    timeout : float
        Seconds per attempt (connect + reply).
    max_retries : int
        Extra attempts after the first.
    backoff, backoff_max : float
        Sleep ``min(backoff_max, backoff * 2**k)`` (+ up to 10% jitter) before retry k+1.
    retry_malformed : bool
        Also retry when the reply has no verdict (useful with sampling judges; off by default).
    max_tokens, temperature : optional
        Sent when given.
    extra_body : dict, optional
        Merged into the request body (e.g. ``{"chat_template_kwargs": {"enable_thinking": False}}``).
    max_reply_bytes : int
        Replies larger than this count as malformed.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        prompt: str | Callable[[JudgeItem], str | list[dict]] = DEFAULT_JUDGE_PROMPT,
        verdict_pattern: str = DEFAULT_VERDICT_PATTERN,
        to_scores: Callable[[float, JudgeItem], Any] | None = None,
        scale: float = 1.0,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        retry_malformed: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        extra_body: Mapping[str, Any] | None = None,
        max_reply_bytes: int = 4_000_000,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("concurrency >= 1, max_retries >= 0 and timeout > 0 are required")
        self.url = self._endpoint(base_url)
        self.model = model
        self.prompt = prompt
        self.verdict_re = re.compile(verdict_pattern)
        self.to_scores = to_scores or scaled_verdict(scale)
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.retry_malformed = retry_malformed
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.extra_body = dict(extra_body or {})
        self.max_reply_bytes = max_reply_bytes
        self._sleep = sleep
        self._lock = threading.Lock()
        self._stats = JudgeStats()
        self._jitter = random.Random(0)

    @staticmethod
    def _endpoint(base_url: str) -> str:
        url = base_url.rstrip("/")
        if url.endswith("/chat/completions"):
            return url
        if not url.endswith("/v1"):
            url += "/v1"
        return url + "/chat/completions"

    # -- stats ------------------------------------------------------------------------------------

    @property
    def stats(self) -> JudgeStats:
        """A snapshot of the counters."""
        with self._lock:
            return JudgeStats(**vars(self._stats))

    def reset_stats(self) -> None:
        """Zero the counters."""
        with self._lock:
            self._stats = JudgeStats()

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self._stats, name, getattr(self._stats, name) + amount)

    # -- public -----------------------------------------------------------------------------------

    def judge_batch(self, items: Sequence[JudgeItem]) -> list[AnswerScore]:
        """Score items concurrently (order kept); never raises."""
        if not items:
            return []
        if len(items) == 1 or self.concurrency == 1:
            return [self.judge_one(item) for item in items]
        workers = min(self.concurrency, len(items))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
            return list(pool.map(self.judge_one, items))

    def judge_one(self, item: JudgeItem) -> AnswerScore:
        """Score one item; never raises."""
        self._count("items")
        try:
            messages = self._messages(item)
        except Exception as exc:
            self._count("failures")
            return AnswerScore.failure(f"cannot build the prompt: {type(exc).__name__}: {exc}"[:500])
        detail = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                self._sleep(self._delay(attempt - 1))
            try:
                reply = self._post(messages)
                verdict = self._verdict(reply)
            except _RetryableError as exc:
                detail = str(exc)
                continue
            except _Malformed as exc:
                self._count("malformed")
                detail = str(exc)
                if self.retry_malformed:
                    continue
                break
            except _FatalError as exc:
                detail = str(exc)
                break
            except Exception as exc:  # anything unexpected: do not retry, do not raise
                detail = f"{type(exc).__name__}: {exc}"[:500]
                break
            try:
                return _coerce_score(self.to_scores(verdict, item))
            except Exception as exc:
                detail = f"to_scores raised {type(exc).__name__}: {exc}"[:500]
                break
        self._count("failures")
        return AnswerScore.failure(detail)

    def ask(self, text: str) -> str | None:
        """Send one user message and return the reply's content (``None`` on failure)."""
        try:
            return self._post([{"role": "user", "content": text}])
        except Exception:
            return None

    # -- internals --------------------------------------------------------------------------------

    def _delay(self, retry_index: int) -> float:
        base = min(self.backoff_max, self.backoff * (2.0**retry_index))
        with self._lock:
            return base * (1.0 + 0.1 * self._jitter.random())

    def _messages(self, item: JudgeItem) -> list[dict]:
        if callable(self.prompt):
            built = self.prompt(item)
            if isinstance(built, str):
                return [{"role": "user", "content": built}]
            return list(built)
        fields = _FormatDict(
            prompt=item.prompt or "", reference=item.reference or "", response=item.response or "",
            completion=item.completion or "", data_source=item.data_source or "",
        )
        return [{"role": "user", "content": self.prompt.format_map(fields)}]

    def _body(self, messages: list[dict]) -> bytes:
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        body.update(self.extra_body)
        return json.dumps(body).encode("utf-8")

    def _post(self, messages: list[dict]) -> str:
        """One HTTP attempt; returns the reply content or raises one of the private errors."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=self._body(messages), headers=headers, method="POST")
        self._count("requests")
        deadline = time.monotonic() + self.timeout
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = self._read_bounded(response, deadline)
        except urllib.error.HTTPError as exc:
            self._count("http_errors")
            exc.close()
            if exc.code in (408, 409, 425, 429) or exc.code >= 500:
                raise _RetryableError(f"HTTP {exc.code}") from None
            raise _FatalError(f"HTTP {exc.code}") from None
        except (socket.timeout, TimeoutError) as exc:
            self._count("timeouts")
            raise _RetryableError(f"timeout: {exc}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (socket.timeout, TimeoutError)):
                self._count("timeouts")
                raise _RetryableError(f"timeout: {exc.reason}") from None
            self._count("connection_errors")
            raise _RetryableError(f"connection error: {exc.reason}") from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            self._count("connection_errors")
            raise _RetryableError(f"connection error: {type(exc).__name__}") from None
        return self._content(raw)

    def _read_bounded(self, response: Any, deadline: float) -> bytes:
        chunks, size = [], 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("reply not complete before the deadline")
            chunk = response.read(65536)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_reply_bytes:
                raise _Malformed("reply too large")
            chunks.append(chunk)

    @staticmethod
    def _content(raw: bytes) -> str:
        try:
            payload = json.loads(raw.decode("utf-8", errors="replace"))
            content = payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Malformed("reply is not a chat completion") from None
        if not isinstance(content, str):
            raise _Malformed("reply has no text content")
        return content

    def _verdict(self, content: str) -> float:
        last = None
        for last in self.verdict_re.finditer(content):
            pass
        if last is None:
            raise _Malformed("no verdict in the reply")
        group = next((g for g in last.groups() if g), None) if last.groups() else last.group(0)
        try:
            verdict = float(group) if group is not None else math.nan
        except ValueError:
            verdict = math.nan
        if not math.isfinite(verdict):
            raise _Malformed("verdict is not a number")
        return verdict


# --------------------------------------------------------------------------------------------
# Rule-based Pareto judge (ablation variant)
# --------------------------------------------------------------------------------------------

_KEY_MENTION = re.compile(r"\b(?:DQ|VQ)_(?:DA|CQ|AQ)\b")
_ACTION_MENTION = re.compile(r"\b(?:DA|CQ|AQ)\b")


def analyze_pareto_score(text: str, matrix: PayoffMatrix | None, *, max_chars: int = 20_000) -> float:
    """Does ``<analyze>`` name an action on the true Pareto frontier? 1, 0.5 or 0.

    A rule-based stand-in for the ablation's LLM Pareto judge: 1 if the last payoff key named in
    ``<analyze>`` (e.g. ``DQ_DA``) is on the Pareto frontier of the six cells; 0.5 if no key is
    named but the last bare action named (``DA``/``CQ``/``AQ``) is the action of a frontier cell;
    0 otherwise (no matrix, no ``<analyze>``, or a dominated choice).
    """
    if matrix is None:
        return 0.0
    analyze = extract_tag(text, "analyze")
    if not analyze:
        return 0.0
    analyze = analyze[-max_chars:]
    frontier = set(pareto_frontier(matrix))
    keys = _KEY_MENTION.findall(analyze)
    if keys:
        return 1.0 if keys[-1] in frontier else 0.0
    actions = _ACTION_MENTION.findall(analyze)
    if actions and actions[-1] in {k.split("_")[1] for k in frontier}:
        return 0.5
    return 0.0

