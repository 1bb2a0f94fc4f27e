"""The draw: one ``sample_`` call per step for every active row, with the rows' seeds (a row seed
mixed with its step count), forced tokens, and the steering bias or forcing."""

from __future__ import annotations

import torch

from ..ops._sample import sample_
from ..ops._seeds import step_seed

__all__ = ["Draw"]


class Draw:
    """The draw of :class:`~gtalign_fast.sampling.sampler.SteeringSampler` (a mixin: it reads the
    sampler's ``backend``, ``steer_analyze`` and ``steer_strength``)."""

    def _draw_inputs(self, rows, active):
        """Per lane, the next draw's forced token (-1: none) and seed, the bias targets
        ``{lane: token}`` and the lanes steered by this draw."""
        n_rows = len(rows)
        forced, seeds = [-1] * n_rows, [0] * n_rows
        biased: dict[int, int] = {}  # row -> token id that gets +steer_strength
        steered: set[int] = set()
        for r in active:
            row = rows[r]
            if row.forced is not None and row.steps < len(row.forced):
                forced[r] = int(row.forced[row.steps])
            seeds[r] = step_seed(row.seed, row.steps)
            if row.steer is not None and row.steer.state == "active" and forced[r] < 0:
                target = row.steer.ids[row.steer.cursor]
                steered.add(r)
                if self.steer_analyze == "force":
                    forced[r] = target
                else:
                    biased[r] = target
        return forced, seeds, biased, steered

    def _sample(self, rows, active, next_logits, settings):
        """One draw for every active row; returns (tokens, raw log-probs, rows steered this draw)."""
        device = next_logits.device
        n_rows = len(rows)
        forced, seeds, biased, steered = self._draw_inputs(rows, active)
        bias = {}
        if biased:  # only then: rows without a bias get an unused slot (-1), which changes nothing
            ids = [[biased.get(r, -1)] for r in range(n_rows)]
            bias_values = torch.full((n_rows, 1), self.steer_strength, dtype=torch.float32, device=device)
            bias = dict(bias_ids=torch.tensor(ids, dtype=torch.long, device=device), bias_values=bias_values)
        # In place: every lane's logits are drawn from once, then overwritten by its next step (or
        # refill) before the next draw; keep_edit_logits copies them before this.
        tokens, _, raw = sample_(
            next_logits, forced=torch.tensor(forced, dtype=torch.long, device=device),
            seed=torch.tensor(seeds, dtype=torch.long, device=device), backend=self.backend, **bias, **settings
        )
        return tokens.tolist(), raw.tolist(), steered
