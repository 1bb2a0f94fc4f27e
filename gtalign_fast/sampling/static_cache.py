"""KV caches of the SteeringSampler: the Hugging Face ``DynamicCache`` (grows by concatenation)
and a preallocated static cache with a boolean visibility mask updated in place.

Both keep the sampler's cache layout: one column per fed token, allocated in lockstep for every
lane (a step that feeds ``w`` tokens to some lane takes ``w`` columns in every lane, padding
masked), so a column's index is its order in the cache. A query at column ``c`` sees the columns
``j <= c`` of its own lane that are visible: the prompt (left-padded), the tokens fed since, minus
the columns an edit hid. Positions are passed explicitly, keys are stored after RoPE, so a column
may be moved (compaction) or rewritten (a lane refilled with a new prompt) without changing what
any query computes.

:class:`StaticKV` preallocates ``[lanes, kv_heads, capacity, head_dim]`` per layer
(``capacity`` = longest prompt + ``max_new_tokens`` + room for re-fed payoff blocks), writes each
step's keys at the cursor with ``index_copy_`` and passes the model a 4-D boolean mask built from
the visibility mask (SDPA attention), so no tensor changes shape or address from one decode step
to the next: what a CUDA graph needs (``decode_graph.py``; eager steps attend over the columns in
use only, views of the buffers). When the cursor reaches the end, the
visible columns of every lane are gathered to the front (on the device, in place); only when that
frees too little is the cache reallocated larger.

The static cache's prefill packs the batch's distinct prompts end to end in one row, without
padding (:func:`pack_prompts`, :meth:`StaticKV.prefill_packed`): the tokens every prompt starts
with come first, once; a block mask lets each prompt's tokens see that prefix and their own
earlier tokens; the keys and values are then scattered into the lanes' columns (a lane: the
prefix, padding, its prompt's other tokens), where the decode steps find them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DynamicKV", "StaticKV", "static_cache_support", "pack_prompts", "PackedChunk", "ROOM",
           "PACKED_PREFILL_TOKENS"]

ROOM = 128
"""Columns reserved beyond ``longest prompt + max_new_tokens`` for re-fed payoff blocks."""

PACKED_PREFILL_TOKENS = 2048
"""Tokens of one packed prefill forward at most (its mask is ``[tokens, tokens]``); a prompt
longer than that runs in a forward of its own."""


@dataclass
class PackedChunk:
    """One forward of a packed prefill (:meth:`StaticKV.prefill_packed`): prompts end to end in
    one row, no padding.

    Attributes
    ----------
    feed, positions : [1, T] int64
        The tokens (the common prefix first, in the first chunk) and their positions.
    mask : [1, 1, T, prefix_columns + T] bool
        Token ``i`` sees the cached prefix columns, and the chunk's tokens ``j <= i`` of the
        prefix or of its own prompt.
    last : [n] int64
        Each of the chunk's prompts' last token (its logits are the first draw's).
    tokens, lanes, columns : [D] int64
        Where the keys and values go: token ``tokens[d]`` into lane ``lanes[d]``, column ``columns[d]``.
    prefix_columns : int
        The prefix's columns that the chunk reads from the cache (0 in the chunk that computes it).
    """

    feed: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor
    tokens: torch.Tensor
    lanes: torch.Tensor
    columns: torch.Tensor
    prefix_columns: int


def _chunks_of(prompts: list[list[int]], common: int) -> list[list[int]]:
    """The prompts' indices in order, split greedily into chunks of at most
    ``PACKED_PREFILL_TOKENS`` tokens (the first also holds the ``common`` prefix)."""
    chunks: list[list[int]] = [[]]
    size = common
    for index, prompt in enumerate(prompts):
        own = len(prompt) - common
        if chunks[-1] and size + own > PACKED_PREFILL_TOKENS:
            chunks.append([])
            size = 0
        chunks[-1].append(index)
        size += own
    return chunks


def pack_prompts(prompts: list[list[int]], lane_prompt: list[int], common: int, width: int,
                 device: torch.device) -> list[PackedChunk]:
    """The packed prefill of the distinct ``prompts`` into lanes (lane ``l`` takes prompt
    ``lane_prompt[l]``): the ``common`` first tokens (every prompt's) once, into columns
    ``[0, common)`` of every lane; each prompt's other tokens once, into the columns ending at
    ``width`` of each lane that takes it. Every prompt needs a token after the prefix."""
    lanes_of: dict[int, list[int]] = defaultdict(list)
    for lane, prompt in enumerate(lane_prompt):
        lanes_of[prompt].append(lane)
    chunks = []
    for number, group in enumerate(_chunks_of(prompts, common)):
        feed, positions, segment, last, tokens, lanes, columns = [], [], [], [], [], [], []
        if number == 0 and common:  # the prefix, segment -1: seen by every prompt
            feed += prompts[0][:common]
            positions += range(common)
            segment += [-1] * common
            for lane in range(len(lane_prompt)):
                tokens += range(common)
                lanes += [lane] * common
                columns += range(common)
        for index in group:
            own, start = prompts[index][common:], len(feed)
            feed += own
            positions += range(common, common + len(own))
            segment += [index] * len(own)
            last.append(len(feed) - 1)
            for lane in lanes_of[index]:
                tokens += range(start, start + len(own))
                lanes += [lane] * len(own)
                columns += range(width - len(own), width)
        chunks.append(_packed_chunk(feed, positions, segment, last, tokens, lanes, columns,
                                    0 if number == 0 else common, device))
    return chunks


def _packed_chunk(feed, positions, segment, last, tokens, lanes, columns, prefix_columns, device) -> PackedChunk:
    def long(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    seg, order = long(segment), torch.arange(len(feed), device=device)
    own = (order[None, :] <= order[:, None]) & ((seg[None, :] == seg[:, None]) | (seg[None, :] == -1))
    seen_prefix = torch.ones((len(feed), prefix_columns), dtype=torch.bool, device=device)
    mask = torch.cat([seen_prefix, own], dim=1)[None, None]
    return PackedChunk(long([feed]), long([positions]), mask, long(last), long(tokens), long(lanes), long(columns),
                       prefix_columns)


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def static_cache_support(model: Any) -> str:
    """``""`` when :class:`StaticKV` can run ``model``, else why not (for the error message)."""
    try:
        from transformers.cache_utils import Cache, StaticLayer  # noqa: F401
    except ImportError:  # pragma: no cover - transformers 4.x
        return "this transformers has no layered StaticLayer cache (transformers >= 5 needed)"
    if getattr(model, "config", None) is None:
        return "the model has no config"
    config = _text_config(model)
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    if attention != "sdpa":
        return f"the model's attention is {attention!r}; the static cache passes a 4-D boolean mask, which needs 'sdpa'"
    layer_types = getattr(config, "layer_types", None) or ()
    if any(kind != "full_attention" for kind in layer_types) or getattr(config, "use_sliding_window", False):
        return "the model has sliding-window or linear-attention layers; the static cache holds full attention only"
    if getattr(config, "num_hidden_layers", None) is None:
        return "the model config has no num_hidden_layers"
    return ""


class DynamicKV:
    """Today's path: the model's own ``DynamicCache`` and a 2-D mask that grows by one
    concatenation per step (the model builds its 4-D mask from it)."""

    kind = "dynamic"

    def __init__(self, forward) -> None:
        self._forward = forward  # (feed, mask, positions, cache, keep_last) -> (logits, cache)
        self.cache = None
        self.mask: torch.Tensor | None = None

    @property
    def next_column(self) -> int:
        return self.mask.shape[1]

    def prefill(self, feed: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                share: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompts ``feed`` ``[n, P]``; ``share`` ``[lanes]``: lane ``l`` takes prompt
        ``share[l]`` (its keys, values, mask and logits are copied), None: one prompt per lane."""
        logits, self.cache = self._forward(feed, mask, positions, None, True)
        if share is not None:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, share), layer.values.index_select(0, share)
            mask, logits = mask.index_select(0, share), logits.index_select(0, share)
        self.mask = mask
        return logits

    def hide(self, lane: int, columns: list[int]) -> None:
        self.mask[lane, columns] = 0

    def make_room(self, width: int) -> bool:
        return False  # grows on its own

    def step(self, feed: torch.Tensor, feed_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, feed_mask], dim=1)
        logits, self.cache = self._forward(feed, self.mask, positions, self.cache, feed.shape[1] == 1)
        return logits

    def refill(self, lanes: torch.Tensor, cache: Any, mask: torch.Tensor) -> None:
        """Put freshly prefilled prompts (``cache``: their own cache, ``mask.shape[1]`` columns)
        into ``lanes`` at columns ``[0, P)``; the lanes' other columns are hidden."""
        width = mask.shape[1]
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys[lanes, :, :width] = theirs.keys
            mine.values[lanes, :, :width] = theirs.values
        self.mask[lanes] = 0
        self.mask[lanes, :width] = mask.to(self.mask.dtype)


