// Definitions of the sample_ C++ CPU kernel (csrc/cpu/sample.cpp) that the Python side shares: the
// per-row status word (see kernels/sample.py for the maths).
//
// The constants mirror gtalign_fast/ops/_sample_constants.py, which the Python code and the Triton
// kernel use; tests/test_constants.py parses this file and checks every value against it, so the
// enum lines below keep their simple `name = literal` form.
#pragma once

#include <cstdint>

namespace gtalign_fast {
namespace sample {

// The status word written per row; a row that is not kStatusOk has no valid draw, and the Python
// side raises. When several apply, the lowest nonzero one is reported.
enum Status : int32_t {
  kStatusOk = 0,
  kStatusBadLogits = 1,               // a NaN or +inf logit (after the temperature)
  kStatusNoFiniteLogit = 2,           // every logit is -inf
  kStatusNoFiniteLogitAfterBias = 3,  // every logit is -inf once the biases are added
};

// Used by the Triton kernel only (kernels/sample.py), kept here so each value is defined once: its
// radix select's digit width and buckets, and the columns of its per-chunk partials.
constexpr int32_t kRadixBits = 4;
constexpr int32_t kNumBuckets = 16;
constexpr int32_t kNumPartStats = 4;
constexpr int32_t kNumPartDraw = 4;
constexpr int32_t kNumRowStats = 3;

}  // namespace sample
}  // namespace gtalign_fast
