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
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DynamicKV", "StaticKV", "static_cache_support", "ROOM"]

ROOM = 128
"""Columns reserved beyond ``longest prompt + max_new_tokens`` for re-fed payoff blocks."""


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
            if owner.share is not None:  # a shared prefill: rows of distinct prompts, copied into the lanes
                self.keys.index_copy_(2, owner.write_columns, key_states.index_select(0, owner.share))
                self.values.index_copy_(2, owner.write_columns, value_states.index_select(0, owner.share))
                if owner.cursor == 0:  # the prompts' own keys are all they see
                    return key_states, value_states
                # after a shared prefix (the same in every lane: lane 0's), then their own keys
                rows, start = key_states.shape[0], owner.cursor
                prefix_keys = self.keys[:1, :, :start].expand(rows, -1, -1, -1)
                prefix_values = self.values[:1, :, :start].expand(rows, -1, -1, -1)
                return torch.cat([prefix_keys, key_states], dim=2), torch.cat([prefix_values, value_states], dim=2)
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
        self._native = native
        self.lanes, self.capacity, self.device = lanes, capacity, device
        self.cursor = 0
        self.prompt_width = 0
        self.cache = _slot_cache(_text_config(model), self)
        self.visible = torch.zeros((lanes, capacity), dtype=torch.bool, device=device)
        self.columns = torch.arange(capacity, device=device)
        self.write_columns = self.columns[:1]
        self.kv_length = capacity  # columns the attention reads: all in a graph, those in use in eager steps
        self.generation = 0  # bumped when the buffers are reallocated (a captured graph is then stale)
        self.share: torch.Tensor | None = None  # during a shared prefill: the prompt of each lane

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

    def prefill_prefix(self, feed: torch.Tensor) -> None:
        """Run ``feed`` ``[1, c]``, the tokens every prompt starts with (positions ``0..c-1``), once
        and write their keys and values into the columns ``[0, c)`` of every lane; the prompts'
        other tokens then go through :meth:`prefill`, which starts at column ``c``."""
        width = feed.shape[1]
        self._shared_forward(feed, torch.ones_like(feed), torch.arange(width, device=feed.device)[None],
                             torch.zeros(self.lanes, dtype=torch.long, device=feed.device))

    def prefill(self, feed: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                share: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`DynamicKV.prefill`, from the cursor (column 0, or after :meth:`prefill_prefix`);
        a shared prefill writes each prompt's keys and values into the columns of every lane that
        takes it, in the same forward."""
        self.prompt_width = self.cursor + feed.shape[1]
        if share is None:
            return self._run(feed, mask, positions, True)
        return self._shared_forward(feed, mask, positions, share).index_select(0, share)

    def _shared_forward(self, feed, mask, positions, share) -> torch.Tensor:
        """The forward of ``feed`` ``[n, w]`` (distinct prompts, or their parts after the prefix)
        at columns ``[cursor, cursor + w)``; lane ``l`` takes row ``share[l]``. Returns the rows'
        last logits ``[n, 1, vocab]``."""
        start, width = self.cursor, feed.shape[1]
        self.kv_length, self.write_columns = start + width, self.columns[start: start + width]
        self.visible[:, start: start + width] = mask.bool().index_select(0, share)
        rows_visible = torch.cat([self.visible[:1, :start].expand(feed.shape[0], -1), mask.bool()], dim=1)
        self.share = share
        try:
            logits, _ = self._forward(feed, self.attention_mask(width, rows_visible), positions, self.cache, True)
        finally:
            self.share = None
        self.cursor = start + width
        return logits

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