def _slot_cache(config: Any, owner: "StaticKV"):
    """A transformers ``Cache`` whose layers write at ``owner.write_columns`` (set before each
    forward) into preallocated buffers and return them whole."""
    from transformers.cache_utils import Cache, StaticLayer

    class SlotLayer(StaticLayer):
        def __init__(self) -> None:
            super().__init__(max_cache_len=owner.capacity)
            self.keys = self.values = None

        def update(self, key_states, value_states, *args, **kwargs):
            if self.keys is None:  # shapes and dtype come from the first forward (autocast included)
                shape = (owner.lanes, key_states.shape[1], owner.capacity)
                self.keys = key_states.new_zeros(shape + key_states.shape[3:])
                self.values = value_states.new_zeros(shape + value_states.shape[3:])
                self.is_initialized = True
            if owner.packed is not None:  # a packed prefill: scatter the sequence's tokens into the lanes
                chunk = owner.packed
                for buffer, states in ((self.keys, key_states), (self.values, value_states)):
                    buffer[chunk.lanes, :, chunk.columns] = states[0].index_select(1, chunk.tokens).transpose(0, 1)
                if not chunk.prefix_columns:
                    return key_states, value_states
                # a later chunk: the common prefix (lane 0's first columns, the same in every lane), then its own tokens
                prefix = slice(0, chunk.prefix_columns)
                return (torch.cat([self.keys[:1, :, prefix], key_states], dim=2),
                        torch.cat([self.values[:1, :, prefix], value_states], dim=2))
            self.keys.index_copy_(2, owner.write_columns, key_states)
            self.values.index_copy_(2, owner.write_columns, value_states)
            if owner.kv_length == owner.capacity:
                return self.keys, self.values
            # eager steps attend over the columns in use only (views, no copy)
            return self.keys[:, :, : owner.kv_length], self.values[:, :, : owner.kv_length]

        def get_seq_length(self) -> int:
            return owner.cursor

        def get_max_length(self) -> int:
            return owner.capacity

        def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
            return owner.kv_length, 0

    class SlotCache(Cache):
        def __init__(self) -> None:
            super().__init__(layers=[SlotLayer() for _ in range(config.num_hidden_layers)])

    return SlotCache()


