// C++ CPU kernel for welfare_advantages (see kernels/welfare_advantages.py for the maths and the
// layout contract): Cobb-Douglas welfare W = exp(alpha log U + (1 - alpha) log L), per-group
// statistics over the valid (non-NaN) rewards, advantages and, optionally, their scatter over the
// tokens of each completion, in one call.
//
// Groups are contiguous row ranges, given by a fixed size or by offsets [G+1]. Threads take
// contiguous runs of groups: W of a whole run is computed in one vectorised loop (the log and exp
// below are branch-free so `#pragma omp simd` vectorises them), then each group is reduced and
// written while its rows are still in L1. scale = "batch" needs the std of the whole batch before
// any advantage is written, so it runs in two parallel passes with a merge in between. Fixed
// groups of 8 with scale = "group" / "none" take a vectorised path that reduces 8 groups at once
// (see groups_of_8_pass), bit for bit the same results.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>  // the groups-of-8 path (AVX2 / AVX-512, chosen at run time)
#endif

#include "../device_checks_common.h"
#include "../welfare_advantages_common.h"
#include "vec_math.h"

namespace gtalign_fast {
namespace cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Rows per unit of parallel work: enough that a thread's share amortises the fork.
constexpr int64_t kRowsPerTask = 4096;

// Scale modes, std and 1 / (std + eps), argument checks (../welfare_advantages_common.h).
using namespace gtalign_fast::welfare;

// W for rows [begin, end); NaN for a missing reward, -inf for an invalid one (negative or
// infinite U or L: the Python side turns that into a ValueError). A zero exponent drops its
// factor (0^0 = 1), so alpha = 0 gives W = L and alpha = 1 gives W = U.
GTALIGN_CPU_CLONES void welfare_rows(const float* user, const float* llm, int64_t begin, int64_t end, float alpha,
                                     float* welfare) {
  const float beta = 1.0f - alpha;
  const bool use_user = alpha > 0.0f, use_llm = beta > 0.0f;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float u = user[i], l = llm[i];
    // Both logs are always computed; a zero exponent then selects 0 instead of 0 * log(0) = NaN.
    const float log_u = blend(use_user, alpha * log_f32(u), 0.0f);
    const float log_l = blend(use_llm, beta * log_f32(l), 0.0f);
    const float w = exp_f32(log_u + log_l);
    const bool missing = (u != u) | (l != l);
    const bool invalid = (u < 0.0f) | (l < 0.0f) | (u == kInf) | (l == kInf);
    welfare[i] = blend(invalid, -kInf, blend(missing, kNaN, w));
  }
}

// Statistics of the valid rewards of one group (or of a whole batch, after merging).
struct Moments {
  double count = 0.0, mean = 0.0, m2 = 0.0;  // m2 = sum of squared deviations from the mean

  // Chan et al.'s parallel merge: exact for any split of the values.
  void merge(const Moments& other) {
    if (other.count == 0.0) return;
    const double total = count + other.count;
    const double delta = other.mean - mean;
    mean += delta * other.count / total;
    m2 += other.m2 + delta * delta * count * other.count / total;
    count = total;
  }
};

struct GroupResult {
  Moments moments;
  bool all_equal;
};

// Sums of the valid rewards of rows [begin, end); VECTOR picks the simd loop (long groups) or a
// plain one (short groups, where vector prologues and horizontal reductions cost more than they save).
template <bool VECTOR>
static inline void accumulate(const float* welfare, int64_t begin, int64_t end, double& sum, double& count,
                              float& lowest, float& highest) {
#pragma omp simd reduction(+ : sum, count) reduction(min : lowest) reduction(max : highest) if (VECTOR)
  for (int64_t i = begin; i < end; ++i) {
    const float w = welfare[i];
    const bool valid = w == w;
    sum += valid ? static_cast<double>(w) : 0.0;
    count += valid ? 1.0 : 0.0;
    lowest = std::min(lowest, valid ? w : kInf);
    highest = std::max(highest, valid ? w : -kInf);
  }
}

