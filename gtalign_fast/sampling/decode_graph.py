"""The SteeringSampler's one-token decode step as a CUDA graph (CUDA only).

On a GPU a small model's decode step is dominated by kernel launches: a 0.5B model launches
hundreds of kernels per token, each a few microseconds of Python and driver work. With the
static cache (``static_cache.StaticKV``) nothing in a width-1 step changes shape or address, so
the step, model forward and ``sample_`` with the rows' Philox seeds, is captured once and
replayed for every plain step; the sampler keeps the cache and its captured step for the next
``generate`` call of the same shape (``SteeringSampler(keep_cache=None)``, the default), so a training run
captures once per shape, not once per call:

- inputs: the fed token, its position and whether the lane is fed, the row seeds and forced
  tokens of the next draw, the cache column; packed into one pinned host buffer and copied to
  the device with one non-blocking copy before each replay;
- in the graph: the lane's visibility bit at the column, the 4-D mask, the forward (keys and
  values written at the column with ``index_copy_``), the float32 next-token logits (kept in the
  sampler's ``next_logits`` buffer) and ``sample_`` on a copy of them;
- outputs: the tokens and raw log-probs, copied to a pinned host buffer once per step (one
  synchronisation, which the host needs anyway to follow the rows' text).

Steps that feed more than one token (a re-fed payoff block), refills (a new prompt's prefill),
and draws with a logit bias (``steer_analyze="bias"``) run eagerly, outside the graph. A warm-up
run with the real inputs precedes the capture (it writes what the replay writes: same column,
same values), so the first replay leaves the same state as one eager step. Under autocast the
capture disables autocast's weight-cast cache (cached casts would be freed under the graph).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..ops._sample import sample_

__all__ = ["GraphedDecodeStep", "graph_supported"]


def graph_supported(device: torch.device) -> bool:
    """CUDA graphs need a CUDA device (never taken on CPU)."""
    return device.type == "cuda" and torch.cuda.is_available()


class GraphedDecodeStep:
    """A captured width-1 decode step over a :class:`~gtalign_fast.sampling.static_cache.StaticKV`.

    Parameters
    ----------
    forward : callable ``(feed, mask4d, positions, cache, keep_last) -> (logits, cache)``
    kv : StaticKV
    next_logits : Tensor ``[lanes, V]`` float32
        The sampler's buffer of next-token logits; each replay writes it.
    settings : dict
        ``temperature``, ``top_k``, ``top_p`` of the run; a later run sets its own with
        :meth:`set_settings` (the graph reads them in place).
    backend : str or None
        ``sample_``'s backend.
    stats : dict, optional
        ``{"captures": int, "seconds": float}``, counted up at each capture (its host time,
        synchronised: once per captured shape, off the replayed path).
    """

    def __init__(self, forward, kv: Any, next_logits: torch.Tensor, settings: dict, backend: str | None,
                 stats: dict | None = None) -> None:
        lanes, device = kv.lanes, kv.device
        self._forward, self.kv, self.next_logits, self.backend = forward, kv, next_logits, backend
        self.generation = kv.generation
        # rows: fed token, position, lane fed (0/1), seed, forced; then the column
        pinned = device.type == "cuda"  # page-locked host buffers: asynchronous copies
        self.host_in = torch.zeros(5 * lanes + 1, dtype=torch.int64, pin_memory=pinned)
        self.device_in = torch.zeros(5 * lanes + 1, dtype=torch.int64, device=device)
        self.host_tokens = torch.zeros(lanes, dtype=torch.int64, pin_memory=pinned)
        self.host_raw = torch.zeros(lanes, dtype=torch.float32, pin_memory=pinned)
        self.tokens = torch.zeros(lanes, dtype=torch.int64, device=device)
        self.raw = torch.zeros(lanes, dtype=torch.float32, device=device)
        self.temperature = torch.zeros(lanes, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(lanes, dtype=torch.int64, device=device)
        self.top_p = torch.zeros(lanes, dtype=torch.float32, device=device)
        self.set_settings(settings)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.lanes = lanes
        self.stats = stats if stats is not None else {"captures": 0, "seconds": 0.0}

    def set_settings(self, settings: dict) -> None:
        """The sampling settings of the next replays, written in place (the graph reads them there:
        a graph kept for a later run takes that run's settings without a new capture)."""
        self.temperature.fill_(float(settings["temperature"]))
        self.top_k.fill_(int(settings["top_k"]))
        self.top_p.fill_(float(settings["top_p"]))

    def _body(self) -> None:
        lanes, kv = self.lanes, self.kv
        fields = self.device_in[: 5 * lanes].view(5, lanes)
        column = self.device_in[5 * lanes:]  # [1]
        feed, positions, fed = fields[0][:, None], fields[1][:, None], fields[2]
        kv.write_columns = column
        kv.kv_length = kv.capacity  # static shapes: the graph attends over every column
        kv.visible.scatter_(1, column.expand(lanes)[:, None], fed.bool()[:, None])
        mask = (kv.visible[:, None, :] & (kv.columns <= column)[None, None, :])[:, None]
        logits, _ = self._forward(feed, mask, positions, kv.cache, True)
        self.next_logits.copy_(logits[:, -1, :])
        work = self.next_logits.clone()  # sample_ works in place; next_logits stays the model's
        tokens, _, raw = sample_(work, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                 forced=fields[4], seed=fields[3], backend=self.backend)
        self.tokens.copy_(tokens)
        self.raw.copy_(raw)

    def _autocast(self):
        enabled = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if enabled else torch.float32
        return torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)

    def _capture(self) -> None:
        begin = time.perf_counter()
        self._record()
        torch.cuda.current_stream().synchronize()  # once per capture: its time is reported (stats)
        self.stats["captures"] += 1
        self.stats["seconds"] += time.perf_counter() - begin

    def _record(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self._autocast():
            self._body()  # warm-up with the real inputs: compiles kernels, initialises lazy state
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), self._autocast():
            self._body()

    def __call__(self, feed: list[int], positions: list[int], fed: list[int], seeds: list[int],
                 forced: list[int]) -> tuple[list[int], list[float]]:
        """One step: feed ``feed`` at the cursor, sample the next draw; returns (tokens, raw
        log-probs) per lane on the host and moves the cursor on."""
        kv = self.kv
        self.host_in[: 5 * self.lanes] = torch.tensor([feed, positions, fed, seeds, forced], dtype=torch.int64).view(-1)
        self.host_in[5 * self.lanes] = kv.cursor
        self.device_in.copy_(self.host_in, non_blocking=True)
        if self.graph is None or self.generation != kv.generation:  # first step, or the cache was reallocated
            self.generation = kv.generation
            self._capture()
        self._replay()
        kv.cursor += 1
        self.host_tokens.copy_(self.tokens, non_blocking=True)
        self.host_raw.copy_(self.raw, non_blocking=True)
        self._wait()
        return self.host_tokens.tolist(), self.host_raw.tolist()

    def _replay(self) -> None:
        self.graph.replay()

    def _wait(self) -> None:
        torch.cuda.current_stream().synchronize()  # the one host round trip of the step
