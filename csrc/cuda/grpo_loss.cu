// CUDA kernels for grpo_loss (see kernels/grpo_loss.py for the maths, the row_stats columns and
// the layout contract: per-token inputs are strided [B, T] views, advantages float32 (time stride
// 0 when per sequence), mask uint8; dlogp / dref contiguous [B, T]).
//
// Forward: one thread block per sequence (a 1-D grid over B) strides over the tokens and reduces
// its partial sums across the block; the reduction over the B rows (per-row weights of the
// aggregation mode, loss, metrics) is done by the last block to finish (a persistent counter the
// caller passes, one launch per forward), or without one by a second single-block launch; no host
// sync either way. Backward: one block per
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

#include "../device_checks_common.h"
#include "../grpo_loss_common.h"

namespace gtalign_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using namespace gtalign_fast::grpo;  // row_stats columns, modes, metrics, limits, ClipParams (../grpo_loss_common.h)

__device__ __forceinline__ PolicyTerm clip_term(float ratio, float adv, const ClipParams& p) {
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

// TRL's SAPO objective (p.sapo): -sigmoid(tau (r - 1)) * 4 / tau * A, d / d r = -4 A s (1 - s); coef_1 = r.
// TRL's CISPO objective (p.cispo): -sg(min(r, eps_high)) * A * logp (p.high_bound is eps_high itself); no
// gradient through r: its d / d logp is cispo_grad; coef_1 = r.
__device__ __forceinline__ float cispo_grad(float ratio, float adv, const ClipParams& p) {
  return -fminf(ratio, p.high_bound) * adv;
}

// TRL's VESPO objective (p.vespo): -sg(phi) * A * logp, phi = exp(lambda + k log w - lambda w) of the row's
// sequence weight (p.log_w, p.w: vespo_weight), the *_pos pair where A >= 0; no gradient through phi: its
// d / d logp is -phi * A (direct_grad). A non-finite phi is 0, as TRL's nan_to_num.
__device__ __forceinline__ float vespo_phi(float adv, const ClipParams& p) {
  const bool nonneg = adv >= 0.0f;
  const float k = nonneg ? p.vespo_k_pos : p.vespo_k_neg;
  const float lambda = nonneg ? p.vespo_lambda_pos : p.vespo_lambda_neg;
  const float phi = expf(lambda + k * p.log_w - lambda * p.w);
  return phi <= 3.402823466e38f ? phi : 0.0f;
}

// CISPO's and VESPO's d / d logp (their weights are detached); 0 for the other objectives.
__device__ __forceinline__ float direct_grad(float ratio, float adv, const ClipParams& p) {
  if (p.cispo) return cispo_grad(ratio, adv, p);
  if (p.vespo) return -vespo_phi(adv, p) * adv;
  return 0.0f;
}

__device__ __forceinline__ PolicyTerm policy_term(float ratio, float adv, float lp, const ClipParams& p) {
  if (p.cispo || p.vespo) return {direct_grad(ratio, adv, p) * lp, 0.0f, ratio};
  if (!p.sapo) return clip_term(ratio, adv, p);
  const float tau = adv > 0.0f ? p.sapo_tau_pos : p.sapo_tau_neg;
  const float s = 1.0f / (1.0f + expf(-tau * (ratio - 1.0f)));
  return {-s * 4.0f / tau * adv, -4.0f * adv * s * (1.0f - s), ratio};
}

// exp(clamp(l, -20, 20)) and its derivative w.r.t. l (0 where clamped). expf, not __expf: the
// ratio sits next to the clip bounds and must round like the other backends.
__device__ __forceinline__ float clamped_exp(float log_ratio, float* dratio) {
  const float ratio = expf(fminf(fmaxf(log_ratio, -kLogRatioLimit), kLogRatioLimit));
  *dratio = (log_ratio >= -kLogRatioLimit && log_ratio <= kLogRatioLimit) ? ratio : 0.0f;
  return ratio;
}

// k3 KL clamp(exp(d) - d - 1, -c, c) with d = clamp(ref - logp, -20, 20), and d kl / d ref
// (c = kl_clamp; +inf: no clamp, TRL's k3).
__device__ __forceinline__ float k3_term(float logp, float ref, float kl_clamp, float* dkl_dref) {
  const float d = ref - logp;
  const float d_clamped = fminf(fmaxf(d, -kLogRatioLimit), kLogRatioLimit);
  const float e = expf(d_clamped);
  const float kl = e - d_clamped - 1.0f;
  const bool pass = d >= -kLogRatioLimit && d <= kLogRatioLimit && kl >= -kl_clamp && kl <= kl_clamp;
  *dkl_dref = pass ? e - 1.0f : 0.0f;
  return fminf(fmaxf(kl, -kl_clamp), kl_clamp);
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
  int64_t logp_b, logp_t, old_b, old_t, ref_b, ref_t, adv_b, adv_t, mask_b, mask_t, is_b, is_t;
};

// What the finalize step needs besides row_stats.
struct Finalize {
  const float* num_items;  // the kNormaliserTensor normaliser (a device scalar)
  float* loss;
  float* metrics;
  float* weights;
  int* error_flag;         // nullptr: a bad normaliser is not reported (the loss is NaN all the same)
  unsigned int* counter;   // nullptr: a separate finalize launch; else the rows kernel's last block finalizes
  int64_t mode;
  float const_weight;
};

// The finalize step, run by one whole block: reduces the [B] row partial sums to the per-row loss
// weights (they need the global token count), the loss and the metrics. row_stats is read with
// __ldcg (L2, not L1): in the fused forward other blocks wrote it.
__device__ void finalize_block(const float* stats, const Finalize& f, int64_t batch, bool row_metrics) {
  // Column sums over the rows, indexed by row_stats column (the loss needs the weights: below;
  // the kLossSum and kSeqGrad slots stay 0).
  float sums[kNumStats] = {};
  for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) {
    const float* row = stats + b * kNumStats;
    sums[kTokens] += __ldcg(row + kTokens);
    sums[kLow] += __ldcg(row + kLow);
    sums[kHigh] += __ldcg(row + kHigh);
    sums[kRegion] += __ldcg(row + kRegion);
    sums[kKlSum] += __ldcg(row + kKlSum);
    sums[kRatioSum] += __ldcg(row + kRatioSum);
  }
  block_sum(sums);
  const float total_tokens = fmaxf(sums[kTokens], 1.0f);
  const float batch_f = static_cast<float>(batch);
  const float metric_count = row_metrics ? batch_f : total_tokens;
  if (threadIdx.x == 0) {
    f.metrics[kMetricLow] = sums[kLow] / metric_count;
    f.metrics[kMetricHigh] = sums[kHigh] / metric_count;
    f.metrics[kMetricRegion] = sums[kRegion] / metric_count;
    f.metrics[kMetricKl] = sums[kKlSum] / total_tokens;
    f.metrics[kMetricRatio] = sums[kRatioSum] / metric_count;
  }
  float shared_weight = f.const_weight;
  if (f.mode == kTokenMean) shared_weight = 1.0f / total_tokens;
  if (f.mode == kNormaliserTensor) {
    // num_items_in_batch as a device tensor: not finite and > 0 sets the error flag (reported
    // without a host sync, gtalign_fast/ops/_device_checks.py) and makes the loss NaN.
    const float n = f.num_items[0];
    const bool bad = !(n > 0.0f && n < INFINITY);
    if (bad && threadIdx.x == 0 && f.error_flag != nullptr) atomicOr(f.error_flag, static_cast<int>(kErrNumItems));
    shared_weight = bad ? NAN : 1.0f / n;
  }
  float total[1] = {0.0f};
  for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) {
    const float* row = stats + b * kNumStats;
    const float weight = f.mode == kSeqMean ? 1.0f / (batch_f * fmaxf(__ldcg(row + kTokens), 1.0f)) : shared_weight;
    f.weights[b] = weight;
    total[0] += weight * __ldcg(row + kLossSum);
  }
  block_sum(total);
  if (threadIdx.x == 0) *f.loss = total[0];
}

