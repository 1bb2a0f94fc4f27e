// C++ CPU kernels for token_logprobs (see kernels/token_logprobs.py for the maths and the
// layout contract: logits are a strided [D0, D1, V] view, per-row outputs are contiguous [N]).
//
// Each row is walked in chunks. Contiguous float32 rows are read in place; other dtypes and
// strides are first converted into a small L1-resident float buffer, so that every case shares one
// vectorised inner loop. Rows run in parallel (OpenMP).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../device_checks_common.h"
#include "../token_logprobs_common.h"
#include "vec_math.h"

namespace gtalign_fast {
namespace cpu {
namespace {

using namespace gtalign_fast::token_logprobs;  // stats columns (../token_logprobs_common.h)

constexpr int64_t kChunk = 2048;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The chunk functions read raw logits x and work on y = x * inv_t (inv_t > 0), so that a
// contiguous float32 row is read in place, with no copy into a buffer.

GTALIGN_CPU_CLONES float chunk_max(const float* x, int64_t count) {
  float result = kNegInf;
#pragma omp simd reduction(max : result)
  for (int64_t i = 0; i < count; ++i) result = x[i] > result ? x[i] : result;
  return result;
}

// sum exp(y - m_ref) and sum exp(y - m_ref) * (y - m_ref) over a chunk (-inf entries add 0).
GTALIGN_CPU_CLONES void chunk_exp_sums(const float* x, int64_t count, float inv_t, float m_ref, bool with_entropy,
                                        float* sum_out, float* centred_out) {
  float sum = 0.0f, centred = 0.0f;
  if (with_entropy) {
#pragma omp simd reduction(+ : sum, centred)
    for (int64_t i = 0; i < count; ++i) {
      const float d = x[i] * inv_t - m_ref;
      const float e = exp_f32(d);
      sum += e;
      centred += blend(e > 0.0f, e * d, 0.0f);  // d = -inf where e = 0
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < count; ++i) sum += exp_f32(x[i] * inv_t - m_ref);
  }
  *sum_out = sum;
  *centred_out = centred;
}

// grad[i] = -g_logp * p_i - g_entropy * p_i * (log p_i + H), log p_i = (y_i - m) - log s.
GTALIGN_CPU_CLONES void chunk_grad(const float* x, int64_t count, float inv_t, float row_max, float log_sum,
                                    float g_logp, float g_entropy, float entropy, float* grad) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const float d = (x[i] * inv_t - row_max) - log_sum;
    const float p = exp_f32(d);
    const float entropy_term = blend(p > 0.0f, p * (d + entropy), 0.0f);
    grad[i] = -g_logp * p - g_entropy * entropy_term;
  }
}

// A chunk of a row as float values: the row itself when it is contiguous float32 (no copy),
// otherwise a converted copy in `buffer`.
template <typename scalar_t>
const float* chunk_as_float(const scalar_t* src, int64_t stride, int64_t count, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stride == 1) return src;
  }
  load_scaled(src, stride, count, 1.0f, buffer);
  return buffer;
}

struct RowLayout {
  int64_t d1, stride0, stride1, stride_v, vocab;
  int64_t offset(int64_t row) const { return (row / d1) * stride0 + (row % d1) * stride1; }
};

RowLayout layout_of(const at::Tensor& logits3d) {
  return {logits3d.size(1), logits3d.stride(0), logits3d.stride(1), logits3d.stride(2), logits3d.size(2)};
}

template <typename scalar_t>
void forward_rows(const at::Tensor& logits3d, const int64_t* targets, float inv_t, int64_t ignore_index,
                  float* logp, float* entropy, float* stats) {
  const RowLayout layout = layout_of(logits3d);
  const scalar_t* base = logits3d.data_ptr<scalar_t>();
  const int64_t n_rows = logits3d.size(0) * layout.d1;
  const bool with_entropy = entropy != nullptr;
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(kChunk);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t target = targets[row];
      if (target == ignore_index) {
        logp[row] = 0.0f;
        stats[row * kNumStats + kRowMax] = stats[row * kNumStats + kLogSum] = 0.0f;
        if (with_entropy) entropy[row] = 0.0f;
        continue;
      }
      const scalar_t* row_ptr = base + layout.offset(row);
      float m = kNegInf, s = 0.0f, t = 0.0f;
      for (int64_t start = 0; start < layout.vocab; start += kChunk) {
        const int64_t count = std::min(kChunk, layout.vocab - start);
        const float* x = chunk_as_float(row_ptr + start * layout.stride_v, layout.stride_v, count, buffer.data());
        const float m_new = std::max(m, chunk_max(x, count) * inv_t);
        // While every value seen is -inf, shift by 0 (exp(-inf - -inf) would be nan).
        const float m_ref = m_new == kNegInf ? 0.0f : m_new;
        const float rescale = s > 0.0f ? exp_f32(m - m_ref) : 0.0f;
        float chunk_s, chunk_t;
        chunk_exp_sums(x, count, inv_t, m_ref, with_entropy, &chunk_s, &chunk_t);
        if (with_entropy) t = (s > 0.0f ? rescale * (t + (m - m_ref) * s) : 0.0f) + chunk_t;
        s = s * rescale + chunk_s;
        m = m_new;
      }
      const float log_s = std::log(s);
      // (y_t - m) - log s, never m + log s: at |y| ~ 1e4 that sum alone rounds by 1e-3.
      logp[row] = (to_float(row_ptr[target * layout.stride_v]) * inv_t - m) - log_s;
      stats[row * kNumStats + kRowMax] = m;
      stats[row * kNumStats + kLogSum] = log_s;
      if (with_entropy) entropy[row] = log_s - t / s;
    }
  });
}

template <typename scalar_t>
void backward_rows(const float* grad_logp, const float* grad_entropy, const at::Tensor& logits3d,
                   const int64_t* targets, const float* stats, const float* entropy, float inv_t,
                   int64_t ignore_index, scalar_t* dlogits) {
  const RowLayout layout = layout_of(logits3d);
  const scalar_t* base = logits3d.data_ptr<scalar_t>();
  const int64_t n_rows = logits3d.size(0) * layout.d1;
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(kChunk), grad(kChunk);
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* out_row = dlogits + row * layout.vocab;
      const int64_t target = targets[row];
      if (target == ignore_index) {
        std::fill(out_row, out_row + layout.vocab, static_cast<scalar_t>(0.0f));
        continue;
      }
      const scalar_t* row_ptr = base + layout.offset(row);
      // The 1/T of the chain rule is folded into the incoming gradients.
      const float g_logp = grad_logp[row] * inv_t;
      const float g_entropy = grad_entropy != nullptr ? grad_entropy[row] * inv_t : 0.0f;
      const float row_entropy = grad_entropy != nullptr ? entropy[row] : 0.0f;
      const float row_max = stats[row * kNumStats + kRowMax], log_sum = stats[row * kNumStats + kLogSum];
      for (int64_t start = 0; start < layout.vocab; start += kChunk) {
        const int64_t count = std::min(kChunk, layout.vocab - start);
        const float* x = chunk_as_float(row_ptr + start * layout.stride_v, layout.stride_v, count, buffer.data());
        // float32 gradients are written straight into dlogits; other dtypes go through `grad`.
        float* grad_out = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(out_row + start) : grad.data();
        chunk_grad(x, count, inv_t, row_max, log_sum, g_logp, g_entropy, row_entropy, grad_out);
        if (target >= start && target < start + count) grad_out[target - start] += g_logp;
        if constexpr (!std::is_same_v<scalar_t, float>) store_as(grad.data(), count, out_row + start);
      }
    }
  });
}

