"""The GTAlign reasoning chain: split a completion into its blocks, check their order, F.

A GTAlign completion is four tagged blocks, in order, with only whitespace between them::

    <thinking>...</thinking><payoff>...</payoff><analyze>...</analyze><response>...</response>

Everything here treats model output as hostile input: every function that takes model text is
bounded in time and size (linear scans, no backtracking-prone regular expressions on the whole text,
a cap on the text scanned) and never raises on bad text; it reports "no match" / ``None`` instead.
The ``<payoff>`` block is parsed by :mod:`.payoff` (its rules are documented there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .payoff import PayoffError, PayoffMatrix, parse_payoff, parse_payoff_strict, payoff_diversity

__all__ = [
    "TAGS",
    "MAX_TEXT_CHARS",
    "FORMAT_PATTERN",
    "Chain",
    "extract_tag",
    "split_chain",
    "format_matches",
    "format_reward",
]

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

TAGS: tuple[str, ...] = ("thinking", "payoff", "analyze", "response")
"""The four blocks of a chain, in order."""

MAX_TEXT_CHARS = 4_000_000
"""Longest completion that is scanned at all. Longer text is a hard failure (no block is found).
Four million characters is ~1M tokens, beyond any real completion; the cap only bounds work."""


# --------------------------------------------------------------------------------------------
# Tags, the chain and the format reward
# --------------------------------------------------------------------------------------------


def _bounded_text(text: Any) -> str | None:
    """The text if it is a str within :data:`MAX_TEXT_CHARS`, else ``None``."""
    if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
        return None
    return text


def extract_tag(text: Any, tag: str) -> str | None:
    """Inner text of the first ``<tag>(.*?)</tag>`` match (dot matches newline), stripped.

    Same result as ``re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)``, in linear time: if the
    first opening tag has no closing tag after it, no later opening tag has one either.
    Returns ``None`` when there is no match (or ``text`` is not a bounded str).
    """
    text = _bounded_text(text)
    if text is None:
        return None
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    start = text.find(open_tag)
    if start < 0:
        return None
    inner_start = start + len(open_tag)
    end = text.find(close_tag, inner_start)
    if end < 0:
        return None
    return text[inner_start:end].strip()


# The format regex of the reference (kept for documentation and for the equivalence tests):
FORMAT_PATTERN = (
    r"^<thinking>.*?</thinking>\s*<payoff>.*?</payoff>\s*<analyze>.*?</analyze>\s*"
    r"<response>.*?</response>$"
)
_STAGES = (
    re.compile(r"</thinking>\s*<payoff>"),
    re.compile(r"</payoff>\s*<analyze>"),
    re.compile(r"</analyze>\s*<response>"),
)
_CLOSE_RESPONSE = "</response>"


def format_matches(text: Any) -> bool:
    """Whether ``re.match(FORMAT_PATTERN, text, re.DOTALL | re.MULTILINE)`` would match.

    Computed in linear time (the regex itself can backtrack polynomially on hostile text with many
    repeated tags). Each lazy ``.*?`` may end at any later occurrence of its closing tag, and every
    constraint only asks that the next stage starts after the previous one ended, so taking the
    earliest possible end at each stage decides the match. With MULTILINE, ``$`` matches at the end
    of the text *or before any newline*, so ``</response>`` followed by ``"\\n"`` and more text
    still matches: that is the reference's behaviour, reproduced on purpose.
    """
    text = _bounded_text(text)
    if text is None or not text.startswith("<thinking>"):
        return False
    pos = len("<thinking>")
    for stage in _STAGES:
        match = stage.search(text, pos)
        if match is None:
            return False
        pos = match.end()
    close = text.find(_CLOSE_RESPONSE, pos)
    while close >= 0:
        after = close + len(_CLOSE_RESPONSE)
        if after == len(text) or text[after] == "\n":
            return True
        close = text.find(_CLOSE_RESPONSE, after)
    return False


@dataclass(frozen=True)
class Chain:
    """A completion split into its blocks.

    Attributes
    ----------
    text : str
        The full completion (``""`` if the input was not a str).
    thinking, payoff, analyze, response : str or None
        Inner text of the first block of each tag, stripped; ``None`` when missing.
    reason : str
        Everything before the first ``"<response>"`` (the whole text if there is none).
    in_order : bool
        The reference format regex matches (four blocks, in order, whitespace between).
    matrix : PayoffMatrix or None
        The parsed payoff matrix, ``None`` if missing or not parseable.
    payoff_error : str or None
        Why the payoff did not parse.
    """

    text: str
    thinking: str | None
    payoff: str | None
    analyze: str | None
    response: str | None
    reason: str
    in_order: bool
    matrix: PayoffMatrix | None
    payoff_error: str | None = None
    problems: tuple[str, ...] = field(default=())
    """Human-readable reasons the chain is not perfect (missing blocks, parse error, order)."""

    @property
    def hard_failure(self) -> bool:
        """``<response>`` or ``<payoff>`` missing, or the payoff does not parse: every reward is 0."""
        return self.response is None or self.matrix is None

    @property
    def format_ok(self) -> bool:
        """F = 1: in order and the payoff parses."""
        return self.in_order and self.matrix is not None

    @property
    def F(self) -> float:  # noqa: N802 - the paper's name
        """The format reward F (0.0 or 1.0)."""
        return 1.0 if self.format_ok else 0.0

    @property
    def P(self) -> float:  # noqa: N802 - the paper's name
        """Payoff diversity P (0.0 when there is no matrix)."""
        return payoff_diversity(self.matrix) if self.matrix is not None else 0.0


def split_chain(text: Any) -> Chain:
    """Split a completion into its four blocks, check their order and parse the payoff.

    Never raises; a non-str or over-long input gives a chain with every block missing.

    Examples
    --------
    >>> c = split_chain("<thinking>t</thinking><payoff>{}</payoff><analyze>a</analyze><response>r</response>")
    >>> c.response, c.in_order, c.matrix is None
    ('r', True, True)
    """
    bounded = _bounded_text(text)
    if bounded is None:
        why = "not a str" if not isinstance(text, str) else f"longer than {MAX_TEXT_CHARS} characters"
        return Chain(
            text=text if isinstance(text, str) else "", thinking=None, payoff=None, analyze=None,
            response=None, reason="", in_order=False, matrix=None, payoff_error=why,
            problems=(f"completion is {why}",),
        )
    blocks = {tag: extract_tag(bounded, tag) for tag in TAGS}
    in_order = format_matches(bounded)
    matrix, error = None, None
    if blocks["payoff"] is not None:
        try:
            matrix = parse_payoff_strict(blocks["payoff"])
        except PayoffError as exc:
            error = str(exc)
        except Exception as exc:  # defensive, see parse_payoff
            error = f"unexpected parser error: {type(exc).__name__}"
    else:
        error = "missing <payoff> block"
    problems = [f"missing <{tag}> block" for tag in TAGS if blocks[tag] is None]
    if blocks["payoff"] is not None and error is not None:
        problems.append(f"payoff does not parse: {error}")
    if not in_order:
        problems.append("blocks are not four tagged blocks in order with only whitespace between")
    return Chain(
        text=bounded,
        thinking=blocks["thinking"],
        payoff=blocks["payoff"],
        analyze=blocks["analyze"],
        response=blocks["response"],
        reason=bounded.split("<response>", 1)[0],
        in_order=in_order,
        matrix=matrix,
        payoff_error=error,
        problems=tuple(problems),
    )


def format_reward(text: Any) -> float:
    """F: 1.0 iff the format regex matches and the payoff block parses, else 0.0. Never raises."""
    if not format_matches(text):
        return 0.0
    return 1.0 if parse_payoff(extract_tag(text, "payoff")) is not None else 0.0
