"""Triton kernels for ``sample_``: temperature, sparse biases, forced tokens, top-k, top-p, min-p
and a seeded Gumbel-max draw, in place on a ``[B, V]`` logits buffer, several programs per row.

Layout contract (shared with the C++ kernel): logits ``[B, V]`` with any strides (rows are read
and written in place, e.g. the last position of ``[B, T, V]`` model logits); per-row parameters
are contiguous ``[B]`` tensors (temperature / top_p / min_p float32, top_k / forced / seeds
int64); biases are contiguous ``[B, K]`` (int64 ids, ``-1`` = padding, no duplicates; float32
values); outputs are contiguous ``[B]``.

Why several programs per row, and why a radix select. One program per row leaves an H200 with
B = 8 programs for 132 SMs, and its threshold search walks the row 20-40 times from one SM. So
each row is split into ``P`` chunks (one program each, grid ``(B, P)``, ``P <= MAX_PROGRAMS``:
no grid dimension grows with the vocabulary) and every pass over the row is one launch whose
programs write per-chunk partials that the next launch reduces in a fixed order (deterministic,
no float atomics). Top-k and top-p need an exact threshold (the k-th largest value; the largest
value whose mass at or above reaches ``p``), so the number of passes must not depend on the data
(a host loop would need a host synchronisation): a most-significant-digit radix select over the
32-bit order-preserving keys of the float32 values does it in a fixed ``32 / RADIX_BITS`` passes
per threshold, each pass a per-chunk histogram of one 4-bit digit (counts for top-k, masses
``exp(y - m)`` for top-p) of the keys that match the prefix chosen so far. FlashInfer's
sorting-free rejection sampling was the other candidate; its number of rounds depends on the draw
(so a host loop or a fixed worst case), and it would change which token a seed gives. The
radix select keeps the kept sets exact, so a seed gives the same token as the one-program
bisection did (only the float32 mass sums are summed in another order: a top-p boundary within
float32 rounding of ``p`` may fall either way, as before). Cost: 18 launches (their host time
dominates at B = 8, V = 32000; not yet timed on a GPU) and 18 reads of each row, spread over all
SMs instead of one.

The launches, per call (``NUM_LEVELS = 2 * 32 / RADIX_BITS`` levels: top-k digits, then top-p digits):

1. ``_stats_kernel``: per chunk, raw statistics of ``z / T`` (max, sum of exp, NaN / +inf seen),
   the chunk's biases applied in place (originals kept for the raw log-prob), the processed max,
   and the level-0 histogram;
2. ``_level_kernel`` for levels ``1 .. NUM_LEVELS - 1``: every program reduces the previous
   level's partial histograms of its row (a few hundred numbers) into the row's search state
   (program 0 stores it for the next launch; state and histograms are double-buffered), then
   builds its chunk's histogram for this level; rows whose search is off skip both. The first
   of these launches also reduces the chunks' statistics into a per-row copy the later ones load;
3. ``_final_kernel``: the last reduction gives the threshold key; per chunk the kept mask
   (threshold, min-p, forced), the kept mass, the Gumbel scores ``y + g`` (``g = -log(-log u)``,
   ``u`` from Philox: ``tl.randint(seed, column)``), their argmax, and the write-back of ``y``
   (kept) or ``-inf`` (removed);
4. ``_reduce_kernel`` (one program per row): the winning chunk (ties: the lowest column), the
   log-probs, the status word, and the device-side input checks (below).

Thresholds. Float32 values map to keys in the same order (flip the low 31 bits of negatives,
-0.0 made +0.0 first, then add 2**31: ``[0, 2**32)``). Top-k: the digit whose cumulative count
from the top first reaches ``k`` is chosen at each level, so after 8 levels the key is that of the
k-th largest value, and ``y >= tau_k`` keeps every token tied with it. Top-p, within ``y >= tau_k``:
the target is ``p`` times the mass of that set (the first top-p level's total), and each level
chooses the digit where the cumulative mass from the top first reaches it: the result is the
largest row value whose mass at or above is ``>= p * M_k`` (a whole tie group is kept or dropped).

Inputs checked on the device (no host synchronisation; see ``gtalign_fast/ops/_device_checks.py``):
a forced token outside ``[-1, V)`` (``ERR_FORCED_TOKEN``: the row is sampled unforced, never read
or written outside the row), a bias id outside ``[-1, V)`` (``ERR_TARGET_RANGE``: skipped), and
``ERR_SAMPLE_INPUT`` for NaN / +inf logits, a row without a finite logit, a NaN / +inf bias value
or a per-row parameter out of range. A flagged row gets NaN log-probs and token 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gtalign_fast.ops import _device_checks as device_checks
from gtalign_fast.ops import _sample_constants as constants
from gtalign_fast.ops._token_logprobs import MIN_TEMPERATURE

# The per-row status words are defined once, in gtalign_fast/ops/_sample_constants.py (the C++ kernel
# reads them from csrc/sample_common.h). Triton reads a global inside @triton.jit code only when it
# is a tl.constexpr.
STATUS_OK = tl.constexpr(constants.STATUS_OK)
STATUS_BAD_LOGITS = tl.constexpr(constants.STATUS_BAD_LOGITS)
STATUS_NO_FINITE_LOGIT = tl.constexpr(constants.STATUS_NO_FINITE_LOGIT)
STATUS_NO_FINITE_LOGIT_AFTER_BIAS = tl.constexpr(constants.STATUS_NO_FINITE_LOGIT_AFTER_BIAS)
ERR_SAMPLE_INPUT = tl.constexpr(device_checks.ERR_SAMPLE_INPUT)
# The radix select (see the module docstring) and the per-chunk partials' columns.
RADIX_BITS = tl.constexpr(constants.RADIX_BITS)
NUM_BUCKETS = tl.constexpr(constants.NUM_BUCKETS)
NUM_PART_STATS = tl.constexpr(constants.NUM_PART_STATS)
NUM_PART_DRAW = tl.constexpr(constants.NUM_PART_DRAW)
NUM_ROW_STATS = tl.constexpr(constants.NUM_ROW_STATS)
LEVELS_PER_SEARCH = 32 // constants.RADIX_BITS
NUM_LEVELS = 2 * LEVELS_PER_SEARCH
# The vocabulary is walked in blocks of at most this many elements (the [BLOCK_V, 16] histogram
# compare stays in registers at 8 warps).
MAX_BLOCK_V = 512
# Programs per row: at most this many (the reductions load [MAX_PROGRAMS, 16] partials), and about
# PROGRAMS_PER_SM * SMs programs in all (enough to fill the GPU, few enough to keep partials small).
MAX_PROGRAMS = 128
PROGRAMS_PER_SM = 4
DEFAULT_SMS = 132  # an H100 / H200; used on CPU tensors (the interpreter) so tests see GPU-like grids


@triton.jit
def _uniform(seed, cols):
    """Philox4x32-10 uniform in [2**-25, 1 - 2**-24] for (row seed, column); see reference.philox_uniform."""
    r = tl.randint(seed, cols.to(tl.int32)).to(tl.uint32, bitcast=True)
    return tl.minimum(((r >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0), 0.99999994)  # 1 - 2**-24


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


# Helpers are few and flat: under the Triton interpreter (the CPU tests) every call of a nested
# @triton.jit function costs milliseconds, so the per-block work is written inline. Per element:
#   y = z * inv_t, with -0.0 made +0.0 (a select, not arithmetic) so that equal values have equal
#   keys; u = the int64 key of y in [0, 2**32): bits ^ ((bits >> 31) & 0x7FFFFFFF), plus 2**31.


@triton.jit
def _row_setup(row, temperature_ptr, top_k_ptr, top_p_ptr, forced_ptr, stats_ptr, row_stats_ptr, V, P,
               FROM_PARTS: tl.constexpr, P_BLOCK: tl.constexpr):
    """A row's parameters, its raw log-sum-exp, processed max and status, and whether it runs the
    top-k / top-p search. The statistics come from the chunks' partials (``FROM_PARTS``: reduced in
    a fixed order, by the first launch that needs them) or from the row's reduced copy."""
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temperature)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    forced = tl.load(forced_ptr + row)
    # Only an id inside the row is ever used to index it (the rest is flagged by _reduce_kernel).
    is_forced = (forced >= 0) & (forced < V)
    if FROM_PARTS:
        parts = tl.arange(0, P_BLOCK)
        base = stats_ptr + (row * P + parts) * NUM_PART_STATS
        valid = parts < P
        m_raw_i = tl.load(base + 0, mask=valid, other=float("-inf"))
        s_raw_i = tl.load(base + 1, mask=valid, other=0.0)
        m_i = tl.load(base + 2, mask=valid, other=float("-inf"))
        bad = tl.max(tl.load(base + 3, mask=valid, other=0.0), axis=0) != 0.0
        m_raw = tl.max(m_raw_i, axis=0)
        m_ref = tl.where(m_raw == float("-inf"), 0.0, m_raw)
        raw_lse = m_raw + tl.log(tl.sum(tl.where(s_raw_i > 0.0, s_raw_i * tl.exp(m_raw_i - m_ref), 0.0), axis=0))
        m = tl.max(m_i, axis=0)
        status = tl.where(
            bad,
            STATUS_BAD_LOGITS,
            tl.where(
                m_raw == float("-inf"),
                STATUS_NO_FINITE_LOGIT,
                tl.where(m == float("-inf"), STATUS_NO_FINITE_LOGIT_AFTER_BIAS, STATUS_OK),
            ),
        )
    else:
        raw_lse = tl.load(row_stats_ptr + row * NUM_ROW_STATS + 0)
        m = tl.load(row_stats_ptr + row * NUM_ROW_STATS + 1)
        status = tl.load(row_stats_ptr + row * NUM_ROW_STATS + 2).to(tl.int32)
    searching = (~is_forced) & (status == STATUS_OK)
    k_on = searching & (top_k > 0) & (top_k < V)
    p_on = searching & (top_p < 1.0)
    return greedy, inv_t, top_k, top_p, forced, is_forced, raw_lse, m, status, k_on, p_on


