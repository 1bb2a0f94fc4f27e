"""The GTAlign payoff matrix: its keys, the :class:`PayoffMatrix` type, parsing, formatting, P, Pareto.

Model text is hostile input: the parser is bounded in time and size (a cap on the payoff block, a
bounded literal reader) and :func:`parse_payoff` never raises on bad text; it returns ``None``.

Parsing rules (the reference's, with three documented tightenings)
------------------------------------------------------------------
The ``<payoff>`` block is the first ``<payoff>(.*?)</payoff>`` match, stripped. It is accepted if

1. it is valid JSON (tried first, as in the reference), or, after curly quotes are normalised
   (“ ” -> ``"`` and ‘ ’ -> ``'``), a Python dict literal; the Python form is read by the small
   bounded parser of :mod:`.literal`, never by ``eval`` / ``ast.literal_eval``;
2. it holds exactly the six keys ``DQ_AQ, DQ_CQ, DQ_DA, VQ_AQ, VQ_CQ, VQ_DA``, each mapping to an
   object with exactly the keys ``"LLM"`` and ``"user"``;
3. every value is an int or a float.

Tightenings against the reference (which would accept these): NaN and infinities (``NaN``,
``Infinity``, ``1e999``) are rejected; booleans are not numbers (Python's ``True`` is an ``int``);
duplicate keys are rejected (JSON would silently keep the last one, so the text the model wrote and
the matrix we score would disagree). Blocks longer than :data:`MAX_PAYOFF_CHARS` are rejected.
The grammar the Python-literal reader accepts is documented in :mod:`.literal`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from .literal import LiteralError, read_payoff_literal

__all__ = [
    "QUESTION_TYPES",
    "ACTIONS",
    "PAYOFF_KEYS",
    "MAX_PAYOFF_CHARS",
    "PayoffError",
    "Cell",
    "PayoffMatrix",
    "parse_payoff",
    "parse_payoff_strict",
    "payoff_diversity",
    "pareto_frontier",
    "format_payoff",
    "split_key",
    "make_key",
]

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

QUESTION_TYPES: tuple[str, ...] = ("DQ", "VQ")
"""User question types: ``DQ`` definite/clear, ``VQ`` vague/ambiguous."""

ACTIONS: tuple[str, ...] = ("AQ", "CQ", "DA")
"""Assistant actions: ``AQ`` answer + one follow-up question, ``CQ`` clarifying question only,
``DA`` direct answer (alphabetical, which is also the canonical key order)."""

PAYOFF_KEYS: tuple[str, ...] = tuple(f"{q}_{a}" for q in QUESTION_TYPES for a in ACTIONS)
"""The six keys in canonical order: DQ_AQ, DQ_CQ, DQ_DA, VQ_AQ, VQ_CQ, VQ_DA."""

_KEY_SET = frozenset(PAYOFF_KEYS)
_PLAYER_KEYS = frozenset(("LLM", "user"))

MAX_PAYOFF_CHARS = 4096
"""Longest payoff block (after stripping) that is parsed; a real matrix is ~300 characters."""


class PayoffError(ValueError):
    """Raised by the strict payoff parser and by :meth:`PayoffMatrix.from_mapping`."""


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def make_key(question_type: str, action: str) -> str:
    """Build a payoff key such as ``"DQ_DA"``; raises ``ValueError`` for unknown parts."""
    if question_type not in QUESTION_TYPES:
        raise ValueError(f"question type must be one of {QUESTION_TYPES}, got {question_type!r}")
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    return f"{question_type}_{action}"


def split_key(key: str) -> tuple[str, str]:
    """Split ``"DQ_DA"`` into ``("DQ", "DA")``; raises ``ValueError`` for an unknown key."""
    if key not in _KEY_SET:
        raise ValueError(f"payoff key must be one of {PAYOFF_KEYS}, got {key!r}")
    question_type, action = key.split("_")
    return question_type, action


# --------------------------------------------------------------------------------------------
# The payoff matrix value
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One cell of the payoff matrix: the payoff of each player.

    Attributes
    ----------
    llm : float
        The assistant's payoff (``"LLM"`` in the text).
    user : float
        The user's payoff (``"user"`` in the text).
    """

    llm: float
    user: float

    def __post_init__(self) -> None:
        # Normalise to float so that equal matrices compare and hash equal, and refuse values
        # that are not payoffs (booleans, NaN, infinities).
        object.__setattr__(self, "llm", _finite_float(self.llm, "LLM"))
        object.__setattr__(self, "user", _finite_float(self.user, "user"))

    @property
    def welfare(self) -> float:
        """Utilitarian welfare ``llm + user`` (the reference prompt's first criterion)."""
        return self.llm + self.user