template <bool VECTOR>
static inline double squared_deviations(const float* welfare, int64_t begin, int64_t end, double mean) {
  double m2 = 0.0;
#pragma omp simd reduction(+ : m2) if (VECTOR)
  for (int64_t i = begin; i < end; ++i) {
    const float w = welfare[i];
    // Missing rewards contribute 0 (selected on bits and by a 0/1 factor: no branch).
    const double d = static_cast<double>(blend(w == w, w, 0.0f)) - mean;
    m2 += d * d * static_cast<double>(static_cast<int32_t>(w == w));
  }
  return m2;
}

// Groups at most this long are reduced with plain loops.
constexpr int64_t kShortGroup = 32;

// Two passes over the group's welfare (mean, then squared deviations: no cancellation), in float64.
static inline GroupResult reduce_group(const float* welfare, int64_t begin, int64_t end) {
  double sum = 0.0, count = 0.0;
  float lowest = kInf, highest = -kInf;
  const bool short_group = end - begin <= kShortGroup;
  if (short_group) {
    accumulate<false>(welfare, begin, end, sum, count, lowest, highest);
  } else {
    accumulate<true>(welfare, begin, end, sum, count, lowest, highest);
  }
  GroupResult result;
  result.moments.count = count;
  result.moments.mean = count > 0.0 ? sum / count : 0.0;
  // Exact comparison: std == 0 iff every valid reward is the same number (vacuous below 2).
  result.all_equal = count < 2.0 || lowest == highest;
  if (!result.all_equal) {
    result.moments.m2 = short_group ? squared_deviations<false>(welfare, begin, end, result.moments.mean)
                                    : squared_deviations<true>(welfare, begin, end, result.moments.mean);
  }
  return result;
}

// advantages[i] = (W_i - mean) * inv_denominator; 0 for missing rewards and all-equal groups.
template <bool VECTOR>
static inline void centre_and_scale(const float* welfare, int64_t begin, int64_t end, float mean,
                                    float inv_denominator, float* advantages) {
#pragma omp simd if (VECTOR)
  for (int64_t i = begin; i < end; ++i) {
    const float w = welfare[i];
    advantages[i] = (blend(w == w, w, mean) - mean) * inv_denominator;  // missing: (mean - mean) * inv = 0
  }
}

static inline void write_advantages(const float* welfare, int64_t begin, int64_t end, float mean,
                                    float inv_denominator, bool zero, float* advantages) {
  if (zero) {
    std::fill(advantages + begin, advantages + end, 0.0f);
  } else if (end - begin <= kShortGroup) {
    centre_and_scale<false>(welfare, begin, end, mean, inv_denominator, advantages);
  } else {
    centre_and_scale<true>(welfare, begin, end, mean, inv_denominator, advantages);
  }
}

// The optional [N, T] mask, read in place with its strides; rows == nullptr when there is none.
template <typename mask_t>
struct TokenScatter {
  const mask_t* mask;
  int64_t stride0, stride1, tokens;
  float* token_advantages;  // contiguous [N, T]

  // token_advantages[i, t] = advantages[i] where mask[i, t] != 0, else 0, for rows [begin, end).
  void rows(const float* advantages, int64_t begin, int64_t end) const {
    if (mask == nullptr) return;
    const mask_t zero = static_cast<mask_t>(0);
    for (int64_t i = begin; i < end; ++i) {
      const float value = advantages[i];
      const mask_t* mask_row = mask + i * stride0;
      float* out_row = token_advantages + i * tokens;
      if (stride1 == 1) {
#pragma omp simd
        for (int64_t t = 0; t < tokens; ++t) out_row[t] = mask_row[t] != zero ? value : 0.0f;
      } else {
        for (int64_t t = 0; t < tokens; ++t) out_row[t] = mask_row[t * stride1] != zero ? value : 0.0f;
      }
    }
  }
};

struct GroupLayout {
  const int64_t* offsets;  // [G + 1], or nullptr for fixed-size groups
  int64_t group_size, count;
  int64_t start(int64_t g) const { return offsets != nullptr ? offsets[g] : g * group_size; }
};

struct Outputs {
  float *welfare, *advantages, *group_mean, *group_std;
  bool* group_all_equal;
};

