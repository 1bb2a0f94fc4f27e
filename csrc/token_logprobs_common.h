// Definitions shared by the token_logprobs C++ CPU kernel (csrc/cpu/token_logprobs.cpp, g++) and
// CUDA kernel (csrc/cuda/token_logprobs.cu, nvcc): the layout of the per-row stats the forward
// saves for the backward (see kernels/token_logprobs.py for the maths).
//
// The constants mirror gtalign_fast/ops/_token_logprobs_constants.py, which the Python code and the
// Triton kernels use; tests/test_constants.py parses this file and checks every value against it,
// so the enum and constexpr lines below keep their simple `name = literal` form.
#pragma once

#include <cstdint>

namespace gtalign_fast {
namespace token_logprobs {

constexpr int64_t kNumStats = 2;
// Columns of stats [N, kNumStats], with y = z / T: m = max y, and log s = log sum exp(y - m)
// (m + log s is never formed: differences to m are exact, their sum would round).
enum Stat : int64_t { kRowMax = 0, kLogSum = 1 };
static_assert(kLogSum + 1 == kNumStats, "one stats column per Stat");

}  // namespace token_logprobs
}  // namespace gtalign_fast
