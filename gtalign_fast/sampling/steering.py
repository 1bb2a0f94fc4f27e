"""Analyze-time steering after an edit (``steer_analyze``): once an edited row opens
``<analyze>``, its next draws are forced toward, or biased toward, the steering text (the key of
the action the steered matrix picks). See :mod:`gtalign_fast.sampling.sampler` for the modes."""

from __future__ import annotations

import math
import numbers

from .detokenize import TagScanner
from .rows import RowState, SteerState

__all__ = ["AnalyzeSteering", "STEER_MODES", "check_steering_options"]

STEER_MODES = ("off", "bias", "force")
OPEN_ANALYZE, CLOSE_ANALYZE = "<analyze>", "</analyze>"


def check_steering_options(mode: str, steer_analyze, steer_strength, steer_template) -> None:
    if steer_analyze not in STEER_MODES:
        raise ValueError(f"SteeringSampler: steer_analyze must be one of {STEER_MODES}, got {steer_analyze!r}")
    if steer_analyze != "off" and mode != "rewrite":
        raise ValueError(f"SteeringSampler: steer_analyze={steer_analyze!r} needs mode='rewrite' (it steers "
                         f"edited rows), got mode={mode!r}")
    if not isinstance(steer_strength, numbers.Real) or isinstance(steer_strength, bool):
        raise TypeError(f"SteeringSampler: steer_strength must be a float, got {type(steer_strength).__name__}")
    if not (math.isfinite(steer_strength) and steer_strength > 0):
        raise ValueError(f"SteeringSampler: steer_strength must be finite and > 0, got {steer_strength}")
    if not isinstance(steer_template, str):
        raise TypeError(f"SteeringSampler: steer_template must be a str, got {type(steer_template).__name__}")
    try:
        example = steer_template.format(key="DQ_DA", action="DA", question_type="DQ")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"SteeringSampler: steer_template {steer_template!r} may only use {{key}}, {{action}} and "
                         f"{{question_type}}: {error}") from None
    if not example:
        raise ValueError("SteeringSampler: steer_template must not format to an empty text")



class AnalyzeSteering:
    """The steering half of :class:`~gtalign_fast.sampling.sampler.SteeringSampler` (a mixin: it
    reads the sampler's ``tokenizer``, ``steer_analyze`` and ``steer_template``)."""

    def _start_steering(self, row: RowState, start: int) -> None:
        """Arm steering on a row just edited; ``start`` is where its re-fed tail begins."""
        action = row.event.action
        if self.steer_analyze == "off" or action is None:
            return
        text = self.steer_template.format(key=action.key, action=action.action, question_type=action.question_type)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"SteeringSampler: the steering text {text!r} encodes to no tokens")
        text_from = len(self.tokenizer.decode(row.ids[:start]))
        row.steer = SteerState(ids=ids, search_from=start, text_from=text_from,
                           open_scan=TagScanner(OPEN_ANALYZE, text_from))
        row.event.steer_ids = list(ids)
        self._look_for_analyze(row)  # the re-fed tail may already hold <analyze>

    def _look_for_analyze(self, row: RowState) -> None:
        """Move a row's steering on when ``<analyze>`` opens (start) or ``</analyze>`` closes (stop)."""
        steer = row.steer
        text, committed = row.text.text, row.text.committed_length
        if steer.open_at < 0:
            steer.open_at = steer.open_scan.find(text, committed)
            if steer.open_at < 0:
                return
            steer.close_scan = TagScanner(CLOSE_ANALYZE, steer.open_at)
        if steer.close_scan.find(text, committed) >= 0:
            steer.state, steer.status = "done", "closed"
        elif steer.state == "waiting":
            steer.state = steer.status = "active"

    def _follow_steering(self, row: RowState, token: int, steered: bool) -> None:
        """Update a row's steering after its draw ``token`` (``steered``: the draw was forced/biased)."""
        steer = row.steer
        if steer is None or steer.state == "done":
            return
        if steered:
            steer.draws += 1
            if token == steer.ids[steer.cursor]:
                steer.cursor += 1
            else:  # bias mode: the row wrote something else; aim at the first token again
                steer.cursor = 1 if token == steer.ids[0] else 0
            if steer.cursor == len(steer.ids):
                steer.state, steer.status = "done", "named"
                return
        if self._has_gt(token):
            self._look_for_analyze(row)
