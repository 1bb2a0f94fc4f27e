"""``linear_token_logprobs``: the LM head fused with ``token_logprobs``, in chunks of tokens.

``linear_token_logprobs(hidden, weight, targets)`` equals
``token_logprobs(hidden @ weight.T + bias, targets)`` but never allocates the ``[N, V]`` logits.
Per chunk of tokens, one GEMM writes the chunk's float32 logits into one reused buffer and one
memory-bound pass turns them into log-prob, entropy and ``(m, log s)`` per row; the backward
recomputes the chunk's logits (GEMM), overwrites them with ``dz`` in one pass, then
``dhidden_c = dz @ W`` and ``dW += dz^T @ hidden_c``. A forward + backward costs four GEMMs and two
passes over each chunk (``gtalign_fast.kernels.linear_token_logprobs_chunked``).

Backends (resolved inside the op, at run time, like every gtalign_fast op); the GEMMs are always
torch's (cuBLAS / the CPU BLAS), the backends differ in the pass over each chunk:

``"triton"``     the Triton kernels of ``gtalign_fast.kernels.linear_token_logprobs``. Default on CUDA.
``"cpu"``        the C++ ``token_logprobs`` kernels (OpenMP, vectorised) on CPU tensors; a row-blocked
                 PyTorch pass for float64, or when the extension is not built. Default on CPU.
``"cuda"``       the PyTorch pass on CUDA tensors (not a hand-written CUDA kernel): the default on
                 CUDA only when Triton is not installed.
``"reference"``  materialises the logits and calls :func:`gtalign_fast.reference.token_logprobs`
                 (float64-capable; for tests, O(N V) memory).

The backend is chosen by ``backend=``, then ``GTALIGN_FAST_BACKEND_LINEAR_TOKEN_LOGPROBS``, then
``GTALIGN_FAST_BACKEND``, then the device default. Its "cpu" / "cuda" backends are declared as
PyTorch paths (``torch_paths``): they run without the compiled extension.

Target ids outside ``[0, V)``: the CPU and reference backends raise ``IndexError`` at once; on CUDA
the kernels set the device error flag (``gtalign_fast.ops._device_checks``; the row's log-prob is NaN)
and the error is raised by ``check_device_errors()``, without a host synchronisation per call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from gtalign_fast.kernels import linear_token_logprobs_chunked as chunked

from .. import reference
from . import _device_checks
from ._op import Op, Output, backends, chunk_drivers
from ._token_logprobs import MIN_TEMPERATURE, check_target_range
from ._token_logprobs_constants import NUM_SOFTMAX_STATS, STAT_LOG_SUM, STAT_ROW_MAX

OP = "linear_token_logprobs"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# Backends


def _forward_reference(hidden, weight, bias, targets, options, logp, entropy, stats):
    temperature, with_entropy, ignore_index, _ = options
    ref_logp, ref_entropy = reference.linear_token_logprobs(
        hidden, weight, targets, bias, temperature, with_entropy, ignore_index
    )
    logp.copy_(ref_logp)
    if with_entropy:
        entropy.copy_(ref_entropy)
    dtype = reference.compute_dtype(hidden.dtype)
    logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    y = logits / temperature
    row_max = y.amax(dim=-1) if y.shape[0] else torch.zeros(0, dtype=dtype, device=y.device)
    shift = torch.where(torch.isinf(row_max), 0.0, row_max)
    valid = targets != ignore_index
    stats[:, STAT_ROW_MAX] = torch.where(valid, shift, 0.0)
    stats[:, STAT_LOG_SUM] = torch.where(valid, torch.logsumexp(y - shift.unsqueeze(1), dim=-1), 0.0)


def _valid_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows to compute, or None when every row is valid (no compaction copy). Used on
    CPU tensors only (the check reads the data: free there, a host sync on CUDA): prompt and padding
    positions are dropped before the GEMMs instead of costing a row of each."""
    valid = targets != ignore_index
    if bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1)


def _forward_chunks(name, hidden, weight, bias, targets, options, logp, entropy, stats):
    """Every backend but the reference: chunks of tokens (only the valid rows on the "cpu" backend)."""
    temperature, with_entropy, ignore_index, chunk_size = options
    if targets.numel() == 0:
        return
    device = hidden.device
    rows = _valid_rows(targets, ignore_index) if name == "cpu" else None
    outs = (logp, entropy if with_entropy else None, stats)
    if rows is not None:
        for out in outs:
            if out is not None:
                out.zero_()
        hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
        outs = tuple(None if out is None else torch.empty((rows.numel(), *out.shape[1:]), dtype=out.dtype,
                                                          device=device) for out in outs)
    flag = _device_checks.error_flag(device)
    chunked.forward_chunked(name, hidden, weight, bias, targets.contiguous(), 1.0 / temperature, ignore_index,
                            chunk_size, *outs, flag)
    if name != "cpu":  # the "cpu" backend checked the ids on the host before
        _device_checks.after_launch(
            OP, device, explain=lambda: check_target_range(targets, weight.shape[0], ignore_index, op=OP)
        )
    if rows is not None:
        for full, part in zip((logp, entropy if with_entropy else None, stats), outs):
            if full is not None:
                full.index_copy_(0, rows, part)


def _backward_reference(g_logp, g_entropy, hidden, weight, bias, targets, stats, entropy, need_hidden, need_weight,
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


def _backward_chunks(name, g_logp, g_entropy, hidden, weight, bias, targets, stats, entropy, need_hidden, need_weight,
                     need_bias, options, dhidden, dweight, dbias):
    """Every backend but the reference; a gradient not asked for is None."""
    temperature, _, ignore_index, chunk_size = options
    dhidden, dweight, dbias = (out if need else None for out, need in
                               ((dhidden, need_hidden), (dweight, need_weight), (dbias, need_bias)))
    if dhidden is None and dweight is None and dbias is None:
        return
    dtype = reference.compute_dtype(hidden.dtype)  # float32 for the kernels, float64 maths for float64
    g_logp = g_logp.to(dtype).contiguous()
    g_entropy = None if g_entropy is None else g_entropy.to(dtype).contiguous()
    rows = _valid_rows(targets, ignore_index) if name == "cpu" and targets.numel() else None
    dhidden_rows = dhidden
    if rows is not None:
        hidden, targets, stats, g_logp = (x.index_select(0, rows) for x in (hidden, targets, stats, g_logp))
        if g_entropy is not None:
            g_entropy, entropy = g_entropy.index_select(0, rows), entropy.index_select(0, rows)
        if dhidden is not None:
            dhidden_rows = torch.empty_like(hidden)
    chunked.backward_chunked(
        name, hidden, weight, bias, targets.contiguous(), stats.contiguous(), entropy.contiguous(), g_logp, g_entropy,
        1.0 / temperature, ignore_index, chunk_size, dhidden_rows, dweight, dbias,
    )
    if rows is not None and dhidden is not None:
        dhidden.zero_().index_copy_(0, rows, dhidden_rows)


def _check_data(hidden, weight, bias, targets, options, backend) -> None:
    """Ids are checked on the host where that is free and where no kernel checks them (CPU, the
    reference); the Triton and "cuda" passes flag them on the device instead."""
    if backend in ("cpu", "reference"):
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
    chunk_size: int  # tokens (rows) per chunk; 0 = chosen from the shapes (chunked.chunk_rows)


def _forward_outputs(hidden, weight, bias, targets, options):
    n_rows = targets.shape[0]
    return (
        Output((n_rows,), torch.float32),  # logp
        Output((n_rows if options.with_entropy else 0,), torch.float32),  # entropy
        # per row (shift m, log sum exp(z / T - m)) for the backward (columns STAT_* of _token_logprobs_constants)
        Output((n_rows, NUM_SOFTMAX_STATS), reference.compute_dtype(hidden.dtype)),
    )


FORWARD = Op(
    "linear_token_logprobs",
    inputs="Tensor hidden, Tensor weight, Tensor? bias, Tensor targets",
    options=LinearTokenLogprobsOptions,
    returns=("logp", "entropy", "stats"),
    outputs=_forward_outputs,
    check=_check_data,
    # "cpu" / "cuda": torch's GEMMs and a pass that needs no extension (the C++ kernels when built)
    backends=backends(**chunk_drivers(_forward_chunks, "triton", "cpu", "cuda"), reference=_forward_reference,
                      torch_paths=("cpu", "cuda")),
)


def _backward_outputs(grad_logp, grad_entropy, hidden, weight, bias, targets, stats, entropy, need_hidden, need_weight,
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
        "Tensor stats, Tensor entropy, bool need_hidden, bool need_weight, bool need_bias"
    ),
    options=LinearTokenLogprobsOptions,
    returns=("dhidden", "dweight", "dbias"),
    outputs=_backward_outputs,
    backends=backends(**chunk_drivers(_backward_chunks, "triton", "cpu", "cuda"), reference=_backward_reference,
                      torch_paths=("cpu", "cuda")),
)


def _save(ctx, inputs, options, outputs) -> None:
    hidden, weight, bias, targets = inputs
    _, entropy, stats = outputs
    ctx.save_for_backward(hidden, weight, bias, targets, stats, entropy)


def _backward(ctx, grad_logp, grad_entropy, _grad_stats):
    hidden, weight, bias, targets, stats, entropy = ctx.saved_tensors
    if grad_logp is None and grad_entropy is None:
        return None, None, None, None
    if grad_logp is None:
        grad_logp = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    if not ctx.options.with_entropy:
        grad_entropy = None
    need_hidden, need_weight, need_bias = ctx.needs_grad[:3]
    need_bias = bool(need_bias and bias is not None)
    dhidden, dweight, dbias = BACKWARD.call_in_backward(
        ctx, grad_logp, grad_entropy, hidden, weight, bias, targets, stats, entropy, bool(need_hidden),
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
    tokens are processed in chunks of ``R`` rows: per chunk one GEMM writes its ``[R, V]`` float32
    logits into one reused buffer and one pass reads them; the backward recomputes them (GEMM),
    overwrites them with ``dz`` in one pass and runs ``dz @ W`` and ``dz^T @ hidden`` (four GEMMs
    and two passes over each chunk in all). Extra memory: that one buffer (``4 R V`` bytes; half
    precision ``dz`` reuses its bytes), nothing of size ``N x V``. With half-precision inputs ``dz``
    is rounded to their dtype for the two backward GEMMs (tensor cores, float32 accumulation) and the
    weight gradient is accumulated in its own dtype, one rounding per chunk. On the ``"cpu"``
    backend, positions whose target is ``ignore_index`` are dropped before the GEMMs.

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
        Tokens (rows) per chunk, at most 32768. Default, from the shapes: as many rows as fit a
        float32 ``[R, V]`` buffer of 64 MiB on CPU (512 rows at V = 32000) / 1 GiB on CUDA (2048
        rows at V = 131072), at least 128 (CPU) / 512 (CUDA) rows (smaller GEMMs lose efficiency,
        and the weight gradient is re-read once per chunk), then evened out over the chunks that
        makes (multiples of 128 rows), so that no small last chunk wastes a GEMM. Too many small
        chunks lose GEMM efficiency; larger ones only cost memory.
    backend : {"triton", "cuda", "cpu", "reference"}, optional
        The pass over each chunk (the GEMMs are torch's, on cuBLAS / the CPU BLAS): ``"triton"``:
        Triton kernels (default on CUDA). ``"cpu"``: the C++ ``token_logprobs`` kernels (a PyTorch
        pass for float64 or without the extension). ``"cuda"``: a PyTorch pass on CUDA tensors (*not*
        a hand-written CUDA kernel; the default on CUDA only without Triton). ``"reference"``:
        materialises the logits.
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
        A target outside ``[0, V)`` that is not ``ignore_index`` (CPU tensors, the reference backend,
        or ``GTALIGN_FAST_SYNC_CHECKS=1``; on CUDA the row's log-prob is NaN and
        ``ops.check_device_errors()`` raises later, without a host sync per call).
    RuntimeError
        A backend that cannot run here (e.g. ``"triton"`` on CPU tensors without the interpreter).

    Notes
    -----
    Gradients: with ``dz_j = (g_logp (1[j = t] - p_j) - g_H p_j (log p_j + H)) / T``,
    ``dhidden = dz @ weight``, ``dweight = dz^T @ hidden``, ``dbias = sum_rows dz``, each in its
    input's dtype (float32 accumulation within a chunk). An infinite value in ``hidden``, ``weight``
    or ``bias`` gives what the materialised logits give: a ``-inf`` logit has probability 0 and adds
    nothing to the entropy; a ``+inf`` logit makes its row's log-probs ``-inf`` (NaN for that token)
    and its entropy NaN.
    """
    _validate(hidden, weight, targets, bias, temperature, chunk_size)
    hidden_rows = hidden.reshape(-1, hidden.shape[-1])
    options = LinearTokenLogprobsOptions(
        float(temperature), bool(with_entropy), int(ignore_index), int(chunk_size or 0)
    )
    logp, entropy, _ = FORWARD(hidden_rows, weight, bias, targets.reshape(-1), options=options, backend=backend or "")
    logp = logp.view(targets.shape)
    return (logp, entropy.view(targets.shape)) if with_entropy else logp
