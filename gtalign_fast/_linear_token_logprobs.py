"""``linear_token_logprobs``: the LM head fused with ``token_logprobs``, in vocabulary chunks.

``linear_token_logprobs(hidden, weight, targets)`` equals
``token_logprobs(hidden @ weight.T + bias, targets)`` but never allocates the ``[N, V]`` logits:
the forward keeps an online log-sum-exp per row across vocabulary chunks, and the backward
recomputes each chunk of logits, turns it into ``dz`` in place and accumulates
``dhidden += dz @ W_chunk`` and ``dW_chunk = dz^T @ hidden``.

Backends (resolved inside the op, at run time, like every gtalign_fast op):

``"triton"``     fused Triton kernels (``gtalign_fast.kernels.linear_token_logprobs``): the forward is
                 one tiled-matmul kernel with the online log-sum-exp in its epilogue (no logits
                 written at all); the backward recomputes logits tiles into ``dz`` chunks and hands
                 the two products to cuBLAS. Default on CUDA tensors.
``"cpu"``        the chunked PyTorch path on CPU tensors (``gtalign_fast.kernels.linear_token_logprobs_chunked``:
                 BLAS ``addmm`` per chunk + in-place elementwise work on the one chunk buffer). Default
                 on CPU tensors.
``"cuda"``       the same chunked PyTorch path on CUDA tensors, built on cuBLAS -- not a hand-written
                 CUDA kernel. Default on CUDA only when Triton is not installed.
``"reference"``  materialises the logits and calls :func:`gtalign_fast.reference.token_logprobs`
                 (float64-capable; for tests, O(N V) memory).

The backend is chosen by ``backend=``, then ``GTALIGN_FAST_BACKEND_LINEAR_TOKEN_LOGPROBS``, then
``GTALIGN_FAST_BACKEND``, then the device default. The op gives ``_backend.resolve`` its own
availability rules because its CPU / CUDA paths are pure PyTorch and do not need the compiled
extension.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from gtalign_fast.kernels import linear_token_logprobs_chunked as chunked

from . import _backend, reference
from ._op import Op, Output
from ._token_logprobs import MIN_TEMPERATURE, check_target_range

OP = "linear_token_logprobs"
BACKENDS = ("triton", "cuda", "cpu", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# Backend resolution: _backend.resolve with this op's own availability rules


def _why_unavailable(name: str, device: torch.device) -> str | None:
    if name == "reference":
        return None
    if name == "triton":
        return _backend.why_unavailable("triton", device)
    if name in ("cpu", "cuda"):
        if name != device.type:
            return f"the {name!r} backend runs on {name} tensors, got {device.type} tensors"
        return None
    return f"unknown backend {name!r}; choose one of {BACKENDS}"


def _default_backend(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton" if _why_unavailable("triton", device) is None else "cuda"
    return "cpu" if device.type == "cpu" else "reference"


# ---------------------------------------------------------------------------------------------
# Backends


def _forward_reference(hidden, weight, bias, targets, options, logp, entropy, lse):
    temperature, with_entropy, ignore_index, _ = options
    ref_logp, ref_entropy = reference.linear_token_logprobs(
        hidden, weight, targets, bias, temperature, with_entropy, ignore_index
    )
    logp.copy_(ref_logp)
    if with_entropy:
        entropy.copy_(ref_entropy)
    dtype = reference.compute_dtype(hidden.dtype)
    logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    lse.copy_(torch.where(targets != ignore_index, torch.logsumexp(logits / temperature, dim=-1), 0.0))


def _valid_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows to compute, or None when every row is valid (no compaction copy).
    Prompt and padding positions are skipped entirely instead of costing a matmul row."""
    valid = targets != ignore_index
    if bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1)


def _forward_chunks(name, hidden, weight, bias, targets, options, logp, entropy, lse):
    """The Triton and chunked forwards: only the valid rows, results scattered back."""
    temperature, with_entropy, ignore_index, chunk_size = options
    if targets.numel() == 0:
        return
    rows = _valid_rows(targets, ignore_index)
    outputs = [logp, lse] + ([entropy] if with_entropy else [])
    if rows is not None:
        for out in outputs:
            out.zero_()
        if rows.numel() == 0:
            return
        hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
    inv_t = 1.0 / temperature
    if name == "triton":
        from gtalign_fast.kernels import linear_token_logprobs as kernels

        partials = kernels.forward_partials(
            hidden, weight, None if bias is None else bias.contiguous(), targets.contiguous(),
            inv_t, ignore_index, with_entropy,
        )
        lse_v, log_s, y_target, t_over_s = kernels.merge_partials(*partials)
        values = [y_target - lse_v, lse_v] + ([log_s - t_over_s] if with_entropy else [])
    else:
        logp_v, lse_v, entropy_v = chunked.forward_chunked(
            hidden, weight, bias, targets, inv_t, with_entropy, chunk_size
        )
        values = [logp_v, lse_v] + ([entropy_v] if with_entropy else [])
    for out, value in zip(outputs, values):
        if rows is None:
            out.copy_(value)
        else:
            out.index_copy_(0, rows, value.to(out.dtype))