def _is_number(value: Any) -> bool:
    # bool is a subclass of int: ``True`` must not pass for a payoff of 1.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_float(value: Any, where: str) -> float:
    if not _is_number(value):
        raise PayoffError(f"{where}: expected an int or a float, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError as exc:  # an int with hundreds of digits
        raise PayoffError(f"{where}: number out of range") from exc
    if not math.isfinite(number):
        raise PayoffError(f"{where}: NaN and infinities are not payoffs")
    return number


@dataclass(frozen=True)
class PayoffMatrix:
    """A validated 2 x 3 GTAlign payoff matrix (six cells, each ``(LLM, user)``).

    Construct it with :meth:`from_mapping`, :meth:`parse` / :func:`parse_payoff`, or directly from
    six :class:`Cell` values in :data:`PAYOFF_KEYS` order. Equality compares the values.

    Examples
    --------
    >>> m = PayoffMatrix.from_mapping({k: {"LLM": 1.0, "user": 2.0} for k in PAYOFF_KEYS})
    >>> m.cell("DQ", "DA").user
    2.0
    >>> m["VQ_CQ"].llm
    1.0
    """

    cells: tuple[Cell, ...]

    def __post_init__(self) -> None:
        cells = tuple(self.cells)
        if len(cells) != len(PAYOFF_KEYS) or not all(isinstance(c, Cell) for c in cells):
            raise PayoffError("a PayoffMatrix holds exactly six Cell values in PAYOFF_KEYS order")
        object.__setattr__(self, "cells", cells)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "PayoffMatrix":
        """Validate a ``{"DQ_AQ": {"LLM": x, "user": y}, ...}`` mapping (the rules of the module).

        Raises
        ------
        PayoffError
            Wrong key set, wrong player keys, a non-number, a boolean, NaN or an infinity.
        """
        if not isinstance(data, Mapping):
            raise PayoffError(f"payoff must be an object, got {type(data).__name__}")
        keys = set(data.keys())
        if keys != _KEY_SET:
            missing = sorted(_KEY_SET - keys, key=str)
            extra = sorted((repr(k) for k in keys - _KEY_SET))
            raise PayoffError(f"payoff keys mismatch (missing {missing}, extra {extra})")
        cells = []
        for key in PAYOFF_KEYS:
            value = data[key]
            if not isinstance(value, Mapping):
                raise PayoffError(f"{key}: expected an object, got {type(value).__name__}")
            if set(value.keys()) != _PLAYER_KEYS:
                raise PayoffError(f"{key}: expected exactly the keys 'LLM' and 'user'")
            cells.append(
                Cell(_finite_float(value["LLM"], f"{key}.LLM"), _finite_float(value["user"], f"{key}.user"))
            )
        return cls(tuple(cells))

    @classmethod
    def parse(cls, block: str) -> "PayoffMatrix":
        """Parse the inner text of a ``<payoff>`` block; raises :class:`PayoffError`."""
        return parse_payoff_strict(block)

    # -- access -------------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Cell:
        try:
            return self.cells[PAYOFF_KEYS.index(key)]
        except ValueError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[str]:
        return iter(PAYOFF_KEYS)

    def __len__(self) -> int:
        return len(PAYOFF_KEYS)

    def __contains__(self, key: object) -> bool:
        return key in _KEY_SET

    def keys(self) -> tuple[str, ...]:
        """The six keys in canonical order."""
        return PAYOFF_KEYS

    def items(self) -> tuple[tuple[str, Cell], ...]:
        """``(key, Cell)`` pairs in canonical order."""
        return tuple(zip(PAYOFF_KEYS, self.cells))

    def cell(self, question_type: str, action: str) -> Cell:
        """The cell for a question type (``DQ``/``VQ``) and an action (``DA``/``CQ``/``AQ``)."""
        return self[make_key(question_type, action)]

    def row(self, question_type: str) -> dict[str, Cell]:
        """``{action: Cell}`` for one question type, actions in canonical order."""
        return {a: self.cell(question_type, a) for a in ACTIONS}

    def to_dict(self) -> dict[str, dict[str, float]]:
        """Plain ``{"DQ_AQ": {"LLM": x, "user": y}, ...}`` (JSON-serialisable)."""
        return {k: {"LLM": c.llm, "user": c.user} for k, c in self.items()}

    def to_text(self, *, indent: int | None = None, max_decimals: int = 6) -> str:
        """Canonical text for a ``<payoff>`` block; see :func:`format_payoff`."""
        return format_payoff(self, indent=indent, max_decimals=max_decimals)

    # -- transforms and analysis ----------------------------------------------------------------

    def map(self, fn: Callable[[str, Cell], Cell]) -> "PayoffMatrix":
        """A new matrix with ``fn(key, cell)`` applied to every cell."""
        return PayoffMatrix(tuple(fn(k, c) for k, c in self.items()))

    def replace(self, key: str, *, llm: float | None = None, user: float | None = None) -> "PayoffMatrix":
        """A new matrix with one cell's payoffs replaced."""
        old = self[key]
        new = Cell(old.llm if llm is None else llm, old.user if user is None else user)
        return self.map(lambda k, c: new if k == key else c)

    def diversity(self) -> float:
        """Payoff diversity P (see :func:`payoff_diversity`)."""
        return payoff_diversity(self)

    def pareto_frontier(self, question_type: str | None = None) -> tuple[str, ...]:
        """Keys of the non-dominated cells (see :func:`pareto_frontier`)."""
        return pareto_frontier(self, question_type=question_type)

    def best_action(self, rule: str = "nash", question_type: str | None = None, **kwargs: Any) -> str:
        """The key chosen by an action-choice rule; see :func:`gtalign_fast.game.pricing.choose_action`.

        Returns the key (e.g. ``"DQ_DA"``); ``kwargs`` go to ``choose_action`` (tie-break, ...).
        """
        from .pricing import choose_action  # pricing imports this module: import at call time

        return choose_action(self, rule=rule, question_type=question_type, **kwargs).key


# --------------------------------------------------------------------------------------------
# Payoff parsing
# --------------------------------------------------------------------------------------------


class _Reject(Exception):
    """Internal: the payoff text does not parse (carries the reason)."""


def _reject_constant(name: str) -> Any:
    raise _Reject(f"{name} is not a payoff")


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Reject(f"duplicate key {key!r}")
        result[key] = value
    return result


_CURLY_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})


