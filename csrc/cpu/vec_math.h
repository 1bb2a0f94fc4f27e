// Small helpers shared by the CPU kernels: a branch-free exp that compilers vectorise, and
// conversion of a strided row of logits (float, half or bfloat16) into a float buffer.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

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

// exp(x) for float, accurate to about 2 ulp over the whole range, exp(-inf) = 0, exp(+inf) = inf,
// and written without branches or calls so that `#pragma omp simd` loops vectorise
// (std::exp is a libm call that blocks vectorisation without -ffast-math, and -ffast-math
// would break the -inf handling the kernels rely on).
static GTALIGN_ALWAYS_INLINE float exp_f32(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;
  const float kLn2Lo = -2.12194440e-4f;
  const float clamped = x < -104.0f ? -104.0f : (x > 88.7f ? 88.7f : x);
  // Round to nearest with the 1.5 * 2^23 trick: vectorises everywhere, unlike nearbyint.
  const float kRound = 12582912.0f;
  const float n = (clamped * kLog2e + kRound) - kRound;
  float r = clamped - n * kLn2Hi;
  r = r - n * kLn2Lo;
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
  const int32_t bits_a = (half + 127) << 23;
  const int32_t bits_b = (ni - half + 127) << 23;
  const float scale_a = __builtin_bit_cast(float, bits_a);
  const float scale_b = __builtin_bit_cast(float, bits_b);
  float result = p * scale_a * scale_b;
  result = x < -104.0f ? 0.0f : result;
  result = x > 88.7f ? std::numeric_limits<float>::infinity() : result;
  return x != x ? x : result;  // NaN in, NaN out
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

}  // namespace cpu
}  // namespace gtalign_fast
