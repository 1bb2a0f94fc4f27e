"""Benchmark rows for ``grpo_loss``: ours vs torch eager / torch.compile of the same maths, TRL, Liger.

Every provider computes the GRPO loss (``loss_type="grpo"``: per-sequence token mean, then mean
over sequences) with clip-higher (0.2 / 0.28), k3 KL with ``beta = 0.04`` and token-level
importance sampling, from float32 ``[B, T]`` per-token log-probs, forward ("fwd"), backward only
("bwd", the gradient w.r.t. ``logp``) or both ("full"). The minimum traffic is one read of
``logp``, ``old_logp``, ``ref_logp`` and the bool mask (plus ``[B]`` advantages) per pass, and one
write of ``dlogp`` backward.

Liger's ``triton_grpo_loss`` starts from the logits (it fuses the log-softmax), so it is compared
in a second op, ``grpo_loss_logits``, against ``ops.logits_grpo_loss`` (provider
``gtalign_fast[<backend>] logits_grpo_loss``), ``token_logprobs`` + ``grpo_loss`` and eager torch
on the same ``[B, T+1, V]`` logits (Liger needs CUDA; on CPU its row says so).
"""

from __future__ import annotations

import torch

from bench.common import Case, dtype_of, grad_closure, missing, skipped
from gtalign_fast import ops, reference
from gtalign_fast.ops import _backend

OP = "grpo_loss"
OP_LOGITS = "grpo_loss_logits"
MODES = ("fwd", "bwd", "full")
HYPER = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo")


def _shapes(device: torch.device, suite: str) -> list[tuple[int, int]]:
    if suite == "default":
        return [(16, 1024)]
    if suite == "full":
        return [(16, 1024), (64, 4096)]
    return []


def _logits_shapes(device: torch.device, suite: str) -> list[tuple[int, int, int]]:
    if device.type != "cuda":
        return [(4, 256, 32000)] if suite == "full" else []
    if suite == "default":  # issue 12's targets: B=8, T=1024 at V=32000 and V=151936
        return [(8, 1024, 32000), (8, 1024, 151936)]
    if suite == "full":
        return [(8, 1024, 32000), (8, 1024, 151936), (16, 2048, 151936)]
    return []


def _make_inputs(batch: int, length: int, device: torch.device):
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=generator)

    logp = (-2.0 * torch.rand(batch, length, device=device, generator=generator)).requires_grad_(True)
    old = logp.detach() + 0.3 * randn(batch, length)
    ref = logp.detach() + 0.3 * randn(batch, length)
    advantages = randn(batch)
    lengths = torch.randint(length // 4, length + 1, (batch,), device=device, generator=generator)
    mask = torch.arange(length, device=device).unsqueeze(0) < lengths.unsqueeze(1)
    return logp, old, ref, advantages, mask


def _make(compute, batch, length, device, mode):
    """Build inputs and return the timed closure for ``compute(logp, old, ref, adv, mask) -> loss``."""

    def make():
        logp, old, ref, advantages, mask = _make_inputs(batch, length, device)
        if mode == "fwd":
            def forward():
                with torch.no_grad():
                    return compute(logp, old, ref, advantages, mask)
            return forward
        if mode == "bwd":
            loss = compute(logp, old, ref, advantages, mask)
            return grad_closure([loss], [logp], [torch.ones_like(loss)])

        def full():
            return torch.autograd.grad(compute(logp, old, ref, advantages, mask), [logp])
        return full

    return make


def _eager(logp, old, ref, advantages, mask):
    return reference.grpo_loss(logp, old, advantages, mask, ref, **HYPER)[0]


_compiled = None


def _torch_compile(logp, old, ref, advantages, mask):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_eager, dynamic=False)
    return _compiled(logp, old, ref, advantages, mask)


def _trl(logp, old, ref, advantages, mask):
    """TRL's own GRPOTrainer._compute_loss (see gtalign_fast.testing.trl_grpo_loss)."""
    from gtalign_fast.testing import trl_grpo_loss

    return trl_grpo_loss(logp, old, advantages, mask, ref_logp=ref, **HYPER)


def _ours(backend):
    return lambda logp, old, ref, advantages, mask: ops.grpo_loss(
        logp, old, advantages, mask, ref_logp=ref, backend=backend, **HYPER)[0]


def _kernel_available(backend: str, device: torch.device) -> str | None:
    reason = _backend.why_unavailable(backend, device)
    if reason is None and backend in ("cpu", "cuda"):
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
            "gtalign_fast_C::grpo_loss_fwd", "CPU" if backend == "cpu" else "CUDA")
        reason = None if has_kernel else "the extension has no grpo_loss kernel for this device (rebuild)"
    return reason


def _providers(device: torch.device, suite: str):
    """(name, compute or None, reason if unavailable)."""
    providers = []
    for backend in ("cpu", "cuda", "triton"):
        if backend == "triton" and device.type == "cpu":
            continue  # the interpreter is a test vehicle, not a CPU backend
        reason = _kernel_available(backend, device)
        if reason is None:
            providers.append((f"gtalign_fast[{backend}]", _ours(backend), None))
        elif backend == device.type:
            providers.append((f"gtalign_fast[{backend}]", None, reason))
    providers.append(("torch-eager", _eager, None))
    # Compiling forward and backward takes longer on a CPU than the whole default suite may.
    slow_compile = "CPU compile time: in the full suite" if device.type == "cpu" and suite == "default" else None
    providers.append(("torch-compile", _torch_compile, slow_compile))
    providers.append(("trl", _trl, missing("trl")))
    return providers