def parse_payoff_strict(block: str) -> PayoffMatrix:
    """Parse the inner text of a ``<payoff>`` block by the rules of this module.

    Parameters
    ----------
    block : str
        The payoff text (it is stripped here).

    Returns
    -------
    PayoffMatrix

    Raises
    ------
    PayoffError
        With the reason, for anything that is not an acceptable payoff matrix.
    """
    if not isinstance(block, str):
        raise PayoffError(f"payoff must be text, got {type(block).__name__}")
    text = block.strip()
    if not text:
        raise PayoffError("empty payoff block")
    if len(text) > MAX_PAYOFF_CHARS:
        raise PayoffError(f"payoff block longer than {MAX_PAYOFF_CHARS} characters")
    data = _load_json(text)
    if data is None:  # not JSON: the reference then tries a Python literal after fixing quotes
        try:
            data = read_payoff_literal(text.translate(_CURLY_QUOTES), max_chars=MAX_PAYOFF_CHARS)
        except LiteralError as exc:
            raise PayoffError(f"payoff is neither JSON nor a Python dict literal: {exc}") from None
    return PayoffMatrix.from_mapping(data)


def _load_json(text: str) -> Any | None:
    """JSON-decode ``text``; ``None`` when it is not JSON, PayoffError for rejected content."""
    try:
        return json.loads(
            text, object_pairs_hook=_pairs_without_duplicates, parse_constant=_reject_constant
        )
    except _Reject as exc:
        raise PayoffError(str(exc)) from None
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None


