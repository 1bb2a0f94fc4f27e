// Definitions shared by the welfare_advantages C++ CPU kernel (csrc/cpu/welfare_advantages.cpp,
// g++) and CUDA kernel (csrc/cuda/welfare_advantages.cu, nvcc): the scale modes, the scale maths
// (host and device) and the validation of the op's arguments (host).
//
// The scale modes mirror gtalign_fast/ops/_welfare_constants.py, which the Python code and the Triton
// kernel use; tests/test_constants.py parses this file and checks every value against it, so the
// enum line below keeps its simple `name = literal` form.
#pragma once

#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <optional>

// nvcc compiles the scale maths for the GPU threads as well; g++ sees plain inline functions.
#ifdef __CUDACC__
#define GTALIGN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GTALIGN_HOST_DEVICE inline
#endif

namespace gtalign_fast {
namespace welfare {

enum ScaleMode : int64_t { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };

// Standard deviation from the count and the sum of squared deviations m2; 0 below two values.
GTALIGN_HOST_DEVICE double std_of(double count, double m2, bool unbiased) {
  if (count < 2.0) return 0.0;
  return sqrt(m2 / (unbiased ? count - 1.0 : count));
}

// 1 / (std + eps), or 0 when that is not finite (std = eps = 0 only happens when every
// difference underflows; the advantages are then 0 rather than inf); 1 for scale = "none".
GTALIGN_HOST_DEVICE float inverse_denominator(int64_t scale_mode, double std, double eps) {
  if (scale_mode == kScaleNone) return 1.0f;
  const double denominator = std + eps;
  return denominator > 0.0 ? static_cast<float>(1.0 / denominator) : 0.0f;
}

// Checks the rewards, the scale mode and the group layout (offsets [G+1] or a fixed group size
// that divides N); returns the number of groups G.
inline int64_t check_inputs(const at::Tensor& user, const at::Tensor& llm, const std::optional<at::Tensor>& offsets,
                            int64_t group_size, int64_t scale_mode) {
  const int64_t n_rows = user.numel();
  TORCH_CHECK(user.scalar_type() == at::kFloat && llm.scalar_type() == at::kFloat && user.is_contiguous() &&
                  llm.is_contiguous() && llm.numel() == n_rows,
              "welfare_advantages: user and llm must be contiguous float32 [N]");
  TORCH_CHECK(llm.device() == user.device(), "welfare_advantages: user and llm must be on one device");
  TORCH_CHECK(scale_mode >= kScaleGroup && scale_mode <= kScaleNone, "welfare_advantages: bad scale mode");
  if (offsets.has_value() && offsets->defined()) {
    TORCH_CHECK(offsets->scalar_type() == at::kLong && offsets->is_contiguous() && offsets->numel() >= 1 &&
                    offsets->device() == user.device(),
                "welfare_advantages: offsets must be contiguous int64 [G+1] on the rewards' device");
    return offsets->numel() - 1;
  }
  TORCH_CHECK(group_size >= 1 && n_rows % group_size == 0, "welfare_advantages: group size must divide N");
  return n_rows / group_size;
}

inline void check_output(const at::Tensor& out, int64_t numel, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(out.scalar_type() == dtype && out.is_contiguous() && out.numel() == numel, "welfare_advantages: ",
              name, " must be a contiguous ", c10::toString(dtype), " tensor of ", numel, " elements");
}

// Checks the per-row ([N]) and per-group ([G]) outputs.
inline void check_outputs(const at::Tensor& welfare, const at::Tensor& advantages, const at::Tensor& group_mean,
                          const at::Tensor& group_std, const at::Tensor& group_all_equal, int64_t n_rows,
                          int64_t n_groups) {
  check_output(welfare, n_rows, at::kFloat, "welfare");
  check_output(advantages, n_rows, at::kFloat, "advantages");
  check_output(group_mean, n_groups, at::kFloat, "group_mean");
  check_output(group_std, n_groups, at::kFloat, "group_std");
  check_output(group_all_equal, n_groups, at::kBool, "group_all_equal");
}

}  // namespace welfare
}  // namespace gtalign_fast