static inline void store_group(const GroupResult& result, bool unbiased, int64_t g, const Outputs& out) {
  out.group_mean[g] = static_cast<float>(result.moments.mean);
  out.group_std[g] = result.all_equal ? 0.0f : static_cast<float>(std_of(result.moments.count, result.moments.m2, unbiased));
  out.group_all_equal[g] = result.all_equal;
}

int64_t groups_per_task(const GroupLayout& groups, int64_t n_rows) {
  const int64_t average_size = std::max<int64_t>(1, n_rows / std::max<int64_t>(1, groups.count));
  return std::max<int64_t>(1, kRowsPerTask / average_size);
}

// Groups [g_begin, g_end): W, statistics and (unless scale = "batch") advantages. With
// `batch` set, their moments are merged into it. One multi-versioned call per run of groups:
// the per-group helpers are inlined into each instruction-set clone.
GTALIGN_CPU_CLONES void groups_pass(const float* user, const float* llm, const GroupLayout& groups, int64_t g_begin,
                                    int64_t g_end, float alpha, int64_t scale_mode, double eps, bool unbiased,
                                    const Outputs& out, Moments* batch) {
  welfare_rows(user, llm, groups.start(g_begin), groups.start(g_end), alpha, out.welfare);
  for (int64_t g = g_begin; g < g_end; ++g) {
    const GroupResult result = reduce_group(out.welfare, groups.start(g), groups.start(g + 1));
    store_group(result, unbiased, g, out);
    if (batch != nullptr) batch->merge(result.moments);
  }
  if (batch != nullptr) return;
  // A second loop, so that the divisions of one group overlap with the work of the next
  // (statistics and advantages of a group form one long dependency chain).
  for (int64_t g = g_begin; g < g_end; ++g) {
    const float inv = inverse_denominator(scale_mode, out.group_std[g], eps);
    write_advantages(out.welfare, groups.start(g), groups.start(g + 1), out.group_mean[g], inv,
                     out.group_all_equal[g] || inv == 0.0f, out.advantages);
  }
}

// scale = "batch", second pass: advantages of groups [g_begin, g_end) with the batch's 1 / (std + eps).
GTALIGN_CPU_CLONES void batch_advantages_pass(const GroupLayout& groups, int64_t g_begin, int64_t g_end, float inv,
                                              const Outputs& out) {
  for (int64_t g = g_begin; g < g_end; ++g) {
    write_advantages(out.welfare, groups.start(g), groups.start(g + 1), out.group_mean[g], inv,
                     out.group_all_equal[g] || inv == 0.0f, out.advantages);
  }
}

// ---------------------------------------------------------------------------------------------
// Fixed groups of 8 (GRPO's usual num_generations), scale = "group" or "none", on AVX2 / AVX-512.
//
// The generic path reduces one group at a time, and each group is one long serial chain
// (sum -> mean -> m2 -> std -> 1 / (std + eps)) of float64 divisions and a square root; with
// 8 rows per group that chain, not the arithmetic, sets the speed. Here 8 groups are reduced at
// once, one group per vector lane: the 8 x 8 block of W is transposed in registers, so that
// every per-group reduction becomes a plain vertical one and each division or square root
// serves 4 (AVX2) or 8 (AVX-512) groups. The maths, and the order of every float64 sum, are
// those of reduce_group / store_group / write_advantages, so both paths give the same bits.
//
// Intrinsics under target attributes, chosen at run time (groups_of_8_kernel): the build itself
// assumes no instruction set beyond x86-64. The float helpers are AVX2 functions, which GCC
// inlines into the AVX-512 entry point as well (its target includes AVX2).
using BlocksOf8Fn = void (*)(int64_t g_begin, int64_t g_end, double eps, bool unbiased, bool scale_none,
                             const Outputs& out);

constexpr int64_t kBlockGroups = 8;  // groups per block: one per float lane of a __m256
// Groups per chunk: W of a chunk (512 rows, 2 KiB) is computed and then reduced while in L1.
constexpr int64_t kChunkGroups = 64;

