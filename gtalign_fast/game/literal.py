"""A bounded reader for the Python-dict form of a payoff block, without ``eval``.

A payoff block that is not JSON may be a Python dict literal such as
``{'DQ_AQ': {'LLM': 1.0, 'user': 2}, ...}``. The GTAlign reference reads it with
``ast.literal_eval``; :func:`read_payoff_literal` reads the same shape with a small hand-written
parser instead, because model text is hostile input: nothing is evaluated, text longer than
``max_chars`` is refused before any work, the work is linear in the text (no backtracking-prone
regular expression runs over it) and the recursion depth is at most two.

Only the shape a payoff can have is read: an outer dict whose values are dicts whose values are
numbers. Accepted: single- or double-quoted strings (optional ``u`` prefix, the usual backslash
escapes), one optional ``+``/``-`` sign before a number, Python int (decimal, hex, octal, binary,
PEP 515 underscores) and float literals, trailing commas and ``#`` comments. Not accepted:
parenthesised values, implicit string concatenation or triple-quoted strings (``ast.literal_eval``
would take them; models do not write them in a payoff). Duplicate keys are rejected (Python would
keep the last one, so the text and the value read would disagree). Whether the keys are the six
payoff keys, and whether the numbers are finite, is for the caller to check
(:meth:`gtalign_fast.game.payoff.PayoffMatrix.from_mapping`).
"""

from __future__ import annotations

import re
from typing import Any, Callable

__all__ = ["LiteralError", "read_payoff_literal"]


class LiteralError(Exception):
    """The text is not a dict of dicts of numbers in Python-literal form (the message says why).

    Not a ``ValueError`` on purpose: the reader converts number tokens inside an
    ``except ValueError`` and must not catch its own rejections there.
    """


def read_payoff_literal(text: str, *, max_chars: int) -> dict[str, dict[str, int | float]]:
    """Read ``{'key': {'key': number, ...}, ...}`` written as a Python literal.

    Parameters
    ----------
    text : str
        The literal (leading and trailing whitespace and comments are allowed).
    max_chars : int
        Longer text is rejected without being read.

    Returns
    -------
    dict
        The outer dict, its values dicts of int / float (booleans cannot occur: ``True`` is a name,
        not a number literal).

    Raises
    ------
    LiteralError
        With the reason, for anything outside the accepted grammar (see the module docstring).
    """
    if len(text) > max_chars:
        raise LiteralError(f"longer than {max_chars} characters")
    return _PyDictReader(text).read()


_PY_WS = " \t\n\r\f"
# Python number literals (PEP 515 underscores included). Sign is handled by the reader.
_PY_NUMBER = re.compile(
    r"""
    0[xX](?:_?[0-9a-fA-F])+ | 0[oO](?:_?[0-7])+ | 0[bB](?:_?[01])+                 # based ints
    | (?: (?:[0-9](?:_?[0-9])*)? \. [0-9](?:_?[0-9])* | [0-9](?:_?[0-9])* \.? )    # float / int body
      (?: [eE][+-]?[0-9](?:_?[0-9])* )?                                             # exponent
    """,
    re.VERBOSE,
)
# ASCII digits only: ``\d`` (and ``float()``) would accept fullwidth or Arabic-Indic digits,
# which Python's own parser (the reference's ``ast.literal_eval``) rejects.
_PY_DECIMAL_INT = re.compile(r"(?:0(?:_?0)*|[1-9](?:_?[0-9])*)\Z")
_SIMPLE_ESCAPES = {
    "\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t", "r": "\r",
    "a": "\a", "b": "\b", "f": "\f", "v": "\v", "\n": "",
}


