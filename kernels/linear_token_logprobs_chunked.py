"""The chunk-over-tokens driver of ``linear_token_logprobs``: GEMMs on BLAS / cuBLAS, one pass per chunk.

Per chunk of ``R`` tokens (rows), with one reused ``[R, V]`` float32 buffer (float64 for float64
inputs):

forward   ``Z = H_c @ W^T`` (one GEMM into the buffer, float32 output even for half inputs), then
          one stats pass over ``Z``: log-prob, entropy and ``(m, log s)`` per row;
backward  recompute ``Z`` (GEMM), one pass turning it into ``dZ`` in place, then
          ``dH_c = dZ @ W`` and ``dW += dZ^T @ H_c`` (``db += sum_rows dZ`` with a bias).

So a forward + backward costs four GEMMs and two passes over each chunk of logits; the ``[N, V]``
logits never exist. The stats / dZ pass is, by backend: ``"triton"`` the kernels of
``linear_token_logprobs.py`` beside this file (bias added inside them); ``"cpu"`` the C++ kernels of
``token_logprobs`` (OpenMP, vectorised) on the float32 buffer, or the row-blocked PyTorch pass below
for float64 or without the extension; ``"cuda"`` the PyTorch pass on cuBLAS logits (the fallback
when Triton is not installed).

Half-precision inputs: the products have float32 results (``out_dtype`` on CUDA; on CPU, which has no
such GEMM, the weight is upcast a block of rows at a time), ``dZ`` is rounded to the input dtype
for the two backward GEMMs (tensor cores, float32 accumulation), and the weight gradient is
accumulated in its own dtype across chunks (one rounding per chunk, as Liger does): few chunks keep
that error small, which is one more reason for large chunks.
"""

from __future__ import annotations

import torch

from gtalign_fast import reference
from gtalign_fast.ops import _backend, _device_checks
from gtalign_fast.ops._token_logprobs_constants import NUM_SOFTMAX_STATS, STAT_LOG_SUM, STAT_ROW_MAX

# Chunk size. Bytes of the float32 [R, V] logits buffer when chunk_size is not given: 64 MiB on CPU
# (512 rows at V = 32000, H = 1024: on a 2-core Xeon the three GEMM shapes ran as fast with 256 to
# 1024 rows as with 2048), 1 GiB on CUDA (2048 rows at V = 131072: each GEMM is ~1 TFLOP, and the dW
# GEMM's K = R stays large enough that reading and writing the [V, H] gradient once per chunk costs
# little next to its FLOPs; half-precision dZ reuses the same bytes).
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}
# Below this many rows a GEMM loses efficiency (and dW is re-read per chunk): the budget is exceeded
# instead, for very large vocabularies.
MIN_CHUNK_ROWS = {"cpu": 128, "cuda": 512}
ROW_ALIGN = 128  # chunk rows rounded to GEMM tile multiples
# One chunk = one launch of one program per row: far below the 65535 limit of a CUDA grid axis,
# whatever N, V or chunk_size are.
MAX_CHUNK_ROWS = 32768
# The PyTorch stats pass works on this many rows at a time (a cache-resident block: its several
# elementwise passes then cost little more than one pass over the chunk).
TORCH_BLOCK_ROWS = 32
# CPU half inputs: weight rows upcast at a time for the float32 logits GEMM.
CPU_UPCAST_ROWS = 4096


# ---------------------------------------------------------------------------------------------
# Chunk size and the GEMMs