#if defined(__GNUC__) && defined(__x86_64__)
#define GTALIGN_AVX2 __attribute__((target("avx2"), always_inline)) inline
#define GTALIGN_AVX512 __attribute__((target("avx2,avx512f,avx512vl"), always_inline)) inline

// In-register transpose of an 8 x 8 float block: r[k] becomes column k (it is its own inverse).
GTALIGN_AVX2 void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// A block of 8 groups: col[k], lane j = row k of group g + j.
struct Block {
  __m256 col[8];
  __m256 valid[8];  // lane masks: W is not NaN
  __m256 count;     // valid rows per group (exact in float)
  __m256 all_equal;  // lane mask: fewer than two valid rows, or all valid W equal
};

// Per-group results, rounded to float as they are stored (inv_denominator = 1 / (std + eps)).
struct BlockStats {
  __m256 mean, std, inv_denominator;
};

// Loads and transposes W of groups g .. g + 7; counts the valid rows and finds the all-equal
// groups (lowest == highest valid W, compared in float as reduce_group does).
GTALIGN_AVX2 Block load_block(const float* welfare) {
  Block b;
  for (int k = 0; k < 8; ++k) b.col[k] = _mm256_loadu_ps(welfare + 8 * k);
  transpose8(b.col);
  const __m256 inf = _mm256_set1_ps(kInf), minus_inf = _mm256_set1_ps(-kInf), one = _mm256_set1_ps(1.0f);
  __m256 lowest = inf, highest = minus_inf;
  b.count = _mm256_setzero_ps();
  for (int k = 0; k < 8; ++k) {
    b.valid[k] = _mm256_cmp_ps(b.col[k], b.col[k], _CMP_ORD_Q);
    b.count = _mm256_add_ps(b.count, _mm256_and_ps(b.valid[k], one));
    lowest = _mm256_min_ps(lowest, _mm256_blendv_ps(inf, b.col[k], b.valid[k]));
    highest = _mm256_max_ps(highest, _mm256_blendv_ps(minus_inf, b.col[k], b.valid[k]));
  }
  b.all_equal = _mm256_or_ps(_mm256_cmp_ps(b.count, _mm256_set1_ps(2.0f), _CMP_LT_OQ),
                             _mm256_cmp_ps(lowest, highest, _CMP_EQ_OQ));
  return b;
}

// Lanes 4 * HALF .. 4 * HALF + 3 of a float vector, widened to double.
template <int HALF>
GTALIGN_AVX2 __m256d widen(__m256 x) {
  return _mm256_cvtps_pd(HALF == 0 ? _mm256_castps256_ps128(x) : _mm256_extractf128_ps(x, 1));
}

// Groups 4 * HALF .. 4 * HALF + 3 of a block (AVX2: 4 doubles per vector), in float64: the mean,
// then the squared deviations (two passes, summed over the rows in order, as reduce_group does),
// std_of and inverse_denominator. The results are float, in lanes 0..3.
template <int HALF>
GTALIGN_AVX2 void half_block_stats(const Block& b, double eps, bool unbiased, bool scale_none, __m128& mean_out,
                                   __m128& std_out, __m128& inv_out) {
  const __m256d zero = _mm256_setzero_pd(), one = _mm256_set1_pd(1.0);
  __m256d x[8], valid[8];
  __m256d sum = zero;
  for (int k = 0; k < 8; ++k) {
    const __m256d w = widen<HALF>(b.col[k]);
    valid[k] = _mm256_cmp_pd(w, w, _CMP_ORD_Q);
    x[k] = _mm256_and_pd(w, valid[k]);  // a missing reward adds 0
    sum = _mm256_add_pd(sum, x[k]);
  }
  const __m256d count = widen<HALF>(b.count);
  const __m256d mean = _mm256_and_pd(_mm256_div_pd(sum, count), _mm256_cmp_pd(count, zero, _CMP_GT_OQ));
  __m256d m2 = zero;
  for (int k = 0; k < 8; ++k) {
    const __m256d d = _mm256_sub_pd(x[k], mean);
    m2 = _mm256_add_pd(m2, _mm256_and_pd(_mm256_mul_pd(d, d), valid[k]));
  }
  // The all-equal mask, widened from 32- to 64-bit lanes: those groups have std 0.
  const __m256i flags = _mm256_castps_si256(b.all_equal);
  const __m256d all_equal = _mm256_castsi256_pd(
      _mm256_cvtepi32_epi64(HALF == 0 ? _mm256_castsi256_si128(flags) : _mm256_extracti128_si256(flags, 1)));
  const __m256d divisor = unbiased ? _mm256_sub_pd(count, one) : count;
  const __m256d std = _mm256_andnot_pd(all_equal, _mm256_sqrt_pd(_mm256_div_pd(m2, divisor)));
  mean_out = _mm256_cvtpd_ps(mean);
  std_out = _mm256_cvtpd_ps(std);
  if (scale_none) {
    inv_out = _mm_set1_ps(1.0f);
  } else {
    // From the float std, as the generic path reads it back from group_std; 0 if std + eps is 0.
    const __m256d denominator = _mm256_add_pd(_mm256_cvtps_pd(std_out), _mm256_set1_pd(eps));
    inv_out = _mm256_cvtpd_ps(_mm256_and_pd(_mm256_div_pd(one, denominator),
                                            _mm256_cmp_pd(denominator, zero, _CMP_GT_OQ)));
  }
}

