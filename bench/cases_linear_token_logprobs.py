"""Benchmark rows for ``linear_token_logprobs``: the LM head + target log-prob, ours vs torch eager
(``hidden @ W.T -> log_softmax -> gather``), torch.compile of it, Liger's fused linear cross
entropy and verl's linear cross entropy, beside the bare GEMMs our design cannot avoid.

Every provider computes the float32 log-prob of each row's target token (temperature 1) from
``hidden [N, H]`` and ``weight [V, H]``: forward ("fwd") or forward + backward to hidden and
weight ("full"). ``flops`` counts the useful work (``2 N H V`` forward, ``6 N H V`` full);
``extra["flops_executed"]`` counts what a provider that recomputes the logits in the backward
really does (``8 N H V``).

The ``bare-gemms`` rows are the floor of our chunk-over-tokens design, timed in the same run: the
logits GEMM alone ("fwd"), and the four GEMMs of a forward + backward ("full": logits, their
recomputation, ``dZ @ W``, ``dZ^T @ H``), in the inputs' dtype into preallocated outputs. The
issue's target is ``gtalign_fast[triton]`` "full" within 1.15x of ``bare-gemms`` "full".
"""

from __future__ import annotations

import torch

from bench.common import Case, dtype_of, missing, skipped
from gtalign_fast import ops
from gtalign_fast.ops import _backend

OP = "linear_token_logprobs"
MODES = ("fwd", "full")


def _shapes(device: torch.device, suite: str) -> list[tuple[int, int, int, str]]:
    """(N, H, V, dtype) rows. The CPU default is the issue's target shape (one fwd+bwd of the
    eager path takes a few seconds on 2 cores)."""
    if device.type == "cuda":
        if suite == "default":
            return [(2048, 1024, 32000, "bfloat16"), (4096, 4096, 131072, "bfloat16")]
        if suite == "full":
            return [(2048, 1024, 32000, "float32"), (4096, 4096, 131072, "bfloat16"), (8192, 3584, 151936, "bfloat16")]
        return []
    if suite in ("default", "full"):
        return [(2048, 1024, 32000, "float32")]
    return []


def _make_inputs(n, hidden_size, vocab, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, hidden_size, device=device, dtype=dtype, generator=generator)
    weight = torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=generator) * hidden_size**-0.5
    targets = torch.randint(0, vocab, (n,), device=device, generator=generator)
    return hidden.requires_grad_(True), weight.requires_grad_(True), targets


def _make(compute, n, hidden_size, vocab, dtype, device, mode):
    """Build inputs and return the timed closure for ``compute(hidden, weight, targets) -> logp``."""

    def make():
        hidden, weight, targets = _make_inputs(n, hidden_size, vocab, dtype, device)
        if mode == "fwd":
            def forward():
                with torch.no_grad():
                    return compute(hidden, weight, targets)
            return forward

        def full():
            logp = compute(hidden, weight, targets)
            return torch.autograd.grad([logp], [hidden, weight], [torch.ones_like(logp)])
        return full

    return make


def _eager(hidden, weight, targets):
    logits = hidden @ weight.T
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


_compiled = None


def _torch_compile(hidden, weight, targets):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_eager, dynamic=False)
    return _compiled(hidden, weight, targets)


def _liger(hidden, weight, targets):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    # Per-token cross entropy = -logp (reduction="none").
    return -LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, targets)


def _verl(hidden, weight, targets):
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    logp, _entropy = linear_cross_entropy(hidden, weight, targets, 1.0, "none")
    return logp


def _bare_gemms(n, hidden_size, vocab, dtype, device, mode):
    """The GEMMs alone: ``Z = H W^T`` ("fwd"); ``Z = H W^T`` twice, ``Z W`` and ``Z^T H`` ("full")."""

    def make():
        hidden, weight, _ = _make_inputs(n, hidden_size, vocab, dtype, device)
        hidden, weight = hidden.detach(), weight.detach()
        logits = torch.empty(n, vocab, dtype=dtype, device=device)
        dhidden = torch.empty_like(hidden)
        dweight = torch.empty_like(weight)

        def fwd():
            return torch.mm(hidden, weight.T, out=logits)

        def full():
            torch.mm(hidden, weight.T, out=logits)
            torch.mm(hidden, weight.T, out=logits)
            torch.mm(logits, weight, out=dhidden)
            return torch.mm(logits.T, hidden, out=dweight)

        return fwd if mode == "fwd" else full

    return make


def _ours(backend):
    return lambda hidden, weight, targets: ops.linear_token_logprobs(hidden, weight, targets, backend=backend)


def _providers(device: torch.device, suite: str):
    """(name, compute or None, reason if unavailable)."""
    providers = []
    for backend in ("triton", "cuda", "cpu"):
        reason = _backend.why_unavailable(backend, device, "linear_token_logprobs")
        if backend == "triton" and device.type == "cpu":
            providers.append(("gtalign_fast[triton]", None, "needs CUDA (the interpreter is a test vehicle)"))
        elif reason is None:
            providers.append((f"gtalign_fast[{backend}]", _ours(backend), None))
    providers.append(("torch-eager", _eager, None))
    if device.type == "cuda" or suite == "full":
        providers.append(("torch-compile", _torch_compile, None))
    else:  # compiling + timing the 2 x 67 GFLOP eager graph would double the CPU default's run time
        providers.append(("torch-compile", None, "CPU: in the 'full' suite only"))
    liger_reason = missing("liger_kernel") or (None if device.type == "cuda" else "needs CUDA")
    providers.append(("liger", _liger, liger_reason))
    verl_reason = missing("verl") or (None if device.type == "cuda" else "needs CUDA")
    providers.append(("verl", _verl, verl_reason))
    return providers


def cases(device: torch.device, suite: str) -> list[Case]:
    rows: list[Case] = []
    for n, hidden_size, vocab, dtype_name in _shapes(device, suite):
        dtype = dtype_of(dtype_name)
        shape = {"N": n, "H": hidden_size, "V": vocab}
        itemsize = dtype.itemsize
        # Minimum traffic: read hidden and weight (+ write their gradients in "full").
        inputs_bytes = (n + vocab) * hidden_size * itemsize
        traffic = {"fwd": inputs_bytes, "full": 2 * inputs_bytes}
        useful = {"fwd": 2 * n * hidden_size * vocab, "full": 6 * n * hidden_size * vocab}
        for mode in MODES:
            rows.append(Case(OP, "bare-gemms", mode, shape, dtype_name,
                             _bare_gemms(n, hidden_size, vocab, dtype, device, mode), bytes=traffic[mode],
                             flops=useful[mode], extra={"flops_executed": 2 * n * hidden_size * vocab * (
                                 1 if mode == "fwd" else 4)}))
        for name, compute, reason in _providers(device, suite):
            if reason is not None:
                rows.extend(skipped(OP, name, MODES, shape, dtype_name, reason))
                continue
            for mode in MODES:
                recompute = 2 * n * hidden_size * vocab if name.startswith("gtalign") and mode == "full" else 0
                executed = useful[mode] + recompute
                fn = _make(compute, n, hidden_size, vocab, dtype, device, mode)
                rows.append(Case(OP, name, mode, shape, dtype_name, fn,
                                 bytes=traffic[mode], flops=useful[mode], extra={"flops_executed": executed}))
    return rows
