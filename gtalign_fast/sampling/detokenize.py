"""Incremental detokenization: a row's text follows its tokens at O(1) tokenizer work per token.

Decoding the whole row after every token (what tag detection and stop strings used to do) is
quadratic in the completion length. :class:`IncrementalText` keeps the row's text as a committed
part plus a short window of tokens that is decoded again each time (vLLM's / TGI's scheme): a
window starts a few tokens back (``prefix``) so that tokenizers which strip a leading space from
the first token of a decode (SentencePiece) lose it on the overlap only, and text ending in
U+FFFD (a multi-byte character not complete yet) stays in the window until the next token
completes it (for at most ``_MAX_PENDING`` tokens: a longer run is invalid bytes, committed as
decoded). ``text`` is what ``tokenizer.decode(ids)`` returns (byte-level BPE, SentencePiece
with byte fallback, character and word-level vocabularies; the tests check it token by token),
except while the last character is incomplete: a byte-fallback decoder then turns the whole run
of byte tokens into U+FFFD, earlier complete characters included, where this keeps them. Tags
and stop strings are ASCII in practice, so no decision depends on that moment.

:class:`TagScanner` finds the first occurrence of a tag in such a growing text, searching only
the characters it has not searched before (plus the tag's length of overlap).
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["IncrementalText", "TagScanner", "TokenTextCache"]

# Tokens kept before the read offset when a window is (re)started: enough context for any
# tokenizer's leading-space handling (vLLM uses 5).
_CONTEXT = 6
# Tokens a window may hold past its read offset while its text still ends in U+FFFD. A UTF-8
# character is at most 4 bytes, so a longer run is invalid bytes (untrusted model output): it is
# committed as the decoder renders it instead of being decoded again at every token (quadratic).
_MAX_PENDING = 8


class IncrementalText:
    """The decoded text of a growing token list, updated in O(window) per token."""

    __slots__ = ("committed", "prefix", "read", "_head", "_pending")

    def __init__(self, tokenizer: Any, ids: Sequence[int] = ()) -> None:
        self.reset(tokenizer, ids)

    def reset(self, tokenizer: Any, ids: Sequence[int]) -> None:
        """Start over from ``ids`` (one full decode: after an edit replaced tokens)."""
        self.committed = tokenizer.decode(list(ids))
        self.read = len(ids)
        self.prefix = max(0, self.read - _CONTEXT)
        self._head = tokenizer.decode(list(ids[self.prefix:self.read])) if self.read else ""
        self._pending = ""

    @property
    def text(self) -> str:
        """The row's text: ``tokenizer.decode(ids)``."""
        return self.committed + self._pending

    @property
    def committed_length(self) -> int:
        """Length of the part of :attr:`text` that no later token can change."""
        return len(self.committed)

    def push(self, tokenizer: Any, ids: Sequence[int]) -> None:
        """Follow ``ids`` after tokens were appended to it (``ids`` is the whole row)."""
        tail = tokenizer.decode(list(ids[self.prefix:]))
        settled = not tail.endswith("\ufffd") or len(ids) - self.read >= _MAX_PENDING
        if len(tail) > len(self._head) and settled:
            self.committed += tail[len(self._head):]
            self.prefix, self.read = self.read, len(ids)
            self._head = tokenizer.decode(list(ids[self.prefix:self.read]))
            self._pending = ""
        else:  # an incomplete character (or nothing new): keep the window open
            self._pending = tail[len(self._head):]


class TagScanner:
    """First occurrence of ``tag`` in a growing text, each character searched about once."""

    __slots__ = ("tag", "start", "scanned")

    def __init__(self, tag: str, start: int = 0) -> None:
        self.tag, self.start, self.scanned = tag, start, start

    def find(self, text: str, committed_length: int) -> int:
        """Index of the first ``tag`` in ``text[start:]`` (-1 if none). Text before
        ``committed_length`` never changes, so the next call starts searching near there."""
        at = text.find(self.tag, max(self.start, self.scanned - len(self.tag) + 1))
        self.scanned = max(self.scanned, committed_length)
        return at


class TokenTextCache:
    """Per token id: whether the token decoded alone contains a character (``">"``), memoised."""

    def __init__(self, tokenizer: Any, char: str) -> None:
        self.tokenizer, self.char, self._seen = tokenizer, char, {}

    def __call__(self, token: int) -> bool:
        hit = self._seen.get(token)
        if hit is None:
            hit = self._seen[token] = self.char in self.tokenizer.decode([token])
        return hit