def _backward_reference(g_logp, g_entropy, hidden, weight, bias, targets, lse, entropy, need_hidden, need_weight,
                        need_bias, options, dhidden, dweight, dbias):
    """Materialised logits and the closed-form gradient (autograd is not reachable inside a
    custom op's kernel): ``dz = (g (onehot - p) - g_H p (log p + H)) / T``."""
    temperature, _, ignore_index, _ = options
    dtype = reference.compute_dtype(hidden.dtype)
    h, w = hidden.to(dtype), weight.to(dtype)
    logits = torch.nn.functional.linear(h, w, None if bias is None else bias.to(dtype))
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    p = log_p.exp()
    valid = targets != ignore_index
    g = torch.where(valid, g_logp.to(dtype), 0.0).unsqueeze(1)
    dz = -g * p
    dz.scatter_add_(1, torch.where(valid, targets, 0).unsqueeze(1), g)
    if g_entropy is not None:
        g_h = torch.where(valid, g_entropy.to(dtype), 0.0).unsqueeze(1)
        plogp = torch.where(p > 0, p * log_p, 0.0)
        entropy = -plogp.sum(dim=1, keepdim=True)
        dz -= g_h * (plogp + p * entropy)
    dz /= temperature
    if need_hidden:
        dhidden.copy_(dz @ w)
    if need_weight:
        dweight.copy_(dz.T @ h)
    if need_bias:
        dbias.copy_(dz.sum(dim=0))


def _backward_chunks(name, g_logp, g_entropy, hidden, weight, bias, targets, lse, entropy, need_hidden, need_weight,
                     need_bias, options, dhidden, dweight, dbias):
    """The Triton and chunked backwards: only the valid rows; a gradient not asked for is None."""
    temperature, _, ignore_index, chunk_size = options
    dhidden, dweight, dbias = (out if need else None for out, need in
                               ((dhidden, need_hidden), (dweight, need_weight), (dbias, need_bias)))
    if dhidden is None and dweight is None and dbias is None:
        return
    g_logp = g_logp.to(torch.float32).contiguous()
    g_entropy = None if g_entropy is None else g_entropy.to(torch.float32).contiguous()
    rows = _valid_rows(targets, ignore_index)
    dhidden_rows = dhidden
    if targets.numel() == 0 or (rows is not None and rows.numel() == 0):
        for out in (dhidden, dweight, dbias):  # no row contributes
            if out is not None:
                out.zero_()
        return
    if rows is not None:
        hidden, targets, lse = hidden.index_select(0, rows), targets.index_select(0, rows), lse.index_select(0, rows)
        g_logp = g_logp.index_select(0, rows)
        if g_entropy is not None:
            g_entropy, entropy = g_entropy.index_select(0, rows), entropy.index_select(0, rows)
        if dhidden is not None:
            dhidden_rows = torch.empty_like(hidden)
    if name != "triton":  # the PyTorch chunks run in the compute dtype (index_put_ needs one dtype)
        dtype = reference.compute_dtype(hidden.dtype)
        g_logp = g_logp.to(dtype)
        g_entropy = None if g_entropy is None else g_entropy.to(dtype)
    chunked.backward_chunked(
        name, hidden, weight, bias, targets.contiguous(), lse.contiguous(),
        None if g_entropy is None else entropy.contiguous(), g_logp.contiguous(),
        None if g_entropy is None else g_entropy.contiguous(), 1.0 / temperature, ignore_index, chunk_size,
        dhidden_rows, dweight, dbias,
    )
    if rows is not None and dhidden is not None:
        dhidden.zero_().index_copy_(0, rows, dhidden_rows)


