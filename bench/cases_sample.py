"""Benchmark rows for ``sample_``: one decode step (temperature 0.7, top-k 50, top-p 0.9, a seeded
draw) against the torch chain people write (softmax, sort-based top-k / top-p, multinomial).

``sample_`` works in place, so its closure first restores the logits from a pristine copy (one
extra B x V copy is timed with it; the torch chain does not modify its input)."""

from __future__ import annotations

import torch

from bench.common import Case, dtype_of, missing, skipped
from gtalign_fast import ops
from gtalign_fast.ops._backend import available_backends

OP = "sample_"
SETTINGS = dict(temperature=0.7, top_k=50, top_p=0.9)


def torch_chain(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator=None) -> torch.Tensor:
    """The usual eager chain (HF-style warpers): temperature, top-k, top-p via a full sort, multinomial."""
    scaled = logits.float() / temperature
    kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    ordered, order = scaled.sort(dim=-1, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    scaled = scaled.masked_fill(remove, float("-inf"))
    return torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator).squeeze(1)


def _inputs(batch: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(0)
    return (torch.randn(batch, vocab, generator=generator) * 3).to(dtype).to(device)


def _ours(backend: str, batch: int, vocab: int, dtype: torch.dtype, device: torch.device):
    def make():
        source = _inputs(batch, vocab, dtype, device)
        buffer = source.clone()

        def step():
            buffer.copy_(source)
            return ops.sample_(buffer, seed=1, backend=backend, **SETTINGS)

        return step

    return make


def _eager(batch: int, vocab: int, dtype: torch.dtype, device: torch.device, compiled: bool = False):
    def make():
        logits = _inputs(batch, vocab, dtype, device)
        chain = torch.compile(torch_chain, dynamic=False) if compiled else torch_chain
        chain(logits, **SETTINGS)  # warm-up (compilation happens here, untimed)
        return lambda: chain(logits, **SETTINGS)

    return make


def cases(device: torch.device, suite: str) -> list[Case]:
    if suite == "default":
        # Issue 12's two targets; the large one only on a GPU (on a CPU the torch chain's sort of
        # 64 x 151936 would take most of the default suite's two minutes).
        shapes = [(8, 32000, "float32")] + ([(64, 151936, "bfloat16")] if device.type == "cuda" else [])
    elif suite == "full":
        shapes = [(8, 32000, "float32"), (64, 151936, "bfloat16"), (64, 151936, "float32")]
    else:
        return []
    rows: list[Case] = []
    backends = [b for b in available_backends(device, "sample") if b in ("triton", "cpu", "cuda")]
    for batch, vocab, dtype_name in shapes:
        dtype = dtype_of(dtype_name)
        shape = {"B": batch, "V": vocab, **SETTINGS}
        moved = batch * vocab * dtype.itemsize  # one read of the logits is the minimum
        for backend in backends:
            if backend == "triton" and device.type == "cpu":
                continue  # the interpreter is not a benchmark
            rows.append(Case(OP, f"gtalign_fast[{backend}]", "fwd", shape, dtype_name,
                             _ours(backend, batch, vocab, dtype, device), bytes=moved,
                             extra={"note": "includes restoring the buffer (one B x V copy)"}))
        rows.append(Case(OP, "torch-eager", "fwd", shape, dtype_name, _eager(batch, vocab, dtype, device), bytes=moved))
        if suite == "full":
            rows.append(Case(OP, "torch-compile", "fwd", shape, dtype_name,
                             _eager(batch, vocab, dtype, device, compiled=True), bytes=moved))
        reason = missing("flashinfer")
        if reason:
            rows.extend(skipped(OP, "flashinfer", ["fwd"], shape, dtype_name, reason))
    return rows
