// C++ CPU kernel for sample_ (see kernels/sample.py for the maths, the threshold bisection and
// the layout contract: logits [B, V] with any strides, modified in place; per-row parameters are
// contiguous [B] tensors; biases contiguous [B, K]; outputs contiguous [B]).
//
// Same algorithm and the same noise as the Triton kernel (Philox4x32-10 on (row seed, column),
// bit-for-bit), so both backends draw the same tokens up to float32 rounding of the scores.
// The CPU differs in one way: each thread converts its current row once into a row-sized float
// buffer (y) and a buffer of exp(y - max) (a few hundred KB per thread, never [B, V]), so the
// bisection probes are compare-and-sum loops over L2-resident floats. Rows run in parallel.
//
// Where the time goes (SmolLM2's [8, 49152] float32 at T = 1, one thread, perf): the noise was
// about 60% of it, as a `#pragma omp simd` loop in which GCC widens each 32x32 multiply of Philox
// to a 64-bit lane (8 counters per AVX-512 register, many shuffles). Now the Philox words are
// explicit AVX-512 / AVX2 code on 16 / 8 counters (philox_words_*, picked at run time), the two
// logs of the Gumbel noise are computed only for columns that can still win (gumbel_of_candidates),
// and the rest of the draw is split into loops that vectorise (scores, argmax, write-back) and the
// one loop that must stay sequential: the kept mass, summed in column order as before. Every
// token, log-prob and processed logit keeps its bits.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define GTALIGN_X86 1
#endif

#include "../sample_common.h"
#include "isa.h"
#include "vec_math.h"

namespace gtalign_fast {
namespace cpu {
namespace {

using namespace gtalign_fast::sample;  // status words (../sample_common.h)

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
// Gumbel noise g = -log(-log u) from u in [2^-25, 1 - 2^-24] lies in [-2.86, 16.64] (kNoiseMin
// with margin; the top word's u is bounded below 1, see uniform_of): a column more than
// kNoiseReach below the row maximum can never win the draw, so its noise is not computed (exact,
// with margin).
constexpr float kNoiseReach = 21.0f;
constexpr double kNoiseMin = -2.87;
constexpr int64_t kNoiseChunk = 256;

// ---------------------------------------------------------------------------------------------
// Philox4x32-10, first output word, counter (col, 0, 0, 0), key = the seed read as uint64
// (Triton's tl.randint(seed, col)). philox_word is the scalar specification; the AVX-512 and
// AVX2 versions below compute the same words for 16 / 8 consecutive columns at once.

constexpr uint32_t kPhiloxMulA = 0xD2511F53u;
constexpr uint32_t kPhiloxMulB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

static inline uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

static inline uint32_t philox_word(uint64_t seed, uint32_t col) {
  uint32_t c0 = col, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t old_c0 = c0, old_c2 = c2;
    c0 = mulhi32(kPhiloxMulB, old_c2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxMulA, old_c0) ^ c3 ^ k1;
    c1 = kPhiloxMulB * old_c2;
    c3 = kPhiloxMulA * old_c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// The words of columns [start, start + count) of one row (start + count <= 2^32).
using PhiloxWords = void (*)(uint64_t seed, int64_t start, int64_t count, uint32_t* out);

// (The simd pragma keeps the vectorisation GCC gives other architectures; x86 uses the versions below.)
void philox_words_scalar(uint64_t seed, int64_t start, int64_t count, uint32_t* out) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) out[i] = philox_word(seed, static_cast<uint32_t>(start + i));
}

// The round keys are the same for every column of a row: computed once per call.
struct RoundKeys {
  uint32_t k0[kPhiloxRounds], k1[kPhiloxRounds];
  explicit RoundKeys(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < kPhiloxRounds; ++r, a += kPhiloxKeyA, b += kPhiloxKeyB) {
      k0[r] = a;
      k1[r] = b;
    }
  }
};

#ifdef GTALIGN_X86
// Both vector versions follow philox_word round by round. A 32x32 -> 64 multiply exists only on
// the even 32-bit lanes (vpmuludq), so each mulhilo runs twice: on the even lanes as they are and
// on the odd lanes shuffled down (shuffle_epi32 0xF5 = DDBB: lane 2j+1 -> 2j). The halves then go
// back in place: the high word of an odd lane's product already sits in that lane, an even lane's
// is shuffled down to it (and the other way round for the low words); AVX-512 does each with one
// masked shuffle, AVX2 with a shuffle and a blend. Round 0 starts from c1 = c2 = c3 = 0, so its
// B-products vanish; the last round only needs c0 (GCC drops the dead halves).

// GCC 12's AVX-512 intrinsics pass an `_mm512_undefined_epi32()` (a self-initialised variable) as
// the unused merge source of unmasked multiplies and shuffles, which -Wmaybe-uninitialized reports.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) inline void mulhilo_avx512(__m512i a, __m512i x, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(x, a);
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(x, _MM_PERM_DDBB), a);
  *hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);   // even lanes: dword 2j+1 of even
  *lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);   // odd lanes: dword 2j of odd
}

