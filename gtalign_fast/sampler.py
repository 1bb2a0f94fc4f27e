"""SteeringSampler: batched decoding on any Hugging Face causal LM that edits the payoff matrix in
place, in one decoding pass.

Decoding keeps a KV cache, left-pads the prompts, and passes explicit ``position_ids`` and a 2-D
attention mask on every call, so that cache slots can be hidden later. A per-row detector follows
the generated text; when a row closes ``</payoff>`` (mode ``"rewrite"``):

1. the block is parsed (:func:`gtalign_fast.game.chain.parse_payoff`) and the pricing policy
   applied (:meth:`gtalign_fast.game.pricing.PricingPolicy.apply`); the chosen action is recorded
   (:func:`gtalign_fast.game.pricing.choose_action`);
2. if the matrix changed, the row's tokens from the one holding ``<payoff>`` onwards are hidden
   (their attention-mask columns become 0; the KV entries stay where they are), and the row's
   re-serialised tail (any text that shared those tokens before ``<payoff>``, the new block, and
   any text after ``</payoff>`` in the closing token) is fed at positions continuing from where the
   old block began. The feed is part of the next forward: every row feeds its own list of tokens
   (one sampled token, the re-fed tail, or nothing once finished), right-padded with masked
   padding, and takes its next-token logits at its last real slot. So an edit costs one wider
   forward, never a re-prefill.
3. a block that does not parse, or a policy that leaves the matrix unchanged, leaves the row as it is.

After an edit the row's state is exactly that of a fresh forward over the edited token sequence
(prompt, kept completion tokens, re-fed tail) with contiguous positions; the tests check the
next-token logits against such a fresh forward. Every row samples with its own seed stream (a row
seed mixed with the row's step count), so a row draws the same tokens alone or in any batch.

Optional logit steering after an edit (``steer_analyze``, mode ``"rewrite"`` only): once an
edited row opens ``<analyze>``, the steering text (by default the key of the action the steered
matrix picks under ``rule``, e.g. ``DQ_DA``, as the tokenizer encodes it without special tokens)
is pushed through ``sample_``'s ``forced`` / ``bias_ids`` arguments:

- ``"force"``: the row's next draws are forced to the steering tokens, in sequence, so the block
  opens by naming the chosen key and the model goes on from there;
- ``"bias"``: at every draw inside the block, ``+steer_strength`` is added to the logit (before
  the temperature) of the next steering token the row has not written yet (the first token until
  the row writes it, then the second, ...; a row that wanders off starts again at the first), until
  the key is written in full or ``</analyze>`` closes;
- ``"off"`` (default): no steering; decoding is exactly what it is without the option.

Tokens forced by ``generate(forced_tokens=...)`` take precedence over steering. The log-prob
reported for a steered token is the model's own (``softmax(z / T)``, without the bias or the
forcing: what a trainer recomputes); steered tokens are off-policy draws.

Mode ``"reference"`` reproduces the reference's two calls: decoding stops at ``</payoff>``, the
steered matrix picks an action, and the model is asked again from scratch with the prompt and a
fixed instruction for that action (a second prefill). Mode ``"off"``: plain sampling.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ._sample import sample_
from ._seeds import signed64, splitmix64, step_seed
from .game.chain import format_payoff, parse_payoff
from .game.pricing import ActionChoice, PricingPolicy, choose_action

__all__ = ["SteeringSampler", "SteeringEvent", "GenerationOutput", "ACTION_INSTRUCTIONS"]

MODES = ("rewrite", "reference", "off")
STEER_MODES = ("off", "bias", "force")
OPEN_TAG, CLOSE_TAG = "<payoff>", "</payoff>"
OPEN_ANALYZE, CLOSE_ANALYZE = "<analyze>", "</analyze>"

ACTION_INSTRUCTIONS = {
    "DA": "Answer the question directly.",
    "CQ": "Ask one clarifying question and do not answer yet.",
    "AQ": "Answer the question, then ask one follow-up question.",
}
"""Instructions the ``"reference"`` mode appends to the prompt for the chosen action (override
with ``SteeringSampler(..., action_instructions=...)``)."""


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
class _Steer:
    """Analyze steering of one edited row: aim at ``ids`` once ``<analyze>`` opens."""

    ids: list[int]
    search_from: int  # index in the row's ids where the re-fed tail starts (tags are looked for from there)
    state: str = "waiting"  # "waiting" for <analyze>, "active", "done"
    cursor: int = 0  # steering tokens written so far, in sequence
    draws: int = 0  # draws forced / biased
    status: str = "waiting"  # final word for the event (see SteeringEvent.steer_status)


@dataclass
class _Row:
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
    steer: _Steer | None = None  # analyze steering after an edit


def _check_steering(mode: str, steer_analyze, steer_strength, steer_template) -> None:
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


class SteeringSampler:
    """Batched sampler with in-place payoff steering (see the module docstring).

    Parameters
    ----------
    model : transformers causal LM (``PreTrainedModel`` with a KV cache)
    tokenizer : the model's tokenizer (``encode`` / ``decode``; ``eos_token_id``, ``pad_token_id``)
    policy : PricingPolicy, optional
        Edit applied to every parsed payoff; default: the identity (nothing is ever edited).
    mode : {"rewrite", "reference", "off"}
    rule : str
        Action-choice rule for the events (and the reference mode): see ``choose_action``.
    stop_strings : sequence of str
        A row stops when its text ends with one of these.
    action_instructions : dict, optional
        Per action, the instruction appended to the prompt in mode ``"reference"``.
    backend : str, optional
        Backend of :func:`gtalign_fast.ops.sample_`.
    steer_analyze : {"off", "bias", "force"}
        Logit steering inside ``<analyze>`` after an edit (mode ``"rewrite"`` only; see the module
        docstring): force the steering tokens in sequence, or bias the next one by
        ``steer_strength``. Rows that were not edited are never steered.
    steer_strength : float
        The bias (added to the logit, before the temperature) of mode ``"bias"``; > 0.
    steer_template : str
        The steering text, formatted with the chosen action's ``key`` (``"DQ_DA"``), ``action``
        (``"DA"``) and ``question_type`` (``"DQ"``); default ``"{key}"``. Encoded without special
        tokens.
    """

    def __init__(
        self,
        model,
        tokenizer,
        policy: PricingPolicy | None = None,
        mode: str = "rewrite",
        *,
        rule: str = "nash",
        stop_strings: Sequence[str] = (),
        action_instructions: dict[str, str] | None = None,
        backend: str | None = None,
        steer_analyze: str = "off",
        steer_strength: float = 5.0,
        steer_template: str = "{key}",
    ):
        if mode not in MODES:
            raise ValueError(f"SteeringSampler: mode must be one of {MODES}, got {mode!r}")
        _check_steering(mode, steer_analyze, steer_strength, steer_template)
        if policy is not None and not isinstance(policy, PricingPolicy):
            raise TypeError(f"SteeringSampler: policy must be a PricingPolicy or None, got {type(policy).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.policy = policy if policy is not None else PricingPolicy.identity()
        self.mode = mode
        self.rule = rule
        self.stop_strings = tuple(stop_strings)
        self.action_instructions = dict(ACTION_INSTRUCTIONS if action_instructions is None else action_instructions)
        self.backend = backend
        self.steer_analyze = steer_analyze
        self.steer_strength = float(steer_strength)
        self.steer_template = steer_template
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)

    # -----------------------------------------------------------------------------------------
    # Public API

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_return_sequences: int = 1,
        seed: int | Sequence[int] | None = None,
        *,
        forced_tokens: Sequence[Sequence[int] | None] | None = None,
        keep_edit_logits: bool = False,
    ) -> GenerationOutput:
        """Sample completions; see :class:`GenerationOutput`.

        Parameters
        ----------
        prompts : list of str or list of token-id lists
        max_new_tokens : int
            Draws per row (re-fed payload tokens do not count).
        temperature, top_k, top_p : as in :func:`gtalign_fast.ops.sample_`
        num_return_sequences : int
            Rows per prompt (row ``i * n + j`` is prompt ``i``'s ``j``-th sequence).
        seed : int or list of int, optional
            One int seeds row ``r`` with ``seed + r``; a list gives each row its own seed. A row's
            tokens depend only on its prompt, its seed and the settings, not on the batch.
        forced_tokens : list (per row) of token-id lists or None, optional
            Tokens to emit at a row's first draws (``-1`` = sample that one); for tests and
            scripted prefixes. They go through ``sample_``'s forced-token path.
        keep_edit_logits : bool
            Keep each edited row's next-token logits in its event (for exactness checks).
        """
        if max_new_tokens < 0 or num_return_sequences < 1:
            raise ValueError("SteeringSampler.generate: max_new_tokens must be >= 0 and num_return_sequences >= 1")
        prompt_ids = [self._encode(p) for p in prompts for _ in range(num_return_sequences)]
        n_rows = len(prompt_ids)
        if n_rows == 0:
            raise ValueError("SteeringSampler.generate: no prompts")
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        seeds = [seed + r for r in range(n_rows)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != n_rows:
            raise ValueError(f"SteeringSampler.generate: {len(seeds)} seeds for {n_rows} rows")
        if forced_tokens is not None and len(forced_tokens) != n_rows:
            raise ValueError(
                f"SteeringSampler.generate: forced_tokens has {len(forced_tokens)} entries for {n_rows} rows"
            )
        rows = [
            _Row(prompt_ids=ids, seed=s, forced=None if forced_tokens is None else forced_tokens[r])
            for r, (ids, s) in enumerate(zip(prompt_ids, seeds))
        ]
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        stop_at_payoff = self.mode == "reference"
        prefilled = self._decode_rows(rows, max_new_tokens, settings, keep_edit_logits, stop_at_payoff)
        if self.mode == "reference":
            prefilled += self._reask(rows, max_new_tokens, settings)
        return self._output(rows, prefilled)

    # -----------------------------------------------------------------------------------------
    # Decoding loop

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return [int(t) for t in prompt]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _cache_argument(self) -> str:
        """The name the model's forward takes its KV cache under: transformers 5.2x renamed
        ``past_key_values`` (deprecated, removed in 5.40) to ``cache``; older releases know only
        the first."""
        if not hasattr(self, "_cache_name"):
            forward = getattr(self.model, "module", self.model).forward  # unwrap DDP
            self._cache_name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        return self._cache_name

    def _forward(self, feed, mask, positions, cache):
        name = self._cache_argument()
        out = self.model(input_ids=feed, attention_mask=mask, position_ids=positions, use_cache=True, **{name: cache})
        return out.logits, getattr(out, name)

    def _decode_rows(self, rows: list[_Row], max_new_tokens: int, settings: dict, keep_edit_logits: bool,
                     stop_at_payoff: bool) -> int:
        """Run the decoding loop on ``rows`` in place; returns the tokens prefilled."""
        device = self._device()
        n_rows = len(rows)
        longest = max(len(r.prompt_ids) for r in rows)
        feed = torch.full((n_rows, longest), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((n_rows, longest), dtype=torch.long, device=device)
        for r, row in enumerate(rows):
            feed[r, longest - len(row.prompt_ids):] = torch.tensor(row.prompt_ids, dtype=torch.long)
            mask[r, longest - len(row.prompt_ids):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
        logits, cache = self._forward(feed, mask, positions, None)
        next_logits = logits[:, -1, :].float()
        next_position = [len(row.prompt_ids) for row in rows]
        prefilled = int(mask.sum())
        for row in rows:
            if max_new_tokens == 0:
                row.finished = "length"

        while any(row.finished is None for row in rows):
            active = [r for r, row in enumerate(rows) if row.finished is None]
            tokens, raw, steered = self._sample(rows, active, next_logits, settings)
            feeds: dict[int, tuple[list[int], int]] = {}  # row -> (tokens to feed, first position)
            edited_now: list[int] = []
            for r in active:
                row = rows[r]
                token = int(tokens[r])
                row.ids.append(token)
                row.logprobs.append(float(raw[r]))
                row.positions.append(next_position[r])
                row.slots.append(-1)
                row.steps += 1
                feeds[r] = ([token], next_position[r])
                next_position[r] += 1
                self._follow_steering(row, token, r in steered)
                edit = self._detect(r, row, stop_at_payoff)
                if edit is not None:
                    tail_ids, start = edit
                    feeds[r] = (tail_ids, row.positions[start])
                    edited_now.append(r)
                    self._replace_tail(row, start, tail_ids)
                    row.event.edited_ids = list(row.ids)
                    next_position[r] = row.positions[start] + len(tail_ids) if tail_ids else row.positions[start]
                    self._start_steering(row, start)
                self._check_finished(row, token, max_new_tokens)
            # Rows that just finished need no more logits: feed them nothing.
            for r in list(feeds):
                if rows[r].finished is not None:
                    del feeds[r]
            if not feeds:
                break
            width = max(len(ids) for ids, _ in feeds.values())
            step_feed = torch.full((n_rows, width), self.pad_id, dtype=torch.long, device=device)
            step_mask = torch.zeros((n_rows, width), dtype=torch.long, device=device)
            step_pos = torch.zeros((n_rows, width), dtype=torch.long, device=device)
            first_slot = mask.shape[1]
            for r, (ids, start) in feeds.items():
                step_feed[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                step_mask[r, : len(ids)] = 1
                step_pos[r, : len(ids)] = torch.arange(start, start + len(ids))
                # Record where the fed tokens live in the cache.
                row = rows[r]
                pending = [i for i, s in enumerate(row.slots) if s == -1]
                for k, i in enumerate(pending):
                    row.slots[i] = first_slot + k
            # Hide the cache columns of the tokens an edit removed (the KV entries stay).
            for r, row in enumerate(rows):
                if row.hide:
                    mask[r, row.hide] = 0
                    row.hide = []
            mask = torch.cat([mask, step_mask], dim=1)
            logits, cache = self._forward(step_feed, mask, step_pos, cache)
            prefilled += sum(len(feeds[r][0]) for r in edited_now if rows[r].finished is None)
            for r, (ids, _) in feeds.items():
                next_logits[r] = logits[r, len(ids) - 1].float()
            if keep_edit_logits:
                for r in edited_now:
                    if r in feeds:
                        rows[r].event.next_logits = next_logits[r].clone()
        return prefilled

    def _sample(self, rows, active, next_logits, settings):
        """One draw for every active row; returns (tokens, raw log-probs, rows steered this draw)."""
        device = next_logits.device
        n_rows = len(rows)
        forced = torch.full((n_rows,), -1, dtype=torch.long)
        seeds = torch.zeros((n_rows,), dtype=torch.long)
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
        bias = {}
        if biased:  # only then: rows without a bias get an unused slot (-1), which changes nothing
            bias_ids = torch.full((n_rows, 1), -1, dtype=torch.long)
            for r, target in biased.items():
                bias_ids[r, 0] = target
            bias_values = torch.full((n_rows, 1), self.steer_strength, dtype=torch.float32)
            bias = dict(bias_ids=bias_ids.to(device), bias_values=bias_values.to(device))
        logits = next_logits.clone()  # sample_ works in place; keep next_logits for edits/debugging
        tokens, _, raw = sample_(
            logits, forced=forced.to(device), seed=seeds.to(device), backend=self.backend, **bias, **settings
        )
        return tokens.tolist(), raw.tolist(), steered

    def _check_finished(self, row: _Row, token: int, max_new_tokens: int) -> None:
        if row.finished is not None:
            return
        if token in self.eos_ids:
            row.finished = "eos"
        elif self.stop_strings and any(self.tokenizer.decode(row.ids).endswith(s) for s in self.stop_strings):
            row.finished = "stop"
        elif row.steps >= max_new_tokens:
            row.finished = "length"

    # -----------------------------------------------------------------------------------------
    # The payoff detector and the edit

    def _detect(self, r: int, row: _Row, stop_at_payoff: bool):
        """Return ``(tail_ids, start)`` when this row's payoff must be rewritten now, else None."""
        if row.payoff_done or self.mode == "off":
            return None
        if ">" not in self.tokenizer.decode([row.ids[-1]]):
            return None
        text = self.tokenizer.decode(row.ids)
        close = text.find(CLOSE_TAG)
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

    # -----------------------------------------------------------------------------------------
    # Analyze steering after an edit

    def _start_steering(self, row: _Row, start: int) -> None:
        """Arm steering on a row just edited; ``start`` is where its re-fed tail begins."""
        action = row.event.action
        if self.steer_analyze == "off" or action is None:
            return
        text = self.steer_template.format(key=action.key, action=action.action, question_type=action.question_type)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"SteeringSampler: the steering text {text!r} encodes to no tokens")
        row.steer = _Steer(ids=ids, search_from=start)
        row.event.steer_ids = list(ids)
        self._look_for_analyze(row)  # the re-fed tail may already hold <analyze>

    def _look_for_analyze(self, row: _Row) -> None:
        """Move a row's steering on when ``<analyze>`` opens (start) or ``</analyze>`` closes (stop)."""
        steer = row.steer
        text = self.tokenizer.decode(row.ids[steer.search_from:])
        opened = text.find(OPEN_ANALYZE)
        if opened < 0:
            return
        if text.find(CLOSE_ANALYZE, opened) >= 0:
            steer.state, steer.status = "done", "closed"
        elif steer.state == "waiting":
            steer.state = steer.status = "active"

    def _follow_steering(self, row: _Row, token: int, steered: bool) -> None:
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
        if ">" in self.tokenizer.decode([token]):
            self._look_for_analyze(row)

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

    def _replace_tail(self, row: _Row, start: int, tail_ids: list[int]) -> None:
        """Drop visible tokens from ``start`` (their cache columns get hidden after the next
        forward) and append the re-fed tail, whose positions continue from the old block's start."""
        row.hide = [s for s in row.slots[start:] if s >= 0]
        first_position = row.positions[start]
        del row.ids[start:], row.logprobs[start:], row.positions[start:], row.slots[start:]
        row.ids.extend(tail_ids)
        row.logprobs.extend([float("nan")] * len(tail_ids))
        row.positions.extend(range(first_position, first_position + len(tail_ids)))
        row.slots.extend([-1] * len(tail_ids))

    # -----------------------------------------------------------------------------------------
    # Mode "reference": the second call

    def _reask(self, rows: list[_Row], max_new_tokens: int, settings: dict) -> int:
        second: list[tuple[int, _Row]] = []
        for r, row in enumerate(rows):
            event = row.event
            if row.finished != "payoff" or event is None or event.action is None:
                continue
            instruction = self.action_instructions[event.action.action]
            prompt_text = self.tokenizer.decode(row.prompt_ids) + "\n" + instruction + "\n"
            new_prompt = self._encode(prompt_text)
            second.append((r, _Row(prompt_ids=new_prompt, seed=signed64(splitmix64(row.seed)), forced=None)))
            event.status, event.reason = "reasked", f"second call with the {event.action.action} instruction"
            event.tokens_refed = len(new_prompt)
        if not second:
            for row in rows:
                if row.finished == "payoff":
                    row.finished = "stop"
            return 0
        again = [row for _, row in second]
        prefilled = self._decode_rows(again, max_new_tokens, settings, False, stop_at_payoff=False)
        for (r, new_row) in second:
            old = rows[r]
            old.ids, old.logprobs, old.finished = new_row.ids, new_row.logprobs, new_row.finished
        for row in rows:
            if row.finished == "payoff":
                row.finished = "stop"
        return prefilled

    def _output(self, rows: list[_Row], prefilled: int) -> GenerationOutput:
        events = []
        for r, row in enumerate(rows):
            if row.event is None:
                status = "off" if self.mode == "off" else "no_payoff"
                reason = "mode off" if status == "off" else "no </payoff> closed"
                row.event = SteeringEvent(row=r, status=status, reason=reason)
            if row.steer is not None:
                row.event.steer_draws, row.event.steer_status = row.steer.draws, row.steer.status
            events.append(row.event)
        return GenerationOutput(
            completion_ids=[row.ids for row in rows],
            texts=[self.tokenizer.decode(row.ids) for row in rows],
            logprobs=[row.logprobs for row in rows],
            finish_reasons=[row.finished or "length" for row in rows],
            events=events,
            prompt_ids=[row.prompt_ids for row in rows],
            tokens_prefilled=prefilled,
        )
