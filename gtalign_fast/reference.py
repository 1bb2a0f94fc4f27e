"""Pure-PyTorch specification of every op.

These functions are the truth the kernels are tested against: written for clarity, not speed,
they materialise whatever they need and are differentiable through autograd. Run them in
float64 to get reference values. Each takes the same arguments as the public op in
:mod:`gtalign_fast.ops` (minus ``backend``).
"""

from __future__ import annotations

import torch

__all__ = ["token_logprobs"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (reference values); every other float type is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# token_logprobs


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each target token (and the entropy) under ``softmax(logits / T)``.

    Parameters
    ----------
    logits : Tensor, shape ``[..., V]``, any float dtype
    targets : Tensor, shape ``[...]``, int64
        Token ids in ``[0, V)``, or ``ignore_index``.
    temperature : float
        ``T > 0``; the logits are divided by it before the log-sum-exp.
    with_entropy : bool
        Also return the entropy of the temperature-scaled distribution.
    ignore_index : int
        Positions whose target equals it give 0 (log-prob and entropy) and no gradient.

    Returns
    -------
    logp : Tensor, shape ``[...]``
        ``z_t / T - logsumexp(z / T)``; float64 for float64 logits, float32 otherwise.
    entropy : Tensor, shape ``[...]``, or None
        ``-sum_j p_j log p_j``, with ``0 log 0 = 0``.
    """
    scaled = logits.to(_compute_dtype(logits.dtype)) / temperature
    log_norm = torch.logsumexp(scaled, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    target_logit = scaled.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, target_logit - log_norm, torch.zeros_like(log_norm))
    if not with_entropy:
        return logp, None
    probs = torch.softmax(scaled, dim=-1)
    # -inf logits have p = 0 and contribute nothing; keep them out of the product (0 * -inf = nan).
    finite_scaled = torch.where(probs > 0, scaled, torch.zeros_like(scaled))
    entropy = log_norm - (probs * finite_scaled).sum(dim=-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy
