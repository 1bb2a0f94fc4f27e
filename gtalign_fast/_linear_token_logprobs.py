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
``"cpu"``        the chunked PyTorch path on CPU tensors (BLAS ``addmm`` per chunk + in-place
                 elementwise work on the one chunk buffer). Default on CPU tensors.
``"cuda"``       the same chunked PyTorch path on CUDA tensors, built on cuBLAS -- not a hand-written
                 CUDA kernel. Default on CUDA only when Triton is not installed.
``"reference"``  materialises the logits and calls :func:`gtalign_fast.reference.token_logprobs`
                 (float64-capable; for tests, O(N V) memory).

The backend is chosen by ``backend=``, then ``GTALIGN_FAST_BACKEND_LINEAR_TOKEN_LOGPROBS``, then
``GTALIGN_FAST_BACKEND``, then the device default. This op does not go through
``_backend.resolve`` because its CPU / CUDA paths are pure PyTorch and do not need the compiled
extension.
"""

from __future__ import annotations

import math

import torch

from . import _backend, reference
from ._token_logprobs import check_target_range

OP = "linear_token_logprobs"
BACKENDS = ("triton", "cuda", "cpu", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)

# Elements of one chunk of logits (float32): 8 Mi elements = 32 MiB on CPU (fits the caches of
# the BLAS blocking well enough, small next to the weight), 32 Mi = 128 MiB on GPU (big enough
# GEMMs for cuBLAS). The chunk's columns are clamped to [MIN_COLS, MAX_COLS] so the GEMMs stay
# efficient when N is huge (rows are then chunked too) or tiny.
CHUNK_ELEMENTS = {"cpu": 8 * 2**20, "cuda": 32 * 2**20}
MIN_COLS, MAX_COLS = 1024, 8192
# An explicit chunk_size is capped here, so the Triton backward's grid axis 1 (column tiles of
# one chunk, >= 32 columns each) stays far below the 65535 limit whatever V is.
CHUNK_SIZE_CAP = 1 << 20


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


def _resolve_backend(device: torch.device, requested: str) -> str:
    return _backend.resolve(OP, device, requested, availability=_why_unavailable, default=_default_backend)


# ---------------------------------------------------------------------------------------------
# Shared helpers


def chunk_shape(n_rows: int, vocab: int, chunk_size: int, device: torch.device) -> tuple[int, int]:
    """``(rows, cols)`` of one chunk of logits: ``cols`` vocabulary entries (``chunk_size`` when
    given) and as many rows as fit the device's element budget, so the chunk never grows with V
    nor (beyond the budget) with N."""
    budget = CHUNK_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    if chunk_size > 0:
        cols = min(chunk_size, vocab, CHUNK_SIZE_CAP)
    else:
        cols = min(vocab, max(MIN_COLS, min(MAX_COLS, budget // max(n_rows, 1))))
    rows = min(max(n_rows, 1), max(1, budget // cols))
    return rows, cols


_MM_OUT_DTYPE_OK: dict[str, bool] = {}


def _mm_float(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` with a ``dtype`` (float32/64) result: half inputs keep the tensor cores on CUDA
    through ``out_dtype`` when this torch has it; elsewhere the operands are upcast (same maths:
    exact products, float32 accumulation, no rounding of the result to half)."""
    if a.dtype == dtype and b.dtype == dtype:
        return a @ b
    if a.device.type == "cuda" and a.dtype == b.dtype and dtype == torch.float32:
        if _MM_OUT_DTYPE_OK.get("cuda", True):
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except (RuntimeError, TypeError, NotImplementedError):
                _MM_OUT_DTYPE_OK["cuda"] = False
    return a.to(dtype) @ b.to(dtype)


def _gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """dtype of ``dz`` for the backward products: the input's half type on CUDA (tensor cores,
    float32 accumulation in cuBLAS), the compute dtype elsewhere (CPU half GEMMs are slow and the
    Triton interpreter has no half ``tl.dot``)."""
    if device.type == "cuda" and dtype in HALF_DTYPES and not _backend.triton_interpreted():
        return dtype
    return reference.compute_dtype(dtype)


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc = a @ b`` (first) or ``acc += a @ b``, accumulating in ``acc``'s dtype."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif first:
        acc.copy_(_mm_float(a, b, acc.dtype))
    else:
        acc.add_(_mm_float(a, b, acc.dtype))


# ---------------------------------------------------------------------------------------------
# Chunked PyTorch path ("cpu" / "cuda"): forward