GTALIGN_AVX2 BlockStats block_stats_avx2(const Block& b, double eps, bool unbiased, bool scale_none) {
  __m128 mean[2], std[2], inv[2];
  half_block_stats<0>(b, eps, unbiased, scale_none, mean[0], std[0], inv[0]);
  half_block_stats<1>(b, eps, unbiased, scale_none, mean[1], std[1], inv[1]);
  return {_mm256_set_m128(mean[1], mean[0]), _mm256_set_m128(std[1], std[0]), _mm256_set_m128(inv[1], inv[0])};
}

// The same for all 8 groups at once (AVX-512: 8 doubles per vector, lane masks in k registers).
GTALIGN_AVX512 BlockStats block_stats_avx512(const Block& b, double eps, bool unbiased, bool scale_none) {
  const __m512d zero = _mm512_setzero_pd(), one = _mm512_set1_pd(1.0);
  __m512d x[8];
  __mmask8 valid[8];
  __m512d sum = zero;
  for (int k = 0; k < 8; ++k) {
    const __m512d w = _mm512_cvtps_pd(b.col[k]);
    valid[k] = _mm512_cmp_pd_mask(w, w, _CMP_ORD_Q);
    x[k] = _mm512_maskz_mov_pd(valid[k], w);  // a missing reward adds 0
    sum = _mm512_add_pd(sum, x[k]);
  }
  const __m512d count = _mm512_cvtps_pd(b.count);
  const __m512d mean = _mm512_maskz_div_pd(_mm512_cmp_pd_mask(count, zero, _CMP_GT_OQ), sum, count);
  __m512d m2 = zero;
  for (int k = 0; k < 8; ++k) {
    const __m512d d = _mm512_sub_pd(x[k], mean);
    m2 = _mm512_mask_add_pd(m2, valid[k], m2, _mm512_mul_pd(d, d));
  }
  const __mmask8 all_equal = static_cast<__mmask8>(_mm256_movemask_ps(b.all_equal));
  const __m512d divisor = unbiased ? _mm512_sub_pd(count, one) : count;
  const __m512d std = _mm512_maskz_sqrt_pd(static_cast<__mmask8>(~all_equal), _mm512_div_pd(m2, divisor));
  BlockStats s;
  s.mean = _mm512_cvtpd_ps(mean);
  s.std = _mm512_cvtpd_ps(std);
  if (scale_none) {
    s.inv_denominator = _mm256_set1_ps(1.0f);
  } else {
    const __m512d denominator = _mm512_add_pd(_mm512_cvtps_pd(s.std), _mm512_set1_pd(eps));
    const __mmask8 positive = _mm512_cmp_pd_mask(denominator, zero, _CMP_GT_OQ);
    s.inv_denominator = _mm512_cvtpd_ps(_mm512_maskz_div_pd(positive, one, denominator));
  }
  return s;
}

