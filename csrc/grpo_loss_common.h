// Definitions shared by the grpo_loss C++ CPU kernel (csrc/cpu/grpo_loss.cpp, g++) and CUDA kernel
// (csrc/cuda/grpo_loss.cu, nvcc): the row_stats columns, the aggregation modes, the clamp limits
// the clip parameters (see kernels/grpo_loss.py for their meaning) and the host-side checks of the
// inputs' layout, which both entry points run. Host code only: the per-token maths stays in each
// file, written for its own compiler (omp simd selects on the CPU, fminf / expf on the GPU).
//
// The constants mirror gtalign_fast/ops/_grpo_constants.py, which the Python code and the Triton
// kernels use; tests/test_constants.py parses this file and checks every value against it, so the
// enum and constexpr lines below keep their simple `name = literal` form.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace gtalign_fast {
namespace grpo {

constexpr int64_t kNumStats = 8;
// Columns of row_stats, one row per sequence.
enum Stat : int64_t { kLossSum = 0, kTokens, kLow, kHigh, kRegion, kKlSum, kRatioSum, kSeqGrad };
static_assert(kSeqGrad + 1 == kNumStats, "one row_stats column per Stat");
// Aggregation modes of the finalize step (the mapping from loss_type is in gtalign_fast/ops/_grpo_loss.py).
enum Mode : int64_t { kSeqMean = 0, kTokenMean = 1, kNormaliserTensor = 2, kConstant = 3 };
constexpr int64_t kNumMetrics = 5;
// Entries of the metrics vector the finalize step writes (their names: METRIC_NAMES in Python).
enum Metric : int64_t { kMetricLow = 0, kMetricHigh, kMetricRegion, kMetricKl, kMetricRatio };
static_assert(kMetricRatio + 1 == kNumMetrics, "one metrics entry per Metric");
constexpr float kLogRatioLimit = 20.0f;  // log-ratios are clamped to [-20, 20]
constexpr float kKlLimit = 10.0f;        // verl's low_var_kl bound on k3 values (the kl_clamp verl's plugin passes)
// TRL's VESPO: the sequence log-weight is clamped to [ln 1e-8, 20], the Gamma decay lambda to >= 1e-4.
constexpr float kVespoMinLogWeight = -18.420680743952367f;
constexpr float kVespoMinLambda = 1e-4f;

// The op's float arguments as the kernels use them (passed to the CUDA kernels by value).
// kl_clamp bounds each k3 value to [-kl_clamp, kl_clamp]; +inf (the ops' default, TRL's k3) clamps nothing.
// bias_kl: TRL's use_bias_correction_kl, the k3 term times the importance ratio. sapo_tau_pos > 0 selects
// TRL's SAPO objective -sigmoid(tau (r - 1)) 4 / tau A (tau_pos where A > 0, else tau_neg) instead of the clip.
// cispo selects TRL's CISPO objective -sg(min(r, eps_high)) A logp: its high_bound is eps_high itself (the
// ratio cap, and the bound of TRL's cispo_clip_ratio), not 1 + eps_high. vespo selects TRL's VESPO objective
// -sg(phi) A logp, phi = exp(lambda + k log w - lambda w) of the sequence weight w (k, lambda: the *_pos pair
// where A >= 0, else *_neg); log_w and w are the row's, set per row by the kernels (vespo_row).
struct ClipParams {
  float low_bound, high_bound, delta, dual_clip, beta, kl_clamp, sapo_tau_pos, sapo_tau_neg;
  bool has_dual_clip, bias_kl, sapo, cispo;
  float vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg;
  bool vespo;
  float log_w, w;
  bool has_is;  // an importance-sampling ratio weights the policy term (set by the entry points)
};

// The objective's parameters as the ops pass them: one float[] argument of kNumParams values in Param
// order (bools as 0 / 1), built once per set of options by gtalign_fast/ops/_grpo_loss.py (kernel_params):
// a Python float argument costs as much to pass as a small kernel's work, a list element about half.
enum Param : int64_t {
  kParamBeta = 0,
  kParamEpsilonLow,
  kParamEpsilonHigh,
  kParamDelta,
  kParamDualClip,
  kParamKlClamp,
  kParamBiasKl,
  kParamSapoTauPos,
  kParamSapoTauNeg,
  kParamCispo,
  kParamVespoKPos,
  kParamVespoLambdaPos,
  kParamVespoKNeg,
  kParamVespoLambdaNeg,
  kParamVespo,
  kParamSeqLevel
};
constexpr int64_t kNumParams = 16;
static_assert(kParamSeqLevel + 1 == kNumParams, "one params entry per Param");

inline void check_params(c10::ArrayRef<double> params) {
  TORCH_CHECK(static_cast<int64_t>(params.size()) == kNumParams, "grpo_loss: params must hold ", kNumParams,
              " values (gtalign_fast.ops._grpo_loss.kernel_params), got ", params.size());
}

inline ClipParams clip_params(c10::ArrayRef<double> params) {
  check_params(params);
  const double eps_high = params[kParamEpsilonHigh];
  const bool cispo = params[kParamCispo] != 0.0;
  const float high_bound = cispo ? static_cast<float>(eps_high) : 1.0f + static_cast<float>(eps_high);
  const auto lambda = [](double value) { return value > kVespoMinLambda ? static_cast<float>(value) : kVespoMinLambda; };
  const double sapo_tau_pos = params[kParamSapoTauPos];
  return {1.0f - static_cast<float>(params[kParamEpsilonLow]), high_bound, static_cast<float>(params[kParamDelta]),
          static_cast<float>(params[kParamDualClip]), static_cast<float>(params[kParamBeta]),
          static_cast<float>(params[kParamKlClamp]), static_cast<float>(sapo_tau_pos),
          static_cast<float>(params[kParamSapoTauNeg]), params[kParamDualClip] > 0.0, params[kParamBiasKl] != 0.0,
          sapo_tau_pos > 0.0, cispo, static_cast<float>(params[kParamVespoKPos]), lambda(params[kParamVespoLambdaPos]),
          static_cast<float>(params[kParamVespoKNeg]), lambda(params[kParamVespoLambdaNeg]),
          params[kParamVespo] != 0.0, 0.0f, 1.0f};
}

inline bool seq_level_of(c10::ArrayRef<double> params) { return params[kParamSeqLevel] != 0.0; }

// The sequence weight of TRL's VESPO from the row's masked sum of clamped log-ratios: log w clamped to
// [ln 1e-8, 20] (TRL's get_gamma_weights), and w = exp(log w); written into the row's copy of the params.
inline void vespo_row(float log_ratio_sum, ClipParams* p) {
  const float log_w = log_ratio_sum < kVespoMinLogWeight ? kVespoMinLogWeight
                      : log_ratio_sum > kLogRatioLimit  ? kLogRatioLimit
                                                        : log_ratio_sum;
  p->log_w = log_w;
  p->w = std::exp(log_w);
}

// Per-token policy loss, d loss / d ratio, and coef_1 = min(ratio, delta).
struct PolicyTerm {
  float loss, dloss_dratio, coef_1;
};

// ---------------------------------------------------------------------------------------------
// Host-side checks of the layout contract, shared by the CPU and CUDA entry points (the Python side
// validates and allocates; a direct call of the registered op gets no Python validation first).

inline bool present(const std::optional<at::Tensor>& tensor) { return tensor.has_value() && tensor->defined(); }

// Every input is indexed with logp's [B, T] and its own strides: each must be a [B, T] view on
// logp's device.
inline void check_bt(const at::Tensor& tensor, const at::Tensor& logp, const char* name) {
  TORCH_CHECK(tensor.dim() == 2 && tensor.size(0) == logp.size(0) && tensor.size(1) == logp.size(1) &&
                  tensor.device() == logp.device(),
              "grpo_loss: ", name, " must be a [B, T] view like logp, on its device");
}

inline void check_float_out(const at::Tensor& out, int64_t numel, const at::Tensor& logp, const char* name) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == numel &&
                  out.device() == logp.device(),
              "grpo_loss: ", name, " must be a contiguous float32 tensor of ", numel, " elements on logp's device");
}