def _chunk_logits(h_rows, w_chunk, b_chunk, inv_t, buffer) -> torch.Tensor:
    """``y = (h_rows @ w_chunk.T + b_chunk) * inv_t`` in the compute dtype, in ``buffer`` when the
    dtypes allow a BLAS ``out=`` (``w_chunk`` / ``b_chunk`` already in the compute dtype there)."""
    if h_rows.dtype != buffer.dtype and w_chunk.dtype == buffer.dtype:
        h_rows = h_rows.to(buffer.dtype)  # CPU half inputs: upcast the rows, keep BLAS out=
    if h_rows.dtype == buffer.dtype:
        if b_chunk is not None:
            torch.addmm(b_chunk, h_rows, w_chunk.T, out=buffer)
        else:
            torch.mm(h_rows, w_chunk.T, out=buffer)
        y = buffer
    else:
        y = _mm_float(h_rows, w_chunk.T, buffer.dtype)
        if b_chunk is not None:
            y.add_(b_chunk)
    if inv_t != 1.0:
        y.mul_(inv_t)
    return y


class _OnlineStats:
    """Per-row online log-sum-exp state across vocabulary chunks: running max ``m``,
    ``s = sum exp(y - m)``, ``t = sum exp(y - m) (y - m)`` (entropy only) and the target logit."""

    def __init__(self, n_rows, dtype, device, with_entropy):
        self.m = torch.full((n_rows,), float("-inf"), dtype=dtype, device=device)
        self.s = torch.zeros((n_rows,), dtype=dtype, device=device)
        self.t = torch.zeros((n_rows,), dtype=dtype, device=device) if with_entropy else None
        self.y_target = torch.zeros((n_rows,), dtype=dtype, device=device)

    def update(self, rows: slice, y, targets_rows, col_start, work, nonfinite_bias):
        """Fold the chunk ``y`` ``[R, C]`` (columns from ``col_start``) into rows ``rows``.
        ``y`` is overwritten (centred, then exponentiated); ``work`` is a second buffer like ``y``
        (entropy only)."""
        n_cols = y.shape[1]
        local = targets_rows - col_start
        in_chunk = (local >= 0) & (local < n_cols)
        picked = y.gather(1, local.clamp(0, n_cols - 1).unsqueeze(1)).squeeze(1)
        self.y_target[rows] += torch.where(in_chunk, picked, torch.zeros_like(picked))

        m_old = self.m[rows]
        m_new = torch.maximum(m_old, y.amax(dim=1))
        # While every value seen is -inf (a -inf bias), shift by 0 instead (-inf - -inf is nan).
        m_ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        rescale = torch.exp(m_old - m_ref)
        y.sub_(m_ref.unsqueeze(1))
        s_old = self.s[rows]
        if self.t is not None:
            e = torch.exp(y, out=work)
            chunk_s = e.sum(dim=1)
            e.mul_(y)
            if nonfinite_bias:
                e.nan_to_num_(nan=0.0)  # 0 * -inf where the bias is -inf: p = 0 adds nothing
            shift = torch.where(s_old > 0, m_old - m_ref, torch.zeros_like(m_ref))
            self.t[rows] = rescale * (self.t[rows] + shift * s_old) + e.sum(dim=1)
        else:
            chunk_s = y.exp_().sum(dim=1)
        self.s[rows] = s_old * rescale + chunk_s
        self.m[rows] = m_new


