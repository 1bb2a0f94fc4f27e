"""Mode ``"reference"``: the reference's two calls. Decoding stops at ``</payoff>``; the steered
matrix picks an action and the model is asked again from scratch with the prompt and a fixed
instruction for that action (a second prefill)."""

from __future__ import annotations

from ..ops._seeds import signed64, splitmix64
from .rows import RowState

__all__ = ["ReferenceCall", "ACTION_INSTRUCTIONS"]

ACTION_INSTRUCTIONS = {
    "DA": "Answer the question directly.",
    "CQ": "Ask one clarifying question and do not answer yet.",
    "AQ": "Answer the question, then ask one follow-up question.",
}
"""Instructions the ``"reference"`` mode appends to the prompt for the chosen action (override
with ``SteeringSampler(..., action_instructions=...)``)."""



class ReferenceCall:
    """The second call of mode ``"reference"`` (a mixin of
    :class:`~gtalign_fast.sampling.sampler.SteeringSampler`)."""

    def _reask(self, rows: list[RowState], max_new_tokens: int, settings: dict, slots: int | None) -> int:
        second: list[tuple[int, RowState]] = []
        for r, row in enumerate(rows):
            event = row.event
            if row.finished != "payoff" or event is None or event.action is None:
                continue
            instruction = self.action_instructions[event.action.action]
            prompt_text = self.tokenizer.decode(row.prompt_ids) + "\n" + instruction + "\n"
            new_prompt = self._encode(prompt_text)
            seed = signed64(splitmix64(row.seed))
            second.append((r, RowState(prompt_ids=new_prompt, seed=seed, forced=None, index=r)))
            event.status, event.reason = "reasked", f"second call with the {event.action.action} instruction"
            event.tokens_refed = len(new_prompt)
        if not second:
            for row in rows:
                if row.finished == "payoff":
                    row.finished = "stop"
            return 0
        again = [row for _, row in second]
        prefilled = self._decode_rows(again, max_new_tokens, settings, False, stop_at_payoff=False, slots=slots)
        for (r, new_row) in second:
            old = rows[r]
            old.ids, old.logprobs, old.finished = new_row.ids, new_row.logprobs, new_row.finished
        for row in rows:
            if row.finished == "payoff":
                row.finished = "stop"
        return prefilled