def chunk_rows(n_rows: int, vocab: int, chunk_size: int, device: torch.device) -> int:
    """Rows (tokens) per chunk.

    ``chunk_size`` > 0 is taken as given (at most ``MAX_CHUNK_ROWS`` and ``n_rows``). Otherwise: as
    many rows as fit the device's :data:`CHUNK_BYTES` of float32 logits, at least
    :data:`MIN_CHUNK_ROWS`, then spread evenly over the chunks that makes (rounded up to a multiple
    of :data:`ROW_ALIGN`) so that no small last chunk wastes a GEMM launch.
    """
    n_rows = max(n_rows, 1)
    if chunk_size > 0:
        return min(chunk_size, n_rows, MAX_CHUNK_ROWS)
    kind = "cuda" if device.type == "cuda" else "cpu"
    rows = CHUNK_BYTES[kind] // (4 * vocab) // ROW_ALIGN * ROW_ALIGN
    rows = min(max(rows, MIN_CHUNK_ROWS[kind]), MAX_CHUNK_ROWS)
    if rows >= n_rows:
        return n_rows
    n_chunks = -(-n_rows // rows)
    even = -(-n_rows // n_chunks)
    return min(-(-even // ROW_ALIGN) * ROW_ALIGN, rows, n_rows)


def logits_gemm(h_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = h_rows @ weight.T (+ bias)`` with ``out`` (``[R, V]``, float32 / float64) never rounded
    to the inputs' half dtype: ``out_dtype`` GEMMs on CUDA, weight blocks upcast on CPU."""
    if h_rows.dtype == out.dtype:
        if bias is None:
            torch.mm(h_rows, weight.T, out=out)
        else:
            torch.addmm(bias, h_rows, weight.T, out=out)
        return
    if out.device.type == "cuda":
        try:
            torch.mm(h_rows, weight.T, out_dtype=out.dtype, out=out)
        except (RuntimeError, TypeError, NotImplementedError) as error:  # never round the logits to half instead
            raise RuntimeError(
                f"linear_token_logprobs: float32 logits from {h_rows.dtype} inputs need torch.mm(..., "
                f"out_dtype=torch.float32) on CUDA, which this torch ({torch.__version__}) refused: {error}"
            ) from error
    else:
        h_wide = h_rows.to(out.dtype)
        for start in range(0, weight.shape[0], CPU_UPCAST_ROWS):
            block = weight[start : start + CPU_UPCAST_ROWS].to(out.dtype)
            out[:, start : start + block.shape[0]] = h_wide @ block.T
    if bias is not None:
        out.add_(bias)


# ---------------------------------------------------------------------------------------------
# The stats pass and the dZ pass in PyTorch (float64; "cuda" without Triton; CPU without the
# extension). Row blocks of TORCH_BLOCK_ROWS keep the elementwise passes in cache.


def _target_masks(targets: torch.Tensor, vocab: int, ignore_index: int, flag: torch.Tensor):
    """(valid, in_range, safe ids); an out-of-range id sets the error flag on the device (no sync)."""
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < vocab)
    bad = (valid & ~in_range).any()
    flag.bitwise_or_(bad.to(flag.dtype) * _device_checks.ERR_TARGET_RANGE)
    return valid, in_range, torch.where(valid & in_range, targets, torch.zeros_like(targets))


def stats_torch(z, targets, inv_t, ignore_index, logp, entropy, stats, flag) -> None:
    """The stats of each row of ``z`` ``[R, V]`` (bias included; overwritten) into ``logp`` /
    ``entropy`` (None without) / ``stats``, with the Triton kernel's conventions (shift 0 for an
    infinite maximum, a p = 0 term adds nothing to the entropy, an out-of-range target gives NaN)."""
    n_rows, vocab = z.shape
    lowest = torch.finfo(z.dtype).min
    valid, in_range, safe = _target_masks(targets, vocab, ignore_index, flag)
    work = torch.empty((min(TORCH_BLOCK_ROWS, n_rows), vocab), dtype=z.dtype, device=z.device)
    for start in range(0, n_rows, TORCH_BLOCK_ROWS):
        rows = slice(start, min(n_rows, start + TORCH_BLOCK_ROWS))
        y = z[rows]
        if inv_t != 1.0:
            y.mul_(inv_t)
        y_t = y.gather(1, safe[rows].unsqueeze(1)).squeeze(1)
        m = y.amax(dim=1)
        m_ref = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        y.sub_(m_ref.unsqueeze(1)).clamp_(min=lowest)  # -inf -> lowest: exp 0, and 0 * lowest = 0
        e = torch.exp(y, out=work[: y.shape[0]])
        s = e.sum(dim=1)
        log_s = torch.log(s)
        ok = valid[rows]
        value = torch.where(in_range[rows], (y_t - m_ref) - log_s, torch.full_like(log_s, float("nan")))
        logp[rows] = torch.where(ok, value, 0.0)
        stats[rows, STAT_ROW_MAX] = torch.where(ok, m_ref, 0.0)
        stats[rows, STAT_LOG_SUM] = torch.where(ok, log_s, 0.0)
        if entropy is not None:
            t = e.mul_(y).sum(dim=1)
            entropy[rows] = torch.where(ok, log_s - t / s, 0.0)


def dlogits_torch(z, targets, stats, entropy, g_logp, g_entropy, inv_t, ignore_index) -> torch.Tensor:
    """Overwrite ``z`` ``[R, V]`` (bias included) with ``dz``; ``g_*`` are the raw upstream gradients."""
    n_rows, vocab = z.shape
    lowest = torch.finfo(z.dtype).min
    scratch = torch.zeros(1, dtype=torch.int32, device=z.device)  # the forward flagged bad ids already
    valid, in_range, safe = _target_masks(targets, vocab, ignore_index, scratch)
    g = torch.where(valid, g_logp.to(z.dtype), 0.0) * inv_t
    g_h = None if g_entropy is None else torch.where(valid, g_entropy.to(z.dtype), 0.0) * inv_t
    shift = stats.to(z.dtype)
    work = torch.empty((min(TORCH_BLOCK_ROWS, n_rows), vocab), dtype=z.dtype, device=z.device) if g_h is not None \
        else None
    for start in range(0, n_rows, TORCH_BLOCK_ROWS):
        rows = slice(start, min(n_rows, start + TORCH_BLOCK_ROWS))
        y = z[rows]
        if inv_t != 1.0:
            y.mul_(inv_t)
        # log p = (y - m) - log s, two exact-order subtractions (never m + log s)
        y.sub_(shift[rows, STAT_ROW_MAX].unsqueeze(1)).sub_(shift[rows, STAT_LOG_SUM].unsqueeze(1))
        if g_h is None:
            y.exp_().mul_(-g[rows].unsqueeze(1))
        else:
            y.clamp_(min=lowest)  # p = 0 where log p = -inf: p (log p + H) = 0, not 0 * -inf
            p = torch.exp(y, out=work[: y.shape[0]])
            y.add_(entropy[rows].to(z.dtype).unsqueeze(1)).mul_(p)
            y.mul_(-g_h[rows].unsqueeze(1)).addcmul_(p, g[rows].unsqueeze(1), value=-1.0)
        y.masked_fill_(~valid[rows].unsqueeze(1), 0.0)  # an ignored row's exp may overflow: 0 * inf
    z.scatter_add_(1, safe.unsqueeze(1), torch.where(in_range, g, 0.0).unsqueeze(1))  # + g onehot
    return z


# ---------------------------------------------------------------------------------------------
# The C++ token_logprobs kernels as the CPU pass (float32 buffer)


def _extension(name: str):
    from gtalign_fast.ops._op import extension_kernel

    return extension_kernel(name, torch.device("cpu"))


def cpu_extension_usable(dtype: torch.dtype) -> bool:
    """Whether the "cpu" backend's passes run on the C++ kernels (float32 buffer, extension built)."""
    return dtype == torch.float32 and _backend.extension_available()


def stats_cpu_extension(z, targets, inv_t, ignore_index, logp, entropy, stats, flag) -> None:
    """The C++ forward pass (targets already checked on the host). A row holding a +inf logit is
    redone by :func:`stats_torch`, whose conventions give the materialised logits' -inf log-prob."""
    empty = torch.empty(0, dtype=torch.float32)
    _extension("token_logprobs_fwd")(z.view(1, *z.shape), targets, inv_t, ignore_index, logp,
                                     entropy if entropy is not None else empty, stats, flag)
    infinite = (stats[:, STAT_ROW_MAX] == float("inf")).nonzero().squeeze(1)  # a CPU tensor: no sync cost
    if infinite.numel() == 0:
        return
    part = (torch.empty(infinite.numel(), dtype=logp.dtype), torch.empty(infinite.numel(), dtype=logp.dtype),
            torch.empty(infinite.numel(), NUM_SOFTMAX_STATS, dtype=stats.dtype))
    stats_torch(z[infinite], targets[infinite], inv_t, ignore_index, part[0],
                part[1] if entropy is not None else None, part[2], flag)
    logp[infinite], stats[infinite] = part[0], part[2]
    if entropy is not None:
        entropy[infinite] = part[1]


def dlogits_cpu_extension(z, targets, stats, entropy, g_logp, g_entropy, inv_t, ignore_index) -> torch.Tensor:
    """The C++ backward pass, written over ``z`` in place (it reads each element before writing it)."""
    _extension("token_logprobs_bwd")(g_logp, g_entropy, z.view(1, *z.shape), targets, stats, entropy, inv_t,
                                     ignore_index, z)
    return z


# ---------------------------------------------------------------------------------------------
# The drivers


def _passes(name: str, dtype: torch.dtype):
    """(stats, dlogits, bias_in_kernel) of backend ``name`` for a buffer of ``dtype``."""
    if name == "triton":
        from gtalign_fast.kernels import linear_token_logprobs as kernels

        return kernels.chunk_stats, kernels.chunk_dlogits, True
    if name == "cpu" and cpu_extension_usable(dtype):
        return stats_cpu_extension, dlogits_cpu_extension, False
    return stats_torch, dlogits_torch, False


def forward_chunked(name, hidden, weight, bias, targets, inv_t, ignore_index, chunk_size, logp, entropy, stats,
                    flag) -> None:
    """Fill ``logp`` ``[N]``, ``entropy`` ``[N]`` (or None) and ``stats`` ``[N, 2]`` chunk by chunk."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if n_rows == 0:
        return
    dtype = reference.compute_dtype(hidden.dtype)
    stats_pass, _, bias_in_kernel = _passes(name, dtype)
    rows_per_chunk = chunk_rows(n_rows, vocab, chunk_size, hidden.device)
    buffer = torch.empty(rows_per_chunk * vocab, dtype=dtype, device=hidden.device)
    gemm_bias = None if bias is None or bias_in_kernel else bias.to(dtype)
    kernel_bias = bias.contiguous() if bias is not None and bias_in_kernel else None
    for start in range(0, n_rows, rows_per_chunk):
        rows = slice(start, min(n_rows, start + rows_per_chunk))
        z = buffer[: (rows.stop - rows.start) * vocab].view(-1, vocab)
        logits_gemm(hidden[rows], weight, gemm_bias, z)
        args = (z, kernel_bias) if bias_in_kernel else (z,)
        stats_pass(*args, targets[rows], inv_t, ignore_index, logp[rows],
                   None if entropy is None else entropy[rows], stats[rows], flag)


def backward_chunked(name, hidden, weight, bias, targets, stats, entropy, g_logp, g_entropy, inv_t, ignore_index,
                     chunk_size, dhidden, dweight, dbias) -> None:
    """Write ``dhidden`` ``[N, H]``, ``dweight`` ``[V, H]``, ``dbias`` ``[V]`` (each None when not needed).

    ``g_logp`` / ``g_entropy`` (None without an entropy gradient) are contiguous float32 ``[N]``;
    ``stats`` / ``entropy`` come from :func:`forward_chunked`.
    """
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = reference.compute_dtype(hidden.dtype)
    if n_rows == 0:
        for out in (dhidden, dweight, dbias):
            if out is not None:
                out.zero_()
        return
    _, dlogits_pass, bias_in_kernel = _passes(name, dtype)
    rows_per_chunk = chunk_rows(n_rows, vocab, chunk_size, hidden.device)
    buffer = torch.empty(rows_per_chunk * vocab, dtype=dtype, device=hidden.device)
    gemm_bias = None if bias is None or bias_in_kernel else bias.to(dtype)
    kernel_bias = bias.contiguous() if bias is not None and bias_in_kernel else None
    db_acc = torch.zeros(vocab, dtype=dtype, device=hidden.device) if dbias is not None else None
    for start in range(0, n_rows, rows_per_chunk):
        rows = slice(start, min(n_rows, start + rows_per_chunk))
        z = buffer[: (rows.stop - rows.start) * vocab].view(-1, vocab)
        h_rows = hidden[rows]
        logits_gemm(h_rows, weight, gemm_bias, z)
        g_h = None if g_entropy is None else g_entropy[rows]
        h_ent = None if g_entropy is None else entropy[rows]
        if bias_in_kernel:
            dz = dlogits_pass(z, kernel_bias, targets[rows], stats[rows], h_ent, g_logp[rows], g_h, inv_t,
                              ignore_index, hidden.dtype)
        else:
            dz = dlogits_pass(z, targets[rows], stats[rows], h_ent if h_ent is not None else entropy,
                              g_logp[rows], g_h, inv_t, ignore_index)
            dz = dz.to(hidden.dtype)  # half inputs: the GEMM operand (a no-op otherwise)
        if dz.device.type == "cpu" and not dz.is_contiguous():
            # The Triton path under the CPU interpreter: torch's CPU half mm(out=) reads the output
            # (NaN * 0) when the first operand has a row stride above its width (torch 2.13).
            dz = dz.contiguous()
        if db_acc is not None:
            db_acc += dz.sum(dim=0, dtype=dtype)
        if dhidden is not None:
            torch.mm(dz, weight, out=dhidden[rows])
        if dweight is not None:
            if start == 0:
                torch.mm(dz.T, h_rows, out=dweight)
            else:
                dweight.addmm_(dz.T, h_rows)
    if dbias is not None:
        dbias.copy_(db_acc)
