"""Rule-based math judge: the last ``\\boxed{}`` of the response against the reference answer.

:func:`extract_boxed` finds the answer (bounded: model text is hostile input),
:func:`normalize_math_answer` strips LaTeX presentation so that equal answers compare equal as
strings, :func:`math_answers_equal` also compares plain numbers and simple fractions exactly, and
:class:`MathJudge` scores 0/1 for both players.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Sequence

from .base import AnswerScore, JudgeItem

__all__ = ["extract_boxed", "normalize_math_answer", "math_answers_equal", "MathJudge"]


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
_SIMPLE_FRACTION = re.compile(
    r"^(?P<sign>[+-]?)(?:\\frac\{(?P<a>[+-]?\d+)\}\{(?P<b>[+-]?\d+)\}"  # \frac{a}{b}
    r"|(?P<c>[+-]?\d+)/(?P<d>[+-]?\d+))$"  # c/d
)


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

    def __repr__(self) -> str:
        return "MathJudge()"

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