__global__ void __launch_bounds__(kThreads) grpo_loss_finalize_kernel(const float* __restrict__ stats, Finalize f,
                                                                        int64_t batch, bool row_metrics) {
  finalize_block(stats, f, batch, row_metrics);
}

// Thread 0 of a row's block: the row's partial sums into row_stats.
__device__ void store_row_stats(float* out, const float (&sums)[kNumStats], const float* row_adv, const ClipParams& p,
                                bool seq_level, bool row_metrics, float seq_ratio, float seq_dratio) {
  float low = sums[kLow], high = sums[kHigh], ratio = sums[kRatioSum];
  float region = low + high;  // exclusive: they need opposite signs of A
  if (row_metrics) {
    // Per-sequence ratio and advantage: one 0/1 indicator per row, as TRL's GSPO metrics.
    const float a = row_adv[0];
    const float coef_1 = fminf(seq_ratio, p.delta);
    low = (coef_1 < p.low_bound && a < 0.0f) ? 1.0f : 0.0f;
    high = (coef_1 > p.high_bound && a > 0.0f) ? 1.0f : 0.0f;
    region = fmaxf(low, high);
    ratio = seq_ratio;
    if (p.vespo) high = vespo_phi(a, p);  // TRL's phi_seq (the other metrics are not reported for VESPO)
  }
  out[kLossSum] = sums[kLossSum];
  out[kTokens] = sums[kTokens];
  out[kLow] = low;
  out[kHigh] = high;
  out[kRegion] = region;
  out[kKlSum] = sums[kKlSum];
  out[kRatioSum] = ratio;
  out[kSeqGrad] = seq_level ? sums[kSeqGrad] * seq_dratio / fmaxf(sums[kTokens], 1.0f) : 0.0f;
}