@triton.jit
def _search_state(state_i_ptr, state_f_ptr, counts_ptr, mass_ptr, slot, row, B, P, level, top_k, top_p, k_on, p_on,
                  P_BLOCK: tl.constexpr, NB: tl.constexpr, LEVELS: tl.constexpr):
    """The row's search state after level ``level``: the state before it (buffer ``slot``) advanced
    by the digit whose cumulative count (top-k) or mass (top-p) from the top first reaches the goal,
    from the row totals of that level's partial histograms (buffer ``slot``, summed in a fixed order).
    State: top-k prefix and count above it, top-p prefix and mass above it, top-p target mass."""
    base_i = state_i_ptr + (slot * B + row) * 3
    base_f = state_f_ptr + (slot * B + row) * 2
    prefix_k = tl.load(base_i)
    above_k = tl.load(base_i + 1)
    prefix_p = tl.load(base_i + 2)
    above_p = tl.load(base_f)
    target = tl.load(base_f + 1)
    parts = tl.arange(0, P_BLOCK)
    buckets = tl.arange(0, NB)
    offsets = ((slot * B + row) * P + parts)[:, None] * NB + buckets[None, :]
    valid = (parts < P)[:, None]
    at_or_above = buckets[None, :] >= buckets[:, None]  # [digit, other digit]
    # (Names differ between the branches: Triton merges a name set in both, so its types must match.)
    if level < LEVELS:
        counts = tl.sum(tl.load(counts_ptr + offsets, mask=valid, other=0), axis=0)
        count_cum = above_k + tl.sum(tl.where(at_or_above, counts[None, :], 0), axis=1).to(tl.int64)
        # The largest digit whose cumulative count reaches k, and the count above it, in one
        # reduction: the digit in the high bits of an int64 (counts < 2**31), the count below.
        packed = tl.max(tl.where(count_cum >= top_k, (buckets.to(tl.int64) << 40) + count_cum - counts, -1), axis=0)
        prefix_k = tl.where(k_on, prefix_k * NB + (packed >> 40), prefix_k)
        above_k = tl.where(k_on, packed & 0xFFFFFFFFFF, above_k)
    else:
        mass = tl.sum(tl.load(mass_ptr + offsets, mask=valid, other=0.0), axis=0)
        if level == LEVELS:
            target = top_p * tl.sum(mass, axis=0)  # p times the mass of the top-k set
        mass_cum = above_p + tl.sum(tl.where(at_or_above, mass[None, :], 0.0), axis=1)
        digit = tl.max(tl.where(mass_cum >= target, buckets, -1), axis=0)
        # Rounding (sums in another order) may leave the goal unreached: keep the whole range then.
        lowest = tl.min(tl.where(mass > 0.0, buckets, NB - 1), axis=0)
        digit = tl.where(digit >= 0, digit, lowest)
        mass_above = tl.sum(tl.where(buckets == digit, mass_cum - mass, 0.0), axis=0)
        prefix_p = tl.where(p_on, prefix_p * NB + digit, prefix_p)
        above_p = tl.where(p_on, mass_above, above_p)
    return prefix_k, above_k, prefix_p, above_p, target


