"""Benchmark rows for ``token_logprobs``: ours vs torch eager / torch.compile / TRL / Liger / flash-attn.

Every provider computes the same thing: the float32 log-prob of the target token of each row of
``[N, V]`` logits (temperature 1), forward ("fwd"), backward only ("bwd") or both ("full").
The minimum traffic is one read of the logits forward, and one read plus one write of
``[N, V]`` in the logits' dtype backward.
"""

from __future__ import annotations

import torch

from bench.common import Case, dtype_of, grad_closure, missing, skipped
from gtalign_fast import ops
from gtalign_fast.ops import _backend

OP = "token_logprobs"
MODES = ("fwd", "bwd", "full")


def _shapes(device: torch.device, suite: str) -> list[tuple[int, int, str]]:
    if device.type == "cuda":
        if suite == "default":
            return [(8192, 151936, "bfloat16"), (4096, 32000, "float32")]
        if suite == "full":
            return [(8192, v, "bfloat16") for v in (32000, 128256, 151936)] + [(8192, 151936, "float32")]
        return []
    if suite == "default":
        return [(2048, 32000, "float32")]
    if suite == "full":
        return [(2048, 32000, "float32"), (1024, 151936, "bfloat16"), (4096, 32000, "float32")]
    return []


def _make_inputs(n: int, vocab: int, dtype: torch.dtype, device: torch.device):
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, vocab, device=device, dtype=dtype, generator=generator).requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), device=device, generator=generator)
    return logits, targets


def _make(compute, n, vocab, dtype, device, mode):
    """Build inputs and return the timed closure for ``compute(logits, targets) -> logp``."""

    def make():
        logits, targets = _make_inputs(n, vocab, dtype, device)
        if mode == "fwd":
            def forward():
                with torch.no_grad():
                    return compute(logits, targets)
            return forward
        if mode == "bwd":
            logp = compute(logits, targets)
            return grad_closure([logp], [logits], [torch.ones_like(logp)])

        def full():
            logp = compute(logits, targets)
            return torch.autograd.grad([logp], [logits], [torch.ones_like(logp)])
        return full

    return make


def _eager(logits, targets):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


_compiled = None


def _torch_compile(logits, targets):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_eager, dynamic=False)
    return _compiled(logits, targets)


def _trl(logits, targets):
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax(logits, targets)


def _liger(logits, targets):
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

    # Liger reads logits[:, :-1] of [B, L+1, V] against ids [B, L]: give it our N rows as one
    # sequence of N - 1 targets (one row less work, and no copy of the logits).
    return fused_selective_log_softmax(logits.unsqueeze(0), targets[:-1].unsqueeze(0), temperature=1.0).squeeze(0)


# Peers without a backward: their bwd / full rows say so instead of failing.
FORWARD_ONLY = {"liger": "forward only: liger's fused_selective_log_softmax has no autograd"}


def _flash_attn(logits, targets):
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    losses, _ = cross_entropy_loss(logits, targets)
    return -losses


def _ours(backend):
    return lambda logits, targets: ops.token_logprobs(logits, targets, backend=backend)


def _providers(device: torch.device):
    """(name, compute or None, reason if unavailable)."""
    providers = []
    for backend in ("cpu", "cuda", "triton"):
        reason = _backend.why_unavailable(backend, device)
        if backend == "triton" and device.type == "cpu":
            continue  # the interpreter is a test vehicle, not a CPU backend
        if reason is None:
            providers.append((f"gtalign_fast[{backend}]", _ours(backend), None))
        elif backend == device.type:
            providers.append((f"gtalign_fast[{backend}]", None, reason))
    providers.append(("torch-eager", _eager, None))
    providers.append(("torch-compile", _torch_compile, None))
    providers.append(("trl", _trl, missing("trl")))
    liger_reason = missing("liger_kernel") or (None if device.type == "cuda" else "needs CUDA")
    providers.append(("liger", _liger, liger_reason))
    flash_reason = missing("flash_attn") or (None if device.type == "cuda" else "needs CUDA")
    providers.append(("flash-attn", _flash_attn, flash_reason))
    return providers


def cases(device: torch.device, suite: str) -> list[Case]:
    rows: list[Case] = []
    for n, vocab, dtype_name in _shapes(device, suite):
        dtype = dtype_of(dtype_name)
        shape = {"N": n, "V": vocab}
        logits_bytes = n * vocab * dtype.itemsize
        traffic = {"fwd": logits_bytes, "bwd": 2 * logits_bytes, "full": 3 * logits_bytes}
        for name, compute, reason in _providers(device):
            if reason is not None:
                rows.extend(skipped(OP, name, MODES, shape, dtype_name, reason))
                continue
            for mode in MODES:
                if mode != "fwd" and name in FORWARD_ONLY:
                    rows.extend(skipped(OP, name, [mode], shape, dtype_name, FORWARD_ONLY[name]))
                    continue
                rows.append(Case(OP, name, mode, shape, dtype_name, _make(compute, n, vocab, dtype, device, mode),
                                 bytes=traffic[mode]))
    return rows
