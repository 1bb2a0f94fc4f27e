"""Payoff detection and the in-place rewrite: when a row closes ``</payoff>``, the block is
parsed, the pricing policy applied, and (if the matrix changed) the row's tokens from the one
holding ``<payoff>`` on are replaced by the re-serialised tail (see the sampler's module docstring)."""

from __future__ import annotations

from ..game.payoff import format_payoff, parse_payoff
from ..game.pricing import choose_action
from .rows import RowState, SteeringEvent

__all__ = ["PayoffEdit", "OPEN_TAG", "CLOSE_TAG"]

OPEN_TAG, CLOSE_TAG = "<payoff>", "</payoff>"


class PayoffEdit:
    """The payoff half of :class:`~gtalign_fast.sampling.sampler.SteeringSampler` (a mixin: it reads
    the sampler's ``tokenizer``, ``policy``, ``rule`` and ``mode``)."""

    def _detect(self, r: int, row: RowState, stop_at_payoff: bool):
        """Return ``(tail_ids, start)`` when this row's payoff must be rewritten now, else None."""
        if row.payoff_done or self.mode == "off":
            return None
        if not self._has_gt(row.ids[-1]):
            return None
        text = row.text.text
        close = row.payoff_scan.find(text, row.text.committed_length)
        if close < 0:
            return None
        row.payoff_done = True
        open_at = text.rfind(OPEN_TAG, 0, close)
        event = SteeringEvent(row=r, status="unparseable", step=row.steps)
        row.event = event
        if open_at < 0:
            event.reason = f"{CLOSE_TAG} without a preceding {OPEN_TAG}"
            return None
        original = parse_payoff(text[open_at + len(OPEN_TAG): close])
        if original is None:
            event.reason = "the payoff block does not parse; the row continues unedited"
            return None
        event.original = original
        try:  # a policy whose shift overflows a payoff (or any policy error) must not kill the batch
            steered = self.policy.apply(original)
            action = choose_action(steered, rule=self.rule)
        except Exception as exc:
            event.status = "unchanged"
            event.reason = f"the pricing policy failed on this matrix ({type(exc).__name__}: {exc}"[:300]
            event.reason += "); the row continues unedited"
            return None
        event.steered, event.action = steered, action
        if stop_at_payoff:
            event.status, event.reason = "unchanged", "stopped at </payoff> for the second call"
            row.finished = "payoff"
            return None
        if steered == original:
            event.status, event.reason = "unchanged", "the policy leaves this matrix unchanged"
            return None
        # The first token that holds any of the block, and the text it and its successors cover.
        start = self._first_token_at(row.ids, open_at)
        prefix_len = len(self.tokenizer.decode(row.ids[:start]))
        close_end = close + len(CLOSE_TAG)
        new_tail = text[prefix_len:open_at] + OPEN_TAG + format_payoff(steered) + CLOSE_TAG + text[close_end:]
        tail_ids = list(self.tokenizer(new_tail, add_special_tokens=False)["input_ids"])
        event.status, event.reason = "edited", "payoff rewritten in place"
        event.tokens_refed, event.tokens_hidden = len(tail_ids), len(row.ids) - start
        return tail_ids, start

    def _first_token_at(self, ids: list[int], char_index: int) -> int:
        """Smallest i such that the decoded text of ids[: i + 1] reaches past char_index."""
        lo, hi = 0, len(ids) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(ids[: mid + 1])) > char_index:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _replace_tail(self, row: RowState, start: int, tail_ids: list[int]) -> None:
        """Drop visible tokens from ``start`` (their cache columns get hidden after the next
        forward) and append the re-fed tail, whose positions continue from the old block's start."""
        row.hide = [s for s in row.slots[start:] if s >= 0]
        first_position = row.positions[start]
        del row.ids[start:], row.logprobs[start:], row.positions[start:], row.slots[start:]
        row.ids.extend(tail_ids)
        row.logprobs.extend([float("nan")] * len(tail_ids))
        row.positions.extend(range(first_position, first_position + len(tail_ids)))
        row.slots.extend([-1] * len(tail_ids))
        if row.text is not None:  # the ids changed in the middle: one full decode, once per edit
            row.text.reset(self.tokenizer, row.ids)