@triton.jit
def _chunk_histogram(row_ptr, stride_v, start, end, inv_t, m, u_min, prefix, shift,
                     MASS: tl.constexpr, BLOCK_V: tl.constexpr, NB: tl.constexpr):
    """Per-digit count (top-k) or mass ``exp(y - m)`` (top-p) of the chunk's keys ``u >= u_min``
    whose high bits (above ``shift + RADIX_BITS``) equal ``prefix``; the digit is ``u >> shift``."""
    buckets = tl.arange(0, NB)
    counts = tl.zeros((NB,), dtype=tl.int32)
    mass = tl.zeros((NB,), dtype=tl.float32)
    shift = tl.cast(shift, tl.int64)
    high = shift + RADIX_BITS
    for block in range(start, end, BLOCK_V):
        cols = block + tl.arange(0, BLOCK_V)
        y = tl.load(row_ptr + cols * stride_v, mask=cols < end, other=float("-inf")).to(tl.float32) * inv_t
        y = tl.where(y == 0.0, 0.0, y)
        bits = y.to(tl.int32, bitcast=True)
        u = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648
        in_range = (cols < end) & (u >= u_min) & ((u >> high) == prefix)
        # Past the first levels few blocks hold a key of the prefix: skip the compare for those.
        if tl.max(in_range.to(tl.int32), axis=0) > 0:
            hit = in_range[:, None] & (((u >> shift) & (NB - 1))[:, None] == buckets[None, :])
            if MASS:
                mass += tl.sum(tl.where(hit, tl.exp(y - m)[:, None], 0.0), axis=0)
            else:
                counts += tl.sum(hit.to(tl.int32), axis=0)
    return counts, mass


