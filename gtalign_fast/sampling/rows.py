"""The sampler's records: what :meth:`SteeringSampler.generate` returns (:class:`GenerationOutput`,
one :class:`SteeringEvent` per row) and the per-row decoding state the engine keeps (``RowState``,
``SteerState``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..game.pricing import ActionChoice
from .detokenize import IncrementalText, TagScanner

__all__ = ["SteeringEvent", "GenerationOutput", "RowState", "SteerState"]


@dataclass
class SteeringEvent:
    """What happened to one row's payoff.

    Attributes
    ----------
    row : int
    status : str
        ``"edited"``, ``"unchanged"`` (the policy left the matrix as it was), ``"unparseable"``,
        ``"no_payoff"`` (the row never closed a payoff block), ``"off"`` (mode off),
        ``"reasked"`` (mode reference: the second call was made).
    original, steered : PayoffMatrix or None
    action : ActionChoice or None
        The action the steered matrix picks (policy's rule).
    tokens_refed : int
        Tokens fed for the edit (rewrite: the re-serialised tail; reference: the second prompt).
    tokens_hidden : int
        Completion tokens hidden by the edit (rewrite).
    step : int or None
        The row's draw count when the payoff closed.
    reason : str
        Human-readable detail (e.g. why nothing was edited).
    next_logits : Tensor or None
        The row's next-token logits right after the edit (with ``keep_edit_logits=True``).
    edited_ids : list of int or None
        The row's completion tokens right after the edit (kept tokens + re-fed tail).
    steer_ids : list of int or None
        The steering tokens aimed at inside ``<analyze>`` (``steer_analyze`` on and the row
        edited), else None.
    steer_draws : int
        Draws that were forced or biased toward them.
    steer_status : str
        ``""`` (not steered), ``"waiting"`` (``<analyze>`` never opened), ``"active"`` (the row
        ended mid-way), ``"named"`` (the steering text was written in full), ``"closed"``
        (``</analyze>`` came first; bias mode).
    """

    row: int
    status: str
    original: Any = None
    steered: Any = None
    action: ActionChoice | None = None
    tokens_refed: int = 0
    tokens_hidden: int = 0
    step: int | None = None
    reason: str = ""
    next_logits: torch.Tensor | None = None
    edited_ids: list[int] | None = None
    steer_ids: list[int] | None = None
    steer_draws: int = 0
    steer_status: str = ""


@dataclass
class GenerationOutput:
    """Result of :meth:`SteeringSampler.generate`, one entry per row (prompt x return sequence).

    Attributes
    ----------
    completion_ids : list of list of int
        The completion as the model saw it at the end (an edited payoff appears re-serialised).
    texts : list of str
    logprobs : list of list of float
        Per completion token: the log-prob under ``softmax(logits / T)`` for sampled tokens (what a
        trainer recomputes), NaN for re-fed tokens (not sampled).
    finish_reasons : list of str
        ``"eos"``, ``"stop"`` (a stop string), ``"length"``.
    events : list of SteeringEvent
    prompt_ids : list of list of int
    tokens_prefilled : int
        Tokens run through the model besides one per decoding step (prompts, re-fed payloads).
    """

    completion_ids: list[list[int]]
    texts: list[str]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    events: list[SteeringEvent]
    prompt_ids: list[list[int]]
    tokens_prefilled: int = 0


@dataclass
class SteerState:
    """Analyze steering of one edited row: aim at ``ids`` once ``<analyze>`` opens."""

    ids: list[int]
    search_from: int  # index in the row's ids where the re-fed tail starts (tags are looked for from there)
    text_from: int = 0  # the same place in the row's text
    open_at: int = -1  # where <analyze> opened in the row's text (-1: not yet)
    open_scan: TagScanner | None = None
    close_scan: TagScanner | None = None
    state: str = "waiting"  # "waiting" for <analyze>, "active", "done"
    cursor: int = 0  # steering tokens written so far, in sequence
    draws: int = 0  # draws forced / biased
    status: str = "waiting"  # final word for the event (see SteeringEvent.steer_status)


@dataclass
class RowState:
    """One row's decoding state in the engine (its tokens, cache columns, text and steering)."""

    prompt_ids: list[int]
    seed: int
    forced: list[int] | None
    ids: list[int] = field(default_factory=list)  # visible completion tokens
    logprobs: list[float] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # position of each visible token
    slots: list[int] = field(default_factory=list)  # cache column of each visible token (-1: not fed yet)
    steps: int = 0  # draws made
    finished: str | None = None
    payoff_done: bool = False
    event: SteeringEvent | None = None
    hide: list[int] = field(default_factory=list)  # cache columns to hide before the next forward
    steer: SteerState | None = None  # analyze steering after an edit
    index: int = 0  # the row's place in the output
    text: IncrementalText | None = None  # the completion's text, followed token by token while needed
    payoff_scan: TagScanner | None = None  # looks for </payoff>
