"""The batching engine: the decoding loop of :class:`~gtalign_fast.sampling.sampler.SteeringSampler`.

Prompts are prefilled together (the static cache packs them end to end, the dynamic one
left-pads them); every step feeds each lane its own list of tokens (one sampled token, a re-fed
payoff tail, or nothing once finished) with explicit positions and a mask, so cache columns can be
hidden later. With ``slots`` a finished row's lane takes the next
waiting row. The KV cache is static (``static_cache.py``) or dynamic; on CUDA the plain one-token
step is a CUDA graph (``decode_graph.py``). The row's text is followed incrementally
(``detokenize.py``) for the payoff detector, analyze steering and stop strings.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import deque

import torch

from ..ops import _device_checks
from .decode_graph import GraphedDecodeStep, graph_supported
from .detokenize import IncrementalText, TagScanner, TokenTextCache
from .fast_decode import DecodeLinears
from .native_decode import NativeDecodeStep, native_decode_support
from .payoff_edit import CLOSE_TAG
from .rows import RowState
from .static_cache import ROOM, DynamicKV, StaticKV

__all__ = ["DecodeEngine", "shared_prefix_length", "CAPACITY_STEP"]

CAPACITY_STEP = 128
"""The static cache's columns are rounded up to a multiple of this, so that the next ``generate``
call with prompts of about the same length finds the same shape and reuses the kept cache."""


def _cache_key(model, lanes: int, capacity: int, device: torch.device) -> tuple:
    """What a kept static cache (and the decode step captured on it) depends on: its shape, the
    forward's dtype (autocast), the training mode (dropout) and where the weights live (a captured
    step reads them by address; an in-place optimizer step keeps them)."""
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    weights = tuple(p.data_ptr() for p in model.parameters())
    return lanes, capacity, str(device), autocast, model.training, weights


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """The tokens every prompt starts with, at most the shortest prompt's length minus one (each
    prompt keeps a token of its own, whose forward gives the row's first logits); 0 for fewer than
    two prompts. The packed prefill runs them once whatever their number: it costs no extra forward."""
    if len(prompts) < 2:
        return 0
    first, length = prompts[0], min(map(len, prompts)) - 1
    return next((i for i in range(length) if any(p[i] != first[i] for p in prompts[1:])), max(length, 0))


class DecodeEngine:
    """The decoding loop (a mixin of :class:`~gtalign_fast.sampling.sampler.SteeringSampler`; it
    reads the sampler's model, tokenizer and settings and calls its draw, payoff and steering
    methods)."""

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return [int(t) for t in prompt]

    def _decode_linears(self):
        """While decoding on the CPU with ``decode_kernel``: the model's linear layers on the decode
        kernel (``fast_decode.py``); else nothing changes."""
        if self.decode_kernel and self._device().type == "cpu":
            return DecodeLinears(getattr(self.model, "module", self.model))
        return contextlib.nullcontext()

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

    def _forward(self, feed, mask, positions, cache, keep=False):
        """One model forward. ``keep``: True, only the last column's logits are needed; a [n] int64
        tensor, only those columns' (the model computes just those where it takes
        ``logits_to_keep``, else all of them)."""
        name = self._cache_argument()
        wanted = 1 if keep is True else keep
        extra = {"logits_to_keep": wanted} if wanted is not False and self._takes_logits_to_keep() else {}
        out = self.model(input_ids=feed, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{name: cache}, **extra)
        return out.logits, getattr(out, name)

    def _takes_logits_to_keep(self) -> bool:
        if not hasattr(self, "_logits_to_keep"):
            forward = getattr(self.model, "module", self.model).forward
            self._logits_to_keep = "logits_to_keep" in inspect.signature(forward).parameters
        return self._logits_to_keep

    def _make_kv(self, lanes: int, prompt_width: int, max_new_tokens: int, device: torch.device):
        """The KV cache of one decoding run (``self.cache``; see static_cache.py). A static cache
        kept from an earlier run (``keep_cache``) is reset and reused when the lanes, the columns
        (rounded up to ``CAPACITY_STEP``), the device, autocast, training mode and the weights'
        storage are the same; its captured decode step then stays valid."""
        if not self._use_static(device):
            return DynamicKV(self._forward)
        capacity = -(-(prompt_width + max_new_tokens + ROOM) // CAPACITY_STEP) * CAPACITY_STEP
        model = getattr(self.model, "module", self.model)
        native = self._native_step(model, device)
        key = _cache_key(model, lanes, capacity, device)
        kept, self._kept_kv = self._kept_kv, None  # taken: a concurrent call would make its own
        if kept is not None and kept.key == key:
            kept.reset(native)
            return kept
        kv = StaticKV(model, self._forward, lanes, capacity, device, native=native)
        kv.key = key
        return kv

    def _keep(self, kv) -> None:
        """Keep a static cache for the next run (``keep_cache``; None: where a step was captured on
        it), unless it grew (its shape is not the one its key names)."""
        if kv.kind != "static" or kv.generation != 0:
            return
        if self.keep_cache or (self.keep_cache is None and kv.graph is not None):
            self._kept_kv = kv

    def release_cache(self) -> None:
        """Free the static KV cache (and captured decode step) kept for the next ``generate`` call."""
        self._kept_kv = None

    def _native_step(self, model, device: torch.device) -> NativeDecodeStep | None:
        """The native one-token step (``native_decode.py``) when ``native_decode`` is on, the model
        is supported and decoding runs on the CPU; else None (the model's forward). Support is
        checked again per run: adapters or hooks added since the sampler was built turn it off
        (or raise, where ``native_decode=True`` asked for it)."""
        if not self.native_decode or device.type != "cpu":
            return None
        why = native_decode_support(model)
        if why and self._native_decode_required:
            raise ValueError(f"SteeringSampler: native_decode=True, but {why}")
        return None if why else NativeDecodeStep(model)

    def _use_static(self, device: torch.device) -> bool:
        if self.cache == "dynamic":
            return False
        if self.cache == "static":
            return True  # checked in __init__
        # On CPU too: measured as fast at 32-48 new tokens and 13% faster at 192 (small Qwen2, one
        # thread) than the DynamicCache, whose concatenation copies the whole cache every step.
        return not self._static_unsupported

    def _decode_rows(self, rows: list[RowState], max_new_tokens: int, settings: dict, keep_edit_logits: bool,
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
        next_logits, prefilled = self._prefill(kv, lane_rows, prompt_width, device)
        if kv.kind == "static":
            next_logits = kv.adopt_logits(next_logits)  # a reused cache's buffer: its captured step writes it
        next_position = [len(row.prompt_ids) for row in lane_rows]

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
        self._keep(kv)
        return prefilled

    def _prefill(self, kv, lane_rows: list[RowState], width: int, device: torch.device):
        """Prefill the lanes' prompts, each distinct prompt once: lanes that share one (the
        ``num_return_sequences`` rows of a prompt, GRPO's group) get copies of its keys, values and
        last logits (a row's forward does not depend on the other rows of its batch). The static
        cache packs the prompts without padding and runs the tokens they all start with once
        (``shared_prefix_length``, ``StaticKV.prefill_packed``); a lane's columns are then that
        prefix, padding, the rest of its prompt. Returns the lanes' next-token logits
        ``[lanes, vocab]`` float32 and the prompt tokens run."""
        distinct: dict[tuple[int, ...], int] = {}
        for row in lane_rows:
            distinct.setdefault(tuple(row.prompt_ids), len(distinct))
        prompts = [list(ids) for ids in distinct]
        lane_prompt = [distinct[tuple(row.prompt_ids)] for row in lane_rows]
        if kv.kind == "static":
            common = shared_prefix_length(prompts) if self.share_prompt_prefix else 0
            logits = kv.prefill_packed(prompts, lane_prompt, common, width)
            return logits, common + sum(len(p) - common for p in prompts)
        feed, mask, positions = self._prompt_batch(prompts, width, device)
        share = None if len(prompts) == len(lane_rows) else torch.tensor(lane_prompt, device=device)
        logits = kv.prefill(feed, mask, positions, share)
        return logits[:, -1, :].float(), sum(map(len, prompts))

    def _make_graph(self, kv, next_logits, settings, device):
        """The CUDA-graph decode step of this run, or None (CPU, dynamic cache, turned off, or
        synchronous device checks: they read the error flag after each launch, which a capture refuses)."""
        if not (self.cuda_graph and kv.kind == "static" and graph_supported(device)) or _device_checks._sync_checks:
            return None
        graph = kv.graph
        if graph is not None and graph.next_logits is next_logits and graph.backend == self.backend:
            graph.set_settings(settings)  # a reused cache's step: captured once, replayed in this run too
        else:
            graph = kv.graph = GraphedDecodeStep(self._forward, kv, next_logits, settings, self.backend,
                                                 self.graph_stats)
        return graph

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

    def _prompt_batch(self, prompts: list[list[int]], width: int, device: torch.device):
        """Left-padded prompts ``[n, width]``, their mask and positions (0 on the padding)."""
        feed = [[self.pad_id] * (width - len(p)) + list(p) for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        positions = [[0] * (width - len(p)) + list(range(len(p))) for p in prompts]
        return tuple(torch.tensor(x, dtype=torch.long, device=device) for x in (feed, mask, positions))

    def _refill(self, kv, lane_rows, lanes, prompt_width, next_logits, next_position, device) -> int:
        """Prefill the new rows of ``lanes`` on their own, then move their keys and values into the
        lanes' columns ``[0, prompt_width)``; returns the prompt tokens prefilled."""
        rows = [lane_rows[lane] for lane in lanes]
        feed, mask, positions = self._prompt_batch([row.prompt_ids for row in rows], prompt_width, device)
        logits, cache = self._forward(feed, mask, positions, None, True)
        index = torch.tensor(lanes, dtype=torch.long, device=device)
        kv.refill(index, cache, mask)
        next_logits[index] = logits[:, -1, :].float()
        for lane, row in zip(lanes, rows):
            next_position[lane] = len(row.prompt_ids)
        return sum(len(row.prompt_ids) for row in rows)

    @staticmethod
    def _renumber_columns(lane_rows: list[RowState]) -> None:
        """After a compaction lane ``l``'s ``k``-th visible column is column ``k``: the prompt comes
        first, then the row's fed tokens in order."""
        for row in lane_rows:
            column = len(row.prompt_ids)
            for i, s in enumerate(row.slots):
                if s >= 0:
                    row.slots[i] = column
                    column += 1

    def _check_finished(self, row: RowState, token: int, max_new_tokens: int) -> None:
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

    def _needs_text(self, row: RowState) -> bool:
        """Whether anything still reads the row's text: stop strings, the payoff detector, or
        analyze steering that has not finished."""
        return bool(self.stop_strings) or (self.mode != "off" and not row.payoff_done) or (
            row.steer is not None and row.steer.state != "done")

    def _push_text(self, row: RowState) -> None:
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