def _traffic(batch: int, length: int) -> dict[str, float]:
    tokens = batch * length
    read = tokens * (3 * 4 + 1) + batch * 4  # logp, old, ref (float32), bool mask, [B] advantages
    write = tokens * 4  # dlogp
    return {"fwd": read, "bwd": read + write, "full": 2 * read + write}


# ---------------------------------------------------------------------------------------------
# From logits: Liger's fused log-softmax + GRPO loss against ours composed


def _make_logits(compute, batch, length, vocab, dtype, device, mode):
    def make():
        generator = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(batch, length + 1, vocab, device=device, dtype=dtype, generator=generator)
        logits.requires_grad_(True)
        ids = torch.randint(0, vocab, (batch, length), device=device, generator=generator)
        old = -2.0 * torch.rand(batch, length, device=device, generator=generator) - 9.0
        ref = old + 0.3 * torch.randn(batch, length, device=device, generator=generator)
        advantages = torch.randn(batch, device=device, generator=generator)
        mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        data = (logits, ids, old, ref, advantages, mask)
        if mode == "fwd":
            def forward():
                with torch.no_grad():
                    return compute(*data)
            return forward
        if mode == "bwd":
            loss = compute(*data)
            return grad_closure([loss], [logits], [torch.ones_like(loss)])
        return lambda: torch.autograd.grad(compute(*data), [logits])

    return make


def _ours_logits(backend):
    def compute(logits, ids, old, ref, advantages, mask):
        logp = ops.token_logprobs(logits[:, :-1], ids, backend=backend)
        return ops.grpo_loss(logp, old, advantages, mask, ref_logp=ref, backend=backend, **HYPER)[0]
    return compute


def _fused_logits(backend):
    """``ops.logits_grpo_loss``: the same maths from the logits in one op (dlogits into a new buffer,
    as Liger's row with ``inplace=False``)."""
    def compute(logits, ids, old, ref, advantages, mask):
        return ops.logits_grpo_loss(logits[:, :-1], ids, advantages, mask, old_logp=old, ref_logp=ref,
                                    backend=backend, **HYPER)[0]
    return compute


def _eager_logits(logits, ids, old, ref, advantages, mask):
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return reference.grpo_loss(logp, old, advantages, mask, ref, **HYPER)[0]


def _liger_logits(logits, ids, old, ref, advantages, mask):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    out = triton_grpo_loss(logits, old, ref, ids, advantages, mask, temperature=1.0, beta=HYPER["beta"],
                           eps_low=HYPER["epsilon_low"], eps_high=HYPER["epsilon_high"], inplace=False,
                           loss_type="grpo", reduce=True)
    return out[0] if isinstance(out, tuple) else out


def _logits_cases(device: torch.device, suite: str) -> list[Case]:
    rows: list[Case] = []
    backend = "triton" if device.type == "cuda" else "cpu"
    for batch, length, vocab in _logits_shapes(device, suite):
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
        dtype = dtype_of(dtype_name)
        shape = {"B": batch, "T": length, "V": vocab}
        logits_bytes = batch * length * vocab * dtype.itemsize
        traffic = {"fwd": logits_bytes, "bwd": 2 * logits_bytes, "full": 3 * logits_bytes}
        liger_reason = missing("liger_kernel") or (None if device.type == "cuda" else "needs CUDA")
        for name, compute, reason in (
            (f"gtalign_fast[{backend}] logits_grpo_loss", _fused_logits(backend), _kernel_available(backend, device)),
            (f"gtalign_fast[{backend}]", _ours_logits(backend), _kernel_available(backend, device)),
            ("torch-eager", _eager_logits, None),
            ("liger", _liger_logits, liger_reason),
        ):
            if reason is not None:
                rows.extend(skipped(OP_LOGITS, name, MODES, shape, dtype_name, reason))
                continue
            for mode in MODES:
                rows.append(Case(OP_LOGITS, name, mode, shape, dtype_name,
                                 _make_logits(compute, batch, length, vocab, dtype, device, mode),
                                 bytes=traffic[mode]))
    return rows


def cases(device: torch.device, suite: str) -> list[Case]:
    rows: list[Case] = []
    for batch, length in _shapes(device, suite):
        shape = {"B": batch, "T": length}
        traffic = _traffic(batch, length)
        for name, compute, reason in _providers(device, suite):
            if reason is not None:
                rows.extend(skipped(OP, name, MODES, shape, "float32", reason))
                continue
            for mode in MODES:
                rows.append(Case(OP, name, mode, shape, "float32", _make(compute, batch, length, device, mode),
                                 bytes=traffic[mode]))
        liger_reason = missing("liger_kernel") or "starts from logits: see the grpo_loss_logits rows"
        rows.extend(skipped(OP, "liger", MODES, shape, "float32", liger_reason))
    return rows + _logits_cases(device, suite)
