"""SteeringSampler: batched decoding on any Hugging Face causal LM that edits the payoff matrix in
place, in one decoding pass.

Decoding keeps a KV cache, left-pads the prompts, and passes explicit ``position_ids`` and a 2-D
attention mask on every call, so that cache slots can be hidden later. A per-row detector follows
the generated text; when a row closes ``</payoff>`` (mode ``"rewrite"``):

1. the block is parsed (:func:`gtalign_fast.game.payoff.parse_payoff`) and the pricing policy
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

Speed without changing a token (``cache``, ``cuda_graph``, ``generate(slots=...)``):

- the row's text is followed incrementally (``detokenize.py``): tags and stop strings are looked
  for in the new token's text, never by decoding the whole row;
- the KV cache is static by default (``static_cache.py``): preallocated for the lanes, the longest
  prompt, ``max_new_tokens`` and room for re-fed blocks, with a visibility mask updated in place
  (hidden payoff columns are masked exactly as in the dynamic cache, positions are the same);
- on CUDA the one-token step (forward + ``sample_`` with the rows' Philox seeds) is a CUDA graph
  (``decode_graph.py``) replayed every plain step; prefill, refills, re-fed payoff blocks and
  biased draws run eagerly; the tokens come back through a pinned buffer once per step;
- with ``slots``, at most that many rows decode at once and a finished row's lane takes the next
  waiting row (its prompt prefilled into the lane's columns), so rows of mixed lengths do not
  keep finished rows in the batch.

The tests check that the static cache, the graph and any slot budget sample the same tokens as the
dynamic eager path for the same seeds (float32 logits equal within 1e-5).

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
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..game.payoff import format_payoff, parse_payoff
from ..game.pricing import ActionChoice, PricingPolicy, choose_action
from ..ops import _device_checks
from ..ops._sample import sample_
from ..ops._seeds import signed64, splitmix64, step_seed
from .decode_graph import GraphedDecodeStep, graph_supported
from .detokenize import IncrementalText, TagScanner, TokenTextCache
from .static_cache import ROOM, DynamicKV, StaticKV, static_cache_support

__all__ = ["SteeringSampler", "SteeringEvent", "GenerationOutput", "ACTION_INSTRUCTIONS"]

MODES = ("rewrite", "reference", "off")
CACHES = ("auto", "static", "dynamic")
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
    text_from: int = 0  # the same place in the row's text
    open_at: int = -1  # where <analyze> opened in the row's text (-1: not yet)
    open_scan: TagScanner | None = None
    close_scan: TagScanner | None = None
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
    index: int = 0  # the row's place in the output
    text: IncrementalText | None = None  # the completion's text, followed token by token while needed
    payoff_scan: TagScanner | None = None  # looks for </payoff>


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
    cache : {"auto", "static", "dynamic"}
        The KV cache (``gtalign_fast/sampling/static_cache.py``): ``"static"`` preallocates it with an
        in-place mask (SDPA attention, full-attention layers; on CUDA the decode step is then
        captured in a CUDA graph), ``"dynamic"`` is the model's ``DynamicCache``. ``"auto"``:
        static where the model supports it (SDPA, full attention), else dynamic. Both give the
        same tokens for the same seeds (logits equal to float32 rounding).
    cuda_graph : bool
        On CUDA with the static cache, replay the one-token decode step (forward + ``sample_``)
        as a CUDA graph (``decode_graph.py``); False: eager steps. Never used on CPU.
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
        cache: str = "auto",
        cuda_graph: bool = True,
    ):
        if mode not in MODES:
            raise ValueError(f"SteeringSampler: mode must be one of {MODES}, got {mode!r}")
        if cache not in CACHES:
            raise ValueError(f"SteeringSampler: cache must be one of {CACHES}, got {cache!r}")
        self._static_unsupported = static_cache_support(getattr(model, "module", model))
        if cache == "static" and self._static_unsupported:
            raise ValueError(f"SteeringSampler: cache='static' cannot run this model: {self._static_unsupported}")
        self.cache = cache
        self.cuda_graph = bool(cuda_graph)
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
        slots: int | None = None,
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
        slots : int, optional
            At most this many rows decode at once; when one finishes (EOS, stop string, length),
            the next waiting row takes its place. Default: all rows at once. The output does not
            depend on it (each row samples from its own seed and sees only its own cache columns).
        """
        if max_new_tokens < 0 or num_return_sequences < 1:
            raise ValueError("SteeringSampler.generate: max_new_tokens must be >= 0 and num_return_sequences >= 1")
        if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
            raise ValueError(f"SteeringSampler.generate: slots must be a positive int or None, got {slots!r}")
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
            _Row(prompt_ids=ids, seed=s, forced=None if forced_tokens is None else forced_tokens[r], index=r)
            for r, (ids, s) in enumerate(zip(prompt_ids, seeds))
        ]
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        stop_at_payoff = self.mode == "reference"
        prefilled = self._decode_rows(rows, max_new_tokens, settings, keep_edit_logits, stop_at_payoff, slots)
        if self.mode == "reference":
            prefilled += self._reask(rows, max_new_tokens, settings, slots)
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

    def _forward(self, feed, mask, positions, cache, keep_last=False):
        """One model forward; ``keep_last``: only the last column's logits are needed (the model
        computes just those where it takes ``logits_to_keep``)."""
        name = self._cache_argument()
        extra = {"logits_to_keep": 1} if keep_last and self._takes_logits_to_keep() else {}
        out = self.model(input_ids=feed, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{name: cache}, **extra)
        return out.logits, getattr(out, name)

    def _takes_logits_to_keep(self) -> bool:
        if not hasattr(self, "_logits_to_keep"):
            forward = getattr(self.model, "module", self.model).forward
            self._logits_to_keep = "logits_to_keep" in inspect.signature(forward).parameters
        return self._logits_to_keep

    def _make_kv(self, lanes: int, prompt_width: int, max_new_tokens: int, device: torch.device):
        """The KV cache of one decoding run (``self.cache``; see static_cache.py)."""
        if self._use_static(device):
            capacity = prompt_width + max_new_tokens + ROOM
            return StaticKV(getattr(self.model, "module", self.model), self._forward, lanes, capacity, device)
        return DynamicKV(self._forward)

    def _use_static(self, device: torch.device) -> bool:
        if self.cache == "dynamic":
            return False
        if self.cache == "static":
            return True  # checked in __init__
        # On CPU too: measured as fast at 32-48 new tokens and 13% faster at 192 (small Qwen2, one
        # thread) than the DynamicCache, whose concatenation copies the whole cache every step.
        return not self._static_unsupported

    def _decode_rows(self, rows: list[_Row], max_new_tokens: int, settings: dict, keep_edit_logits: bool,
                     stop_at_payoff: bool, slots: int | None = None) -> int:
        """Run the decoding loop on ``rows`` in place; returns the tokens prefilled.

        At most ``slots`` rows decode at once (lanes); when a row finishes, its lane takes the next
        waiting row (a prefill of that prompt into the lane's cache columns). A row's tokens do not
        depend on its lane or on when it started."""
        if max_new_tokens == 0:
            for row in rows:
                row.finished = "length"
            return 0
        device = self._device()
        n_lanes = len(rows) if not slots else min(slots, len(rows))
        prompt_width = max(len(r.prompt_ids) for r in rows)  # every prompt of the batch fits these columns
        lane_rows = list(rows[:n_lanes])
        waiting = deque(rows[n_lanes:])
        kv = self._make_kv(n_lanes, prompt_width, max_new_tokens, device)
        feed, mask, positions = self._prompt_batch(lane_rows, prompt_width, device)
        next_logits = kv.prefill(feed, mask, positions)[:, -1, :].float()
        next_position = [len(row.prompt_ids) for row in lane_rows]
        prefilled = sum(len(row.prompt_ids) for row in lane_rows)

        graph = self._make_graph(kv, next_logits, settings, device)
        drawn = None  # the next draw, when the graph made it with the step
        while any(row.finished is None for row in lane_rows):
            active = [lane for lane, row in enumerate(lane_rows) if row.finished is None]
            if drawn is None:
                tokens, raw, steered = self._sample(lane_rows, active, next_logits, settings)
            else:
                tokens, raw, steered = drawn
                drawn = None
            feeds: dict[int, tuple[list[int], int]] = {}  # lane -> (tokens to feed, first position)
            edited_now: list[int] = []
            for lane in active:
                row = lane_rows[lane]
                token = int(tokens[lane])
                row.ids.append(token)
                row.logprobs.append(float(raw[lane]))
                row.positions.append(next_position[lane])
                row.slots.append(-1)
                row.steps += 1
                feeds[lane] = ([token], next_position[lane])
                next_position[lane] += 1
                self._push_text(row)
                self._follow_steering(row, token, lane in steered)
                edit = self._detect(row.index, row, stop_at_payoff)
                if edit is not None:
                    tail_ids, start = edit
                    feeds[lane] = (tail_ids, row.positions[start])
                    edited_now.append(lane)
                    self._replace_tail(row, start, tail_ids)
                    row.event.edited_ids = list(row.ids)
                    next_position[lane] = row.positions[start] + len(tail_ids) if tail_ids else row.positions[start]
                    self._start_steering(row, start)
                self._check_finished(row, token, max_new_tokens)
            # Rows that just finished need no more logits: feed them nothing; their lanes take waiting rows.
            refill = []
            for lane in list(feeds):
                if lane_rows[lane].finished is not None:
                    del feeds[lane]
                    if waiting:
                        lane_rows[lane] = waiting.popleft()
                        refill.append(lane)
            if refill:
                prefilled += self._refill(kv, lane_rows, refill, prompt_width, next_logits, next_position, device)
            if not feeds:
                continue
            # Hide the cache columns of the tokens an edit removed (the KV entries stay).
            for lane, row in enumerate(lane_rows):
                if row.hide:
                    kv.hide(lane, row.hide)
                    row.hide = []
            width = max(len(ids) for ids, _ in feeds.values())
            if kv.make_room(width):
                self._renumber_columns(lane_rows)
            first_slot = kv.next_column
            if graph is not None and width == 1 and not refill and not edited_now:
                drawn = self._graph_step(graph, lane_rows, feeds, first_slot)
                if drawn is not None:
                    continue
            feed_rows = [[self.pad_id] * width for _ in range(n_lanes)]
            mask_rows = [[0] * width for _ in range(n_lanes)]
            position_rows = [[0] * width for _ in range(n_lanes)]
            for lane, (ids, start) in feeds.items():
                feed_rows[lane][: len(ids)] = ids
                mask_rows[lane][: len(ids)] = [1] * len(ids)
                position_rows[lane][: len(ids)] = range(start, start + len(ids))
                # Record where the fed tokens live in the cache (they are the row's last len(ids)).
                row = lane_rows[lane]
                row.slots[len(row.slots) - len(ids):] = range(first_slot, first_slot + len(ids))
            logits = kv.step(*(torch.tensor(x, dtype=torch.long, device=device)
                               for x in (feed_rows, mask_rows, position_rows)))
            prefilled += sum(len(feeds[lane][0]) for lane in edited_now if lane_rows[lane].finished is None)
            if width == 1 and len(feeds) == n_lanes:
                next_logits.copy_(logits[:, -1, :])
            elif width == 1:  # not the lanes fed nothing: a refilled lane holds its prompt's logits
                fed = torch.tensor(list(feeds), dtype=torch.long, device=device)
                next_logits[fed] = logits[fed, -1, :].float()
            else:
                for lane, (ids, _) in feeds.items():
                    next_logits[lane] = logits[lane, len(ids) - 1].float()
            if keep_edit_logits:
                for lane in edited_now:
                    if lane in feeds:
                        lane_rows[lane].event.next_logits = next_logits[lane].clone()
        return prefilled

    def _make_graph(self, kv, next_logits, settings, device):
        """The CUDA-graph decode step of this run, or None (CPU, dynamic cache, turned off, or
        synchronous device checks: they read the error flag after each launch, which a capture refuses)."""
        if not (self.cuda_graph and kv.kind == "static" and graph_supported(device)) or _device_checks._sync_checks:
            return None
        return GraphedDecodeStep(self._forward, kv, next_logits, settings, self.backend)

    def _graph_step(self, graph, lane_rows, feeds, first_slot):
        """Feed one token per fed lane and draw the next tokens in one graph replay; returns the
        draw as :meth:`_sample` does, or None (and does nothing) when a draw needs a logit bias."""
        active = [lane for lane, row in enumerate(lane_rows) if row.finished is None]
        forced, seeds, biased, steered = self._draw_inputs(lane_rows, active)
        if biased:
            return None
        n_lanes = len(lane_rows)
        feed, positions, fed = [self.pad_id] * n_lanes, [0] * n_lanes, [0] * n_lanes
        for lane, (ids, start) in feeds.items():
            feed[lane], positions[lane], fed[lane] = ids[0], start, 1
            lane_rows[lane].slots[-1] = first_slot
        tokens, raw = graph(feed, positions, fed, seeds, forced)
        return tokens, raw, steered

    def _prompt_batch(self, rows: list[_Row], width: int, device: torch.device):
        """Left-padded prompts ``[n, width]``, their mask and positions (0 on the padding)."""
        feed = [[self.pad_id] * (width - len(r.prompt_ids)) + list(r.prompt_ids) for r in rows]
        mask = [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows]
        positions = [[0] * (width - len(r.prompt_ids)) + list(range(len(r.prompt_ids))) for r in rows]
        return tuple(torch.tensor(x, dtype=torch.long, device=device) for x in (feed, mask, positions))

    def _refill(self, kv, lane_rows, lanes, prompt_width, next_logits, next_position, device) -> int:
        """Prefill the new rows of ``lanes`` on their own, then move their keys and values into the
        lanes' columns ``[0, prompt_width)``; returns the prompt tokens prefilled."""
        rows = [lane_rows[lane] for lane in lanes]
        feed, mask, positions = self._prompt_batch(rows, prompt_width, device)
        logits, cache = self._forward(feed, mask, positions, None, True)
        index = torch.tensor(lanes, dtype=torch.long, device=device)
        kv.refill(index, cache, mask)
        next_logits[index] = logits[:, -1, :].float()
        for lane, row in zip(lanes, rows):
            next_position[lane] = len(row.prompt_ids)
        return sum(len(row.prompt_ids) for row in rows)

    @staticmethod
    def _renumber_columns(lane_rows: list[_Row]) -> None:
        """After a compaction lane ``l``'s ``k``-th visible column is column ``k``: the prompt comes
        first, then the row's fed tokens in order."""
        for row in lane_rows:
            column = len(row.prompt_ids)
            for i, s in enumerate(row.slots):
                if s >= 0:
                    row.slots[i] = column
                    column += 1

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
        logits = next_logits.clone()  # sample_ works in place; keep next_logits for edits/debugging
        tokens, _, raw = sample_(
            logits, forced=torch.tensor(forced, dtype=torch.long, device=device),
            seed=torch.tensor(seeds, dtype=torch.long, device=device), backend=self.backend, **bias, **settings
        )
        return tokens.tolist(), raw.tolist(), steered

    def _check_finished(self, row: _Row, token: int, max_new_tokens: int) -> None:
        if row.finished is not None:
            return
        if token in self.eos_ids:
            row.finished = "eos"
        elif self.stop_strings and row.text.text.endswith(self.stop_strings):
            row.finished = "stop"
        elif row.steps >= max_new_tokens:
            row.finished = "length"

    # -----------------------------------------------------------------------------------------
    # The row's text, followed token by token

    def _needs_text(self, row: _Row) -> bool:
        """Whether anything still reads the row's text: stop strings, the payoff detector, or
        analyze steering that has not finished."""
        return bool(self.stop_strings) or (self.mode != "off" and not row.payoff_done) or (
            row.steer is not None and row.steer.state != "done")

    def _push_text(self, row: _Row) -> None:
        """Follow the row's text after a token was appended (O(1) tokenizer work, see detokenize)."""
        if row.text is None:
            if not self._needs_text(row):
                return
            row.text = IncrementalText(self.tokenizer, row.ids[:-1])
            row.payoff_scan = TagScanner(CLOSE_TAG)
        elif not self._needs_text(row):
            return
        row.text.push(self.tokenizer, row.ids)

    def _has_gt(self, token: int) -> bool:
        """Whether ``token`` decoded alone contains ``>`` (every tag ends with one), memoised."""
        cache = getattr(self, "_gt_tokens", None)
        if cache is None or cache.tokenizer is not self.tokenizer:
            cache = self._gt_tokens = TokenTextCache(self.tokenizer, ">")
        return cache(token)

    # -----------------------------------------------------------------------------------------
    # The payoff detector and the edit

    def _detect(self, r: int, row: _Row, stop_at_payoff: bool):
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
        text_from = len(self.tokenizer.decode(row.ids[:start]))
        row.steer = _Steer(ids=ids, search_from=start, text_from=text_from,
                           open_scan=TagScanner(OPEN_ANALYZE, text_from))
        row.event.steer_ids = list(ids)
        self._look_for_analyze(row)  # the re-fed tail may already hold <analyze>

    def _look_for_analyze(self, row: _Row) -> None:
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
        if self._has_gt(token):
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
        if row.text is not None:  # the ids changed in the middle: one full decode, once per edit
            row.text.reset(self.tokenizer, row.ids)

    # -----------------------------------------------------------------------------------------
    # Mode "reference": the second call

    def _reask(self, rows: list[_Row], max_new_tokens: int, settings: dict, slots: int | None) -> int:
        second: list[tuple[int, _Row]] = []
        for r, row in enumerate(rows):
            event = row.event
            if row.finished != "payoff" or event is None or event.action is None:
                continue
            instruction = self.action_instructions[event.action.action]
            prompt_text = self.tokenizer.decode(row.prompt_ids) + "\n" + instruction + "\n"
            new_prompt = self._encode(prompt_text)
            second.append((r, _Row(prompt_ids=new_prompt, seed=signed64(splitmix64(row.seed)), forced=None, index=r)))
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