// Stores the per-group results of groups g .. g + 7 and the advantages of their 64 rows, as
// store_group and write_advantages do (0 for all-equal groups and a zero 1 / (std + eps)).
GTALIGN_AVX2 void store_block(Block& b, const BlockStats& s, int64_t g, const Outputs& out) {
  _mm256_storeu_ps(out.group_mean + g, s.mean);
  _mm256_storeu_ps(out.group_std + g, s.std);
  // The flags as bytes 0 / 1: pack the 32-bit lane masks (-1 / 0) down to 8 bits, keep bit 0.
  const __m256i flags = _mm256_castps_si256(b.all_equal);
  const __m128i flags16 = _mm_packs_epi32(_mm256_castsi256_si128(flags), _mm256_extracti128_si256(flags, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out.group_all_equal + g),
                   _mm_and_si128(_mm_packs_epi16(flags16, flags16), _mm_set1_epi8(1)));

  const __m256 zero = _mm256_or_ps(b.all_equal, _mm256_cmp_ps(s.inv_denominator, _mm256_setzero_ps(), _CMP_EQ_OQ));
  for (int k = 0; k < 8; ++k) {
    const __m256 centred = _mm256_sub_ps(_mm256_blendv_ps(s.mean, b.col[k], b.valid[k]), s.mean);  // missing: 0
    b.col[k] = _mm256_andnot_ps(zero, _mm256_mul_ps(centred, s.inv_denominator));
  }
  transpose8(b.col);  // back to one group per vector
  float* advantages = out.advantages + g * 8;
  for (int k = 0; k < 8; ++k) _mm256_storeu_ps(advantages + 8 * k, b.col[k]);
}

// Whole blocks of groups [g_begin, g_end) (a multiple of 8 groups), W already computed.
__attribute__((target("avx2"))) void blocks_of_8_avx2(int64_t g_begin, int64_t g_end, double eps, bool unbiased,
                                                      bool scale_none, const Outputs& out) {
  for (int64_t g = g_begin; g < g_end; g += kBlockGroups) {
    Block b = load_block(out.welfare + g * 8);
    store_block(b, block_stats_avx2(b, eps, unbiased, scale_none), g, out);
  }
}

__attribute__((target("avx2,avx512f,avx512vl"))) void blocks_of_8_avx512(int64_t g_begin, int64_t g_end, double eps,
                                                                         bool unbiased, bool scale_none,
                                                                         const Outputs& out) {
  for (int64_t g = g_begin; g < g_end; g += kBlockGroups) {
    Block b = load_block(out.welfare + g * 8);
    store_block(b, block_stats_avx512(b, eps, unbiased, scale_none), g, out);
  }
}

// The best kernel for this CPU, or nullptr (no AVX2: the generic path runs). Like ATen's own
// kernels, it honours ATEN_CPU_CAPABILITY=default / avx2 (tests use it to run every variant).
BlocksOf8Fn groups_of_8_kernel() {
  static const BlocksOf8Fn kernel = [] {
    const char* capability = std::getenv("ATEN_CPU_CAPABILITY");
    const std::string cap = capability != nullptr ? capability : "";
    const bool avx2 = cap != "default" && __builtin_cpu_supports("avx2");
    const bool avx512 =
        avx2 && cap != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
    return avx512 ? blocks_of_8_avx512 : avx2 ? blocks_of_8_avx2 : static_cast<BlocksOf8Fn>(nullptr);
  }();
  return kernel;
}
#else
BlocksOf8Fn groups_of_8_kernel() { return nullptr; }
#endif  // x86-64 GCC / Clang

