"""The chunked backend of ``linear_token_logprobs``: the LM head in vocabulary (and row) chunks.

``gtalign_fast.linear_token_logprobs``'s ``"cpu"`` and ``"cuda"`` backends are this PyTorch path
(BLAS / cuBLAS ``addmm`` per chunk + in-place elementwise work on one reused chunk buffer); the
``"triton"`` backend uses its backward driver too, with ``dz`` from the Triton kernel of
``linear_token_logprobs.py`` beside this file. Inputs arrive validated, with every row valid (the
op drops ``ignore_index`` rows before calling in).
"""

from __future__ import annotations

import math

import torch

from gtalign_fast import _backend, reference

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
# Chunk shapes and products


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
# Forward


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


def _any_nonfinite(*tensors) -> bool:
    """Whether any of the tensors (None skipped) holds an inf or NaN: one host sync."""
    finite = [torch.isfinite(t).all() for t in tensors if t is not None]
    return not bool(torch.stack(finite).all())


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
                # 0 * -inf where a logit is -inf: p = 0 adds nothing (+-inf are kept: a +inf logit
                # makes the row's entropy nan, as the reference has it)
                e.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
            shift = torch.where(s_old > 0, m_old - m_ref, torch.zeros_like(m_ref))
            self.t[rows] = rescale * (self.t[rows] + shift * s_old) + e.sum(dim=1)
        else:
            chunk_s = y.exp_().sum(dim=1)
        self.s[rows] = s_old * rescale + chunk_s
        self.m[rows] = m_new


def forward_chunked(hidden, weight, bias, targets, inv_t, with_entropy, chunk_size):
    """Return ``(logp, lse, entropy or None)`` ``[N]`` in the compute dtype; all rows valid."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = reference.compute_dtype(hidden.dtype)
    rows_per_chunk, cols_per_chunk = chunk_shape(n_rows, vocab, chunk_size, hidden.device)
    capacity = rows_per_chunk * cols_per_chunk
    buffer = torch.empty(capacity, dtype=dtype, device=hidden.device)
    work = torch.empty(capacity, dtype=dtype, device=hidden.device) if with_entropy else None
    # An infinite value in the bias, the hidden states or the weight can make a logit -inf, whose
    # p * (y - m) term is 0 * -inf = nan: those chunks need the nan_to_num pass (one sync, on the
    # inputs, not the [N, V] logits).
    nonfinite_bias = with_entropy and _any_nonfinite(hidden, weight, bias)
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
# Backward (dz from PyTorch or from the Triton kernel)


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


def backward_chunked(name, hidden, weight, bias, targets, lse, entropy, g_logp, g_entropy, inv_t, ignore_index,
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
    # An infinite value in the bias, the hidden states or the weight can make a logit -inf, whose
    # p * (y - m) term is 0 * -inf = nan: those chunks need the nan_to_num pass (one sync, on the
    # inputs, not the [N, V] logits).
    nonfinite_bias = work is not None and _any_nonfinite(hidden, weight, bias)
    g_scaled = g_logp * inv_t if name != "triton" else g_logp
    g_entropy_scaled = (g_entropy * inv_t if name != "triton" else g_entropy) if g_entropy is not None else None

    dh_acc = None
    if dhidden is not None:
        dh_acc = dhidden.zero_() if dhidden.dtype == dtype else torch.zeros((n_rows, hidden_size), dtype=dtype,
                                                                             device=device)
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
