// C++ CPU kernel of logits_grpo_loss / linear_grpo_loss: the logits gradient of a loss that reaches
// the logits only through the target log-probs (see kernels/logits_grpo_loss.py for the maths and
// the layout contract). Per row, with y = z / T, the forward's stats (m = max y, log s) and the
// upstream gradient g of the row's log-prob:
//
//     dz_j = g / T * (1[j = target] - exp((y_j - m) - log s))
//
// written to `out3d`, a strided [D0, D1, V] view that may be the logits themselves (the in-place
// backward): each element is read before it is written, and nothing reads it afterwards. Rows
// whose target is ignore_index get zeros. Rows run in parallel (OpenMP), each walked in chunks.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../token_logprobs_common.h"
#include "vec_math.h"

namespace gtalign_fast {
namespace cpu {
namespace {

using namespace gtalign_fast::token_logprobs;  // stats columns (../token_logprobs_common.h)

constexpr int64_t kChunk = 2048;

// grad[i] = -g * exp((x_i * inv_t - m) - log s); g already carries the 1/T of the chain rule.
GTALIGN_CPU_CLONES void chunk_softmax_grad(const float* x, int64_t count, float inv_t, float row_max, float log_sum,
                                           float g, float* grad) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) grad[i] = -g * exp_f32((x[i] * inv_t - row_max) - log_sum);
}

struct Layout3d {
  int64_t d1, stride0, stride1, stride_v;
  int64_t offset(int64_t row) const { return (row / d1) * stride0 + (row % d1) * stride1; }
};

Layout3d layout_of(const at::Tensor& view) { return {view.size(1), view.stride(0), view.stride(1), view.stride(2)}; }

template <typename scalar_t>
void grad_rows(const at::Tensor& logits3d, const int64_t* targets, const float* grad_logp, const float* stats,
               float inv_t, int64_t ignore_index, const at::Tensor& out3d) {
  const Layout3d in = layout_of(logits3d), out = layout_of(out3d);
  const int64_t vocab = logits3d.size(2), n_rows = logits3d.size(0) * logits3d.size(1);
  const scalar_t* in_base = logits3d.data_ptr<scalar_t>();
  scalar_t* out_base = out3d.data_ptr<scalar_t>();
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(kChunk), grad(kChunk);
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* out_row = out_base + out.offset(row);
      const int64_t target = targets[row];
      if (target == ignore_index) {
        for (int64_t j = 0; j < vocab; ++j) out_row[j * out.stride_v] = static_cast<scalar_t>(0.0f);
        continue;
      }
      const scalar_t* in_row = in_base + in.offset(row);
      const float g = grad_logp[row] * inv_t;
      const float row_max = stats[row * kNumStats + kRowMax], log_sum = stats[row * kNumStats + kLogSum];
      for (int64_t start = 0; start < vocab; start += kChunk) {
        const int64_t count = std::min(kChunk, vocab - start);
        const float* x = buffer.data();
        float* grad_out = grad.data();
        // Contiguous float32 rows are read and written in place; the rest through the buffers
        // (read into `buffer` before anything of the chunk is written, so in place is safe too).
        const bool direct = std::is_same_v<scalar_t, float> && in.stride_v == 1 && out.stride_v == 1;
        if (direct) {
          x = reinterpret_cast<const float*>(in_row + start);
          grad_out = reinterpret_cast<float*>(out_row + start);
        } else {
          load_scaled(in_row + start * in.stride_v, in.stride_v, count, 1.0f, buffer.data());
        }
        chunk_softmax_grad(x, count, inv_t, row_max, log_sum, g, grad_out);
        if (target >= start && target < start + count) grad_out[target - start] += g;
        if (!direct) {
          scalar_t* dst = out_row + start * out.stride_v;
          if (out.stride_v == 1) {
            store_as(grad.data(), count, dst);
          } else {
            for (int64_t i = 0; i < count; ++i) dst[i * out.stride_v] = static_cast<scalar_t>(grad[i]);
          }
        }
      }
    }
  });
}

void logits_grpo_grad_cpu(const at::Tensor& logits3d, const at::Tensor& targets, const at::Tensor& grad_logp,
                          const at::Tensor& stats, double inv_temperature, int64_t ignore_index, at::Tensor& out3d) {
  TORCH_CHECK(logits3d.dim() == 3 && out3d.dim() == 3 && logits3d.sizes() == out3d.sizes(),
              "logits_grpo_loss: logits3d and out3d must be [D0, D1, V] views of one shape");
  TORCH_CHECK(out3d.scalar_type() == logits3d.scalar_type(), "logits_grpo_loss: out3d must have the logits' dtype");
  const int64_t n_rows = logits3d.size(0) * logits3d.size(1), vocab = logits3d.size(2);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.numel() == n_rows,
              "logits_grpo_loss: targets must be contiguous int64 with one id per row");
  TORCH_CHECK(grad_logp.scalar_type() == at::kFloat && grad_logp.is_contiguous() && grad_logp.numel() == n_rows,
              "logits_grpo_loss: grad_logp must be contiguous float32 with one value per row");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.numel() == n_rows * kNumStats,
              "logits_grpo_loss: stats must be contiguous float32 [N, ", kNumStats, "]");
  if (n_rows == 0 || vocab == 0) return;
  // Every id indexes the row: checked first, so a bad id raises instead of writing outside it.
  const int64_t* ids = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < n_rows; ++i) {
    TORCH_CHECK_INDEX(ids[i] == ignore_index || (ids[i] >= 0 && ids[i] < vocab), "logits_grpo_loss: target id ",
                      ids[i], " at position ", i, " is outside [0, ", vocab, ")");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits3d.scalar_type(), "logits_grpo_grad_cpu", [&] {
    grad_rows<scalar_t>(logits3d, ids, grad_logp.data_ptr<float>(), stats.data_ptr<float>(),
                        static_cast<float>(inv_temperature), ignore_index, out3d);
  });
}

}  // namespace
}  // namespace cpu
}  // namespace gtalign_fast

TORCH_LIBRARY_FRAGMENT(gtalign_fast_C, m) {
  m.def(
      "logits_grpo_grad(Tensor logits3d, Tensor targets, Tensor grad_logp, Tensor stats, float inv_temperature, "
      "int ignore_index, Tensor(a!) out3d) -> ()");
}

TORCH_LIBRARY_IMPL(gtalign_fast_C, CPU, m) { m.impl("logits_grpo_grad", &gtalign_fast::cpu::logits_grpo_grad_cpu); }