__attribute__((target("avx512f"))) void philox_words_avx512(uint64_t seed, int64_t start, int64_t count,
                                                             uint32_t* out) {
  const RoundKeys keys(seed);
  const __m512i mul_a = _mm512_set1_epi32(static_cast<int>(kPhiloxMulA));
  const __m512i mul_b = _mm512_set1_epi32(static_cast<int>(kPhiloxMulB));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t i = 0; i < count; i += 16) {
    const __m512i col = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(start + i))), lane);
    __m512i hi_a, lo_a, hi_b, lo_b;
    mulhilo_avx512(mul_a, col, &hi_a, &lo_a);  // round 0
    __m512i c0 = _mm512_set1_epi32(static_cast<int>(keys.k0[0]));
    __m512i c1 = _mm512_setzero_si512();
    __m512i c2 = _mm512_xor_si512(hi_a, _mm512_set1_epi32(static_cast<int>(keys.k1[0])));
    __m512i c3 = lo_a;
#pragma GCC unroll 9
    for (int r = 1; r < kPhiloxRounds; ++r) {
      mulhilo_avx512(mul_b, c2, &hi_b, &lo_b);
      mulhilo_avx512(mul_a, c0, &hi_a, &lo_a);
      // 0x96: a ^ b ^ c in one instruction.
      c0 = _mm512_ternarylogic_epi32(hi_b, c1, _mm512_set1_epi32(static_cast<int>(keys.k0[r])), 0x96);
      c2 = _mm512_ternarylogic_epi32(hi_a, c3, _mm512_set1_epi32(static_cast<int>(keys.k1[r])), 0x96);
      c1 = lo_b;
      c3 = lo_a;
    }
    // Masked store of the last, partial vector: never writes past out[count - 1].
    const int64_t left = std::min<int64_t>(16, count - i);
    _mm512_mask_storeu_epi32(out + i, static_cast<__mmask16>((1u << left) - 1u), c0);
  }
}

#pragma GCC diagnostic pop

__attribute__((target("avx2"))) inline void mulhilo_avx2(__m256i a, __m256i x, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(x, a);
  const __m256i odd = _mm256_mul_epu32(_mm256_shuffle_epi32(x, 0xF5), a);
  *hi = _mm256_blend_epi32(_mm256_shuffle_epi32(even, 0xF5), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_shuffle_epi32(odd, 0xA0), 0xAA);
}

