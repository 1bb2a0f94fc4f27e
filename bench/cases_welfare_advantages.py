"""Benchmark rows for ``welfare_advantages``: ours vs the eager torch chain of the same maths,
torch.compile of that chain, and verl's / TRL's advantage code where installed.

Every provider computes, for N completions in groups of G_SIZE: W = sqrt(U * L) (alpha = 0.5, in
log space), the NaN-aware group mean and Bessel std, the all-equal flag, and the advantages
(W - mean) / (std + eps) with 0 for missing rewards and all-equal groups (forward only: rewards are
data). The minimum traffic is one read of U and L and one write of W and A (16 N bytes) plus the
per-group mean, std and flag (9 bytes per group).
"""

from __future__ import annotations

import math

import torch

from bench.common import Case, missing, skipped
from gtalign_fast import ops
from gtalign_fast.ops import _backend

OP = "welfare_advantages"
MODES = ("fwd",)
GROUP_SIZE = 8
EPS = 1e-6


def _sizes(device: torch.device, suite: str) -> list[int]:
    if suite == "default":
        return [512, 65_536]
    if suite == "full":
        return [512, 4096, 32_768, 65_536, 262_144, 1_048_576]
    return []


def _make_inputs(n: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    user = torch.rand(n, generator=generator) * 0.92 + 1e-4
    llm = torch.rand(n, generator=generator) * 0.92 + 1e-4
    user[torch.rand(n, generator=generator) < 0.02] = float("nan")  # a few missing rewards
    return user.to(device), llm.to(device)


def _eager(user, llm, group_size=GROUP_SIZE, alpha=0.5, eps=EPS):
    """The same maths as the op, as the eager torch chain a trainer would write."""
    welfare = torch.exp(alpha * torch.log(user) + (1 - alpha) * torch.log(llm))
    grouped = welfare.view(-1, group_size)
    valid = ~torch.isnan(grouped)
    count = valid.sum(1)
    mean = torch.where(valid, grouped, 0.0).sum(1) / count.clamp_min(1)
    deviation = torch.where(valid, grouped - mean[:, None], 0.0)
    std = torch.sqrt((deviation * deviation).sum(1) / (count - 1).clamp_min(1))
    lowest = torch.where(valid, grouped, math.inf).amin(1)
    highest = torch.where(valid, grouped, -math.inf).amax(1)
    all_equal = (count < 2) | (lowest == highest)
    std = torch.where(all_equal, 0.0, std)
    advantages = torch.where(valid & ~all_equal[:, None], deviation / (std[:, None] + eps), 0.0)
    return welfare, advantages.view(-1), mean, std, all_equal


_compiled = None


def _torch_compile(user, llm):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_eager, dynamic=False)
    return _compiled(user, llm)


def _verl(user, llm):
    """verl's GRPO outcome advantage on the welfare (its own group-of-one rule: mean 0, std 1)."""
    import numpy as np
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    welfare = torch.sqrt(user * llm)
    index = np.arange(welfare.numel()) // GROUP_SIZE
    mask = torch.ones_like(welfare)[:, None]
    return compute_grpo_outcome_advantage(welfare[:, None], mask, index, epsilon=EPS)


def _ours(backend):
    return lambda user, llm: ops.welfare_advantages(user, llm, GROUP_SIZE, eps=EPS, backend=backend)


def _make(compute, n: int, device: torch.device):
    def make():
        user, llm = _make_inputs(n, device)
        return lambda: compute(user, llm)

    return make


def _providers(device: torch.device, suite: str):
    """(name, compute or None, reason if unavailable)."""
    providers = []
    for backend in ("cpu", "cuda", "triton"):
        if backend == "triton" and device.type == "cpu":
            continue  # the interpreter is a test vehicle, not a CPU backend
        reason = _backend.why_unavailable(backend, device)
        if reason is None:
            providers.append((f"gtalign_fast[{backend}]", _ours(backend), None))
        elif backend == device.type:
            providers.append((f"gtalign_fast[{backend}]", None, reason))
    providers.append(("torch-eager", _eager, None))
    # Compiling costs ~20 s on CPU: only in the full suite there (and always on a GPU).
    compile_reason = None if (suite == "full" or device.type == "cuda") else "full suite only on CPU (compile time)"
    providers.append(("torch-compile", _torch_compile, compile_reason))
    providers.append(("verl", _verl, missing("verl")))
    trl_reason = missing("trl") or "trl has no standalone advantage function (inline in GRPOTrainer)"
    providers.append(("trl", None, trl_reason))
    return providers


def cases(device: torch.device, suite: str) -> list[Case]:
    rows: list[Case] = []
    for n in _sizes(device, suite):
        shape = {"N": n, "group": GROUP_SIZE}
        traffic = 16 * n + 9 * (n // GROUP_SIZE)
        for name, compute, reason in _providers(device, suite):
            if reason is not None:
                rows.extend(skipped(OP, name, MODES, shape, "float32", reason))
                continue
            rows.append(Case(OP, name, "fwd", shape, "float32", _make(compute, n, device), bytes=traffic))
    return rows
