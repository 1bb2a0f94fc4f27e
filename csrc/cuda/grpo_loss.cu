// CUDA kernels for grpo_loss (see kernels/grpo_loss.py for the maths, the row_stats columns and
// the layout contract: per-token inputs are strided [B, T] views, advantages float32 (time stride
// 0 when per sequence), mask uint8; dlogp / dref contiguous [B, T]).
//
// Forward: one thread block per sequence (a 1-D grid over B) strides over the tokens and reduces
// its partial sums across the block; one more single-block launch reduces over the B rows (per-row
// weights of the aggregation mode, loss, metrics) without a host sync. Backward: one block per
// sequence. Derivatives follow torch's conventions (clamp passes the gradient on the closed
// interval, min splits it evenly on ties), as in the Triton and C++ kernels.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cuda_runtime.h>

#include <optional>

#include "../grpo_loss_common.h"

namespace gtalign_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using namespace gtalign_fast::grpo;  // row_stats columns, modes, metrics, limits, ClipParams (../grpo_loss_common.h)

__device__ __forceinline__ PolicyTerm policy_term(float ratio, float adv, const ClipParams& p) {
  const float coef_1 = ratio <= p.delta ? ratio : p.delta;
  const float gate_1 = ratio <= p.delta ? 1.0f : 0.0f;
  const float coef_2 = fminf(fmaxf(ratio, p.low_bound), p.high_bound);
  const float gate_2 = (ratio >= p.low_bound && ratio <= p.high_bound) ? 1.0f : 0.0f;
  const float s1 = coef_1 * adv, s2 = coef_2 * adv;
  // torch.min splits the gradient evenly between equal arguments (on-policy every token ties).
  const float gate = s1 < s2 ? gate_1 : (s1 > s2 ? gate_2 : 0.5f * (gate_1 + gate_2));
  float loss = -(s1 < s2 ? s1 : s2);
  float dloss = -adv * gate;
  // verl's dual clip: the loss of a negative-advantage token is capped at -c * A.
  const bool dual = p.has_dual_clip && adv < 0.0f;
  const float cap = -adv * p.dual_clip;
  const bool capped = dual && loss > cap;
  const bool tie = dual && loss == cap;
  dloss = capped ? 0.0f : (tie ? 0.5f * dloss : dloss);
  loss = capped ? cap : loss;
  return {loss, dloss, coef_1};
}

// exp(clamp(l, -20, 20)) and its derivative w.r.t. l (0 where clamped). expf, not __expf: the
// ratio sits next to the clip bounds and must round like the other backends.
__device__ __forceinline__ float clamped_exp(float log_ratio, float* dratio) {
  const float ratio = expf(fminf(fmaxf(log_ratio, -kLogRatioLimit), kLogRatioLimit));
  *dratio = (log_ratio >= -kLogRatioLimit && log_ratio <= kLogRatioLimit) ? ratio : 0.0f;
  return ratio;
}

// k3 KL clamp(exp(d) - d - 1, -10, 10) with d = clamp(ref - logp, -20, 20), and d kl / d ref.
__device__ __forceinline__ float k3_term(float logp, float ref, float* dkl_dref) {
  const float d = ref - logp;
  const float d_clamped = fminf(fmaxf(d, -kLogRatioLimit), kLogRatioLimit);
  const float e = expf(d_clamped);
  const float kl = e - d_clamped - 1.0f;
  const bool pass = d >= -kLogRatioLimit && d <= kLogRatioLimit && kl >= -kKlLimit && kl <= kKlLimit;
  *dkl_dref = pass ? e - 1.0f : 0.0f;
  return fminf(fmaxf(kl, -kKlLimit), kKlLimit);
}

// Sums N values across the block; every thread gets the totals (fixed order: deterministic).
template <int N>
__device__ void block_sum(float (&values)[N]) {
  __shared__ float partial[N][kWarps];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    for (int offset = 16; offset > 0; offset >>= 1) values[k] += __shfl_xor_sync(0xffffffff, values[k], offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // a previous call's readers are done with `partial`
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) partial[k][warp] = values[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float total = 0.0f;
    for (int w = 0; w < kWarps; ++w) total += partial[k][w];
    values[k] = total;
  }
}

