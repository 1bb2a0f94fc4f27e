"""Benchmark rows for ``linear_grpo_loss``: hidden states -> LM head -> GRPO loss, ours vs the eager
chain (``hidden @ W.T -> log_softmax -> gather -> GRPO loss``), torch.compile of it, Liger's
``LigerFusedLinearGRPOLoss``, and the floor: its three bare GEMMs (``Z = H W^T``, ``dH = dZ W``,
``dW = dZ^T H``) timed in the same run (provider ``gemm-floor``).

Every provider computes the GRPO loss (``loss_type="grpo"``, clip-higher 0.2 / 0.28, token-level
ratio against an ``old_logp``, no KL) from ``hidden [B, T, H]`` and ``weight [V, H]``, forward
("fwd") or forward + backward to hidden and weight ("full"). ``flops`` is the useful work
(``2 N H V`` forward, ``6 N H V`` full); issue 11's targets: full within 1.15x (GPU) / 1.1x (CPU)
of ``gemm-floor``.
"""

from __future__ import annotations

import torch

from bench.common import Case, dtype_of, missing, skipped
from gtalign_fast import ops, reference
from gtalign_fast.ops._backend import why_unavailable

OP = "linear_grpo_loss"
MODES = ("fwd", "full")
HYPER = dict(epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo")


def _shapes(device: torch.device, suite: str) -> list[tuple[int, int, int, int, str]]:
    """(B, T, H, V, dtype): N = B T tokens. CPU: issue 11's target shape (N = 2048)."""
    if device.type == "cuda":
        if suite == "default":
            return [(4, 1024, 4096, 131072, "bfloat16")]
        if suite == "full":
            return [(2, 1024, 1024, 32000, "bfloat16"), (4, 1024, 4096, 131072, "bfloat16"),
                    (8, 1024, 3584, 151936, "bfloat16")]
        return []
    if suite in ("default", "full"):
        return [(2, 1024, 1024, 32000, "float32")]
    return []


def _make_inputs(batch, length, size, vocab, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, length, size, device=device, dtype=dtype, generator=generator)
    weight = torch.randn(vocab, size, device=device, dtype=dtype, generator=generator) * size**-0.5
    targets = torch.randint(0, vocab, (batch, length), device=device, generator=generator)
    old = -10.5 + 0.3 * torch.randn(batch, length, device=device, generator=generator)  # near log(1/V)
    advantages = torch.randn(batch, device=device, generator=generator)
    lengths = torch.randint(3 * length // 4, length + 1, (batch,), device=device, generator=generator)
    mask = torch.arange(length, device=device).unsqueeze(0) < lengths.unsqueeze(1)
    return hidden.requires_grad_(True), weight.requires_grad_(True), targets, old, advantages, mask


def _make(compute, shape, dtype, device, mode):
    def make():
        hidden, weight, *data = _make_inputs(*shape, dtype, device)
        if mode == "fwd":
            def forward():
                with torch.no_grad():
                    return compute(hidden, weight, *data)
            return forward
        return lambda: torch.autograd.grad(compute(hidden, weight, *data), [hidden, weight])

    return make


def _eager(hidden, weight, targets, old, advantages, mask):
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return reference.grpo_loss(logp, old, advantages, mask, **HYPER)[0]


_compiled = None


def _torch_compile(*args):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_eager, dynamic=False)
    return _compiled(*args)


def _liger(hidden, weight, targets, old, advantages, mask):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, epsilon_low=HYPER["epsilon_low"],
                                       epsilon_high=HYPER["epsilon_high"], loss_type="grpo", use_ref_model=False)
    out = loss_fn(hidden, weight, targets, mask.int(), advantages, old_per_token_logps=old)
    return out[0] if isinstance(out, tuple) else out


def _ours(backend):
    def compute(hidden, weight, targets, old, advantages, mask):
        return ops.linear_grpo_loss(hidden, weight, targets, advantages, mask, old_logp=old, backend=backend,
                                    **HYPER)[0]
    return compute


def _gemm_floor(shape, dtype, device, mode):
    """The three GEMMs a fused LM-head loss cannot avoid, on the BLAS / cuBLAS, nothing else
    (``dZ`` is a fixed buffer; its values do not change the GEMM's time)."""

    def make():
        batch, length, size, vocab = shape
        hidden, weight, *_ = _make_inputs(*shape, dtype, device)
        h, w = hidden.detach().reshape(batch * length, size), weight.detach()
        z = torch.empty(batch * length, vocab, device=device, dtype=dtype)
        dh, dw = torch.empty_like(h), torch.empty_like(w)

        def gemms():
            torch.mm(h, w.t(), out=z)
            if mode == "full":
                torch.mm(z, w, out=dh)
                torch.mm(z.t(), h, out=dw)
        return gemms

    return make


def _providers(device: torch.device, suite: str):
    providers = []
    for backend in ("cpu", "triton"):
        if backend == "triton" and device.type == "cpu":
            continue  # the interpreter is a test vehicle, not a CPU backend
        reason = why_unavailable(backend, device, OP)
        if reason is None or backend == device.type:
            providers.append((f"gtalign_fast[{backend}]", _ours(backend), reason))
    providers.append(("torch-eager", _eager, None))
    if device.type == "cuda" or suite == "full":
        providers.append(("torch-compile", _torch_compile, None))
    else:
        providers.append(("torch-compile", None, "CPU: in the 'full' suite only"))
    liger_reason = missing("liger_kernel") or (None if device.type == "cuda" else "needs CUDA")
    providers.append(("liger", _liger, liger_reason))
    return providers


def cases(device: torch.device, suite: str) -> list[Case]:
    rows: list[Case] = []
    for batch, length, size, vocab, dtype_name in _shapes(device, suite):
        dtype = dtype_of(dtype_name)
        shape = (batch, length, size, vocab)
        shape_dict = {"N": batch * length, "H": size, "V": vocab}
        n = batch * length
        inputs_bytes = (n + vocab) * size * dtype.itemsize
        traffic = {"fwd": inputs_bytes, "full": 2 * inputs_bytes}
        useful = {"fwd": 2 * n * size * vocab, "full": 6 * n * size * vocab}
        for mode in MODES:
            rows.append(Case(OP, "gemm-floor", mode, shape_dict, dtype_name, _gemm_floor(shape, dtype, device, mode),
                             bytes=traffic[mode], flops=useful[mode]))
        for name, compute, reason in _providers(device, suite):
            if reason is not None:
                rows.extend(skipped(OP, name, MODES, shape_dict, dtype_name, reason))
                continue
            for mode in MODES:
                rows.append(Case(OP, name, mode, shape_dict, dtype_name, _make(compute, shape, dtype, device, mode),
                                 bytes=traffic[mode], flops=useful[mode]))
    return rows