// GSPO's ratio of row b (exp of the masked mean log-ratio, clamped) and its derivative; every thread
// of the block calls it (block_sum synchronises).
template <typename scalar_t>
__device__ float sequence_ratio(const scalar_t* __restrict__ logp, const scalar_t* __restrict__ old,
                                const uint8_t* __restrict__ mask, int64_t b, int64_t length, const Strides& s,
                                float* dratio) {
  float sums[2] = {0.0f, 0.0f};  // masked log-ratio, tokens
  for (int64_t t = threadIdx.x; t < length; t += blockDim.x) {
    if (mask[b * s.mask_b + t * s.mask_t] == 0) continue;
    sums[1] += 1.0f;
    if (old != nullptr) {
      sums[0] += static_cast<float>(logp[b * s.logp_b + t * s.logp_t]) - static_cast<float>(old[b * s.old_b + t * s.old_t]);
    }
  }
  block_sum(sums);
  return clamped_exp(sums[0] / fmaxf(sums[1], 1.0f), dratio);
}

// VESPO's sequence weight of row b into p (log w: the masked sum of the clamped log-ratios, clamped to
// [ln 1e-8, 20], TRL's); every thread of the block calls it (block_sum synchronises).
__device__ __forceinline__ float clamped_log(float x) {  // TRL's log of an IS ratio in VESPO's weight
  return fminf(fmaxf(logf(x), kVespoMinLogWeight), kLogRatioLimit);
}