__attribute__((target("avx2"))) void philox_words_avx2(uint64_t seed, int64_t start, int64_t count, uint32_t* out) {
  const RoundKeys keys(seed);
  const __m256i mul_a = _mm256_set1_epi32(static_cast<int>(kPhiloxMulA));
  const __m256i mul_b = _mm256_set1_epi32(static_cast<int>(kPhiloxMulB));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < count; i += 8) {
    const __m256i col = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(start + i))), lane);
    __m256i hi_a, lo_a, hi_b, lo_b;
    mulhilo_avx2(mul_a, col, &hi_a, &lo_a);  // round 0
    __m256i c0 = _mm256_set1_epi32(static_cast<int>(keys.k0[0]));
    __m256i c1 = _mm256_setzero_si256();
    __m256i c2 = _mm256_xor_si256(hi_a, _mm256_set1_epi32(static_cast<int>(keys.k1[0])));
    __m256i c3 = lo_a;
#pragma GCC unroll 9
    for (int r = 1; r < kPhiloxRounds; ++r) {
      mulhilo_avx2(mul_b, c2, &hi_b, &lo_b);
      mulhilo_avx2(mul_a, c0, &hi_a, &lo_a);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(keys.k0[r])));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(keys.k1[r])));
      c1 = lo_b;
      c3 = lo_a;
    }
    if (count - i >= 8) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), c0);
    } else {  // the last, partial vector: copy only the words that belong to the range
      alignas(32) uint32_t tail[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tail), c0);
      std::memcpy(out + i, tail, static_cast<size_t>(count - i) * sizeof(uint32_t));
    }
  }
}
#endif  // GTALIGN_X86

// The best instruction set this CPU has, or the one GTALIGN_FAST_SAMPLE_ISA names (isa.h).
PhiloxWords pick_philox() {
  switch (pick_isa("GTALIGN_FAST_SAMPLE_ISA", "sample_", /*avx2_needs_fma=*/false)) {
#ifdef GTALIGN_X86
    case Isa::kAvx512: return philox_words_avx512;
    case Isa::kAvx2: return philox_words_avx2;
#endif
    default: return philox_words_scalar;
  }
}

// Called on the calling thread before any parallel region, so a bad GTALIGN_FAST_SAMPLE_ISA
// raises there (a failed static initialisation is retried on the next call, and raises again).
PhiloxWords philox_kernel() {
  static const PhiloxWords kernel = pick_philox();
  return kernel;
}

// u = min(((word >> 8) + 0.5) / 2^24, 1 - 2^-24): the top word's (2^24 - 0.5) / 2^24 would round to
// 1.0 in float32 (noise +inf); see ops/_seeds.py philox_uniform.
static inline float uniform_of(uint32_t word) {
  return std::min((static_cast<float>(word >> 8) + 0.5f) * (1.0f / 16777216.0f), 0.99999994f);
}

// Gumbel noise -log(-log u) of Philox words. The expression is the one the kernel has always used,
// in a loop GCC vectorises per target clone, so the noise keeps its bits (FMA contractions included).
GTALIGN_CPU_CLONES void gumbel_of_words(const uint32_t* words, int64_t count, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) out[i] = -log_f32(-log_f32(uniform_of(words[i])));
}

// ---------------------------------------------------------------------------------------------
// Order-preserving int keys of float32 values (see kernels/sample.py).

static inline int64_t key_of(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(float));
  return static_cast<int64_t>(bits ^ ((bits >> 31) & 0x7FFFFFFF));
}

static inline float value_of(int64_t key) {
  const int32_t k32 = static_cast<int32_t>(key);
  const int32_t bits = k32 ^ ((k32 >> 31) & 0x7FFFFFFF);
  float x;
  std::memcpy(&x, &bits, sizeof(float));
  return x;
}

struct Probe {
  int64_t count;
  float mass, v_min, v_max;
};

// Count and mass of y >= t, smallest value >= t, largest value < t.
GTALIGN_CPU_CLONES Probe probe(const float* y, const float* weight, int64_t n, float t) {
  int64_t count = 0;
  float mass = 0.0f, v_min = kPosInf, v_max = kNegInf;
#pragma omp simd reduction(+ : count, mass) reduction(min : v_min) reduction(max : v_max)
  for (int64_t i = 0; i < n; ++i) {
    const bool above = y[i] >= t;
    count += above ? 1 : 0;
    mass += above ? weight[i] : 0.0f;
    v_min = above ? std::min(v_min, y[i]) : v_min;
    v_max = above ? v_max : std::max(v_max, y[i]);
  }
  return {count, mass, v_min, v_max};
}