inline void check_inputs(const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                         const std::optional<at::Tensor>& ref_logp, const at::Tensor& advantages,
                         const at::Tensor& mask, const std::optional<at::Tensor>& is_ratio) {
  TORCH_CHECK(logp.dim() == 2, "grpo_loss: logp must be a [B, T] tensor");
  if (present(is_ratio)) {
    check_bt(*is_ratio, logp, "is_ratio");
    TORCH_CHECK(is_ratio->scalar_type() == at::kFloat, "grpo_loss: is_ratio must be a float32 [B, T] view");
  }
  for (const auto* other : {&old_logp, &ref_logp}) {
    if (present(*other)) {
      check_bt(**other, logp, "old_logp / ref_logp");
      TORCH_CHECK((*other)->scalar_type() == logp.scalar_type(), "grpo_loss: old_logp / ref_logp need logp's dtype");
    }
  }
  check_bt(advantages, logp, "advantages");
  TORCH_CHECK(advantages.scalar_type() == at::kFloat, "grpo_loss: advantages must be a float32 [B, T] view");
  check_bt(mask, logp, "mask");
  TORCH_CHECK(mask.scalar_type() == at::kByte, "grpo_loss: mask must be a uint8 [B, T] view");
}

}  // namespace grpo
}  // namespace gtalign_fast
