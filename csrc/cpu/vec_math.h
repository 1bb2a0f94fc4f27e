// Small helpers shared by the CPU kernels: a branch-free exp that compilers vectorise, and
// conversion of a strided row of logits (float, half or bfloat16) into a float buffer.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// Compile the hot loops for several instruction sets and pick at load time (GCC function
// multi-versioning), so a source build is fast on AVX2 / AVX-512 machines and still runs anywhere.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GTALIGN_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GTALIGN_CPU_CLONES
#endif

// Force inlining of the element-wise helpers into the multi-versioned loops (GCC otherwise
// keeps them as out-of-line calls there, which blocks vectorisation).
#if defined(__GNUC__)
#define GTALIGN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define GTALIGN_ALWAYS_INLINE inline
#endif

namespace gtalign_fast {
namespace cpu {

constexpr float kInfF32 = std::numeric_limits<float>::infinity();
constexpr float kNaNF32 = std::numeric_limits<float>::quiet_NaN();

// c ? a : b on bits: GCC keeps both sides computed instead of sinking one into a branch.
static GTALIGN_ALWAYS_INLINE float blend(bool c, float a, float b) {
  const int32_t mask = -static_cast<int32_t>(c);
  return __builtin_bit_cast(float, (__builtin_bit_cast(int32_t, a) & mask) | (__builtin_bit_cast(int32_t, b) & ~mask));
}

// min(max(x, lo), hi) through blend, so that it stays branch-free inside simd loops (NaN passes
// through, as torch.clamp does).
static GTALIGN_ALWAYS_INLINE float clamp_f32(float x, float lo, float hi) {
  return blend(x < lo, lo, blend(x > hi, hi, x));
}

// exp(x) for float, accurate to about 2 ulp over the whole range, exp(-inf) = 0, exp(+inf) = inf,
// NaN in NaN out, written without branches or calls so that `#pragma omp simd` loops vectorise
// (std::exp is a libm call that blocks vectorisation without -ffast-math, and -ffast-math would
// break the -inf handling the kernels rely on). Special cases are blended on bits (see blend).
static GTALIGN_ALWAYS_INLINE float exp_f32(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;
  const float kLn2Lo = -2.12194440e-4f;
  const float clamped = blend(x < -104.0f, -104.0f, blend(x > 88.7f, 88.7f, x));
  // Round to nearest with the 1.5 * 2^23 trick: vectorises everywhere, unlike nearbyint.
  const float kRound = 12582912.0f;
  const float n = (clamped * kLog2e + kRound) - kRound;
  const float r = (clamped - n * kLn2Hi) - n * kLn2Lo;
  // Minimax polynomial for exp(r) on [-ln2/2, ln2/2] (Cephes expf coefficients).
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // Scale by 2^n in two steps so that results down to the denormal range stay exact-ish.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t half = ni / 2;
  const float scale_a = __builtin_bit_cast(float, (half + 127) << 23);
  const float scale_b = __builtin_bit_cast(float, (ni - half + 127) << 23);
  const float result = p * scale_a * scale_b;
  return blend(x != x, x, blend(x > 88.7f, kInfF32, blend(x < -104.0f, 0.0f, result)));
}

// log(x) for float, under 1 ulp (Cephes logf polynomial), branch-free so that simd loops
// vectorise (std::log is a libm call); log(0) = -inf, log(inf) = inf, log(x < 0) = NaN, NaN in
// NaN out, denormals handled. Selections are made on bits: GCC turns `c ? x * a : x` into a
// branch, and a branch in the loop blocks vectorisation.
static GTALIGN_ALWAYS_INLINE float log_f32(float x) {
  const bool denormal = x < 1.17549435e-38f;
  // x * 2^23 for denormals (brings them into range), x * 1 otherwise; the factor is built from
  // bits so that GCC emits no branch.
  const float scale = __builtin_bit_cast(float, 0x3f800000 + (static_cast<int32_t>(denormal) * (23 << 23)));
  const float scaled = x * scale;
  const int32_t bits = __builtin_bit_cast(int32_t, scaled);
  int32_t exponent = ((bits >> 23) & 0xff) - 127 - 23 * static_cast<int32_t>(denormal);
  const int32_t mantissa_bits = (bits & 0x007fffff) | 0x3f800000;
  // m in [1, 2); above sqrt(2) halve it (exponent bits - 1) so that it lies in [sqrt(1/2), sqrt(2)].
  const int32_t above_sqrt2 = static_cast<int32_t>(__builtin_bit_cast(float, mantissa_bits) > 1.41421356f);
  const float m = __builtin_bit_cast(float, mantissa_bits - (above_sqrt2 << 23));
  exponent += above_sqrt2;
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float e = static_cast<float>(exponent);
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  float result = f + y + 0.693359375f * e;
  // Special cases are blended in with bit masks, not ?:, so that GCC keeps the polynomial
  // unconditional (it would sink it into a branch, which blocks vectorisation).
  const int32_t zero_mask = -static_cast<int32_t>(x == 0.0f), inf_mask = -static_cast<int32_t>(x == kInfF32);
  const int32_t special = (__builtin_bit_cast(int32_t, -kInfF32) & zero_mask) | (__builtin_bit_cast(int32_t, kInfF32) & inf_mask) |
                          (__builtin_bit_cast(int32_t, kNaNF32) & ~(zero_mask | inf_mask));
  const int32_t keep = -static_cast<int32_t>((x > 0.0f) & (x < kInfF32));
  const int32_t out = (__builtin_bit_cast(int32_t, result) & keep) | (special & ~keep);
  return __builtin_bit_cast(float, out);
}



template <typename scalar_t>
static GTALIGN_ALWAYS_INLINE float to_float(scalar_t value) {
  return static_cast<float>(value);
}

// Copy `count` elements starting at `src` (element stride `stride`) into `dst`, times `scale`.
template <typename scalar_t>
static inline void load_scaled(const scalar_t* src, int64_t stride, int64_t count, float scale, float* dst) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) dst[i] = to_float(src[i]) * scale;
  } else {
    for (int64_t i = 0; i < count; ++i) dst[i] = to_float(src[i * stride]) * scale;
  }
}

template <typename scalar_t>
static inline void store_as(const float* src, int64_t count, scalar_t* dst) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// Ask Linux for transparent huge pages on a large output buffer that is about to be written for
// the first time. A freshly allocated [N, V] gradient otherwise costs one page fault per 4 KiB
// (about half the backward's time at N = 2048, V = 32000); with 2 MiB pages that cost mostly goes.
// Only a hint: harmless where huge pages are off, and pages already touched keep their size.
static inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = 2u << 20;
  if (bytes < 2 * kHugePage) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace cpu
}  // namespace gtalign_fast