GTALIGN_CPU_CLONES float max_of(const float* y, int64_t n) {
  float result = kNegInf;
#pragma omp simd reduction(max : result)
  for (int64_t i = 0; i < n; ++i) result = y[i] > result ? y[i] : result;
  return result;
}

// weight[i] = exp(y[i] - m); returns their sum.
GTALIGN_CPU_CLONES float weights_and_sum(const float* y, int64_t n, float m, float* weight) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    weight[i] = exp_f32(y[i] - m);
    sum += weight[i];
  }
  return sum;
}

struct RowParams {
  float inv_t;
  bool greedy;
  int64_t top_k;
  float top_p, log_min_p;
  int64_t forced;
  uint64_t seed;
};

struct RowResult {
  int64_t token;
  float logprob, raw_logprob;
  int32_t status;
};

// The key of the top-k threshold (the k-th largest value), and the mass kept at it.
int64_t top_k_key(const float* y, const float* weight, int64_t n, float m, int64_t k, int64_t lo, float* mass_lo) {
  int64_t hi = key_of(m) + 1;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    const Probe p = probe(y, weight, n, value_of(mid));
    if (p.count >= k) {
      lo = key_of(p.v_min);
      *mass_lo = p.mass;
      if (p.count == k) hi = lo + 1;
    } else {
      hi = key_of(p.v_max) + 1;
    }
  }
  return lo;
}

// The key of the top-p threshold: the largest row value whose mass at or above is >= target.
int64_t top_p_key(const float* y, const float* weight, int64_t n, float m, float target, int64_t lo) {
  int64_t hi = key_of(m) + 1;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    const Probe p = probe(y, weight, n, value_of(mid));
    if (p.mass >= target) {
      lo = key_of(p.v_min);
    } else {
      hi = key_of(p.v_max) + 1;
    }
  }
  return lo;
}

// y = z / T as read (y[i] holds it); turns -0.0 into +0.0 so that equal values get equal keys.
// Returns whether any value is NaN or +inf.
GTALIGN_CPU_CLONES bool tidy_and_check(float* y, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    const float v = y[i];
    bad |= static_cast<int>((v != v) | (v == kPosInf));
    y[i] = v == 0.0f ? 0.0f : v;
  }
  return bad != 0;
}

// Which columns a row that is not forced keeps: the values at or above the top-k / top-p
// threshold tau that pass min-p. (`&`, not `&&`: GCC turns `&&` into a branch, which blocks
// vectorisation.)
struct Filter {
  float tau, m, log_min_p;
  bool keeps(float v) const { return (v >= tau) & (v - m >= log_min_p); }
};

// Scores of a chunk of columns: y + noise where the column is kept and within reach of the row
// max, -inf where it cannot win. Returns the largest score. A greedy row passes zero noise and
// reach = -inf (y + 0 = y: the values themselves), so one branch-free loop serves both. (Lanes
// below reach read noise that is blended away; the buffers are zero-initialised, so they read numbers.)
GTALIGN_CPU_CLONES float scores_chunk(const float* y, const float* noise, int64_t count, Filter filter, float reach,
                                      float* score) {
  float best = kNegInf;
#pragma omp simd reduction(max : best)
  for (int64_t j = 0; j < count; ++j) {
    const float v = y[j];
    const float s = blend(filter.keeps(v) & (v >= reach), v + noise[j], kNegInf);
    score[j] = s;
    best = s > best ? s : best;
  }
  return best;
}

