// CUDA kernels for token_logprobs (see kernels/token_logprobs.py for the maths and the layout
// contract: logits are a strided [D0, D1, V] view, per-row outputs are contiguous [N]).
//
// One thread block per row (a 1-D grid, so N is not limited to 65535). Each thread keeps an
// online log-sum-exp state (max m, s = sum exp(y - m), t = sum exp(y - m) * (y - m)) over its
// strided slice of the vocabulary; the states are merged across the block at the end.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cuda_runtime.h>

#include "../device_checks_common.h"
#include "../token_logprobs_common.h"

namespace gtalign_fast {
namespace cuda {
namespace {

constexpr int kThreads = 512;

using namespace gtalign_fast::token_logprobs;  // stats columns (../token_logprobs_common.h)

struct LseState {
  float m, s, t;
};

__device__ __forceinline__ LseState merge(LseState a, LseState b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f, 0.0f};
  const float scale_a = a.s > 0.0f ? __expf(a.m - m) : 0.0f;
  const float scale_b = b.s > 0.0f ? __expf(b.m - m) : 0.0f;
  const float t_a = a.s > 0.0f ? scale_a * (a.t + (a.m - m) * a.s) : 0.0f;
  const float t_b = b.s > 0.0f ? scale_b * (b.t + (b.m - m) * b.s) : 0.0f;
  return {m, a.s * scale_a + b.s * scale_b, t_a + t_b};
}

__device__ __forceinline__ LseState add_value(LseState state, float y) {
  if (y == -INFINITY) return state;  // p = 0: contributes nothing
  if (y > state.m) {
    const float scale = state.s > 0.0f ? __expf(state.m - y) : 0.0f;
    const float t = state.s > 0.0f ? scale * (state.t + (state.m - y) * state.s) : 0.0f;
    return {y, state.s * scale + 1.0f, t};
  }
  const float d = y - state.m;
  const float e = __expf(d);
  return {state.m, state.s + e, state.t + e * d};
}

__device__ LseState block_merge(LseState state) {
  __shared__ LseState warp_states[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    LseState other{__shfl_xor_sync(0xffffffff, state.m, offset), __shfl_xor_sync(0xffffffff, state.s, offset),
                   __shfl_xor_sync(0xffffffff, state.t, offset)};
    state = merge(state, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_states[warp] = state;
  __syncthreads();
  if (warp == 0) {
    state = lane < blockDim.x / 32 ? warp_states[lane] : LseState{-INFINITY, 0.0f, 0.0f};
    for (int offset = 16; offset > 0; offset >>= 1) {
      LseState other{__shfl_xor_sync(0xffffffff, state.m, offset), __shfl_xor_sync(0xffffffff, state.s, offset),
                     __shfl_xor_sync(0xffffffff, state.t, offset)};
      state = merge(state, other);
    }
  }
  return state;  // valid in thread 0
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) token_logprobs_fwd_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets, float* __restrict__ logp,
    float* __restrict__ entropy, float* __restrict__ stats, int* __restrict__ error_flag, int64_t d1,
    int64_t stride0, int64_t stride1, int64_t stride_v, int64_t vocab, float inv_t, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const int64_t target = targets[row];
  if (target == ignore_index) {
    if (threadIdx.x == 0) {
      logp[row] = 0.0f;
      stats[row * kNumStats + kRowMax] = stats[row * kNumStats + kLogSum] = 0.0f;
      if (entropy != nullptr) entropy[row] = 0.0f;
    }
    return;
  }
  const scalar_t* row_ptr = logits + (row / d1) * stride0 + (row % d1) * stride1;
  LseState state{-INFINITY, 0.0f, 0.0f};
  for (int64_t col = threadIdx.x; col < vocab; col += blockDim.x) {
    state = add_value(state, static_cast<float>(row_ptr[col * stride_v]) * inv_t);
  }
  state = block_merge(state);
  if (threadIdx.x == 0) {
    const float log_s = logf(state.s);
    // (y_t - m) - log s, never m + log s: at |y| ~ 1e4 that sum alone rounds by 1e-3.
    // A target outside [0, vocab) reads nothing: its logp is NaN and it sets the error flag, which
    // the wrapper reports without a host sync (gtalign_fast/ops/_device_checks.py), as the Triton kernel does.
    if (target >= 0 && target < vocab) {
      logp[row] = (static_cast<float>(row_ptr[target * stride_v]) * inv_t - state.m) - log_s;
    } else {
      if (error_flag != nullptr) atomicOr(error_flag, static_cast<int>(kErrTargetRange));
      logp[row] = NAN;
    }
    stats[row * kNumStats + kRowMax] = state.m;
    stats[row * kNumStats + kLogSum] = log_s;
    if (entropy != nullptr) entropy[row] = log_s - state.t / state.s;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) token_logprobs_bwd_kernel(
    const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy, const scalar_t* __restrict__ logits,
    const int64_t* __restrict__ targets, const float* __restrict__ stats, const float* __restrict__ entropy,
    scalar_t* __restrict__ dlogits, int64_t d1, int64_t stride0, int64_t stride1, int64_t stride_v, int64_t vocab,
    float inv_t, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  scalar_t* out_row = dlogits + row * vocab;
  const int64_t target = targets[row];
  if (target == ignore_index) {
    for (int64_t col = threadIdx.x; col < vocab; col += blockDim.x) out_row[col] = static_cast<scalar_t>(0.0f);
    return;
  }
  const scalar_t* row_ptr = logits + (row / d1) * stride0 + (row % d1) * stride1;
  // The 1/T of the chain rule is folded into the incoming gradients.
  const float g_logp = grad_logp[row] * inv_t;
  const float g_entropy = grad_entropy != nullptr ? grad_entropy[row] * inv_t : 0.0f;
  const float row_entropy = grad_entropy != nullptr ? entropy[row] : 0.0f;
  const float row_max = stats[row * kNumStats + kRowMax], log_sum = stats[row * kNumStats + kLogSum];
  for (int64_t col = threadIdx.x; col < vocab; col += blockDim.x) {
    const float d = (static_cast<float>(row_ptr[col * stride_v]) * inv_t - row_max) - log_sum;  // log p
    const float p = __expf(d);
    // target is only compared with in-row columns, never used as an index: any id is safe.
    float grad = (col == target ? g_logp : 0.0f) - g_logp * p;
    if (p > 0.0f) grad -= g_entropy * p * (d + row_entropy);
    out_row[col] = static_cast<scalar_t>(grad);
  }
}

// The shared checks (../token_logprobs_common.h), plus one block per row within the grid's limit.
int64_t check_cuda_rows(const at::Tensor& logits3d, const at::Tensor& targets) {
  TORCH_CHECK(logits3d.is_cuda(), "token_logprobs: logits must be a CUDA tensor");
  const int64_t n_rows = check_rows(logits3d, targets);
  TORCH_CHECK(n_rows <= INT32_MAX, "token_logprobs: at most 2^31 - 1 rows per call");
  return n_rows;
}

void token_logprobs_fwd_cuda(const at::Tensor& logits3d, const at::Tensor& targets, double inv_temperature,
                             int64_t ignore_index, at::Tensor& logp, at::Tensor& entropy, at::Tensor& stats,
                             const std::optional<at::Tensor>& error_flag) {
  const int64_t n_rows = check_cuda_rows(logits3d, targets);
  check_forward_outputs(logits3d, n_rows, logp, entropy, stats);
  int* flag = error_flag_data(error_flag, logits3d, "token_logprobs");
  if (n_rows == 0) return;
  const c10::cuda::CUDAGuard guard(logits3d.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool with_entropy = entropy.numel() > 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits3d.scalar_type(), "token_logprobs_fwd_cuda", [&] {
    token_logprobs_fwd_kernel<scalar_t><<<static_cast<unsigned int>(n_rows), kThreads, 0, stream>>>(
        logits3d.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), logp.data_ptr<float>(),
        with_entropy ? entropy.data_ptr<float>() : nullptr, stats.data_ptr<float>(), flag,
        logits3d.size(1),
        logits3d.stride(0), logits3d.stride(1), logits3d.stride(2), logits3d.size(2),
        static_cast<float>(inv_temperature), ignore_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void token_logprobs_bwd_cuda(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& logits3d, const at::Tensor& targets, const at::Tensor& stats,
                             const at::Tensor& entropy, double inv_temperature, int64_t ignore_index,
                             at::Tensor& dlogits) {
  const int64_t n_rows = check_cuda_rows(logits3d, targets);
  check_backward_tensors(logits3d, n_rows, grad_logp, grad_entropy, stats, entropy, dlogits);
  if (n_rows == 0) return;
  const c10::cuda::CUDAGuard guard(logits3d.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool has_grad_entropy = grad_entropy.has_value() && grad_entropy->defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits3d.scalar_type(), "token_logprobs_bwd_cuda", [&] {
    token_logprobs_bwd_kernel<scalar_t><<<static_cast<unsigned int>(n_rows), kThreads, 0, stream>>>(
        grad_logp.data_ptr<float>(), has_grad_entropy ? grad_entropy->data_ptr<float>() : nullptr,
        logits3d.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), stats.data_ptr<float>(),
        has_grad_entropy ? entropy.data_ptr<float>() : nullptr, dlogits.data_ptr<scalar_t>(), logits3d.size(1),
        logits3d.stride(0), logits3d.stride(1), logits3d.stride(2), logits3d.size(2),
        static_cast<float>(inv_temperature), ignore_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda
}  // namespace gtalign_fast

TORCH_LIBRARY_IMPL(gtalign_fast_C, CUDA, m) {
  m.impl("token_logprobs_fwd", &gtalign_fast::cuda::token_logprobs_fwd_cuda);
  m.impl("token_logprobs_bwd", &gtalign_fast::cuda::token_logprobs_bwd_cuda);
}