struct Strides {
  int64_t logp_b, logp_t, old_b, old_t, ref_b, ref_t, adv_b, adv_t, mask_b, mask_t;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grpo_loss_rows_kernel(
    const scalar_t* __restrict__ logp, const scalar_t* __restrict__ old, const scalar_t* __restrict__ ref,
    const float* __restrict__ adv, const uint8_t* __restrict__ mask, float* __restrict__ stats, int64_t length,
    Strides s, ClipParams p, bool seq_level, bool row_metrics) {
  const int64_t b = blockIdx.x;
  float seq_ratio = 1.0f, seq_dratio = 1.0f;
  if (seq_level) {
    float sums[2] = {0.0f, 0.0f};  // masked log-ratio, tokens
    for (int64_t t = threadIdx.x; t < length; t += blockDim.x) {
      if (mask[b * s.mask_b + t * s.mask_t] == 0) continue;
      sums[1] += 1.0f;
      if (old != nullptr) {
        sums[0] += static_cast<float>(logp[b * s.logp_b + t * s.logp_t]) - static_cast<float>(old[b * s.old_b + t * s.old_t]);
      }
    }
    block_sum(sums);
    seq_ratio = clamped_exp(sums[0] / fmaxf(sums[1], 1.0f), &seq_dratio);
  }
  // The row's sums, indexed by row_stats column. kRegion is derived from kLow and kHigh after the
  // reduction (its slot stays 0); kSeqGrad collects the sum of d pg / d ratio, turned into the
  // sequence gradient at the end.
  float sums[kNumStats] = {};
  for (int64_t t = threadIdx.x; t < length; t += blockDim.x) {
    if (mask[b * s.mask_b + t * s.mask_t] == 0) continue;
    const float lp = static_cast<float>(logp[b * s.logp_b + t * s.logp_t]);
    const float a = adv[b * s.adv_b + t * s.adv_t];
    float ratio = seq_ratio, dratio;
    if (!seq_level && old != nullptr) ratio = clamped_exp(lp - static_cast<float>(old[b * s.old_b + t * s.old_t]), &dratio);
    const PolicyTerm term = policy_term(ratio, a, p);
    float kl = 0.0f, dkl_dref;
    if (ref != nullptr) kl = k3_term(lp, static_cast<float>(ref[b * s.ref_b + t * s.ref_t]), &dkl_dref);
    sums[kLossSum] += term.loss + p.beta * kl;
    sums[kTokens] += 1.0f;
    sums[kLow] += (term.coef_1 < p.low_bound && a < 0.0f) ? 1.0f : 0.0f;
    sums[kHigh] += (term.coef_1 > p.high_bound && a > 0.0f) ? 1.0f : 0.0f;
    sums[kKlSum] += kl;
    sums[kRatioSum] += ratio;
    sums[kSeqGrad] += term.dloss_dratio;
  }
  block_sum(sums);
  if (threadIdx.x != 0) return;
  float low = sums[kLow], high = sums[kHigh], ratio = sums[kRatioSum];
  float region = low + high;  // exclusive: they need opposite signs of A
  if (row_metrics) {
    // Per-sequence ratio and advantage: one 0/1 indicator per row, as TRL's GSPO metrics.
    const float a = adv[b * s.adv_b];
    const float coef_1 = fminf(seq_ratio, p.delta);
    low = (coef_1 < p.low_bound && a < 0.0f) ? 1.0f : 0.0f;
    high = (coef_1 > p.high_bound && a > 0.0f) ? 1.0f : 0.0f;
    region = fmaxf(low, high);
    ratio = seq_ratio;
  }
  float* out = stats + b * kNumStats;
  out[kLossSum] = sums[kLossSum];
  out[kTokens] = sums[kTokens];
  out[kLow] = low;
  out[kHigh] = high;
  out[kRegion] = region;
  out[kKlSum] = sums[kKlSum];
  out[kRatioSum] = ratio;
  out[kSeqGrad] = seq_level ? sums[kSeqGrad] * seq_dratio / fmaxf(sums[kTokens], 1.0f) : 0.0f;
}

__global__ void __launch_bounds__(kThreads) grpo_loss_finalize_kernel(
    const float* __restrict__ stats, const float* __restrict__ num_items, float* __restrict__ loss,
    float* __restrict__ metrics, float* __restrict__ weights, int64_t batch, int64_t mode, float const_weight,
    bool row_metrics) {
  // Column sums over the rows, indexed by row_stats column (the loss needs the weights: below;
  // the kLossSum and kSeqGrad slots stay 0).
  float sums[kNumStats] = {};
  for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) {
    const float* row = stats + b * kNumStats;
    sums[kTokens] += row[kTokens];
    sums[kLow] += row[kLow];
    sums[kHigh] += row[kHigh];
    sums[kRegion] += row[kRegion];
    sums[kKlSum] += row[kKlSum];
    sums[kRatioSum] += row[kRatioSum];
  }
  block_sum(sums);
  const float total_tokens = fmaxf(sums[kTokens], 1.0f);
  const float batch_f = static_cast<float>(batch);
  const float metric_count = row_metrics ? batch_f : total_tokens;
  if (threadIdx.x == 0) {
    metrics[kMetricLow] = sums[kLow] / metric_count;
    metrics[kMetricHigh] = sums[kHigh] / metric_count;
    metrics[kMetricRegion] = sums[kRegion] / metric_count;
    metrics[kMetricKl] = sums[kKlSum] / total_tokens;
    metrics[kMetricRatio] = sums[kRatioSum] / metric_count;
  }
  float shared_weight = const_weight;
  if (mode == kTokenMean) shared_weight = 1.0f / total_tokens;
  if (mode == kNormaliserTensor) shared_weight = 1.0f / num_items[0];
  float total[1] = {0.0f};
  for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) {
    const float* row = stats + b * kNumStats;
    const float weight = mode == kSeqMean ? 1.0f / (batch_f * fmaxf(row[kTokens], 1.0f)) : shared_weight;
    weights[b] = weight;
    total[0] += weight * row[kLossSum];
  }
  block_sum(total);
  if (threadIdx.x == 0) *loss = total[0];
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grpo_loss_bwd_kernel(
    const float* __restrict__ grad_loss, const float* __restrict__ weights, const float* __restrict__ stats,
    const scalar_t* __restrict__ logp, const scalar_t* __restrict__ old, const scalar_t* __restrict__ ref,
    const float* __restrict__ adv, const uint8_t* __restrict__ mask, scalar_t* __restrict__ dlogp,
    scalar_t* __restrict__ dref, int64_t length, Strides s, ClipParams p, bool seq_level) {
  const int64_t b = blockIdx.x;
  const float row_scale = grad_loss[0] * weights[b];
  const float seq_grad = stats[b * kNumStats + kSeqGrad];
  for (int64_t t = threadIdx.x; t < length; t += blockDim.x) {
    const int64_t out = b * length + t;
    if (mask[b * s.mask_b + t * s.mask_t] == 0) {
      dlogp[out] = static_cast<scalar_t>(0.0f);
      if (dref != nullptr) dref[out] = static_cast<scalar_t>(0.0f);
      continue;
    }
    const float lp = static_cast<float>(logp[b * s.logp_b + t * s.logp_t]);
    float dloss = seq_grad;
    if (!seq_level) {
      float ratio = 1.0f, dratio = 1.0f;
      if (old != nullptr) ratio = clamped_exp(lp - static_cast<float>(old[b * s.old_b + t * s.old_t]), &dratio);
      dloss = policy_term(ratio, adv[b * s.adv_b + t * s.adv_t], p).dloss_dratio * dratio;
    }
    float kl_grad = 0.0f;
    if (ref != nullptr) {
      float dkl_dref;
      k3_term(lp, static_cast<float>(ref[b * s.ref_b + t * s.ref_t]), &dkl_dref);
      kl_grad = p.beta * dkl_dref;
    }
    dlogp[out] = static_cast<scalar_t>(row_scale * (dloss - kl_grad));
    if (dref != nullptr) dref[out] = static_cast<scalar_t>(row_scale * kl_grad);
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points (the Python side validates and allocates; these check the layout contract)

bool present(const std::optional<at::Tensor>& tensor) { return tensor.has_value() && tensor->defined(); }

template <typename scalar_t>
const scalar_t* optional_data(const std::optional<at::Tensor>& tensor) {
  return present(tensor) ? tensor->data_ptr<scalar_t>() : nullptr;
}

Strides strides_of(const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                   const std::optional<at::Tensor>& ref_logp, const at::Tensor& advantages, const at::Tensor& mask) {
  return {logp.stride(0), logp.stride(1),
          present(old_logp) ? old_logp->stride(0) : 0, present(old_logp) ? old_logp->stride(1) : 0,
          present(ref_logp) ? ref_logp->stride(0) : 0, present(ref_logp) ? ref_logp->stride(1) : 0,
          advantages.stride(0), advantages.stride(1), mask.stride(0), mask.stride(1)};
}

void check_inputs(const at::Tensor& logp, const at::Tensor& advantages, const at::Tensor& mask) {
  TORCH_CHECK(logp.dim() == 2 && logp.is_cuda(), "grpo_loss: logp must be a CUDA [B, T] tensor");
  TORCH_CHECK(logp.size(0) <= INT32_MAX, "grpo_loss: at most 2^31 - 1 sequences per call");
  TORCH_CHECK(advantages.dim() == 2 && advantages.scalar_type() == at::kFloat, "grpo_loss: advantages must be a float32 [B, T] view");
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kByte, "grpo_loss: mask must be a uint8 [B, T] view");
}

void grpo_loss_fwd_cuda(const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                        const std::optional<at::Tensor>& ref_logp, const at::Tensor& advantages, const at::Tensor& mask,
                        const std::optional<at::Tensor>& num_items, double beta, double epsilon_low,
                        double epsilon_high, double delta, double dual_clip, bool seq_level, bool row_metrics,
                        int64_t mode, double const_weight, at::Tensor& loss, at::Tensor& metrics,
                        at::Tensor& row_stats, at::Tensor& row_weights) {
  check_inputs(logp, advantages, mask);
  const int64_t batch = logp.size(0), length = logp.size(1);
  TORCH_CHECK(row_stats.is_contiguous() && row_stats.numel() == batch * kNumStats, "grpo_loss: row_stats must be [B, ",
              kNumStats, "]");
  TORCH_CHECK(mode != kNormaliserTensor || (present(num_items) && num_items->scalar_type() == at::kFloat),
              "grpo_loss: num_items must be a float32 tensor");
  if (batch == 0) return;
  const c10::cuda::CUDAGuard guard(logp.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const ClipParams params = clip_params(beta, epsilon_low, epsilon_high, delta, dual_clip);
  const Strides strides = strides_of(logp, old_logp, ref_logp, advantages, mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logp.scalar_type(), "grpo_loss_fwd_cuda", [&] {
    grpo_loss_rows_kernel<scalar_t><<<static_cast<unsigned int>(batch), kThreads, 0, stream>>>(
        logp.data_ptr<scalar_t>(), optional_data<scalar_t>(old_logp), optional_data<scalar_t>(ref_logp),
        advantages.data_ptr<float>(), mask.data_ptr<uint8_t>(), row_stats.data_ptr<float>(), length, strides, params,
        seq_level, row_metrics);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  grpo_loss_finalize_kernel<<<1, kThreads, 0, stream>>>(
      row_stats.data_ptr<float>(), mode == kNormaliserTensor ? num_items->data_ptr<float>() : nullptr,
      loss.data_ptr<float>(), metrics.data_ptr<float>(), row_weights.data_ptr<float>(), batch, mode,
      static_cast<float>(const_weight), row_metrics);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void grpo_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& row_weights, const at::Tensor& row_stats,
                        const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                        const std::optional<at::Tensor>& ref_logp, const at::Tensor& advantages, const at::Tensor& mask,
                        double beta, double epsilon_low, double epsilon_high, double delta, double dual_clip,
                        bool seq_level, at::Tensor& dlogp, at::Tensor& dref) {
  check_inputs(logp, advantages, mask);
  const int64_t batch = logp.size(0), length = logp.size(1);
  TORCH_CHECK(dlogp.is_contiguous() && dlogp.scalar_type() == logp.scalar_type() && dlogp.numel() == batch * length,
              "grpo_loss: dlogp must be contiguous [B, T] in logp's dtype");
  const bool ref_grad = dref.numel() > 0;
  TORCH_CHECK(!ref_grad || (present(ref_logp) && dref.is_contiguous() && dref.numel() == batch * length),
              "grpo_loss: dref must be contiguous [B, T] and needs ref_logp");
  if (batch == 0) return;
  const c10::cuda::CUDAGuard guard(logp.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const ClipParams params = clip_params(beta, epsilon_low, epsilon_high, delta, dual_clip);
  const Strides strides = strides_of(logp, old_logp, ref_logp, advantages, mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logp.scalar_type(), "grpo_loss_bwd_cuda", [&] {
    grpo_loss_bwd_kernel<scalar_t><<<static_cast<unsigned int>(batch), kThreads, 0, stream>>>(
        grad_loss.data_ptr<float>(), row_weights.data_ptr<float>(), row_stats.data_ptr<float>(),
        logp.data_ptr<scalar_t>(), optional_data<scalar_t>(old_logp), optional_data<scalar_t>(ref_logp),
        advantages.data_ptr<float>(), mask.data_ptr<uint8_t>(), dlogp.data_ptr<scalar_t>(),
        ref_grad ? dref.data_ptr<scalar_t>() : nullptr, length, strides, params, seq_level);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda
}  // namespace gtalign_fast

TORCH_LIBRARY_IMPL(gtalign_fast_C, CUDA, m) {
  m.impl("grpo_loss_fwd", &gtalign_fast::cuda::grpo_loss_fwd_cuda);
  m.impl("grpo_loss_bwd", &gtalign_fast::cuda::grpo_loss_bwd_cuda);
}