// One thread's buffers: y and weight hold a row (V floats each), the rest one chunk of columns.
struct Scratch {
  std::vector<float> y, weight, noise, zeros, score, candidate_noise;
  std::vector<uint32_t> words, candidate_words;
  std::vector<int64_t> candidates;
  std::vector<uint8_t> flags;
  explicit Scratch(int64_t vocab)
      : y(vocab), weight(vocab), noise(kNoiseChunk, 0.0f), zeros(kNoiseChunk, 0.0f), score(kNoiseChunk),
        candidate_noise(kNoiseChunk), words(kNoiseChunk), candidate_words(kNoiseChunk), candidates(kNoiseChunk),
        flags(kNoiseChunk) {}
};

// Most columns of a row cannot win the draw, once a lower bound on the winning score is known (the
// best score of the chunks drawn before): a column of value v needs noise g > floor - v, i.e.
// u > exp(-exp(-(floor - v))). losing_word_bound gives, for a chunk whose values are at most v_max,
// the largest (word >> 8) whose u lies below that bound at v_max (-1 where no word is that low):
// those columns lose for certain. (u(w) <= (w + 1) / 2^24, and the bound keeps 2 more words away.)
int64_t losing_word_bound(double needed_noise) {
  if (!(needed_noise > kNoiseMin)) return -1;  // NaN too (an infinite row max): no skipping
  return static_cast<int64_t>(std::floor(std::exp(-std::exp(-needed_noise)) * 16777216.0)) - 2;
}

// flag[j] = whether column j's word is above `bound` (a vectorised pass before the packing).
GTALIGN_CPU_CLONES void flag_candidates(const uint32_t* words, int64_t count, uint32_t bound, uint8_t* flag) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) flag[j] = static_cast<uint8_t>((words[j] >> 8) > bound);
}

// Gumbel noise of the columns of a chunk whose word is above `bound` (0 <= bound < 2^24), -inf (a
// score that never wins) for the others: the candidates are packed, their noise computed by the
// same loop as for a whole chunk (gumbel_of_words: the same bits), and put back. Candidates are
// rare where this runs, so the packing tests the flags 8 at a time.
void gumbel_of_candidates(const uint32_t* words, int64_t count, int64_t bound, Scratch& scratch, float* noise) {
  uint8_t* flag = scratch.flags.data();
  flag_candidates(words, count, static_cast<uint32_t>(bound), flag);
  int64_t* index = scratch.candidates.data();
  uint32_t* packed = scratch.candidate_words.data();
  int64_t found = 0;  // found <= j < count: inside the buffers
  for (int64_t group = 0; group < count; group += 8) {
    const int64_t end = std::min(group + 8, count);
    uint64_t any = 0;
    if (end - group == 8) std::memcpy(&any, flag + group, 8);
    if (end - group == 8 && any == 0) continue;
    for (int64_t j = group; j < end; ++j) {
      if (flag[j]) {
        index[found] = j;
        packed[found++] = words[j];
      }
    }
  }
  std::fill(noise, noise + count, kNegInf);
  gumbel_of_words(packed, found, scratch.candidate_noise.data());
  for (int64_t k = 0; k < found; ++k) noise[index[k]] = scratch.candidate_noise[k];
}