// With an IS ratio (is), its logs join the sum (each clamped to [ln 1e-8, 20]; a time stride of 0: one per row).
template <typename scalar_t>
__device__ void vespo_weight(const scalar_t* __restrict__ logp, const scalar_t* __restrict__ old,
                             const uint8_t* __restrict__ mask, const float* __restrict__ is, int64_t b,
                             int64_t length, const Strides& s, ClipParams* p) {
  float sum[1] = {0.0f};
  const bool is_tokens = is != nullptr && s.is_t != 0;
  for (int64_t t = threadIdx.x; (old != nullptr || is_tokens) && t < length; t += blockDim.x) {
    if (mask[b * s.mask_b + t * s.mask_t] == 0) continue;
    if (old != nullptr) {
      const float lr = static_cast<float>(logp[b * s.logp_b + t * s.logp_t]) -
                       static_cast<float>(old[b * s.old_b + t * s.old_t]);
      sum[0] += fminf(fmaxf(lr, -kLogRatioLimit), kLogRatioLimit);
    }
    if (is_tokens) sum[0] += clamped_log(is[b * s.is_b + t * s.is_t]);
  }
  block_sum(sum);
  if (is != nullptr && !is_tokens) sum[0] += clamped_log(is[b * s.is_b]);
  p->log_w = fminf(fmaxf(sum[0], kVespoMinLogWeight), kLogRatioLimit);
  p->w = expf(p->log_w);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grpo_loss_rows_kernel(
    const scalar_t* __restrict__ logp, const scalar_t* __restrict__ old, const scalar_t* __restrict__ ref,
    const float* __restrict__ adv, const uint8_t* __restrict__ mask, const float* __restrict__ is,
    float* __restrict__ stats, int64_t length, Strides s, ClipParams p, bool seq_level, bool row_metrics, Finalize f) {
  const int64_t b = blockIdx.x;
  if (p.vespo) vespo_weight(logp, old, mask, is, b, length, s, &p);
  float seq_ratio = 1.0f, seq_dratio = 1.0f;
  if (seq_level) seq_ratio = sequence_ratio(logp, old, mask, b, length, s, &seq_dratio);
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
    const PolicyTerm term = policy_term(ratio, a, lp, p);
    // The IS ratio weights the policy term (VESPO has it in its sequence weight instead).
    const float weight = (is != nullptr && !p.vespo) ? is[b * s.is_b + t * s.is_t] : 1.0f;
    float kl = 0.0f, dkl_dref;
    if (ref != nullptr) kl = k3_term(lp, static_cast<float>(ref[b * s.ref_b + t * s.ref_t]), p.kl_clamp, &dkl_dref);
    // TRL's bias correction: k3 * r, whose d / d r (beta * k3) joins d pg / d r for the sequence gradient.
    const float dkl_dratio = p.bias_kl ? p.beta * kl : 0.0f;
    if (p.bias_kl) kl *= ratio;
    sums[kLossSum] += weight * term.loss + p.beta * kl;
    sums[kTokens] += 1.0f;
    sums[kLow] += (term.coef_1 < p.low_bound && a < 0.0f) ? 1.0f : 0.0f;
    // VESPO: the high slot holds the sum of phi (TRL's vespo/phi_seq_mean).
    sums[kHigh] += p.vespo ? vespo_phi(a, p) : ((term.coef_1 > p.high_bound && a > 0.0f) ? 1.0f : 0.0f);
    sums[kKlSum] += kl;
    sums[kRatioSum] += ratio;
    sums[kSeqGrad] += weight * term.dloss_dratio + dkl_dratio;
  }
  block_sum(sums);
  if (threadIdx.x == 0) store_row_stats(stats + b * kNumStats, sums, adv + b * s.adv_b, p, seq_level, row_metrics,
                                        seq_ratio, seq_dratio);
  if (f.counter == nullptr) return;  // a separate finalize launch follows
  // Fused finalize (one launch per forward): the last block to finish reduces every row. The
  // fence makes this block's row visible device-wide before it is counted; the counter is reset
  // by the last block, ready for the next launch on the stream.
  __shared__ bool last_block;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(f.counter, 1u) == static_cast<unsigned int>(gridDim.x) - 1u;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  finalize_block(stats, f, gridDim.x, row_metrics);
  if (threadIdx.x == 0) *f.counter = 0u;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grpo_loss_bwd_kernel(
    const float* __restrict__ grad_loss, const float* __restrict__ weights, const float* __restrict__ stats,
    const scalar_t* __restrict__ logp, const scalar_t* __restrict__ old, const scalar_t* __restrict__ ref,
    const float* __restrict__ adv, const uint8_t* __restrict__ mask, const float* __restrict__ is,
    scalar_t* __restrict__ dlogp, scalar_t* __restrict__ dref, int64_t length, Strides s, ClipParams p,
    bool seq_level) {
  const int64_t b = blockIdx.x;
  if (p.vespo) vespo_weight(logp, old, mask, is, b, length, s, &p);
  const float row_scale = grad_loss[0] * weights[b];
  const float seq_grad = stats[b * kNumStats + kSeqGrad];
  // The bias-corrected KL of a sequence-level row weights each token's k3 gradient by the row's ratio;
  // CISPO's per-token gradient reads it too.
  float seq_ratio = 1.0f, unused;
  if (seq_level && ((p.bias_kl && ref != nullptr) || p.cispo)) seq_ratio = sequence_ratio(logp, old, mask, b, length, s, &unused);
  for (int64_t t = threadIdx.x; t < length; t += blockDim.x) {
    const int64_t out = b * length + t;
    if (mask[b * s.mask_b + t * s.mask_t] == 0) {
      dlogp[out] = static_cast<scalar_t>(0.0f);
      if (dref != nullptr) dref[out] = static_cast<scalar_t>(0.0f);
      continue;
    }
    const float lp = static_cast<float>(logp[b * s.logp_b + t * s.logp_t]);
    float dloss = seq_grad, ratio = seq_ratio, dratio = 1.0f;
    // The IS ratio weights the policy term (at sequence level seq_grad has it already; VESPO: not a weight).
    const float weight = (is != nullptr && !p.vespo) ? is[b * s.is_b + t * s.is_t] : 1.0f;
    if (!seq_level) {
      ratio = 1.0f;
      if (old != nullptr) ratio = clamped_exp(lp - static_cast<float>(old[b * s.old_b + t * s.old_t]), &dratio);
      dloss = weight * policy_term(ratio, adv[b * s.adv_b + t * s.adv_t], lp, p).dloss_dratio * dratio;
    }
    // CISPO's and VESPO's gradients go to logp directly (their weights are detached), at either level.
    dloss += weight * direct_grad(ratio, adv[b * s.adv_b + t * s.adv_t], p);
    float kl_grad = 0.0f;
    if (ref != nullptr) {
      float dkl_dref;
      const float kl = k3_term(lp, static_cast<float>(ref[b * s.ref_b + t * s.ref_t]), p.kl_clamp, &dkl_dref);
      kl_grad = p.beta * dkl_dref;
      if (p.bias_kl) {  // d (k3 * r): r * d k3, plus k3 * dr (at sequence level inside seq_grad)
        if (!seq_level) dloss += p.beta * kl * dratio;
        kl_grad *= ratio;
      }
    }
    dlogp[out] = static_cast<scalar_t>(row_scale * (dloss - kl_grad));
    if (dref != nullptr) dref[out] = static_cast<scalar_t>(row_scale * kl_grad);
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points (the Python side validates and allocates; these check the layout contract)

// The shared layout checks (grpo::check_inputs, ../grpo_loss_common.h), plus what the launch needs:
// CUDA tensors and one block per sequence within the grid's limit.
void check_inputs(const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                  const std::optional<at::Tensor>& ref_logp, const at::Tensor& advantages, const at::Tensor& mask,
                  const std::optional<at::Tensor>& is_ratio) {
  TORCH_CHECK(logp.is_cuda(), "grpo_loss: logp must be a CUDA tensor");
  grpo::check_inputs(logp, old_logp, ref_logp, advantages, mask, is_ratio);
  TORCH_CHECK(logp.size(0) <= INT32_MAX, "grpo_loss: at most 2^31 - 1 sequences per call");
}

template <typename scalar_t>
const scalar_t* optional_data(const std::optional<at::Tensor>& tensor) {
  return present(tensor) ? tensor->data_ptr<scalar_t>() : nullptr;
}

Strides strides_of(const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                   const std::optional<at::Tensor>& ref_logp, const at::Tensor& advantages, const at::Tensor& mask,
                   const std::optional<at::Tensor>& is_ratio) {
  return {logp.stride(0), logp.stride(1),
          present(old_logp) ? old_logp->stride(0) : 0, present(old_logp) ? old_logp->stride(1) : 0,
          present(ref_logp) ? ref_logp->stride(0) : 0, present(ref_logp) ? ref_logp->stride(1) : 0,
          advantages.stride(0), advantages.stride(1), mask.stride(0), mask.stride(1),
          present(is_ratio) ? is_ratio->stride(0) : 0, present(is_ratio) ? is_ratio->stride(1) : 0};
}

void grpo_loss_fwd_cuda(const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                        const std::optional<at::Tensor>& ref_logp, const at::Tensor& advantages, const at::Tensor& mask,
                        const std::optional<at::Tensor>& num_items, const std::optional<at::Tensor>& is_ratio,
                        c10::ArrayRef<double> params, bool row_metrics, int64_t mode, double const_weight,
                        at::Tensor& loss, at::Tensor& metrics, at::Tensor& row_stats, at::Tensor& row_weights,
                        const std::optional<at::Tensor>& error_flag, const std::optional<at::Tensor>& finalize_counter) {
  check_inputs(logp, old_logp, ref_logp, advantages, mask, is_ratio);
  const int64_t batch = logp.size(0), length = logp.size(1);
  check_float_out(loss, 1, logp, "loss");
  check_float_out(metrics, kNumMetrics, logp, "metrics");
  check_float_out(row_stats, batch * kNumStats, logp, "row_stats");
  check_float_out(row_weights, batch, logp, "row_weights");
  TORCH_CHECK(mode != kNormaliserTensor || (present(num_items) && num_items->scalar_type() == at::kFloat &&
                                            num_items->numel() >= 1 && num_items->device() == logp.device()),
              "grpo_loss: num_items must be a float32 tensor of one element on logp's device");
  int* flag = error_flag_data(error_flag, logp, "grpo_loss");
  // With a counter (int32, zero, persistent: the kernel leaves it at zero) the forward is one launch.
  unsigned int* counter = nullptr;
  if (present(finalize_counter)) {
    TORCH_CHECK(finalize_counter->scalar_type() == at::kInt && finalize_counter->numel() >= 1 &&
                    finalize_counter->device() == logp.device(),
                "grpo_loss: finalize_counter must be an int32 tensor of one element on logp's device");
    counter = reinterpret_cast<unsigned int*>(finalize_counter->data_ptr<int>());
  }
  if (batch == 0) return;
  const c10::cuda::CUDAGuard guard(logp.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const ClipParams clip = clip_params(params);
  const bool seq_level = seq_level_of(params);
  const Strides strides = strides_of(logp, old_logp, ref_logp, advantages, mask, is_ratio);
  const Finalize finalize{mode == kNormaliserTensor ? num_items->data_ptr<float>() : nullptr,
                          loss.data_ptr<float>(),
                          metrics.data_ptr<float>(),
                          row_weights.data_ptr<float>(),
                          flag,
                          counter,
                          mode,
                          static_cast<float>(const_weight)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logp.scalar_type(), "grpo_loss_fwd_cuda", [&] {
    grpo_loss_rows_kernel<scalar_t><<<static_cast<unsigned int>(batch), kThreads, 0, stream>>>(
        logp.data_ptr<scalar_t>(), optional_data<scalar_t>(old_logp), optional_data<scalar_t>(ref_logp),
        advantages.data_ptr<float>(), mask.data_ptr<uint8_t>(), optional_data<float>(is_ratio),
        row_stats.data_ptr<float>(), length, strides, clip, seq_level, row_metrics, finalize);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (counter != nullptr) return;  // the rows kernel's last block finalized
  grpo_loss_finalize_kernel<<<1, kThreads, 0, stream>>>(row_stats.data_ptr<float>(), finalize, batch, row_metrics);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void grpo_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& row_weights, const at::Tensor& row_stats,
                        const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                        const std::optional<at::Tensor>& ref_logp, const at::Tensor& advantages, const at::Tensor& mask,
                        const std::optional<at::Tensor>& is_ratio, c10::ArrayRef<double> params, at::Tensor& dlogp,
                        at::Tensor& dref) {
  check_inputs(logp, old_logp, ref_logp, advantages, mask, is_ratio);
  const int64_t batch = logp.size(0), length = logp.size(1);
  check_float_out(grad_loss, 1, logp, "grad_loss");
  check_float_out(row_weights, batch, logp, "row_weights");
  check_float_out(row_stats, batch * kNumStats, logp, "row_stats");
  TORCH_CHECK(dlogp.device() == logp.device() && dref.device() == logp.device(),
              "grpo_loss: dlogp and dref must be on logp's device");
  TORCH_CHECK(dlogp.is_contiguous() && dlogp.scalar_type() == logp.scalar_type() && dlogp.numel() == batch * length,
              "grpo_loss: dlogp must be contiguous [B, T] in logp's dtype");
  const bool ref_grad = dref.numel() > 0;
  TORCH_CHECK(!ref_grad || (present(ref_logp) && dref.is_contiguous() && dref.numel() == batch * length),
              "grpo_loss: dref must be contiguous [B, T] and needs ref_logp");
  if (batch == 0) return;
  const c10::cuda::CUDAGuard guard(logp.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const ClipParams clip = clip_params(params);
  const bool seq_level = seq_level_of(params);
  const Strides strides = strides_of(logp, old_logp, ref_logp, advantages, mask, is_ratio);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logp.scalar_type(), "grpo_loss_bwd_cuda", [&] {
    grpo_loss_bwd_kernel<scalar_t><<<static_cast<unsigned int>(batch), kThreads, 0, stream>>>(
        grad_loss.data_ptr<float>(), row_weights.data_ptr<float>(), row_stats.data_ptr<float>(),
        logp.data_ptr<scalar_t>(), optional_data<scalar_t>(old_logp), optional_data<scalar_t>(ref_logp),
        advantages.data_ptr<float>(), mask.data_ptr<uint8_t>(), optional_data<float>(is_ratio),
        dlogp.data_ptr<scalar_t>(),
        ref_grad ? dref.data_ptr<scalar_t>() : nullptr, length, strides, clip, seq_level);
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