def _check_data(hidden, weight, bias, targets, options, backend) -> None:
    check_target_range(targets, weight.shape[0], options.ignore_index, op=OP)
    if backend == "triton" and hidden.dtype == torch.float64:
        raise TypeError(
            f"{OP}: the 'triton' backend takes float16 / bfloat16 / float32 inputs, got float64; "
            "use backend='cpu' / 'cuda' (chunked, float64 maths) or 'reference'"
        )


# ---------------------------------------------------------------------------------------------
# The ops


class LinearTokenLogprobsOptions(NamedTuple):
    temperature: float
    with_entropy: bool
    ignore_index: int
    chunk_size: int  # vocabulary entries per chunk; 0 = automatic


def _forward_outputs(hidden, weight, bias, targets, options):
    n_rows = targets.shape[0]
    return (
        Output((n_rows,), torch.float32),  # logp
        Output((n_rows if options.with_entropy else 0,), torch.float32),  # entropy
        Output((n_rows,), torch.float32),  # lse: log-sum-exp of z / T per row, for the backward
    )


def _backend_functions(chunks, reference_fn) -> dict:
    """Triton and the chunked PyTorch path share one driver, told which one runs."""
    return {name: functools.partial(chunks, name) for name in ("triton", "cpu", "cuda")} | {"reference": reference_fn}


FORWARD = Op(
    "linear_token_logprobs",
    inputs="Tensor hidden, Tensor weight, Tensor? bias, Tensor targets",
    options=LinearTokenLogprobsOptions,
    returns=("logp", "entropy", "lse"),
    outputs=_forward_outputs,
    check=_check_data,
    backends=_backend_functions(_forward_chunks, _forward_reference),
    availability=_why_unavailable,
    default=_default_backend,
)


def _backward_outputs(grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy, need_hidden, need_weight,
                      need_bias, options):
    """A gradient that is not needed is an empty ``[0]`` (outputs may not alias each other)."""
    return (
        Output(hidden.shape if need_hidden else (0,), hidden.dtype),
        Output(weight.shape if need_weight else (0,), hidden.dtype),
        Output(bias.shape if need_bias else (0,), hidden.dtype),
    )


BACKWARD = Op(
    "linear_token_logprobs_backward",
    key=OP,
    inputs=(
        "Tensor grad_logp, Tensor? grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
        "Tensor lse, Tensor entropy, bool need_hidden, bool need_weight, bool need_bias"
    ),
    options=LinearTokenLogprobsOptions,
    returns=("dhidden", "dweight", "dbias"),
    outputs=_backward_outputs,
    backends=_backend_functions(_backward_chunks, _backward_reference),
    availability=_why_unavailable,
    default=_default_backend,
)


def _save(ctx, inputs, options, outputs) -> None:
    hidden, weight, bias, targets = inputs
    _, entropy, lse = outputs
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    if grad_logp is None and grad_entropy is None:
        return None, None, None, None
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not ctx.options.with_entropy:
        grad_entropy = None
    need_hidden, need_weight, need_bias = ctx.needs_grad[:3]
    need_bias = bool(need_bias and bias is not None)
    dhidden, dweight, dbias = BACKWARD.call_in_backward(
        ctx, grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy, bool(need_hidden),
        bool(need_weight), need_bias,
    )
    return dhidden if need_hidden else None, dweight if need_weight else None, dbias if need_bias else None, None


FORWARD.register_autograd(_save, _backward, differentiable=(0, 1))


# ---------------------------------------------------------------------------------------------
# Public function