template <typename scalar_t>
RowResult sample_row(scalar_t* row, int64_t stride_v, int64_t n, const RowParams& params, const int64_t* ids,
                     const float* bias, int64_t n_bias, PhiloxWords philox, Scratch& scratch) {
  float* y = scratch.y.data();
  float* weight = scratch.weight.data();
  const bool is_forced = params.forced >= 0;
  const float forced_z = is_forced ? to_float(row[params.forced * stride_v]) : 0.0f;

  // A. raw statistics of y = z / T (temperature only); NaN / +inf check.
  load_scaled(row, stride_v, n, params.inv_t, y);
  if (tidy_and_check(y, n)) return {0, 0.0f, 0.0f, kStatusBadLogits};
  const float m_raw = max_of(y, n);
  if (m_raw == kNegInf) return {0, 0.0f, 0.0f, kStatusNoFiniteLogit};
  const float raw_total = weights_and_sum(y, n, m_raw, weight);
  const float raw_lse = m_raw + std::log(raw_total);

  // B. biases in place (remembering the raw values), then the processed statistics (without
  // biases, y and its max are unchanged: the weights computed above are the processed ones too).
  std::vector<float> original(static_cast<size_t>(n_bias), 0.0f);
  for (int64_t slot = 0; slot < n_bias; ++slot) {
    const int64_t id = ids[slot];
    if (id < 0) continue;
    original[slot] = to_float(row[id * stride_v]);
    row[id * stride_v] = static_cast<scalar_t>(original[slot] + bias[slot]);
    const float v = to_float(row[id * stride_v]) * params.inv_t;
    y[id] = v == 0.0f ? 0.0f : v;
  }
  const float m = n_bias > 0 ? max_of(y, n) : m_raw;
  if (m == kNegInf) return {0, 0.0f, 0.0f, kStatusNoFiniteLogitAfterBias};
  if (is_forced) {  // the kept set is the forced token: no thresholds, nothing to draw, a log-prob of 0
    for (int64_t i = 0; i < n; ++i) row[i * stride_v] = static_cast<scalar_t>(i == params.forced ? y[i] : kNegInf);
    return {params.forced, 0.0f, forced_z * params.inv_t - raw_lse, kStatusOk};
  }
  const float total = n_bias > 0 ? weights_and_sum(y, n, m, weight) : raw_total;

  // C, D. thresholds.
  int64_t lo = key_of(kNegInf);
  float mass_lo = total;
  if (params.top_k > 0 && params.top_k < n) lo = top_k_key(y, weight, n, m, params.top_k, lo, &mass_lo);
  if (params.top_p < 1.0f) lo = top_p_key(y, weight, n, m, params.top_p * mass_lo, lo);
  const Filter filter{value_of(lo), m, params.log_min_p};

  // E. Gumbel-max draw, kept mass and write-back, a chunk of columns at a time (its noise and
  // scores stay in L1).
  const bool noisy = !params.greedy;
  const float reach = noisy ? m - kNoiseReach : kNegInf;
  const float* noise = noisy ? scratch.noise.data() : scratch.zeros.data();
  // floor: a lower bound on the winning score (the best score drawn so far), less a margin far
  // above the float error of the noise (about 1e-5) and of v + g (ulps of |m|), so that a column
  // skipped against it could not even tie.
  const double margin = 1e-2 + 1e-5 * std::fabs(static_cast<double>(m));
  float kept_mass = 0.0f, best_score = kNegInf, best_y = 0.0f, best_z = 0.0f;
  int64_t best_index = 0;
  const float* score = scratch.score.data();
  for (int64_t start = 0; start < n; start += kNoiseChunk) {
    const int64_t count = std::min(kNoiseChunk, n - start);
    // A chunk with no value within reach of the max cannot win the draw: its noise is not computed.
    const float chunk_max = noisy ? max_of(y + start, count) : kNegInf;
    if (noisy && chunk_max >= reach) {
      philox(params.seed, start, count, scratch.words.data());
      const int64_t bound = losing_word_bound(static_cast<double>(best_score) - margin - chunk_max);
      if (bound < 0) {
        gumbel_of_words(scratch.words.data(), count, scratch.noise.data());
      } else {
        gumbel_of_candidates(scratch.words.data(), count, bound, scratch, scratch.noise.data());
      }
    }
    const float chunk_best = scores_chunk(y + start, noise, count, filter, reach, scratch.score.data());
    // Strictly better than the earlier chunks, at its first column: ties keep the lowest index.
    if (chunk_best > best_score) {
      int64_t j = 0;
      while (j + 1 < count && score[j] != chunk_best) ++j;
      best_score = chunk_best;
      best_index = start + j;
      best_y = y[best_index];
      best_z = to_float(row[best_index * stride_v]);  // the biased logit, before the write-back below
    }
    // The kept mass is summed in column order, one column after another (adding +0 for a dropped
    // column changes nothing): the order every earlier version used, so log-probs keep their bits.
    for (int64_t i = start; i < start + count; ++i) {
      const float v = y[i];
      const bool keep = filter.keeps(v);
      kept_mass += keep ? weight[i] : 0.0f;
      row[i * stride_v] = static_cast<scalar_t>(keep ? v : kNegInf);
    }
  }
  const int64_t token = best_index;
  float raw_z = best_z;
  // A biased token's raw logit is its value from before the bias.
  for (int64_t slot = 0; slot < n_bias; ++slot) {
    if (ids[slot] == token) raw_z = original[slot];
  }
  const float logprob = best_y - m - std::log(kept_mass);
  return {token, logprob, raw_z * params.inv_t - raw_lse, kStatusOk};
}