class StaticKV:
    """Preallocated KV cache with an in-place visibility mask (see the module docstring).

    Parameters
    ----------
    model : the causal LM (its text config sizes the layers)
    forward : callable ``(feed, mask4d, positions, cache, keep_last) -> (logits, cache)``
    lanes : int
        Rows decoded at once.
    capacity : int
        Columns preallocated.
    device : torch.device
    native : NativeDecodeStep, optional
        Runs the one-token steps it can (``native_decode.py``) instead of ``forward``.
    """

    kind = "static"

    def __init__(self, model: Any, forward, lanes: int, capacity: int, device: torch.device, native=None) -> None:
        self._forward = forward
        self.lanes, self.capacity, self.device = lanes, capacity, device
        self.cache = _slot_cache(_text_config(model), self)
        self.visible = torch.zeros((lanes, capacity), dtype=torch.bool, device=device)
        self.columns = torch.arange(capacity, device=device)
        self.reset(native)  # the run state: cursor, widths, write columns (the buffers come with the prefill)
        self.generation = 0  # bumped when the buffers are reallocated (a captured graph is then stale)
        self.packed: PackedChunk | None = None  # during a packed prefill: where the chunk's tokens go
        # What a later run on this cache reuses (SteeringSampler(keep_cache=...)): its key
        # (engine._cache_key), the next-token logits buffer and the decode step captured on both.
        self.key: tuple | None = None
        self.next_logits: torch.Tensor | None = None
        self.graph = None

    @property
    def next_column(self) -> int:
        return self.cursor

    def attention_mask(self, width: int, visible: torch.Tensor | None = None) -> torch.Tensor:
        """``[lanes, 1, width, kv_length]`` bool: query ``i`` (column ``cursor + i``) sees column ``j``
        when ``j`` is visible in its lane and ``j <= cursor + i`` (``visible``: other rows' visibility
        ``[n, >= kv_length]`` instead of the lanes')."""
        visible = self.visible if visible is None else visible
        queries = self.write_columns[:, None]
        columns = self.columns[: self.kv_length]
        return (visible[:, None, : self.kv_length] & (columns[None, :] <= queries)[None])[:, None]

    def _run(self, feed, feed_mask, positions, keep_last) -> torch.Tensor:
        width = feed.shape[1]
        self.kv_length = self.cursor + width
        self.write_columns = self.columns[self.cursor: self.cursor + width]
        self.visible[:, self.cursor: self.cursor + width] = feed_mask.bool()
        if self._native is not None and self.cursor > 0 and self._native.usable(feed):
            logits = self._native(feed, positions, self)  # the buffers exist: the prefill made them
        else:
            logits, _ = self._forward(feed, self.attention_mask(width), positions, self.cache, keep_last)
        self.cursor += width
        return logits

    def prefill_packed(self, prompts: list[list[int]], lane_prompt: list[int], common: int, width: int) -> torch.Tensor:
        """Prefill the lanes from column 0 without padding (module docstring): the distinct
        ``prompts``' tokens in one sequence (chunks of at most ``PACKED_PREFILL_TOKENS``), their
        ``common`` first tokens once; lane ``l`` takes prompt ``lane_prompt[l]``. A lane's columns
        are then the prefix ``[0, common)``, padding (hidden), its prompt's other tokens ending at
        column ``width``. Returns the lanes' next-token logits ``[lanes, vocab]`` float32."""
        last_logits: list[torch.Tensor] = []
        for chunk in pack_prompts(prompts, lane_prompt, common, width, self.device):
            self.kv_length = chunk.prefix_columns + chunk.feed.shape[1]
            self.packed = chunk
            try:
                logits, _ = self._forward(chunk.feed, chunk.mask, chunk.positions, self.cache, chunk.last)
            finally:
                self.packed = None
            if logits.shape[1] != chunk.last.numel():  # a model without logits_to_keep: every column's logits
                logits = logits.index_select(1, chunk.last)
            last_logits.append(logits[0].float())
        for lane, prompt in enumerate(lane_prompt):
            self.visible[lane, :common] = True
            self.visible[lane, width - (len(prompts[prompt]) - common): width] = True
        self.cursor = self.prompt_width = width
        return torch.cat(last_logits).index_select(0, torch.tensor(lane_prompt, device=self.device))

    def reset(self, native=None) -> None:
        """The run state of a new cache, or a used one made ready for a new run, in place (no
        address changes: a decode step captured on it stays valid): every column hidden and
        zeroed, the cursor at column 0; ``native``: this run's native step (checked per run)."""
        self._native = native
        self.cursor = self.prompt_width = 0
        self.kv_length = self.capacity  # columns the attention reads: all in a graph, those in use in eager steps
        self.write_columns = self.columns[:1]
        self.visible.zero_()
        for layer in self.cache.layers:
            if layer.keys is not None:
                layer.keys.zero_()
                layer.values.zero_()

    def adopt_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The run's next-token logits buffer ``[lanes, vocab]`` float32: the one an earlier run
        left (a step captured on this cache writes it), refilled with ``logits``, else ``logits``."""
        if self.next_logits is None or self.next_logits.shape != logits.shape:
            self.next_logits, self.graph = logits, None
        else:
            self.next_logits.copy_(logits)
        return self.next_logits

    def hide(self, lane: int, columns: list[int]) -> None:
        self.visible[lane, columns] = False

    def step(self, feed: torch.Tensor, feed_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._run(feed, feed_mask, positions, feed.shape[1] == 1)

    def refill(self, lanes: torch.Tensor, cache: Any, mask: torch.Tensor) -> None:
        """As :meth:`DynamicKV.refill` (``mask.shape[1]`` is the prefill width, ``<= cursor``)."""
        width = mask.shape[1]
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys[lanes, :, :width] = theirs.keys.to(mine.keys.dtype)
            mine.values[lanes, :, :width] = theirs.values.to(mine.values.dtype)
        self.visible[lanes] = False
        self.visible[lanes, :width] = mask.bool()

    def make_room(self, width: int) -> bool:
        """Ensure ``width`` free columns at the cursor. Returns True when the visible columns were
        compacted (lane ``l``'s ``k``-th visible column is now column ``k``), so the caller renumbers
        its columns; reallocation keeps the numbering."""
        if self.cursor + width <= self.capacity:
            return False
        counts = self.visible.sum(dim=1)
        used = max(int(counts.max()), self.prompt_width)  # one host sync, once per compaction
        if used + width <= self.capacity - width:  # compaction frees enough (and some to spare)
            order = torch.argsort((~self.visible).to(torch.int8), dim=1, stable=True)  # visible first, in order
            for layer in self.cache.layers:
                for buffer in (layer.keys, layer.values):
                    index = order[:, None, :, None].expand_as(buffer)
                    buffer.copy_(buffer.gather(2, index))  # in place: a captured graph stays valid
            self.visible.copy_(self.columns[None, :] < counts[:, None])
            self.cursor = used
            return True
        self._grow(max(2 * self.capacity, self.cursor + width + ROOM))
        return False

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                buffer = getattr(layer, name)
                bigger = buffer.new_zeros(buffer.shape[:2] + (capacity,) + buffer.shape[3:])
                bigger[:, :, :old] = buffer
                setattr(layer, name, bigger)
            layer.max_cache_len = capacity
        visible = torch.zeros((self.lanes, capacity), dtype=torch.bool, device=self.device)
        visible[:, :old] = self.visible
        self.visible, self.capacity = visible, capacity
        self.columns = torch.arange(capacity, device=self.device)
        self.generation += 1
