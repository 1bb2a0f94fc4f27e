// Error codes the CUDA kernels OR into the per-device error flag (an int32 [1] tensor) when an
// index they were given is out of range (see gtalign_fast/ops/_device_checks.py: the wrapper passes
// the flag and reports it without a host synchronisation).
//
// The values mirror the ERR_* constants of gtalign_fast/ops/_device_checks.py;
// tests/test_device_checks.py parses this file and checks every value against them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace gtalign_fast {

enum ErrorCode : int32_t {
  kErrTargetRange = 1,
  kErrGroupOffsets = 2,
  kErrNonfiniteReward = 4,
  kErrForcedToken = 8,
  kErrNumItems = 16,
  kErrSampleInput = 1024,  // set by sample_'s Triton kernel only; the C++ CPU kernel reports a status word
};

// The flag's data pointer, or nullptr when the caller passed none (the kernels then still mask a
// bad index, NaN row included, but nothing reports it). The registered ops take it as an optional
// last argument; the Python wrappers always pass gtalign_fast.ops._device_checks.error_flag(device).
inline int* error_flag_data(const std::optional<at::Tensor>& flag, const at::Tensor& like, const char* op) {
  if (!flag.has_value() || !flag->defined()) return nullptr;
  TORCH_CHECK(flag->scalar_type() == at::kInt && flag->numel() >= 1 && flag->is_contiguous() &&
                  flag->device() == like.device(),
              op, ": error_flag must be an int32 tensor of at least one element on the device of the inputs");
  return flag->data_ptr<int>();
}

}  // namespace gtalign_fast