void check_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.dim() == 1 && t.numel() == n, "sample_: ", name,
              " must be a contiguous ", dtype, " tensor of ", n, " elements");
}

void sample_cpu(at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                const at::Tensor& min_p, const at::Tensor& forced, const at::Tensor& seeds,
                const std::optional<at::Tensor>& bias_ids, const std::optional<at::Tensor>& bias_values,
                at::Tensor& tokens, at::Tensor& logprobs, at::Tensor& raw_logprobs, at::Tensor& status) {
  TORCH_CHECK(logits.dim() == 2, "sample_: logits must be [B, V]");
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  check_vector(temperature, batch, at::kFloat, "temperature");
  check_vector(top_k, batch, at::kLong, "top_k");
  check_vector(top_p, batch, at::kFloat, "top_p");
  check_vector(min_p, batch, at::kFloat, "min_p");
  check_vector(forced, batch, at::kLong, "forced");
  check_vector(seeds, batch, at::kLong, "seeds");
  check_vector(tokens, batch, at::kLong, "tokens");
  check_vector(logprobs, batch, at::kFloat, "logprobs");
  check_vector(raw_logprobs, batch, at::kFloat, "raw_logprobs");
  check_vector(status, batch, at::kInt, "status");
  const bool has_bias = bias_ids.has_value() && bias_ids->defined() && bias_ids->size(1) > 0;
  int64_t n_bias = 0;
  if (has_bias) {
    TORCH_CHECK(bias_values.has_value() && bias_values->defined(), "sample_: bias_values missing");
    n_bias = bias_ids->size(1);
    TORCH_CHECK(bias_ids->scalar_type() == at::kLong && bias_ids->is_contiguous() && bias_ids->dim() == 2 &&
                    bias_ids->size(0) == batch,
                "sample_: bias_ids must be contiguous int64 [B, K]");
    TORCH_CHECK(bias_values->scalar_type() == at::kFloat && bias_values->is_contiguous() &&
                    bias_values->sizes() == bias_ids->sizes(),
                "sample_: bias_values must be contiguous float32 [B, K]");
  }
  if (batch == 0) return;
  // The ids the row loop indexes the logits with (forced tokens, bias ids) are in [-1, V): a pre-pass
  // over the [B] and [B, K] ids, so a direct call of the registered op cannot write outside a row.
  {
    const int64_t* f = forced.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK_INDEX(f[b] >= -1 && f[b] < vocab, "sample_: forced token ", f[b], " of row ", b,
                        " is neither -1 (none) nor in [0, ", vocab, ")");
    }
    if (has_bias) {
      const int64_t* ids = bias_ids->data_ptr<int64_t>();
      for (int64_t i = 0; i < batch * n_bias; ++i) {
        TORCH_CHECK_INDEX(ids[i] >= -1 && ids[i] < vocab, "sample_: bias id ", ids[i], " of row ", i / n_bias,
                          " is neither -1 (padding) nor in [0, ", vocab, ")");
      }
    }
  }
  const float* t_ptr = temperature.data_ptr<float>();
  const int64_t* k_ptr = top_k.data_ptr<int64_t>();
  const float* p_ptr = top_p.data_ptr<float>();
  const float* min_p_ptr = min_p.data_ptr<float>();
  const int64_t* forced_ptr = forced.data_ptr<int64_t>();
  const int64_t* seed_ptr = seeds.data_ptr<int64_t>();
  const int64_t* ids_ptr = has_bias ? bias_ids->data_ptr<int64_t>() : nullptr;
  const float* bias_ptr = has_bias ? bias_values->data_ptr<float>() : nullptr;
  int64_t* token_out = tokens.data_ptr<int64_t>();
  float* logprob_out = logprobs.data_ptr<float>();
  float* raw_out = raw_logprobs.data_ptr<float>();
  int32_t* status_out = status.data_ptr<int32_t>();
  const int64_t stride_b = logits.stride(0), stride_v = logits.stride(1);

  const PhiloxWords philox = philox_kernel();  // before the parallel region: a bad ISA setting raises here

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_cpu", [&] {
    scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch(vocab);
      for (int64_t b = begin; b < end; ++b) {
        RowParams params;
        params.greedy = t_ptr[b] == 0.0f;
        params.inv_t = 1.0f / (params.greedy ? 1.0f : t_ptr[b]);
        params.top_k = k_ptr[b];
        params.top_p = p_ptr[b];
        params.log_min_p = min_p_ptr[b] > 0.0f ? std::log(min_p_ptr[b]) : kNegInf;
        params.forced = forced_ptr[b];
        params.seed = static_cast<uint64_t>(seed_ptr[b]);
        const RowResult result =
            sample_row<scalar_t>(base + b * stride_b, stride_v, vocab, params, has_bias ? ids_ptr + b * n_bias : nullptr,
                                 has_bias ? bias_ptr + b * n_bias : nullptr, n_bias, philox, scratch);
        token_out[b] = result.token;
        logprob_out[b] = result.logprob;
        raw_out[b] = result.raw_logprob;
        status_out[b] = result.status;
      }
    });
  });
}