def _validate(hidden, weight, targets, bias, temperature, chunk_size) -> None:
    named = {"hidden": hidden, "weight": weight, "targets": targets}
    if bias is not None:
        named["bias"] = bias
    for arg, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{OP}: {arg} must be a tensor, got {type(value).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{OP}: weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"{OP}: bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{OP}: targets must be int64 token ids, got {targets.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{OP}: hidden must be [..., H] with H >= 1, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{OP}: weight must be [V, H] with V >= 1 and H = {hidden.shape[-1]} (hidden's last dim), "
            f"got shape {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{OP}: bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{OP}: targets shape {tuple(targets.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    for arg, value in named.items():
        if value.device != hidden.device:
            raise ValueError(f"{OP}: {arg} is on {value.device} but hidden is on {hidden.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{OP}: temperature must be a Python float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"{OP}: temperature must be finite and >= {MIN_TEMPERATURE:.4g} (1/T must be a finite float32), "
            f"got {temperature}"
        )
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"{OP}: chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"{OP}: chunk_size must be >= 1, got {chunk_size}")


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """Log-probability of each target token under ``softmax((hidden @ weight.T + bias) / T)``,
    without ever materialising the ``[N, V]`` logits.

    Same values and gradients as ``token_logprobs(hidden @ weight.T + bias, targets, ...)``, except
    that the logits are formed with float32 accumulation and never rounded to a half dtype. The
    vocabulary (and, for large N, the rows) is processed in chunks; the backward recomputes each
    chunk. Extra memory: one chunk of float32 logits (two with the entropy), plus a float32
    ``[N, H]`` accumulator for half-precision ``hidden`` and a float32 ``[C, H]`` accumulator for
    one chunk of a half-precision weight gradient: independent of V beyond the weight gradient
    itself. Positions whose target is
    ``ignore_index`` are dropped before the matmul (they cost nothing).

    Parameters
    ----------
    hidden : Tensor, shape ``[N, H]`` (or ``[..., H]``), float16 / bfloat16 / float32 (float64 accepted)
        Final hidden states; any strides.
    weight : Tensor, shape ``[V, H]``, same dtype as ``hidden``
        The LM head (``lm_head.weight``); any strides (a tied embedding is read in place).
    targets : Tensor, shape ``[N]`` (or ``[...]``, hidden's leading shape), int64
        Token ids in ``[0, V)``, or ``ignore_index``.
    bias : Tensor, shape ``[V]``, same dtype as ``hidden``, optional
    temperature : float, default 1.0
        Finite and ``>= MIN_TEMPERATURE`` (~2.9e-39: 1/T is a finite float32): ``logp = z_t / T - logsumexp(z / T)``.
    with_entropy : bool, default False
        Also return the entropy of ``softmax(z / T)`` (differentiable), from the same pass.
    ignore_index : int, default -100
        Positions whose target equals it give 0 (log-prob and entropy) and zero gradient.
    chunk_size : int, optional
        Vocabulary entries per chunk (``"cpu"`` / ``"cuda"`` forward and every backward). Default:
        as many as keep one float32 chunk of logits near 32 MiB (CPU) / 128 MiB (CUDA), between
        1024 and 8192 columns; rows are chunked too so the chunk never exceeds that budget.
    backend : {"triton", "cuda", "cpu", "reference"}, optional
        ``"triton"``: fused Triton kernels (default on CUDA). ``"cpu"`` / ``"cuda"``: the chunked
        PyTorch path (BLAS / cuBLAS per chunk; ``"cuda"`` is *not* a hand-written CUDA kernel, it is
        the default on CUDA only without Triton). ``"reference"``: materialises the logits.
        Default: ``GTALIGN_FAST_BACKEND_LINEAR_TOKEN_LOGPROBS``, ``GTALIGN_FAST_BACKEND``, then the device's.

    Returns
    -------
    logp : Tensor, shape ``[N]`` (targets' shape), float32
        Returned alone when ``with_entropy`` is False.
    (logp, entropy) : tuple of Tensor, shape ``[N]``, float32
        When ``with_entropy`` is True.

    Raises
    ------
    TypeError
        Non-tensor inputs, a non-float or mismatched dtype (weight / bias vs hidden), non-int64
        targets, a non-float temperature, a non-int chunk_size, float64 with the Triton backend.
    ValueError
        Shape or device mismatch, V = 0 or H = 0, temperature not finite or ``<= 0``, chunk_size < 1,
        an unknown backend.
    IndexError
        A target outside ``[0, V)`` that is not ``ignore_index``.
    RuntimeError
        A backend that cannot run here (e.g. ``"triton"`` on CPU tensors without the interpreter).

    Notes
    -----
    Gradients: with ``dz_j = (g_logp (1[j = t] - p_j) - g_H p_j (log p_j + H)) / T``,
    ``dhidden = dz @ weight``, ``dweight = dz^T @ hidden``, ``dbias = sum_rows dz``, each in its
    input's dtype (float32 accumulation).
    """
    _validate(hidden, weight, targets, bias, temperature, chunk_size)
    hidden_rows = hidden.reshape(-1, hidden.shape[-1])
    options = LinearTokenLogprobsOptions(
        float(temperature), bool(with_entropy), int(ignore_index), int(chunk_size or 0)
    )
    logp, entropy, _ = FORWARD(hidden_rows, weight, bias, targets.reshape(-1), options=options, backend=backend or "")
    logp = logp.view(targets.shape)
    return (logp, entropy.view(targets.shape)) if with_entropy else logp