def _forward_chunked(hidden, weight, bias, targets, inv_t, with_entropy, chunk_size):
    """Return ``(logp, lse, entropy or None)`` ``[N]`` in the compute dtype; all rows valid."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = reference.compute_dtype(hidden.dtype)
    rows_per_chunk, cols_per_chunk = chunk_shape(n_rows, vocab, chunk_size, hidden.device)
    capacity = rows_per_chunk * cols_per_chunk
    buffer = torch.empty(capacity, dtype=dtype, device=hidden.device)
    work = torch.empty(capacity, dtype=dtype, device=hidden.device) if with_entropy else None
    nonfinite_bias = bias is not None and not bool(torch.isfinite(bias).all())
    stats = _OnlineStats(n_rows, dtype, hidden.device, with_entropy)
    for col_start in range(0, vocab, cols_per_chunk):
        col_end = min(vocab, col_start + cols_per_chunk)
        w_chunk = weight[col_start:col_end].to(dtype) if hidden.device.type == "cpu" else weight[col_start:col_end]
        b_chunk = None if bias is None else bias[col_start:col_end].to(dtype)
        for row_start in range(0, n_rows, rows_per_chunk):
            rows = slice(row_start, min(n_rows, row_start + rows_per_chunk))
            shape = (rows.stop - rows.start, col_end - col_start)
            y = _chunk_logits(hidden[rows], w_chunk, b_chunk, inv_t, buffer[: shape[0] * shape[1]].view(shape))
            chunk_work = work[: y.numel()].view(shape) if work is not None else None
            stats.update(rows, y, targets[rows], col_start, chunk_work, nonfinite_bias)
    log_s = torch.log(stats.s)
    lse = stats.m + log_s
    entropy = log_s - stats.t / stats.s if with_entropy else None
    return stats.y_target - lse, lse, entropy


# ---------------------------------------------------------------------------------------------
# Backward driver (chunked; dz from PyTorch or from the Triton kernel)


def _dz_chunked(h_rows, w_chunk, b_chunk, targets_rows, lse_rows, entropy_rows, g_rows, g_entropy_rows,
                inv_t, col_start, buffer, work, nonfinite_bias):
    """``dz`` ``[R, C]`` of one chunk, computed in place in ``buffer`` (``work`` with entropy).
    ``g_rows`` / ``g_entropy_rows`` already hold the ``1/T`` factor."""
    z = _chunk_logits(h_rows, w_chunk, b_chunk, inv_t, buffer)
    z.sub_(lse_rows.unsqueeze(1))  # log p
    if g_entropy_rows is None:
        z.exp_().mul_(-g_rows.unsqueeze(1))  # -g p
    else:
        p = torch.exp(z, out=work)
        z.add_(entropy_rows.unsqueeze(1)).mul_(p)  # p (log p + H)
        if nonfinite_bias:
            z.nan_to_num_(nan=0.0)
        z.mul_(-g_entropy_rows.unsqueeze(1)).addcmul_(p, g_rows.unsqueeze(1), value=-1.0)
    local = targets_rows - col_start
    hit = ((local >= 0) & (local < z.shape[1])).nonzero().squeeze(1)
    z.index_put_((hit, local[hit]), g_rows[hit], accumulate=True)  # + g onehot
    return z


def _dz_triton(h_rows, w_chunk, b_chunk, targets_rows, lse_rows, entropy_rows, g_rows, g_entropy_rows,
               inv_t, ignore_index, col_start, buffer):
    from gtalign_fast.kernels import linear_token_logprobs as kernels

    # The kernel folds 1/T itself: hand it the raw upstream gradients.
    kernels.backward_dz(
        h_rows, w_chunk, b_chunk, targets_rows, lse_rows, entropy_rows,
        g_rows, g_entropy_rows, inv_t, ignore_index, col_start, buffer,
    )
    return buffer


def _backward_chunks(name, hidden, weight, bias, targets, lse, entropy, g_logp, g_entropy, inv_t, ignore_index,
                     chunk_size, dhidden, dweight, dbias):
    """Accumulate the gradients of the (all valid) rows into ``dhidden`` ``[N, H]``,
    ``dweight`` ``[V, H]``, ``dbias`` ``[V]`` (each may be None: not needed).

    Vocabulary chunks outside, row chunks inside: the weight-gradient chunk is finished (and
    written once) before the next chunk starts, so its float32 accumulator stays one chunk big.
    """
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    dtype = reference.compute_dtype(hidden.dtype)
    gemm_dtype = _gemm_dtype(hidden.dtype, device)
    rows_per_chunk, cols_per_chunk = chunk_shape(n_rows, vocab, chunk_size, device)
    capacity = rows_per_chunk * cols_per_chunk
    buffer = torch.empty(capacity, dtype=dtype if name != "triton" else gemm_dtype, device=device)
    work = torch.empty(capacity, dtype=dtype, device=device) if (g_entropy is not None and name != "triton") else None
    nonfinite_bias = bias is not None and not bool(torch.isfinite(bias).all())
    g_scaled = g_logp * inv_t if name != "triton" else g_logp
    g_entropy_scaled = (g_entropy * inv_t if name != "triton" else g_entropy) if g_entropy is not None else None

    dh_acc = None
    if dhidden is not None:
        dh_acc = dhidden.zero_() if dhidden.dtype == dtype else torch.zeros((n_rows, hidden_size), dtype=dtype, device=device)
    dw_buffer = None
    if dweight is not None and dweight.dtype != dtype:
        dw_buffer = torch.empty((cols_per_chunk, hidden_size), dtype=dtype, device=device)
    db_acc = torch.zeros((vocab,), dtype=dtype, device=device) if dbias is not None else None

    for col_start in range(0, vocab, cols_per_chunk):
        cols = slice(col_start, min(vocab, col_start + cols_per_chunk))
        n_cols = cols.stop - cols.start
        w_raw = weight[cols]
        w_compute = w_raw.to(dtype) if (name != "triton" and device.type == "cpu") else w_raw
        w_gemm = w_compute if w_compute.dtype == gemm_dtype else w_raw.to(gemm_dtype)
        b_chunk = None if bias is None else (bias[cols].to(dtype) if name != "triton" else bias[cols].contiguous())
        dw_acc = None
        if dweight is not None:
            dw_acc = dweight[cols] if dw_buffer is None else dw_buffer[:n_cols]
        for row_start in range(0, n_rows, rows_per_chunk):
            rows = slice(row_start, min(n_rows, row_start + rows_per_chunk))
            shape = (rows.stop - rows.start, n_cols)
            chunk = buffer[: shape[0] * shape[1]].view(shape)
            ent_rows = entropy[rows] if g_entropy is not None else None
            g_ent_rows = g_entropy_scaled[rows] if g_entropy is not None else None
            if name == "triton":
                dz = _dz_triton(hidden[rows], w_raw, b_chunk, targets[rows], lse[rows], ent_rows,
                                g_scaled[rows], g_ent_rows, inv_t, ignore_index, col_start, chunk)
            else:
                dz = _dz_chunked(hidden[rows], w_compute, b_chunk, targets[rows], lse[rows], ent_rows,
                                 g_scaled[rows], g_ent_rows, inv_t, col_start, chunk,
                                 work[: chunk.numel()].view(shape) if work is not None else None, nonfinite_bias)
            if db_acc is not None:
                db_acc[cols] += dz.sum(dim=0, dtype=dtype)
            dz = dz.to(gemm_dtype)  # CUDA "cuda" path with half inputs: tensor-core products
            if dh_acc is not None:
                _accumulate_mm(dh_acc[rows], dz, w_gemm, first=False)
            if dw_acc is not None:
                _accumulate_mm(dw_acc, dz.T, hidden[rows].to(gemm_dtype), first=row_start == 0)
        if dw_buffer is not None:
            dweight[cols].copy_(dw_acc)
    if dh_acc is not None and dh_acc is not dhidden:
        dhidden.copy_(dh_acc)
    if dbias is not None:
        dbias.copy_(db_acc)


# ---------------------------------------------------------------------------------------------
# Backends: forward and backward runners


def _forward_reference(hidden, weight, bias, targets, temperature, with_entropy, ignore_index, logp, entropy, lse):
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


def _run_forward(name, hidden, weight, bias, targets, temperature, with_entropy, ignore_index, chunk_size,
                 logp, entropy, lse):
    if name == "reference":
        _forward_reference(hidden, weight, bias, targets, temperature, with_entropy, ignore_index, logp, entropy, lse)
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
        logp_v, lse_v, entropy_v = _forward_chunked(hidden, weight, bias, targets, inv_t, with_entropy, chunk_size)
        values = [logp_v, lse_v] + ([entropy_v] if with_entropy else [])
    for out, value in zip(outputs, values):
        if rows is None:
            out.copy_(value)
        else:
            out.index_copy_(0, rows, value.to(out.dtype))


def _backward_reference(g_logp, g_entropy, hidden, weight, bias, targets, temperature, ignore_index,
                        dhidden, dweight, dbias):
    """Materialised logits and the closed-form gradient (autograd is not reachable inside a
    custom op's kernel): ``dz = (g (onehot - p) - g_H p (log p + H)) / T``."""
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
    if dhidden is not None:
        dhidden.copy_(dz @ w)
    if dweight is not None:
        dweight.copy_(dz.T @ h)
    if dbias is not None:
        dbias.copy_(dz.sum(dim=0))


def _run_backward(name, g_logp, g_entropy, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
                  chunk_size, dhidden, dweight, dbias):
    if name == "reference":
        _backward_reference(g_logp, g_entropy, hidden, weight, bias, targets, temperature, ignore_index,
                            dhidden, dweight, dbias)
        return
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
    _backward_chunks(
        name, hidden, weight, bias, targets.contiguous(), lse.contiguous(),
        None if g_entropy is None else entropy.contiguous(), g_logp.contiguous(),
        None if g_entropy is None else g_entropy.contiguous(), 1.0 / temperature, ignore_index, chunk_size,
        dhidden_rows, dweight, dbias,
    )
    if rows is not None and dhidden is not None:
        dhidden.zero_().index_copy_(0, rows, dhidden_rows)


def _check_backend_dtype(name: str, dtype: torch.dtype) -> None:
    if name == "triton" and dtype == torch.float64:
        raise TypeError(
            f"{OP}: the 'triton' backend takes float16 / bfloat16 / float32 inputs, got float64; "
            "use backend='cpu' / 'cuda' (chunked, float64 maths) or 'reference'"
        )


# ---------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("gtalign_fast::linear_token_logprobs", mutates_args=())
def _linear_token_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    ignore_index: int,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    name = _resolve_backend(hidden.device, backend)
    _backend.record(OP, name)
    _check_backend_dtype(name, hidden.dtype)
    check_target_range(targets, weight.shape[0], ignore_index, op=OP)
    n_rows = targets.shape[0]
    logp = _backend.new_output((n_rows,), torch.float32, hidden.device)
    lse = _backend.new_output((n_rows,), torch.float32, hidden.device)
    entropy = _backend.new_output((n_rows if with_entropy else 0,), torch.float32, hidden.device)
    if n_rows > 0:
        _run_forward(name, hidden, weight, bias, targets, temperature, with_entropy, ignore_index, chunk_size,
                     logp, entropy, lse)
    return logp, entropy, lse


@_linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, targets, temperature, with_entropy, ignore_index, chunk_size, backend):
    n_rows = targets.shape[0]
    logp = hidden.new_empty((n_rows,), dtype=torch.float32)
    entropy = hidden.new_empty((n_rows if with_entropy else 0,), dtype=torch.float32)
    return logp, entropy, hidden.new_empty((n_rows,), dtype=torch.float32)