// Groups [g_begin, g_end) of 8 rows each: W, then statistics and advantages, chunk by chunk; the
// last groups (fewer than a block) go through the generic path.
void groups_of_8_pass(BlocksOf8Fn blocks, const float* user, const float* llm, const GroupLayout& groups,
                      int64_t g_begin, int64_t g_end, float alpha, int64_t scale_mode, double eps, bool unbiased,
                      const Outputs& out) {
  const int64_t blocks_end = g_begin + (g_end - g_begin) / kBlockGroups * kBlockGroups;
  for (int64_t g = g_begin; g < blocks_end; g += kChunkGroups) {
    const int64_t chunk_end = std::min(g + kChunkGroups, blocks_end);
    welfare_rows(user, llm, g * 8, chunk_end * 8, alpha, out.welfare);
    blocks(g, chunk_end, eps, unbiased, scale_mode == kScaleNone, out);
  }
  if (blocks_end < g_end) {
    groups_pass(user, llm, groups, blocks_end, g_end, alpha, scale_mode, eps, unbiased, out, nullptr);
  }
}

template <typename mask_t>
void run_group_or_none(const float* user, const float* llm, const GroupLayout& groups, int64_t n_rows, float alpha,
                       int64_t scale_mode, double eps, bool unbiased, const Outputs& out,
                       const TokenScatter<mask_t>& scatter) {
  // Fixed groups of 8: the vectorised path (when the CPU has AVX2).
  const BlocksOf8Fn blocks = groups.offsets == nullptr && groups.group_size == 8 ? groups_of_8_kernel() : nullptr;
  at::parallel_for(0, groups.count, groups_per_task(groups, n_rows), [&](int64_t g_begin, int64_t g_end) {
    if (blocks != nullptr) {
      groups_of_8_pass(blocks, user, llm, groups, g_begin, g_end, alpha, scale_mode, eps, unbiased, out);
    } else {
      groups_pass(user, llm, groups, g_begin, g_end, alpha, scale_mode, eps, unbiased, out, nullptr);
    }
    scatter.rows(out.advantages, groups.start(g_begin), groups.start(g_end));
  });
}

template <typename mask_t>
void run_batch(const float* user, const float* llm, const GroupLayout& groups, int64_t n_rows, float alpha,
               double eps, bool unbiased, const Outputs& out, const TokenScatter<mask_t>& scatter) {
  const int64_t grain = groups_per_task(groups, n_rows);
  Moments batch;
  std::mutex batch_lock;
  at::parallel_for(0, groups.count, grain, [&](int64_t g_begin, int64_t g_end) {
    Moments local;
    groups_pass(user, llm, groups, g_begin, g_end, alpha, kScaleBatch, eps, unbiased, out, &local);
    const std::lock_guard<std::mutex> guard(batch_lock);
    batch.merge(local);
  });
  const float inv = inverse_denominator(kScaleBatch, std_of(batch.count, batch.m2, unbiased), eps);
  at::parallel_for(0, groups.count, grain, [&](int64_t g_begin, int64_t g_end) {
    batch_advantages_pass(groups, g_begin, g_end, inv, out);
    scatter.rows(out.advantages, groups.start(g_begin), groups.start(g_end));
  });
}

// A negative or infinite reward gets W = -inf, which makes its group's mean non-finite: scan the
// [G] means (cheap), and only then the inputs, to raise a ValueError naming the first bad reward.
void raise_on_bad_rewards(const float* user, const float* llm, int64_t n_rows, const float* group_mean,
                          int64_t n_groups) {
  bool suspicious = false;
  for (int64_t g = 0; g < n_groups; ++g) suspicious |= !std::isfinite(group_mean[g]);
  if (!suspicious) return;
  const char* names[2] = {"user", "llm"};
  const float* values[2] = {user, llm};
  for (int k = 0; k < 2; ++k) {
    for (int64_t i = 0; i < n_rows; ++i) {
      const float v = values[k][i];
      TORCH_CHECK_VALUE(!(v < 0.0f || std::isinf(v)), "welfare_advantages: ", names[k], "[", i, "] = ", v,
                        "; rewards must be finite and >= 0 (Cobb-Douglas welfare is defined on non-negative "
                        "rewards; use NaN for a missing reward)");
    }
  }
}