// Every target the kernels index the logits with is in [0, V) or ignore_index: a pre-pass over the
// [N] ids (next to the O(N V) kernel it costs nothing), so a direct call of the registered op with a
// bad id raises instead of reading or writing outside the row.
void check_targets(const at::Tensor& targets, int64_t vocab, int64_t ignore_index) {
  const int64_t* ids = targets.data_ptr<int64_t>();
  const int64_t n = targets.numel();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = ids[i];
    TORCH_CHECK_INDEX(id == ignore_index || (id >= 0 && id < vocab), "token_logprobs: target id ", id,
                      " at position ", i, " is outside [0, ", vocab, ") and is not ignore_index (", ignore_index,
                      ")");
  }
}

void token_logprobs_fwd_cpu(const at::Tensor& logits3d, const at::Tensor& targets, double inv_temperature,
                            int64_t ignore_index, at::Tensor& logp, at::Tensor& entropy, at::Tensor& stats,
                            const std::optional<at::Tensor>& error_flag) {
  // The error flag (gtalign_fast/ops/_device_checks.py) is for the CUDA kernel, which cannot raise
  // without a host sync; here a bad target raises directly (the flag is left untouched).
  error_flag_data(error_flag, logits3d, "token_logprobs");
  const int64_t n_rows = check_rows(logits3d, targets);
  check_forward_outputs(logits3d, n_rows, logp, entropy, stats);
  const bool with_entropy = entropy.numel() > 0;
  if (n_rows == 0) return;
  check_targets(targets, logits3d.size(2), ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits3d.scalar_type(), "token_logprobs_fwd_cpu", [&] {
    forward_rows<scalar_t>(logits3d, targets.data_ptr<int64_t>(), static_cast<float>(inv_temperature), ignore_index,
                           logp.data_ptr<float>(), with_entropy ? entropy.data_ptr<float>() : nullptr,
                           stats.data_ptr<float>());
  });
}

void token_logprobs_bwd_cpu(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits3d, const at::Tensor& targets, const at::Tensor& stats,
                            const at::Tensor& entropy, double inv_temperature, int64_t ignore_index,
                            at::Tensor& dlogits) {
  const int64_t n_rows = check_rows(logits3d, targets);
  check_backward_tensors(logits3d, n_rows, grad_logp, grad_entropy, stats, entropy, dlogits);
  const bool has_grad_entropy = grad_entropy.has_value() && grad_entropy->defined();
  if (n_rows == 0) return;
  check_targets(targets, logits3d.size(2), ignore_index);
  advise_huge_pages(dlogits.data_ptr(), dlogits.nbytes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits3d.scalar_type(), "token_logprobs_bwd_cpu", [&] {
    backward_rows<scalar_t>(grad_logp.data_ptr<float>(), has_grad_entropy ? grad_entropy->data_ptr<float>() : nullptr,
                            logits3d, targets.data_ptr<int64_t>(), stats.data_ptr<float>(),
                            has_grad_entropy ? entropy.data_ptr<float>() : nullptr,
                            static_cast<float>(inv_temperature), ignore_index, dlogits.data_ptr<scalar_t>());
  });
}

}  // namespace
}  // namespace cpu
}  // namespace gtalign_fast

TORCH_LIBRARY_FRAGMENT(gtalign_fast_C, m) {
  m.def(
      "token_logprobs_fwd(Tensor logits3d, Tensor targets, float inv_temperature, int ignore_index, "
      "Tensor(a!) logp, Tensor(b!) entropy, Tensor(c!) stats, Tensor(d!)? error_flag=None) -> ()");
  m.def(
      "token_logprobs_bwd(Tensor grad_logp, Tensor? grad_entropy, Tensor logits3d, Tensor targets, Tensor stats, "
      "Tensor entropy, float inv_temperature, int ignore_index, Tensor(a!) dlogits) -> ()");
}

TORCH_LIBRARY_IMPL(gtalign_fast_C, CPU, m) {
  m.impl("token_logprobs_fwd", &gtalign_fast::cpu::token_logprobs_fwd_cpu);
  m.impl("token_logprobs_bwd", &gtalign_fast::cpu::token_logprobs_bwd_cpu);
}