class _PyDictReader:
    """Bounded reader for ``{'DQ_AQ': {'LLM': 1.0, 'user': 2}, ...}``.

    Only the shape a payoff can have is read: an outer dict whose values are dicts whose values are
    numbers. Anything else is rejected on the spot (the reference would reject it in validation).
    Work is linear in the (capped) input; recursion depth is at most two.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def read(self) -> dict[str, Any]:
        outer = self._dict(lambda: self._dict(self._number))
        self._skip()
        if self.pos != len(self.text):
            raise LiteralError(f"trailing text at {self.pos}")
        return outer

    # -- lexical helpers ------------------------------------------------------------------------

    def _skip(self) -> None:
        text, n = self.text, len(self.text)
        while self.pos < n:
            ch = text[self.pos]
            if ch in _PY_WS:
                self.pos += 1
            elif ch == "#":  # a comment runs to the end of the line
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end + 1
            else:
                return

    def _expect(self, ch: str) -> None:
        self._skip()
        if not self.text.startswith(ch, self.pos):
            raise LiteralError(f"expected {ch!r} at {self.pos}")
        self.pos += 1

    def _peek(self) -> str:
        self._skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    # -- grammar ----------------------------------------------------------------------------------

    def _dict(self, value_reader: Callable[[], Any]) -> dict[str, Any]:
        self._expect("{")
        result: dict[str, Any] = {}
        while True:
            if self._peek() == "}":
                self.pos += 1
                return result
            key = self._string()
            self._expect(":")
            value = value_reader()
            if key in result:
                raise LiteralError(f"duplicate key {key!r}")
            result[key] = value
            nxt = self._peek()
            if nxt == ",":
                self.pos += 1  # a trailing comma before '}' is fine in Python
            elif nxt != "}":
                raise LiteralError(f"expected ',' or '}}' at {self.pos}")

    def _string(self) -> str:
        self._skip()
        text = self.text
        if text.startswith(("u", "U"), self.pos):
            self.pos += 1
        if self.pos >= len(text) or text[self.pos] not in "'\"":
            raise LiteralError(f"expected a string at {self.pos}")
        quote = text[self.pos]
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(text):
                raise LiteralError("unterminated string")
            ch = text[self.pos]
            if ch == quote:
                self.pos += 1
                return "".join(out)
            if ch == "\n":
                raise LiteralError("newline in a string")
            if ch == "\\":
                out.append(self._escape())
            else:
                out.append(ch)
                self.pos += 1

    def _escape(self) -> str:
        text = self.text
        self.pos += 1  # the backslash
        if self.pos >= len(text):
            raise LiteralError("unterminated escape")
        ch = text[self.pos]
        if ch in _SIMPLE_ESCAPES:
            self.pos += 1
            return _SIMPLE_ESCAPES[ch]
        width = {"x": 2, "u": 4, "U": 8}.get(ch)
        if width is not None:
            digits = text[self.pos + 1 : self.pos + 1 + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise LiteralError("bad escape")
            self.pos += 1 + width
            code = int(digits, 16)
            if code > 0x10FFFF:
                raise LiteralError("bad escape")
            return chr(code)
        if ch in "01234567":
            end = self.pos
            while end < len(text) and end - self.pos < 3 and text[end] in "01234567":
                end += 1
            code = int(text[self.pos : end], 8)
            self.pos = end
            return chr(code)
        # Python keeps unknown escapes verbatim (with a warning).
        return "\\"

    def _number(self) -> int | float:
        self._skip()
        text = self.text
        negative = False
        if self.pos < len(text) and text[self.pos] in "+-":
            negative = text[self.pos] == "-"
            self.pos += 1
            self._skip()  # ``- 1.5`` is a valid literal
        match = _PY_NUMBER.match(text, self.pos)
        if match is None or match.end() == self.pos:
            raise LiteralError(f"expected a number at {self.pos}")
        token = match.group()
        end = match.end()
        # A number glued to a name character (``1j``, ``2x``, ``1_``) is not a plain number.
        if end < len(text) and (text[end].isalnum() or text[end] in "_."):
            raise LiteralError(f"bad number at {self.pos}")
        self.pos = end
        value: int | float
        try:
            if token[:2].lower() in ("0x", "0o", "0b"):
                value = int(token, 0)
            elif _PY_DECIMAL_INT.match(token):
                value = int(token)
            elif "." in token or "e" in token or "E" in token:
                value = float(token)
            else:  # e.g. ``01`` is a SyntaxError in Python
                raise LiteralError(f"bad number {token!r}")
        except (ValueError, OverflowError):  # e.g. more digits than int() converts
            raise LiteralError(f"bad number at {self.pos}") from None
        return -value if negative else value
