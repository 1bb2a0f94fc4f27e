// The decode-shaped product of decode_linear.cpp, for the other CPU kernels that run a decode step
// (decode_layers.cpp): y = x @ W^T (+ b) for x of at most 16 rows, each row of W read once.
#pragma once

#include <cstdint>

namespace gtalign_fast {
namespace cpu {

// One weight of a decode_linears call: W [n, K] with row stride ldw (contiguous rows), an optional
// bias [n] (nullptr: none) and the output y [M, n] with row stride ldy.
struct LinearJob {
  const float* w;
  int64_t ldw;
  const float* bias;
  int64_t n;
  float* y;
  int64_t ldy;
};

// y_j = x @ W_j^T (+ b_j) for the `count` jobs, all sharing x [m, k] (row stride ldx, 1 <= m <= 16),
// in one parallel region over the rows of all the weights.
void decode_linears(const float* x, int64_t ldx, int64_t m, int64_t k, const LinearJob* jobs, int count);

}  // namespace cpu
}  // namespace gtalign_fast
