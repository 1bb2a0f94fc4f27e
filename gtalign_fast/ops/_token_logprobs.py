"""``token_logprobs``: the public op and its backends.

Forward and backward are two :class:`~gtalign_fast.ops._op.Op` (custom ops
``gtalign_fast::token_logprobs`` and ``gtalign_fast::token_logprobs_backward``); autograd links
them. Each resolves its backend at run time (inside the op), so a compiled graph keeps working
when the backend changes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import reference
from . import _device_checks
from ._device_checks import error_flag
from ._op import Op, Output, backends, compiled_kernels
from ._token_logprobs_constants import NUM_SOFTMAX_STATS

OP = "token_logprobs"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The kernels scale by 1/T in float32: the smallest temperature whose inverse is a finite float32
# (~2.9e-39; below it 1/T overflows to inf and every log-prob is NaN).
MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max


# ---------------------------------------------------------------------------------------------
# Layout: any [..., V] logits as a strided [D0, D1, V] view, without copying


def rows_view(logits: torch.Tensor) -> torch.Tensor:
    """View ``[..., V]`` logits as ``[D0, D1, V]`` with the original strides (no copy).

    Leading dimensions that are laid out back to back are merged, so a contiguous tensor becomes
    ``[1, N, V]`` and the ``[:, :-1]`` slice of ``[B, T+1, V]`` logits becomes ``[B, T, V]`` with the
    row stride of the parent. Raises when more than two leading dimensions cannot be merged.
    """
    *leading, vocab = logits.shape
    leading_strides = logits.stride()[:-1]
    merged: list[tuple[int, int]] = []  # (size, stride), outermost first
    for size, stride in zip(leading, leading_strides):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    if len(merged) > 2:
        raise ValueError(
            f"token_logprobs: logits of shape {tuple(logits.shape)} and strides {logits.stride()} have "
            f"{len(merged)} leading dimensions that cannot be merged into rows; the kernels read at most "
            "two (e.g. the [:, :-1] slice of [B, T+1, V]). Pass a view with fewer strided dimensions."
        )
    while len(merged) < 2:
        merged.insert(0, (1, 0))
    (d0, s0), (d1, s1) = merged
    return logits.as_strided((d0, d1, vocab), (s0, s1, logits.stride(-1)), logits.storage_offset())


def check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int, op: str = OP) -> None:
    """IndexError naming the first target id outside ``[0, vocab)`` that is not ``ignore_index``
    (shared with linear_token_logprobs). One reduction, and a host sync on CUDA: the kernels check on
    the device instead; this gives the precise message where a sync is free (CPU tensors, the
    reference backend, ``GTALIGN_FAST_SYNC_CHECKS=1``)."""
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(out_of_range.any()):
        position = int(out_of_range.reshape(-1).nonzero()[0, 0])
        value = int(targets.reshape(-1)[position])
        raise IndexError(
            f"{op}: target id {value} at position {position} (flattened) is outside [0, {vocab}) "
            f"and is not ignore_index ({ignore_index})"
        )


# ---------------------------------------------------------------------------------------------
# Forward


class TokenLogprobsOptions(NamedTuple):
    temperature: float
    with_entropy: bool
    ignore_index: int


def _forward_outputs(logits, targets, options):
    """(logp, entropy, stats); stats holds per row (max of z/T, log sum exp(z/T - max)) for the
    backward (columns STAT_* of _token_logprobs_constants)."""
    entropy_shape = targets.shape if options.with_entropy else (0,)
    stats_shape = (targets.numel(), NUM_SOFTMAX_STATS)
    return (
        Output(targets.shape, torch.float32),
        Output(entropy_shape, torch.float32),
        Output(stats_shape, torch.float32),
    )


def _forward_reference(logits, targets, options, logp, entropy, stats):
    """float64 through the reference (the slow, exact path: it materialises [N, V])."""
    temperature, with_entropy, ignore_index = options
    logits = logits.double()
    ref_logp, ref_entropy = reference.token_logprobs(logits, targets, temperature, with_entropy, ignore_index)
    logp.copy_(ref_logp)
    scaled = (logits / temperature).reshape(-1, logits.shape[-1])
    row_max = scaled.max(dim=-1).values
    log_sum = torch.logsumexp(scaled - row_max.unsqueeze(-1), dim=-1)
    valid = (targets != ignore_index).reshape(-1)
    stats.copy_(torch.where(valid.unsqueeze(-1), torch.stack([row_max, log_sum], dim=-1), 0.0))
    if with_entropy:
        entropy.copy_(ref_entropy)


def forward_kernel(launch, logits, targets, options, logp, entropy, stats) -> None:
    """Call a kernel (the Triton launcher and the C++/CUDA kernels share one signature) on rows read in
    place and flat outputs. The kernels check the targets themselves: the C++ CPU kernel raises, the
    Triton and CUDA kernels set the device's error flag (a bad row's logp is NaN), which
    :func:`~gtalign_fast.ops._device_checks.after_launch` raises on at once for CPU tensors and lazily
    (no host sync) for CUDA ones."""
    if targets.numel() > 0:
        device = logits.device
        launch(rows_view(logits), targets.reshape(-1).contiguous(), 1.0 / options.temperature, options.ignore_index,
               logp.view(-1), entropy.view(-1), stats, error_flag(device))
        _device_checks.after_launch(
            OP, device, explain=lambda: check_target_range(targets, logits.shape[-1], options.ignore_index)
        )


def _check_forward(logits, targets, options, backend) -> None:
    """The reference backend gathers with the targets unchecked: check them on the host there (the
    kernels check them on the device)."""
    if backend == "reference":
        check_target_range(targets, logits.shape[-1], options.ignore_index)


FORWARD = Op(
    "token_logprobs",
    inputs="Tensor logits, Tensor targets",
    options=TokenLogprobsOptions,
    returns=("logp", "entropy", "stats"),
    outputs=_forward_outputs,
    check=_check_forward,
    backends=backends(
        **compiled_kernels(forward_kernel, triton="token_logprobs.token_logprobs_forward",
                           extension="token_logprobs_fwd"),
        reference=_forward_reference,
    ),
)


# ---------------------------------------------------------------------------------------------
# Backward


def _backward_outputs(grad_logp, grad_entropy, logits, targets, stats, entropy, options):
    return (Output(logits.shape, logits.dtype),)  # contiguous, whatever the logits' strides


def _backward_reference(grad_logp, grad_entropy, logits, targets, stats, entropy, options, dlogits):
    # The closed form, in float64 (autograd is not reachable inside a custom op's kernel):
    # dz = (g_logp * (onehot - p) - g_entropy * p * (log p + H)) / T.
    scaled = logits.double() / options.temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    probs = log_probs.exp()
    valid = (targets != options.ignore_index).unsqueeze(-1)
    g_logp = grad_logp.reshape(targets.shape).to(scaled.dtype).unsqueeze(-1)
    onehot = torch.zeros_like(scaled).scatter_(-1, targets.clamp(min=0).unsqueeze(-1), 1.0)
    grad = g_logp * (onehot - probs)
    if grad_entropy is not None:
        entropy = -(probs * torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))).sum(-1, keepdim=True)
        g_entropy = grad_entropy.reshape(targets.shape).to(scaled.dtype).unsqueeze(-1)
        grad = grad - g_entropy * torch.where(probs > 0, probs * (log_probs + entropy), torch.zeros_like(probs))
    grad = torch.where(valid, grad / options.temperature, torch.zeros_like(grad))
    dlogits.copy_(grad.reshape(dlogits.shape))


def _backward_kernel(launch, grad_logp, grad_entropy, logits, targets, stats, entropy, options, dlogits) -> None:
    """Call a kernel launcher on float32 flat upstream gradients and logits rows read in place."""
    if targets.numel() > 0:
        grad_entropy = None if grad_entropy is None else grad_entropy.reshape(-1).to(torch.float32).contiguous()
        launch(grad_logp.reshape(-1).to(torch.float32).contiguous(), grad_entropy, rows_view(logits),
               targets.reshape(-1).contiguous(), stats, entropy.reshape(-1), 1.0 / options.temperature,
               options.ignore_index, dlogits)


BACKWARD = Op(
    "token_logprobs_backward",
    key="token_logprobs",
    inputs="Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor targets, Tensor stats, Tensor entropy",
    options=TokenLogprobsOptions,
    returns=("dlogits",),
    outputs=_backward_outputs,
    backends=backends(
        **compiled_kernels(_backward_kernel, triton="token_logprobs.token_logprobs_backward",
                           extension="token_logprobs_bwd"),
        reference=_backward_reference,
    ),
)


def _save(ctx, inputs, options, outputs) -> None:
    logits, targets = inputs
    _, entropy, stats = outputs
    ctx.save_for_backward(logits, targets, stats, entropy)


def _backward(ctx, grad_logp, grad_entropy, _grad_stats):
    logits, targets, stats, entropy = ctx.saved_tensors
    if grad_logp is None and grad_entropy is None:
        return None, None
    if grad_logp is None:
        grad_logp = torch.zeros(targets.shape, dtype=torch.float32, device=stats.device)
    if not ctx.options.with_entropy:
        grad_entropy = None
    (dlogits,) = BACKWARD.call_in_backward(ctx, grad_logp, grad_entropy, logits, targets, stats, entropy)
    return dlogits, None


FORWARD.register_autograd(_save, _backward, differentiable=(0, 1))


# ---------------------------------------------------------------------------------------------
# Public function


def _validate(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("token_logprobs: logits and targets must be tensors")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"token_logprobs: logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if targets.dtype != torch.int64:
        raise TypeError(f"token_logprobs: targets must be int64 token ids, got {targets.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"token_logprobs: logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"token_logprobs: targets shape {tuple(targets.shape)} must equal the logits' leading shape "
            f"{tuple(logits.shape[:-1])}"
        )
    if logits.device != targets.device:
        raise ValueError(f"token_logprobs: logits on {logits.device} but targets on {targets.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"token_logprobs: temperature must be a Python float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"token_logprobs: temperature must be finite and >= {MIN_TEMPERATURE:.4g} (1/T must be a finite "
            f"float32), got {temperature}"
        )


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
    backend: str | None = None,
):
    """Log-probability of each target token under ``softmax(logits / temperature)``, fused.

    One pass over the vocabulary per row (temperature, online log-sum-exp, gather, optional
    entropy); the backward is one more pass that writes dlogits. No float32 ``[N, V]`` temporary is
    ever made, and strided rows are read in place.

    Parameters
    ----------
    logits : Tensor, shape ``[..., V]``, float16 / bfloat16 / float32 (float64 accepted)
        Rows may be strided: the ``[:, :-1]`` slice of ``[B, T+1, V]`` logits is read without a copy.
    targets : Tensor, shape ``[...]``, int64
        Token ids in ``[0, V)``, or ``ignore_index``.
    temperature : float, default 1.0
        Finite and ``>= MIN_TEMPERATURE`` (~2.9e-39, so that 1/T is a finite float32); the logits
        are divided by it: ``logp = z_t / T - logsumexp(z / T)``.
    with_entropy : bool, default False
        Also return the entropy of ``softmax(logits / T)`` (differentiable), from the same pass.
    ignore_index : int, default -100
        Positions whose target equals it give 0 (log-prob and entropy) and zero gradient.
    backend : {"triton", "cuda", "cpu", "reference"}, optional
        Force a backend; default: ``GTALIGN_FAST_BACKEND[_TOKEN_LOGPROBS]``, else the C++ kernel on
        CPU and the Triton kernel on CUDA.

    Returns
    -------
    logp : Tensor, shape ``[...]``, float32
        Returned alone when ``with_entropy`` is False.
    (logp, entropy) : tuple of Tensor, shape ``[...]``, float32
        When ``with_entropy`` is True.

    Raises
    ------
    TypeError
        Integer logits, non-int64 targets, a non-float temperature.
    ValueError
        Shape or device mismatch, temperature not finite or ``<= 0``, V = 0.
    IndexError
        A target outside ``[0, V)`` that is not ``ignore_index``. On CUDA tensors the kernel finds
        it without a host sync: that row's logp is NaN and :func:`gtalign_fast.ops.check_device_errors`
        raises (a RuntimeError), or the op raises at once with ``GTALIGN_FAST_SYNC_CHECKS=1``.

    Notes
    -----
    Backward gives ``dlogits`` in the logits' dtype, contiguous, with
    ``dz_j = (g_logp (1[j = t] - p_j) - g_H p_j (log p_j + H)) / T``.
    """
    _validate(logits, targets, temperature)
    options = TokenLogprobsOptions(float(temperature), bool(with_entropy), int(ignore_index))
    logp, entropy, _ = FORWARD(logits, targets, options=options, backend=backend or "")
    return (logp, entropy) if with_entropy else logp