void welfare_advantages_cpu(const at::Tensor& user, const at::Tensor& llm, const std::optional<at::Tensor>& offsets,
                            int64_t group_size, double alpha, int64_t scale_mode, double eps, bool unbiased,
                            const std::optional<at::Tensor>& mask, at::Tensor& welfare, at::Tensor& advantages,
                            at::Tensor& group_mean, at::Tensor& group_std, at::Tensor& group_all_equal,
                            at::Tensor& token_advantages, const std::optional<at::Tensor>& error_flag) {
  // The error flag (gtalign_fast/ops/_device_checks.py) is for the CUDA kernel, which cannot raise
  // without a host sync; here bad offsets and rewards raise directly (the flag is left untouched).
  error_flag_data(error_flag, user, "welfare_advantages");
  const int64_t n_rows = user.numel();
  const int64_t n_groups = check_inputs(user, llm, offsets, group_size, scale_mode);
  const bool has_offsets = offsets.has_value() && offsets->defined();
  check_outputs(welfare, advantages, group_mean, group_std, group_all_equal, n_rows, n_groups);
  const bool has_mask = mask.has_value() && mask->defined();
  if (has_mask) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == n_rows, "welfare_advantages: mask must be [N, T]");
    check_output(token_advantages, n_rows * mask->size(1), at::kFloat, "token_advantages");
  }
  if (has_offsets) {  // the row ranges the groups read and write: 0 = o[0] <= ... <= o[G] = N
    const int64_t* o = offsets->data_ptr<int64_t>();
    TORCH_CHECK_VALUE(o[0] == 0 && o[n_groups] == n_rows, "welfare_advantages: offsets must start at 0 and end at N = ",
                      n_rows, ", got ", o[0], " and ", o[n_groups]);
    for (int64_t g = 0; g < n_groups; ++g) {
      TORCH_CHECK_VALUE(o[g] <= o[g + 1], "welfare_advantages: offsets must be non-decreasing, got ", o[g],
                        " then ", o[g + 1], " at group ", g);
    }
  }
  if (n_rows == 0 && n_groups == 0) return;

  const GroupLayout groups{has_offsets ? offsets->data_ptr<int64_t>() : nullptr, group_size, n_groups};
  const Outputs out{welfare.data_ptr<float>(), advantages.data_ptr<float>(), group_mean.data_ptr<float>(),
                    group_std.data_ptr<float>(), group_all_equal.data_ptr<bool>()};
  const float* user_ptr = user.data_ptr<float>();
  const float* llm_ptr = llm.data_ptr<float>();
  const float alpha_f = static_cast<float>(alpha);
  // Without a mask the dispatch still picks one instantiation (bool) whose scatter does nothing.
  const at::ScalarType mask_type = has_mask ? mask->scalar_type() : at::kBool;
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask_type, "welfare_advantages_cpu", [&] {
    TokenScatter<scalar_t> scatter{nullptr, 0, 0, 0, nullptr};
    if (has_mask && mask->size(1) > 0) {
      scatter = {mask->data_ptr<scalar_t>(), mask->stride(0), mask->stride(1), mask->size(1),
                 token_advantages.data_ptr<float>()};
    }
    if (scale_mode == kScaleBatch) {
      run_batch(user_ptr, llm_ptr, groups, n_rows, alpha_f, eps, unbiased, out, scatter);
    } else {
      run_group_or_none(user_ptr, llm_ptr, groups, n_rows, alpha_f, scale_mode, eps, unbiased, out, scatter);
    }
  });
  raise_on_bad_rewards(user_ptr, llm_ptr, n_rows, out.group_mean, n_groups);
}

}  // namespace
}  // namespace cpu
}  // namespace gtalign_fast

TORCH_LIBRARY_FRAGMENT(gtalign_fast_C, m) {
  m.def(
      "welfare_advantages(Tensor user, Tensor llm, Tensor? offsets, int group_size, float alpha, int scale_mode, "
      "float eps, bool unbiased, Tensor? mask, Tensor(a!) welfare, Tensor(b!) advantages, Tensor(c!) group_mean, "
      "Tensor(d!) group_std, Tensor(e!) group_all_equal, Tensor(f!) token_advantages, "
      "Tensor(g!)? error_flag=None) -> ()");
}

TORCH_LIBRARY_IMPL(gtalign_fast_C, CPU, m) {
  m.impl("welfare_advantages", &gtalign_fast::cpu::welfare_advantages_cpu);
}