@triton.jit
def _stats_kernel(
    logits_ptr, stride_b, stride_v, V, chunk,
    temperature_ptr, top_k_ptr, forced_ptr, bias_ids_ptr, bias_values_ptr, K,
    stats_ptr, originals_ptr, forced_z_ptr, counts_ptr, mass_ptr, state_i_ptr, state_f_ptr,
    HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, NB: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    P = tl.num_programs(1)
    row_ptr = logits_ptr + row * stride_b
    temperature = tl.load(temperature_ptr + row)
    inv_t = 1.0 / tl.where(temperature == 0.0, 1.0, temperature)
    top_k = tl.load(top_k_ptr + row)
    forced = tl.load(forced_ptr + row)
    is_forced = (forced >= 0) & (forced < V)
    start = part.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, V)

    # Raw statistics (temperature only): online log-sum-exp and the NaN / +inf check.
    m_raw = tl.cast(float("-inf"), tl.float32)
    s_raw = tl.cast(0.0, tl.float32)
    bad = tl.cast(0.0, tl.float32)
    for block in range(start, end, BLOCK_V):
        cols = block + tl.arange(0, BLOCK_V)
        y = tl.load(row_ptr + cols * stride_v, mask=cols < end, other=float("-inf")).to(tl.float32) * inv_t
        bad = tl.maximum(bad, tl.max(((y != y) | (y == float("inf"))).to(tl.float32), axis=0))
        m_new = tl.maximum(m_raw, tl.max(y, axis=0))
        # While every value seen is -inf, shift by 0 instead (exp(-inf - -inf) would be nan).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_raw = s_raw * tl.exp(m_raw - m_ref) + tl.sum(tl.exp(y - m_ref), axis=0)
        m_raw = m_new
    # The forced token's raw logit, read before any bias touches it.
    owns_forced = is_forced & (forced >= start) & (forced < end)
    forced_z = tl.load(row_ptr + tl.where(owns_forced, forced, start) * stride_v, mask=owns_forced, other=0.0)
    tl.store(forced_z_ptr + row, forced_z.to(tl.float32), mask=owns_forced)

    # The chunk's biases, in place (the originals are kept for the raw log-prob); then the processed max.
    m = m_raw
    if HAS_BIAS:
        slots = tl.arange(0, BLOCK_K)
        ids = tl.load(bias_ids_ptr + row * K + slots, mask=slots < K, other=-1)
        owned = (ids >= start) & (ids < end)  # padding (-1) and ids outside the row are never owned
        safe_ids = tl.where(owned, ids, start)
        original = tl.load(row_ptr + safe_ids * stride_v, mask=owned, other=0.0).to(tl.float32)
        bias = tl.load(bias_values_ptr + row * K + slots, mask=owned, other=0.0)
        tl.store(originals_ptr + row * K + slots, original, mask=owned)
        tl.store(row_ptr + safe_ids * stride_v, _to_element(original + bias, logits_ptr), mask=owned)
        # Other threads of this program read those elements in the next loop.
        tl.debug_barrier()
        m = tl.cast(float("-inf"), tl.float32)
        for block in range(start, end, BLOCK_V):
            cols = block + tl.arange(0, BLOCK_V)
            z = tl.load(row_ptr + cols * stride_v, mask=cols < end, other=float("-inf")).to(tl.float32)
            m = tl.maximum(m, tl.max(z * inv_t, axis=0))
    stats = stats_ptr + (row * P + part) * NUM_PART_STATS
    tl.store(stats + 0, m_raw)
    tl.store(stats + 1, s_raw)
    tl.store(stats + 2, m)
    tl.store(stats + 3, bad)

    # Level 0: the first top-k digit (the status is not known yet; the next launch ignores the
    # histogram of a row that is not OK).
    counts = tl.zeros((NB,), dtype=tl.int32)
    mass = tl.zeros((NB,), dtype=tl.float32)
    if (~is_forced) & (top_k > 0) & (top_k < V):
        counts, mass = _chunk_histogram(row_ptr, stride_v, start, end, inv_t, m, 0, 0, 32 - RADIX_BITS,
                                        False, BLOCK_V, NB)
    offsets = (row * P + part) * NB + tl.arange(0, NB)  # slot 0
    tl.store(counts_ptr + offsets, counts)
    tl.store(mass_ptr + offsets, mass)
    if part == 0:  # the state before level 0: empty prefixes
        tl.store(state_i_ptr + row * 3 + tl.arange(0, 4), tl.zeros((4,), dtype=tl.int64), mask=tl.arange(0, 4) < 3)
        tl.store(state_f_ptr + row * 2 + tl.arange(0, 2), tl.zeros((2,), dtype=tl.float32))


