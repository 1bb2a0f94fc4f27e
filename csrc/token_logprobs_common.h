// Definitions shared by the token_logprobs C++ CPU kernel (csrc/cpu/token_logprobs.cpp, g++) and
// CUDA kernel (csrc/cuda/token_logprobs.cu, nvcc): the layout of the per-row stats the forward
// saves for the backward (see kernels/token_logprobs.py for the maths) and the host-side checks of
// the layout contract, which both entry points run.
//
// The constants mirror gtalign_fast/ops/_token_logprobs_constants.py, which the Python code and the
// Triton kernels use; tests/test_constants.py parses this file and checks every value against it,
// so the enum and constexpr lines below keep their simple `name = literal` form.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace gtalign_fast {
namespace token_logprobs {

constexpr int64_t kNumStats = 2;
// Columns of stats [N, kNumStats], with y = z / T: m = max y, and log s = log sum exp(y - m)
// (m + log s is never formed: differences to m are exact, their sum would round).
enum Stat : int64_t { kRowMax = 0, kLogSum = 1 };
static_assert(kLogSum + 1 == kNumStats, "one stats column per Stat");

// ---------------------------------------------------------------------------------------------
// Host-side checks shared by the CPU and CUDA entry points (a direct call of the registered op gets
// no Python validation first). Every tensor a kernel reads or writes by row index holds the rows it
// is indexed with, on the logits' device: a short output cannot be written past.

inline void check_row_tensor(const at::Tensor& tensor, int64_t numel, const at::Tensor& logits3d, const char* name) {
  TORCH_CHECK(tensor.scalar_type() == at::kFloat && tensor.is_contiguous() && tensor.numel() == numel &&
                  tensor.device() == logits3d.device(),
              "token_logprobs: ", name, " must be a contiguous float32 tensor of ", numel,
              " elements on the logits' device");
}

// The number of rows N = D0 * D1 of the [D0, D1, V] logits view, after checking the targets.
inline int64_t check_rows(const at::Tensor& logits3d, const at::Tensor& targets) {
  TORCH_CHECK(logits3d.dim() == 3, "token_logprobs: logits must be a [D0, D1, V] view");
  const int64_t n_rows = logits3d.size(0) * logits3d.size(1);
  TORCH_CHECK(targets.numel() == n_rows && targets.is_contiguous() && targets.scalar_type() == at::kLong &&
                  targets.device() == logits3d.device(),
              "token_logprobs: targets must be contiguous int64 with one id per row, on the logits' device");
  return n_rows;
}

// The forward's outputs; `entropy` may be empty (no entropy asked for).
inline void check_forward_outputs(const at::Tensor& logits3d, int64_t n_rows, const at::Tensor& logp,
                                  const at::Tensor& entropy, const at::Tensor& stats) {
  check_row_tensor(logp, n_rows, logits3d, "logp");
  check_row_tensor(stats, kNumStats * n_rows, logits3d, "stats");
  if (entropy.numel() > 0) check_row_tensor(entropy, n_rows, logits3d, "entropy");
}

// The backward's inputs and its dlogits output.
inline void check_backward_tensors(const at::Tensor& logits3d, int64_t n_rows, const at::Tensor& grad_logp,
                                   const std::optional<at::Tensor>& grad_entropy, const at::Tensor& stats,
                                   const at::Tensor& entropy, const at::Tensor& dlogits) {
  check_row_tensor(grad_logp, n_rows, logits3d, "grad_logp");
  check_row_tensor(stats, kNumStats * n_rows, logits3d, "stats");
  if (grad_entropy.has_value() && grad_entropy->defined()) {
    check_row_tensor(*grad_entropy, n_rows, logits3d, "grad_entropy");
    check_row_tensor(entropy, n_rows, logits3d, "entropy");
  }
  TORCH_CHECK(dlogits.is_contiguous() && dlogits.scalar_type() == logits3d.scalar_type() &&
                  dlogits.numel() == n_rows * logits3d.size(2) && dlogits.device() == logits3d.device(),
              "token_logprobs: dlogits must be contiguous [N, V] in the logits' dtype, on their device");
}

}  // namespace token_logprobs
}  // namespace gtalign_fast
