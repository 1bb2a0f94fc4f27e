"""Triton kernel for ``sample_``: temperature, sparse biases, forced tokens, top-k, top-p, min-p
and a seeded Gumbel-max draw, in place on a ``[B, V]`` logits buffer, one program per row.

Layout contract (shared with the C++ kernel): logits ``[B, V]`` with any strides (rows are read
and written in place, e.g. the last position of ``[B, T, V]`` model logits); per-row parameters
are contiguous ``[B]`` tensors (temperature / top_p / min_p float32, top_k / forced / seeds
int64); biases are contiguous ``[B, K]`` (int64 ids, ``-1`` = padding, no duplicates; float32
values); outputs are contiguous ``[B]``.

Per row, in passes over the row (which stays in L2 between passes; no float32 copy is made):

A. the raw statistics: online log-sum-exp of ``z / T`` (for the raw log-prob), NaN / +inf check;
B. the biases are added in place (``K`` elements), then the processed max ``m`` and mass
   ``s = sum exp(y - m)`` of ``y = z' / T`` (skipped when the row has no bias: same as A);
C. top-k threshold, D. top-p threshold: bisection on the threshold value (below);
E. one last pass: the kept mask (threshold, min-p, forced), the kept mass, the Gumbel scores
   ``y + g`` with ``g = -log(-log u)`` (``u`` from Philox: ``tl.randint(seed, column)``), their
   argmax, and the write-back of ``y`` (kept) or ``-inf`` (removed).

Thresholds without sorting. The kept set of top-k and of top-p is ``{y >= tau}`` for a row value
``tau``. Float32 values map to int keys in the same order (flip the low 31 bits of negatives;
-0.0 is made +0.0 first), so ``tau`` is found by bisection over keys ``[lo, hi)``: one pass counts
(top-k) or sums the mass (top-p) of ``y >= key^-1(mid)`` and also records the smallest value at or
above and the largest value below the probe; the bracket then snaps to those row values, so it
always holds row values at both ends and stops when one distinct value is left (at most 33
passes; typically far fewer, and top-k stops as soon as a probe keeps exactly k). The result is
exact, ties included: top-k keeps every token equal to the k-th largest value (so more than k
when it is tied); top-p keeps the tokens ``>= tau`` for the largest row value ``tau`` whose mass
``>= p`` times the top-k mass (a whole tie group is kept or dropped). Only sums of
``exp(y - m)`` are rounded (float32); a boundary within float32 rounding of ``p`` can fall either
way (the float64 reference agrees everywhere else).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gtalign_fast import _sample_constants as constants

# The per-row status words are defined once, in gtalign_fast/_sample_constants.py (the C++ kernel
# reads them from csrc/sample_common.h). Triton reads a global inside @triton.jit code only when it
# is a tl.constexpr.
STATUS_OK = tl.constexpr(constants.STATUS_OK)
STATUS_BAD_LOGITS = tl.constexpr(constants.STATUS_BAD_LOGITS)
STATUS_NO_FINITE_LOGIT = tl.constexpr(constants.STATUS_NO_FINITE_LOGIT)
STATUS_NO_FINITE_LOGIT_AFTER_BIAS = tl.constexpr(constants.STATUS_NO_FINITE_LOGIT_AFTER_BIAS)

# The vocabulary is walked in blocks of this many elements. The bias slots of a row are held in
# registers (BLOCK_K of them); the Python side bounds K (gtalign_fast._sample.MAX_BIASES).
MAX_BLOCK_V = 2048


@triton.jit
def _uniform(seed, cols):
    """Philox4x32-10 uniform in [2**-25, 1 - 2**-25] for (row seed, column); see reference.philox_uniform."""
    r = tl.randint(seed, cols.to(tl.int32)).to(tl.uint32, bitcast=True)
    return ((r >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _key(x):
    """Int64 key with the order of the float32 value ``x`` (no NaN; -0.0 already made +0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _value(key):
    """Inverse of ``_key``."""
    k32 = key.to(tl.int32)
    return (k32 ^ ((k32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _to_element(x, ptr):
    """float32 -> the buffer's dtype, rounding to nearest even. bfloat16 is rounded with integer
    ops because the Triton CPU interpreter truncates float32 -> bfloat16 casts."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _load_y(row_ptr, cols, stride_v, V, inv_t):
    y = tl.load(row_ptr + cols * stride_v, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
    # -0.0 -> +0.0 (a select, not arithmetic) so that equal values have equal keys.
    return tl.where(y == 0.0, 0.0, y)


@triton.jit
def _row_stats(row_ptr, stride_v, V, inv_t, BLOCK_V: tl.constexpr):
    """Online log-sum-exp of the row: (max, sum exp(y - max), 1 if a NaN or +inf was seen)."""
    m = tl.cast(float("-inf"), tl.float32)
    s = tl.cast(0.0, tl.float32)
    bad = tl.cast(0, tl.int32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        y = _load_y(row_ptr, cols, stride_v, V, inv_t)
        bad = tl.maximum(bad, tl.max(((y != y) | (y == float("inf"))).to(tl.int32), axis=0))
        m_new = tl.maximum(m, tl.max(y, axis=0))
        # While every value seen is -inf, shift by 0 instead (exp(-inf - -inf) would be nan).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(y - m_ref), axis=0)
        m = m_new
    return m, s, bad


@triton.jit
def _probe(row_ptr, stride_v, V, inv_t, m, t, BLOCK_V: tl.constexpr):
    """One pass for a threshold probe ``t``: count and mass of ``y >= t``, the smallest value
    ``>= t`` and the largest value ``< t``."""
    count = tl.cast(0, tl.int64)
    mass = tl.cast(0.0, tl.float32)
    v_min = tl.cast(float("inf"), tl.float32)
    v_max = tl.cast(float("-inf"), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        y = _load_y(row_ptr, cols, stride_v, V, inv_t)
        above = y >= t
        count += tl.sum(above.to(tl.int64), axis=0)
        mass += tl.sum(tl.where(above, tl.exp(y - m), 0.0), axis=0)
        v_min = tl.minimum(v_min, tl.min(tl.where(above, y, float("inf")), axis=0))
        v_max = tl.maximum(v_max, tl.max(tl.where(above, float("-inf"), y), axis=0))
    return count, mass, v_min, v_max


@triton.jit
def _sample_kernel(
    logits_ptr,
    stride_b,
    stride_v,
    V,
    temperature_ptr,
    top_k_ptr,
    top_p_ptr,
    min_p_ptr,
    forced_ptr,
    seeds_ptr,
    bias_ids_ptr,
    bias_values_ptr,
    K,
    tokens_ptr,
    logprobs_ptr,
    raw_logprobs_ptr,
    status_ptr,
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_b
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temperature)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    forced = tl.load(forced_ptr + row)
    seed = tl.load(seeds_ptr + row)
    is_forced = forced >= 0
    # The forced token's raw logit is read before any bias touches the row.
    # An id outside [0, V) (a direct call of the low-level op; the public function refuses it) reads
    # column 0 instead of outside the row.
    forced_z = tl.load(row_ptr + tl.where(is_forced & (forced < V), forced, 0) * stride_v).to(tl.float32)

    # A. raw statistics (temperature only).
    m_raw, s_raw, bad = _row_stats(row_ptr, stride_v, V, inv_t, BLOCK_V)
    raw_lse = m_raw + tl.log(s_raw)

    # B. biases in place, then the processed statistics.
    if HAS_BIAS:
        slots = tl.arange(0, BLOCK_K)
        ids = tl.load(bias_ids_ptr + row * K + slots, mask=slots < K, other=-1)
        has_id = (ids >= 0) & (ids < V)  # an id outside the row (never from sample_) is skipped
        safe_ids = tl.where(has_id, ids, 0)
        original = tl.load(row_ptr + safe_ids * stride_v, mask=has_id, other=0.0).to(tl.float32)
        bias = tl.load(bias_values_ptr + row * K + slots, mask=has_id, other=0.0)
        biased = _to_element(original + bias, logits_ptr)
        tl.store(row_ptr + safe_ids * stride_v, biased, mask=has_id)
        # Other threads of this program read those elements in the next pass.
        tl.debug_barrier()
        m, s, _ = _row_stats(row_ptr, stride_v, V, inv_t, BLOCK_V)
    else:
        m, s = m_raw, s_raw
    status = tl.where(
        bad != 0,
        STATUS_BAD_LOGITS,
        tl.where(
            m_raw == float("-inf"),
            STATUS_NO_FINITE_LOGIT,
            tl.where(m == float("-inf"), STATUS_NO_FINITE_LOGIT_AFTER_BIAS, STATUS_OK),
        ),
    )
    ok = status == STATUS_OK

    # C. top-k threshold: the largest key whose probe keeps >= k tokens.
    lo = _key(tl.cast(float("-inf"), tl.float32))
    hi = _key(m) + 1
    mass_lo = s
    searching = (top_k > 0) & (top_k < V) & (~is_forced) & ok
    while searching:
        mid = lo + (hi - lo) // 2
        count, mass, v_min, v_max = _probe(row_ptr, stride_v, V, inv_t, m, _value(mid), BLOCK_V)
        enough = count >= top_k
        lo = tl.where(enough, _key(v_min), lo)
        mass_lo = tl.where(enough, mass, mass_lo)
        hi = tl.where(enough, tl.where(count == top_k, _key(v_min) + 1, hi), _key(v_max) + 1)
        searching = hi - lo > 1

    # D. top-p threshold within the top-k set: the largest key whose probe keeps mass >= p * M_k.
    target = top_p * mass_lo
    hi = _key(m) + 1
    searching = (top_p < 1.0) & (~is_forced) & ok & (hi - lo > 1)
    while searching:
        mid = lo + (hi - lo) // 2
        count, mass, v_min, v_max = _probe(row_ptr, stride_v, V, inv_t, m, _value(mid), BLOCK_V)
        enough = mass >= target
        lo = tl.where(enough, _key(v_min), lo)
        hi = tl.where(enough, hi, _key(v_max) + 1)
        searching = hi - lo > 1
    tau = _value(lo)
    log_min_p = tl.where(min_p > 0.0, tl.log(tl.where(min_p > 0.0, min_p, 1.0)), float("-inf"))

    # E. kept mask, kept mass, Gumbel-max draw and write-back, in one pass.
    kept_mass = tl.cast(0.0, tl.float32)
    best_score = tl.cast(float("-inf"), tl.float32)
    best_index = tl.cast(0, tl.int64)
    best_y = tl.cast(0.0, tl.float32)
    best_z = tl.cast(0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(row_ptr + cols * stride_v, mask=in_row, other=float("-inf")).to(tl.float32)
        y = z * inv_t
        y = tl.where(y == 0.0, 0.0, y)
        keep = (y >= tau) & (y - m >= log_min_p)
        keep = tl.where(is_forced, cols == forced, keep) & in_row
        kept_mass += tl.sum(tl.where(keep, tl.exp(y - m), 0.0), axis=0)
        gumbel = -tl.log(-tl.log(_uniform(seed, cols)))
        score = tl.where(keep, tl.where(greedy, y, y + gumbel), float("-inf"))
        chunk_best = tl.max(score, axis=0)
        chunk_index = tl.argmax(score, axis=0)
        at_best = cols == start + chunk_index
        take = chunk_best > best_score  # strict: ties keep the lowest index
        best_index = tl.where(take, start + chunk_index, best_index)
        best_y = tl.where(take, tl.sum(tl.where(at_best, y, 0.0), axis=0), best_y)
        best_z = tl.where(take, tl.sum(tl.where(at_best, z, 0.0), axis=0), best_z)
        best_score = tl.maximum(best_score, chunk_best)
        processed = tl.where(keep, y, float("-inf"))
        tl.store(row_ptr + cols * stride_v, _to_element(processed, logits_ptr), mask=in_row)

    token = tl.where(is_forced, forced, best_index)
    raw_z = tl.where(is_forced, forced_z, best_z)
    if HAS_BIAS:
        # A biased token's raw logit is its value from before the bias.
        match = has_id & (ids == token)
        raw_z = tl.where(tl.max(match.to(tl.int32), axis=0) > 0, tl.sum(tl.where(match, original, 0.0), axis=0), raw_z)
    logprob = tl.where(is_forced, 0.0, best_y - m - tl.log(kept_mass))
    tl.store(tokens_ptr + row, token)
    tl.store(logprobs_ptr + row, logprob)
    tl.store(raw_logprobs_ptr + row, raw_z * inv_t - raw_lse)
    tl.store(status_ptr + row, status)


@triton.jit
def _uniform_kernel(seeds_ptr, out_ptr, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(seeds_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        tl.store(out_ptr + row * V + cols, _uniform(seed, cols), mask=cols < V)


def _block_size(vocab_size: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(max(vocab_size, 16)))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    forced: torch.Tensor,
    seeds: torch.Tensor,
    bias_ids: torch.Tensor | None,
    bias_values: torch.Tensor | None,
    tokens: torch.Tensor,
    logprobs: torch.Tensor,
    raw_logprobs: torch.Tensor,
    status: torch.Tensor,
) -> None:
    """Launch the sampling kernel on validated inputs (see the module docstring for the contract)."""
    batch, vocab = logits.shape
    if batch == 0:
        return
    has_bias = bias_ids is not None and bias_ids.shape[1] > 0
    n_bias = bias_ids.shape[1] if has_bias else 0
    block_v = _block_size(vocab)
    _sample_kernel[(batch,)](
        logits, logits.stride(0), logits.stride(1), vocab,
        temperature, top_k, top_p, min_p, forced, seeds,
        bias_ids if has_bias else forced, bias_values if has_bias else temperature, n_bias,
        tokens, logprobs, raw_logprobs, status,
        HAS_BIAS=has_bias, BLOCK_K=triton.next_power_of_2(max(n_bias, 1)), BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )


def uniform_noise(seeds: torch.Tensor, vocab: int) -> torch.Tensor:
    """The ``[B, vocab]`` float32 noise the kernel draws for these row seeds (for tests)."""
    out = torch.empty((seeds.shape[0], vocab), dtype=torch.float32, device=seeds.device)
    if seeds.shape[0] > 0:
        _uniform_kernel[(seeds.shape[0],)](seeds, out, vocab, BLOCK_V=_block_size(vocab))
    return out