@triton.jit
def _level_kernel(
    logits_ptr, stride_b, stride_v, V, chunk, level,
    temperature_ptr, top_k_ptr, top_p_ptr, forced_ptr,
    stats_ptr, row_stats_ptr, counts_ptr, mass_ptr, state_i_ptr, state_f_ptr,
    FIRST: tl.constexpr, LEVELS: tl.constexpr, P_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr, NB: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    B = tl.num_programs(0)
    P = tl.num_programs(1)
    greedy, inv_t, top_k, top_p, forced, is_forced, raw_lse, m, status, k_on, p_on = _row_setup(
        row, temperature_ptr, top_k_ptr, top_p_ptr, forced_ptr, stats_ptr, row_stats_ptr, V, P, FIRST, P_BLOCK)
    if FIRST:  # the first launch after the statistics reduces them; later ones load this copy
        if part == 0:
            tl.store(row_stats_ptr + row * NUM_ROW_STATS + 0, raw_lse)
            tl.store(row_stats_ptr + row * NUM_ROW_STATS + 1, m)
            tl.store(row_stats_ptr + row * NUM_ROW_STATS + 2, status.to(tl.float32))
    counts = tl.zeros((NB,), dtype=tl.int32)
    mass = tl.zeros((NB,), dtype=tl.float32)
    if k_on | p_on:
        prefix_k, above_k, prefix_p, above_p, target = _search_state(
            state_i_ptr, state_f_ptr, counts_ptr, mass_ptr, (level - 1) % 2, row, B, P, level - 1, top_k, top_p,
            k_on, p_on, P_BLOCK, NB, LEVELS)
        if part == 0:  # every program computed the same state; one stores it for the next launch
            base_i = state_i_ptr + ((level % 2) * B + row) * 3
            base_f = state_f_ptr + ((level % 2) * B + row) * 2
            tl.store(base_i, prefix_k)
            tl.store(base_i + 1, above_k)
            tl.store(base_i + 2, prefix_p)
            tl.store(base_f, above_p)
            tl.store(base_f + 1, target)
        start = part.to(tl.int64) * chunk
        end = tl.minimum(start + chunk, V)
        row_ptr = logits_ptr + row * stride_b
        if level < LEVELS:
            if k_on:
                shift = (LEVELS - 1 - level) * RADIX_BITS
                counts, mass = _chunk_histogram(row_ptr, stride_v, start, end, inv_t, m, 0, prefix_k, shift,
                                                False, BLOCK_V, NB)
        else:
            if p_on:
                shift = (2 * LEVELS - 1 - level) * RADIX_BITS
                u_k = tl.where(k_on, prefix_k, 0)
                counts, mass = _chunk_histogram(row_ptr, stride_v, start, end, inv_t, m, u_k, prefix_p, shift,
                                                True, BLOCK_V, NB)
    offsets = (((level % 2) * B + row) * P + part) * NB + tl.arange(0, NB)
    tl.store(counts_ptr + offsets, counts)
    tl.store(mass_ptr + offsets, mass)


@triton.jit
def _final_kernel(
    logits_ptr, stride_b, stride_v, V, chunk,
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, forced_ptr, seeds_ptr,
    row_stats_ptr, counts_ptr, mass_ptr, state_i_ptr, state_f_ptr, draw_f_ptr, draw_i_ptr,
    LEVELS: tl.constexpr, P_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr, NB: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    B = tl.num_programs(0)
    P = tl.num_programs(1)
    row_ptr = logits_ptr + row * stride_b
    greedy, inv_t, top_k, top_p, forced, is_forced, raw_lse, m, status, k_on, p_on = _row_setup(
        row, temperature_ptr, top_k_ptr, top_p_ptr, forced_ptr, row_stats_ptr, row_stats_ptr, V, P, False, P_BLOCK)
    min_p = tl.load(min_p_ptr + row)
    seed = tl.load(seeds_ptr + row)

    # The threshold key: the last level's reduction (keys >= tau_u are kept; 0 keeps everything).
    tau_u = tl.cast(0, tl.int64)
    if k_on | p_on:
        last = 2 * LEVELS - 1
        prefix_k, above_k, prefix_p, above_p, target = _search_state(
            state_i_ptr, state_f_ptr, counts_ptr, mass_ptr, last % 2, row, B, P, last, top_k, top_p,
            k_on, p_on, P_BLOCK, NB, LEVELS)
        tau_u = tl.where(p_on, prefix_p, tl.where(k_on, prefix_k, 0))
    log_min_p = tl.where(min_p > 0.0, tl.log(tl.where(min_p > 0.0, min_p, 1.0)), float("-inf"))

    start = part.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, V)
    kept_mass = tl.cast(0.0, tl.float32)
    best_score = tl.cast(float("-inf"), tl.float32)
    best_index = start
    best_y = tl.cast(0.0, tl.float32)
    best_z = tl.cast(0.0, tl.float32)
    for block in range(start, end, BLOCK_V):
        cols = block + tl.arange(0, BLOCK_V)
        in_chunk = cols < end
        z = tl.load(row_ptr + cols * stride_v, mask=in_chunk, other=float("-inf")).to(tl.float32)
        y = z * inv_t
        y = tl.where(y == 0.0, 0.0, y)
        bits = y.to(tl.int32, bitcast=True)
        u = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648
        keep = (u >= tau_u) & (y - m >= log_min_p)
        keep = tl.where(is_forced, cols == forced, keep) & in_chunk
        kept_mass += tl.sum(tl.where(keep, tl.exp(y - m), 0.0), axis=0)
        # Philox4x32-10 uniform in [2**-25, 1 - 2**-24] for (row seed, column); see reference.philox_uniform.
        r = tl.randint(seed, cols.to(tl.int32)).to(tl.uint32, bitcast=True)
        uniform = tl.minimum(((r >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0), 0.99999994)  # 1 - 2**-24
        gumbel = -tl.log(-tl.log(uniform))
        score = tl.where(keep, tl.where(greedy, y, y + gumbel), float("-inf"))
        block_best = tl.max(score, axis=0)
        block_index = tl.argmax(score, axis=0)
        at_best = cols == block + block_index
        take = block_best > best_score  # strict: ties keep the lowest column
        best_index = tl.where(take, block + block_index, best_index)
        best_y = tl.where(take, tl.sum(tl.where(at_best, y, 0.0), axis=0), best_y)
        best_z = tl.where(take, tl.sum(tl.where(at_best, z, 0.0), axis=0), best_z)
        best_score = tl.maximum(best_score, block_best)
        tl.store(row_ptr + cols * stride_v, _to_element(tl.where(keep, y, float("-inf")), logits_ptr), mask=in_chunk)
    draw = draw_f_ptr + (row * P + part) * NUM_PART_DRAW
    tl.store(draw + 0, best_score)
    tl.store(draw + 1, best_y)
    tl.store(draw + 2, best_z)
    tl.store(draw + 3, kept_mass)
    tl.store(draw_i_ptr + row * P + part, best_index)


@triton.jit
def _reduce_kernel(
    V, P, min_temperature,
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, forced_ptr, bias_ids_ptr, bias_values_ptr, K,
    row_stats_ptr, originals_ptr, forced_z_ptr, draw_f_ptr, draw_i_ptr,
    tokens_ptr, logprobs_ptr, raw_logprobs_ptr, status_ptr, flag_ptr,
    ERR_FORCED_TOKEN: tl.constexpr, ERR_TARGET_RANGE: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, P_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    greedy, inv_t, top_k, top_p, forced, is_forced, raw_lse, m, status, k_on, p_on = _row_setup(
        row, temperature_ptr, top_k_ptr, top_p_ptr, forced_ptr, row_stats_ptr, row_stats_ptr, V, P, False, P_BLOCK)
    temperature = tl.load(temperature_ptr + row)
    min_p = tl.load(min_p_ptr + row)

    # The winning chunk: the highest score, ties to the lowest chunk (so to the lowest column).
    parts = tl.arange(0, P_BLOCK)
    valid = parts < P
    draw = draw_f_ptr + (row * P + parts) * NUM_PART_DRAW
    scores = tl.load(draw + 0, mask=valid, other=float("-inf"))
    best = tl.max(scores, axis=0)
    winner = tl.min(tl.where(valid & (scores == best), parts, P_BLOCK), axis=0)
    winner = tl.where(winner < P, winner, 0)
    at_winner = parts == winner
    best_y = tl.sum(tl.where(at_winner, tl.load(draw + 1, mask=valid, other=0.0), 0.0), axis=0)
    best_z = tl.sum(tl.where(at_winner, tl.load(draw + 2, mask=valid, other=0.0), 0.0), axis=0)
    kept_mass = tl.sum(tl.load(draw + 3, mask=valid, other=0.0), axis=0)
    best_index = tl.sum(tl.where(at_winner, tl.load(draw_i_ptr + row * P + parts, mask=valid, other=0), 0), axis=0)

    token = tl.where(is_forced, forced, best_index)
    raw_z = tl.where(is_forced, tl.load(forced_z_ptr + row, mask=is_forced, other=0.0), best_z)
    error = tl.where((forced < -1) | (forced >= V), ERR_FORCED_TOKEN, 0)
    if HAS_BIAS:
        # A biased token's raw logit is its value from before the bias.
        slots = tl.arange(0, BLOCK_K)
        ids = tl.load(bias_ids_ptr + row * K + slots, mask=slots < K, other=-1)
        in_row = (ids >= 0) & (ids < V)
        match = in_row & (ids == token)
        original = tl.load(originals_ptr + row * K + slots, mask=match, other=0.0)
        raw_z = tl.where(tl.max(match.to(tl.int32), axis=0) > 0, tl.sum(tl.where(match, original, 0.0), axis=0), raw_z)
        error |= tl.where(tl.max(((ids < -1) | (ids >= V)).to(tl.int32), axis=0) > 0, ERR_TARGET_RANGE, 0)
        values = tl.load(bias_values_ptr + row * K + slots, mask=in_row, other=0.0)
        bad_value = tl.max(((values != values) | (values == float("inf"))).to(tl.int32), axis=0) > 0
        error |= tl.where(bad_value, ERR_SAMPLE_INPUT, 0)
    # The per-row parameters (the public function checks them on the host for CPU tensors).
    bad_t = ~((temperature == 0.0) | ((temperature >= min_temperature) & (temperature < float("inf"))))
    bad_param = bad_t | (top_k < 0) | ~((top_p > 0.0) & (top_p <= 1.0)) | ~((min_p >= 0.0) & (min_p <= 1.0))
    error |= tl.where(bad_param | (status != STATUS_OK), ERR_SAMPLE_INPUT, 0)
    tl.atomic_or(flag_ptr, error, mask=error != 0)

    logprob = tl.where(is_forced, 0.0, best_y - m - tl.log(kept_mass))
    raw_logprob = raw_z * inv_t - raw_lse
    failed = error != 0
    tl.store(tokens_ptr + row, tl.where(failed, 0, token))
    tl.store(logprobs_ptr + row, tl.where(failed, float("nan"), logprob))
    tl.store(raw_logprobs_ptr + row, tl.where(failed, float("nan"), raw_logprob))
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


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count  # cached by torch: no sync
    return DEFAULT_SMS


def launch_grid(batch: int, vocab: int, device: torch.device, programs: int | None = None) -> tuple[int, int, int]:
    """``(block_v, chunk, programs_per_row)`` for a ``[batch, vocab]`` call: about
    ``PROGRAMS_PER_SM`` programs per SM in all, at most ``MAX_PROGRAMS`` per row and at least one
    block of the vocabulary each; ``chunk`` (a multiple of ``block_v``) is each program's share
    of the row, the last one's being shorter. ``programs`` overrides the per-row count (tests)."""
    block_v = _block_size(vocab)
    blocks = triton.cdiv(vocab, block_v)
    if programs is None:
        programs = triton.cdiv(PROGRAMS_PER_SM * _multiprocessors(device), batch)
    programs = max(1, min(programs, blocks, MAX_PROGRAMS))
    chunk = triton.cdiv(blocks, programs) * block_v
    return block_v, chunk, triton.cdiv(vocab, chunk)


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
    error_flag: torch.Tensor,
    programs: int | None = None,
) -> None:
    """Launch the sampling kernels on inputs of the right dtypes and layout (see the module
    docstring); the values are checked on the device: an error sets a bit of ``error_flag``
    (int32 ``[1]``, see ``gtalign_fast.ops._device_checks``). ``programs``: programs per row (tests)."""
    batch, vocab = logits.shape
    if batch == 0:
        return
    device = logits.device
    block_v, chunk, parts = launch_grid(batch, vocab, device, programs)
    has_bias = bias_ids is not None and bias_ids.shape[1] > 0
    n_bias = bias_ids.shape[1] if has_bias else 0
    block_k = triton.next_power_of_2(max(n_bias, 1))
    p_block = triton.next_power_of_2(parts)
    f32, i64 = dict(dtype=torch.float32, device=device), dict(dtype=torch.int64, device=device)
    # Workspace: O(B * P * 16), never O(B * V).
    stats = torch.empty((batch, parts, constants.NUM_PART_STATS), **f32)
    originals = torch.empty((batch, max(n_bias, 1)), **f32)
    forced_z = torch.empty((batch,), **f32)
    counts = torch.empty((2, batch, parts, constants.NUM_BUCKETS), dtype=torch.int32, device=device)
    mass = torch.empty((2, batch, parts, constants.NUM_BUCKETS), **f32)
    row_stats = torch.empty((batch, constants.NUM_ROW_STATS), **f32)
    state_i = torch.empty((2, batch, 3), **i64)
    state_f = torch.empty((2, batch, 2), **f32)
    draw_f = torch.empty((batch, parts, constants.NUM_PART_DRAW), **f32)
    draw_i = torch.empty((batch, parts), **i64)
    ids = bias_ids if has_bias else forced
    values = bias_values if has_bias else temperature
    grid = (batch, parts)  # batch on axis 0 (up to 2**31 - 1); parts <= MAX_PROGRAMS
    warps = 8 if block_v >= 256 else 4
    s_b, s_v = logits.stride()
    meta = dict(LEVELS=LEVELS_PER_SEARCH, P_BLOCK=p_block, BLOCK_V=block_v, NB=constants.NUM_BUCKETS, num_warps=warps)
    _stats_kernel[grid](
        logits, s_b, s_v, vocab, chunk, temperature, top_k, forced, ids, values, n_bias,
        stats, originals, forced_z, counts, mass, state_i, state_f,
        HAS_BIAS=has_bias, BLOCK_K=block_k, BLOCK_V=block_v, NB=constants.NUM_BUCKETS, num_warps=warps,
    )
    for level in range(1, NUM_LEVELS):
        _level_kernel[grid](
            logits, s_b, s_v, vocab, chunk, level, temperature, top_k, top_p, forced,
            stats, row_stats, counts, mass, state_i, state_f,
            FIRST=level == 1, **meta,
        )
    _final_kernel[grid](
        logits, s_b, s_v, vocab, chunk, temperature, top_k, top_p, min_p, forced, seeds,
        row_stats, counts, mass, state_i, state_f, draw_f, draw_i,
        **meta,
    )
    _reduce_kernel[(batch,)](
        vocab, parts, MIN_TEMPERATURE, temperature, top_k, top_p, min_p, forced, ids, values, n_bias,
        row_stats, originals, forced_z, draw_f, draw_i, tokens, logprobs, raw_logprobs, status, error_flag,
        ERR_FORCED_TOKEN=device_checks.ERR_FORCED_TOKEN, ERR_TARGET_RANGE=device_checks.ERR_TARGET_RANGE,
        HAS_BIAS=has_bias, BLOCK_K=block_k, P_BLOCK=p_block, num_warps=4,
    )


def uniform_noise(seeds: torch.Tensor, vocab: int) -> torch.Tensor:
    """The ``[B, vocab]`` float32 noise the kernel draws for these row seeds (for tests)."""
    out = torch.empty((seeds.shape[0], vocab), dtype=torch.float32, device=seeds.device)
    if seeds.shape[0] > 0:
        _uniform_kernel[(seeds.shape[0],)](seeds, out, vocab, BLOCK_V=_block_size(vocab))
    return out
