"""Seed arithmetic shared by ``sample_`` and the :class:`~gtalign_fast.SteeringSampler`, and the
counter-based noise a row's seed gives (:func:`philox_uniform`, the specification every
``sample_`` backend draws; :mod:`gtalign_fast.reference` names it beside ``sample``).

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


# The counter-based noise: Philox4x32-10, as Triton's tl.randint

_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and uint32 values held in
    int64 ``b``, without int64 overflow (``b`` is split into 16-bit halves)."""
    low_product = b.bitwise_and(0xFFFF) * a  # < 2**48
    high_product = b.bitwise_right_shift(16) * a  # < 2**48
    high = (low_product.bitwise_right_shift(16) + high_product).bitwise_right_shift(16)
    low = (low_product + high_product.bitwise_and(0xFFFF).bitwise_left_shift(16)).bitwise_and(_MASK32)
    return high, low


UNIFORM_MAX = 1.0 - 2.0**-24
"""The largest uniform of :func:`philox_uniform` (float32's largest value below 1)."""


def philox_uniform(seeds: torch.Tensor, vocab: int) -> torch.Tensor:
    """The uniform noise every ``sample_`` backend draws: ``u[b, j]`` for row seed ``seeds[b]``.

    Philox4x32-10 with key ``(seed mod 2**32, seed div 2**32)`` (the seed read as uint64) and
    counter ``(j, 0, 0, 0)``, exactly as Triton's ``tl.randint(seed, j)``; the first output word
    ``r`` becomes ``u = min(((r >> 8) + 0.5) / 2**24, 1 - 2**-24)`` in float32, within
    ``[2**-25, 1 - 2**-24]``: never 0 or 1, so the Gumbel noise ``-log(-log u)`` is finite, within
    ``[-2.86, 16.64]``. (The bound matters for the top word only: ``(2**24 - 0.5) / 2**24`` rounds to
    1.0 in float32, whose noise would be +inf, a column drawn whatever its logit, with probability
    2**-24 per column: about one draw in 340 over a 49152-token vocabulary.)

    Parameters
    ----------
    seeds : Tensor, shape ``[B]``, int64
    vocab : int

    Returns
    -------
    Tensor, shape ``[B, vocab]``, float32
    """
    seeds = seeds.to(torch.int64).reshape(-1, 1)
    k0 = seeds.bitwise_and(_MASK32)
    k1 = seeds.bitwise_right_shift(32).bitwise_and(_MASK32)  # arithmetic shift, then masked: uint64 high word
    c0 = torch.arange(vocab, dtype=torch.int64, device=seeds.device).expand(seeds.shape[0], vocab)
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A).bitwise_and(_MASK32)
        k1 = (k1 + _PHILOX_KEY_B).bitwise_and(_MASK32)
    uniform = (c0.bitwise_right_shift(8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    return uniform.clamp_(max=UNIFORM_MAX)
