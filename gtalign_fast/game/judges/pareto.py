"""Rule-based Pareto judge of the ablation variant: does ``<analyze>`` pick a frontier cell?

A stand-in for the LLM Pareto judge of the ``pareto`` welfare variant: it reads the last payoff key
(or bare action) that ``<analyze>`` names and checks it against the Pareto frontier of the parsed
matrix (:func:`~gtalign_fast.game.payoff.pareto_frontier`).
"""

from __future__ import annotations

import re

from ..chain import extract_tag
from ..payoff import PayoffMatrix, pareto_frontier

__all__ = ["analyze_pareto_score"]


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