@torch.library.custom_op("gtalign_fast::linear_token_logprobs_backward", mutates_args=())
def _linear_token_logprobs_backward_op(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dhidden, dweight, dbias)``; a gradient that is not needed is an empty ``[0]``."""
    name = _resolve_backend(hidden.device, backend)
    _backend.record(OP, name)
    device = hidden.device
    dhidden = _backend.new_output(hidden.shape, hidden.dtype, device) if need_hidden else None
    dweight = _backend.new_output(weight.shape, weight.dtype, device) if need_weight else None
    dbias = _backend.new_output(bias.shape, bias.dtype, device) if (need_bias and bias is not None) else None
    if dhidden is not None or dweight is not None or dbias is not None:
        grad_logp = grad_logp.to(torch.float32).contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.to(torch.float32).contiguous()
        _run_backward(name, grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature,
                      ignore_index, chunk_size, dhidden, dweight, dbias)
    # Outputs may not alias each other: a fresh empty tensor for each gradient not asked for.
    return tuple(out if out is not None else hidden.new_empty((0,)) for out in (dhidden, dweight, dbias))


@_linear_token_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index, chunk_size,
      need_hidden, need_weight, need_bias, backend):
    dhidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else hidden.new_empty((0,))
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else hidden.new_empty((0,))
    dbias = torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty((0,))
    return dhidden, dweight, dbias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, with_entropy, ignore_index, chunk_size, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.temperature, ctx.with_entropy, ctx.ignore_index = temperature, with_entropy, ignore_index
    ctx.chunk_size, ctx.backend = chunk_size, backend
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logp, grad_entropy, grad_lse):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    no_grads = (None,) * 9
    if grad_logp is None and grad_entropy is None:
        return no_grads
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not ctx.with_entropy:
        grad_entropy = None
    dhidden, dweight, dbias = _linear_token_logprobs_backward_op(
        grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy, ctx.temperature, ctx.ignore_index,
        ctx.chunk_size, bool(need_hidden), bool(need_weight), bool(need_bias and ctx.has_bias), ctx.backend,
    )
    return (
        dhidden if need_hidden else None,
        dweight if need_weight else None,
        dbias if (need_bias and ctx.has_bias) else None,
        None, None, None, None, None, None,
    )


_linear_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


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
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{OP}: temperature must be finite and > 0, got {temperature}")
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
        Finite and ``> 0``: ``logp = z_t / T - logsumexp(z / T)``.
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
    logp, entropy, _ = _linear_token_logprobs_op(
        hidden_rows, weight, bias, targets.reshape(-1), float(temperature), bool(with_entropy),
        int(ignore_index), int(chunk_size or 0), backend or "",
    )
    logp = logp.view(targets.shape)
    return (logp, entropy.view(targets.shape)) if with_entropy else logp
