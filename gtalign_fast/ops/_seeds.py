"""Seed arithmetic shared by ``sample_`` and the :class:`~gtalign_fast.SteeringSampler`.

Seeds are int64 tensors on the device (the kernels' Philox keys), so every helper here maps Python
ints onto the signed 64-bit range. Rows get seeds of their own so that a row's draws depend on its
seed alone, never on its position in a batch.
"""

from __future__ import annotations

import torch

GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: the Weyl increment of splitmix64
MASK64 = (1 << 64) - 1


def signed64(value: int) -> int:
    """``value`` mod 2**64 as a signed int64 (the range an int64 tensor holds)."""
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def splitmix64(value: int) -> int:
    """One step of splitmix64 (Steele, Lea and Flood 2014): a bijective 64-bit mix."""
    value = (value + GOLDEN) & MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def batch_row_seeds(seed: int, batch: int, device: torch.device | str) -> torch.Tensor:
    """The ``[batch]`` int64 row seeds ``sample_`` uses for a scalar ``seed``:
    ``seed + row * GOLDEN`` (mod 2**64), so rows draw independent Philox streams."""
    return torch.tensor([signed64(seed + row * GOLDEN) for row in range(batch)], dtype=torch.int64, device=device)


def step_seed(row_seed: int, step: int) -> int:
    """The sampling seed (int64) of a row at its ``step``-th draw: depends on nothing else."""
    return signed64(splitmix64((row_seed & MASK64) ^ splitmix64(step)))