// The noise sample_ draws, for tests: out[b, j] = u(seeds[b], j), from the same Philox words
// (GTALIGN_FAST_SAMPLE_ISA picks the version, as for sample_).
void sample_uniform_cpu(const at::Tensor& seeds, at::Tensor& out) {
  TORCH_CHECK(seeds.scalar_type() == at::kLong && seeds.is_contiguous() && seeds.dim() == 1,
              "sample_uniform: seeds must be contiguous int64 [B]");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == seeds.size(0),
              "sample_uniform: out must be contiguous float32 [B, V]");
  const PhiloxWords philox = philox_kernel();
  const int64_t vocab = out.size(1);
  const int64_t* seed_ptr = seeds.data_ptr<int64_t>();
  float* out_ptr = out.data_ptr<float>();
  std::vector<uint32_t> words(kNoiseChunk);
  for (int64_t b = 0; b < seeds.size(0); ++b) {
    for (int64_t start = 0; start < vocab; start += kNoiseChunk) {
      const int64_t count = std::min(kNoiseChunk, vocab - start);
      philox(static_cast<uint64_t>(seed_ptr[b]), start, count, words.data());
      for (int64_t j = 0; j < count; ++j) out_ptr[b * vocab + start + j] = uniform_of(words[j]);
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace gtalign_fast

TORCH_LIBRARY_FRAGMENT(gtalign_fast_C, m) {
  m.def(
      "sample(Tensor(a!) logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor forced, "
      "Tensor seeds, Tensor? bias_ids, Tensor? bias_values, Tensor(b!) tokens, Tensor(c!) logprobs, "
      "Tensor(d!) raw_logprobs, Tensor(e!) status) -> ()");
  m.def("sample_uniform(Tensor seeds, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(gtalign_fast_C, CPU, m) {
  m.impl("sample", &gtalign_fast::cpu::sample_cpu);
  m.impl("sample_uniform", &gtalign_fast::cpu::sample_uniform_cpu);
}