def parse_payoff(block: Any) -> PayoffMatrix | None:
    """Parse a payoff block; ``None`` when it does not parse. Never raises."""
    try:
        return parse_payoff_strict(block)
    except PayoffError:
        return None
    except Exception:  # defensive: model text must never crash a training step
        return None


# --------------------------------------------------------------------------------------------
# Analysis of a matrix
# --------------------------------------------------------------------------------------------


def payoff_diversity(matrix: PayoffMatrix) -> float:
    """Payoff diversity P in [0, 1].

    For each of the six cells: + 1/12 if ``user != LLM``, and + 1/12 more if
    ``|user - LLM| / max(|user|, |LLM|, 1e-8) > 0.1``. Summed in canonical key order (the sum of
    floats depends on the order; this is the reference's dict order for a JSON-ordered matrix).
    """
    total = 0.0
    for cell in matrix.cells:
        if cell.user != cell.llm:
            total += 1 / 12
        denominator = max(abs(cell.user), abs(cell.llm), 1e-8)
        if abs(cell.user - cell.llm) / denominator > 0.1:
            total += 1 / 12
    return total


def pareto_frontier(matrix: PayoffMatrix, question_type: str | None = None) -> tuple[str, ...]:
    """Keys of the Pareto-optimal cells, in canonical order.

    A cell is dominated when another cell is at least as good for both players and strictly better
    for one. Equal cells do not dominate each other (both stay on the frontier).

    Parameters
    ----------
    matrix : PayoffMatrix
    question_type : {"DQ", "VQ"}, optional
        Restrict the comparison to the three cells of one question type.
    """
    keys = PAYOFF_KEYS if question_type is None else tuple(make_key(question_type, a) for a in ACTIONS)
    frontier = []
    for key in keys:
        here = matrix[key]
        dominated = any(
            other.llm >= here.llm and other.user >= here.user and (other.llm > here.llm or other.user > here.user)
            for other in (matrix[k] for k in keys if k != key)
        )
        if not dominated:
            frontier.append(key)
    return tuple(frontier)


def _format_number(value: float, max_decimals: int) -> str:
    rounded = round(value, max_decimals) + 0.0  # ``+ 0.0`` turns -0.0 into 0.0
    text = repr(float(rounded))
    return text


def format_payoff(matrix: PayoffMatrix, *, indent: int | None = None, max_decimals: int = 6) -> str:
    """Write a matrix back as canonical payoff text (JSON, canonical key order, LLM before user).

    Numbers are rounded to ``max_decimals`` (which removes float noise such as
    ``0.30000000000000004``) and written in Python's shortest round-trip form (``2.0``, ``-1.5``).
    ``parse_payoff(format_payoff(m)) == m`` whenever ``m``'s values have at most ``max_decimals``
    decimals.

    Parameters
    ----------
    matrix : PayoffMatrix
    indent : int, optional
        ``None`` (default) writes one line like the prompt's example; an int writes one key per
        line, indented by that many spaces.
    max_decimals : int
        Decimal places kept.
    """
    parts = []
    for key, cell in matrix.items():
        parts.append(
            f'"{key}": {{"LLM": {_format_number(cell.llm, max_decimals)}, '
            f'"user": {_format_number(cell.user, max_decimals)}}}'
        )
    if indent is None:
        return "{" + ", ".join(parts) + "}"
    pad = " " * indent
    return "{\n" + ",\n".join(pad + p for p in parts) + "\n}"
