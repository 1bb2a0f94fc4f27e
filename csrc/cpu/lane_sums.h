// Horizontal sums of several AVX-512 accumulators at once, for the decode kernels
// (decode_linear.cpp, decode_layers.cpp).
//
// Each accumulator's 16 lanes are added in the order _mm512_reduce_add_ps adds them: the upper
// 256 bits + the lower, then the upper 128 + the lower, then lanes (0 + 2) + (1 + 3). So the sums
// keep the bits of one reduction per accumulator, while the accumulators share each level's
// shuffles: 24 vector instructions for 8 sums and 46 for 16, where separate reductions take about
// 8 each, and the shuffles compete with the FMAs for one port.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

#include <cstdint>

namespace gtalign_fast {
namespace cpu {

// 128-bit lanes (a0 + a2, a1 + a3, b0 + b2, b1 + b3): each input's 256-bit halves added.
__attribute__((target("avx512f"))) inline __m512 add_256_halves(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
}

// 128-bit lanes (a0 + a1, a2 + a3, b0 + b1, b2 + b3).
__attribute__((target("avx512f"))) inline __m512 add_128_lanes(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}

// In every 128-bit lane: (a0 + a2, a1 + a3, b0 + b2, b1 + b3).
__attribute__((target("avx512f"))) inline __m512 add_64_halves(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
}

// In every 128-bit lane: (a0 + a1, a2 + a3, b0 + b1, b2 + b3).
__attribute__((target("avx512f"))) inline __m512 add_32_pairs(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
}

// y[r * ldy] = the sum of acc[r]'s lanes + bias, r = 0..7.
__attribute__((target("avx512f"))) inline void store_sums8(const __m512 acc[8], float bias, float* y, int64_t ldy) {
  // 128-bit lane L of low (high): accumulator L's (L + 4's) four partial sums.
  const __m512 low = add_128_lanes(add_256_halves(acc[0], acc[1]), add_256_halves(acc[2], acc[3]));
  const __m512 high = add_128_lanes(add_256_halves(acc[4], acc[5]), add_256_halves(acc[6], acc[7]));
  const __m512 pairs = add_64_halves(low, high);
  const __m512 sums = add_32_pairs(pairs, pairs);  // lane L: (sum L, sum L + 4, the same again)
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sums);
  for (int r = 0; r < 4; ++r) {
    y[r * ldy] = lanes[4 * r] + bias;
    y[(r + 4) * ldy] = lanes[4 * r + 1] + bias;
  }
}

// Lane c of the result: the sum of acc[c]'s lanes, c = 0..15.
__attribute__((target("avx512f"))) inline __m512 sums16(const __m512 acc[16]) {
  __m512 halves[8];  // 128-bit lanes: accumulator c's two, then c + 8's
  for (int c = 0; c < 8; ++c) halves[c] = add_256_halves(acc[c], acc[c + 8]);
  __m512 quarters[4];  // 128-bit lanes: accumulators c, c + 8, c + 4, c + 12
  for (int c = 0; c < 4; ++c) quarters[c] = add_128_lanes(halves[c], halves[c + 4]);
  // Lane L (base b = 0, 8, 4, 12): the sums of accumulators b, b + 2, b + 1, b + 3.
  const __m512 sums = add_32_pairs(add_64_halves(quarters[0], quarters[2]), add_64_halves(quarters[1], quarters[3]));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), sums);
}

}  // namespace cpu
}  // namespace gtalign_fast

#endif
