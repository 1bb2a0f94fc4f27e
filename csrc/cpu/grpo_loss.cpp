// C++ CPU kernels for grpo_loss (see kernels/grpo_loss.py for the maths, the row_stats columns
// and the layout contract: per-token inputs are strided [B, T] views, advantages float32 (time
// stride 0 when per sequence), mask uint8; dlogp / dref contiguous [B, T]).
//
// Forward: sequences run in parallel (OpenMP), each walked once (twice at sequence level) in
// chunks read as float arrays (in place for contiguous float32, else converted into small
// L1-resident buffers), so every dtype and stride shares one branch-free `omp simd` loop; then a
// serial reduction over the B rows gives the weights, loss and metrics. Backward: one pass per sequence, same chunking. Derivatives follow torch's conventions (clamp passes the
// gradient on the closed interval, min splits it evenly on ties), as in the Triton kernels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "../device_checks_common.h"
#include "../grpo_loss_common.h"
#include "grpo_loss_chunk.h"
#include "grpo_loss_terms.h"
#include "vec_math.h"

namespace gtalign_fast {
namespace cpu {
namespace {

using namespace gtalign_fast::grpo;  // row_stats columns, modes, metrics, limits, ClipParams (../grpo_loss_common.h)
using namespace grpo_terms;          // the per-token terms (grpo_loss_terms.h)
using namespace grpo_chunk;          // Inputs, Chunk, load_chunk, kChunk (grpo_loss_chunk.h)

// The per-token terms (policy objectives, ratio, k3): grpo_loss_terms.h; the inputs' views and the chunks
// they are read in (kChunk tokens): grpo_loss_chunk.h.

struct RowSums {
  float loss = 0, tokens = 0, low = 0, high = 0, kl = 0, ratio = 0, dpg = 0;
};

// The exponentials of one chunk (ratio and k3) and their derivatives, for the backward, in a
// loop of their own (the forward computes them inside its reduction loop instead).
GTALIGN_CPU_CLONES void exp_chunk(Chunk* c, int64_t count, float ref_on, float kl_clamp) {
  const float *logp = c->logp, *old = c->old, *ref = c->ref;  // locals: see forward_chunk_body
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    float dratio, dkl_dref;
    c->ratio[i] = clamped_exp(logp[i] - old[i], &dratio);
    c->dratio[i] = dratio;
    c->kl[i] = ref_on * k3_term(logp[i], ref[i], kl_clamp, &dkl_dref);
    c->dkl_dref[i] = ref_on * dkl_dref;
  }
}

// Sums of one chunk of a row, exponentials included (one pass over the chunk, no ratio / kl
// arrays). kSeqLevel: every token uses the sequence's ratio (no per-token exp). kRef: ref_logp
// was given (without it the k3 exp is skipped and the KL is 0). No run-time flag inside the
// loop (GCC keeps a scalar fallback for loops with invariant branches). kBiasKl: TRL's bias-corrected
// KL (k3 * r), only with kRef. kObjective: the policy objective. kIs: an IS ratio weights the policy term.
template <bool kSeqLevel, bool kRef, bool kBiasKl, int kObjective, bool kIs>
GTALIGN_ALWAYS_INLINE void forward_chunk_body(const Chunk& c, int64_t count, const ClipParams params,
                                              float seq_ratio, RowSums* sums) {
  const ClipParams p = params;  // a local copy: loads through a reference inside the loop block vectorisation
  // The same for the chunk's pointers: read through `c` inside the loop, GCC keeps it scalar.
  const float *logp = c.logp, *old = c.old, *ref = c.ref, *adv_in = c.adv, *valid_in = c.valid, *is_in = c.is;
  float loss = 0, tokens = 0, low = 0, high = 0, kl_sum = 0, ratio_sum = 0, dpg_sum = 0;
#pragma omp simd reduction(+ : loss, tokens, low, high, kl_sum, ratio_sum, dpg_sum)
  for (int64_t i = 0; i < count; ++i) {
    const bool valid = valid_in[i] != 0.0f;
    float unused;
    const float ratio = kSeqLevel ? seq_ratio : clamped_exp(logp[i] - old[i], &unused);
    const float k3 = kRef ? k3_term(logp[i], ref[i], p.kl_clamp, &unused) : 0.0f;
    const float kl = kBiasKl ? k3 * ratio : k3;  // TRL's bias correction: k3 * r
    const float adv = adv_in[i];
    const PolicyTerm term = objective_term<kObjective>(ratio, adv, logp[i], p);
    const float weight = kIs ? is_in[i] : 1.0f;  // the IS ratio of the policy term (TRL's vLLM correction)
    loss += blend(valid, weight * term.loss + p.beta * kl, 0.0f);
    tokens += indicator(valid);
    kl_sum += blend(valid, kl, 0.0f);
    ratio_sum += blend(valid, ratio, 0.0f);
    // Only the sequence level needs d loss / d r (with the bias correction, beta * k3 is part of it).
    if (kSeqLevel) dpg_sum += blend(valid, weight * term.dloss_dratio + (kBiasKl ? p.beta * k3 : 0.0f), 0.0f);
    low += indicator(valid & (term.coef_1 < p.low_bound) & (adv < 0.0f));
    if constexpr (kObjective == kVespoObjective) {
      high += blend(valid, vespo_phi(adv, p), 0.0f);  // the high slot holds VESPO's phi sum (TRL's metric)
    } else {
      high += indicator(valid & (term.coef_1 > p.high_bound) & (adv > 0.0f));
    }
  }
  sums->loss += loss;
  sums->tokens += tokens;
  sums->low += low;
  sums->high += high;
  sums->kl += kl_sum;
  sums->ratio += ratio_sum;
  sums->dpg += dpg_sum;
}

// The objective's instantiation (the branches are outside the loop).
template <bool kSeqLevel, bool kRef, bool kBiasKl, bool kIs>
GTALIGN_ALWAYS_INLINE void forward_chunk_weighted(const Chunk& c, int64_t count, const ClipParams& p,
                                                  float seq_ratio, RowSums* sums) {
  if (p.cispo) {
    forward_chunk_body<kSeqLevel, kRef, kBiasKl, kCispoObjective, kIs>(c, count, p, seq_ratio, sums);
  } else if (p.sapo) {
    forward_chunk_body<kSeqLevel, kRef, kBiasKl, kSapoObjective, kIs>(c, count, p, seq_ratio, sums);
  } else {
    forward_chunk_body<kSeqLevel, kRef, kBiasKl, kClipObjective, kIs>(c, count, p, seq_ratio, sums);
  }
}

// VESPO takes the IS ratio into its sequence weight (row_params), the other objectives as a weight.
template <bool kSeqLevel, bool kRef, bool kBiasKl>
GTALIGN_ALWAYS_INLINE void forward_chunk_objective(const Chunk& c, int64_t count, const ClipParams& p,
                                                   float seq_ratio, RowSums* sums) {
  if (p.vespo) {
    forward_chunk_body<kSeqLevel, kRef, kBiasKl, kVespoObjective, false>(c, count, p, seq_ratio, sums);
  } else if (p.has_is) {
    forward_chunk_weighted<kSeqLevel, kRef, kBiasKl, true>(c, count, p, seq_ratio, sums);
  } else {
    forward_chunk_weighted<kSeqLevel, kRef, kBiasKl, false>(c, count, p, seq_ratio, sums);
  }
}

// The ref and bias-correction branches, outside the loop (the KL's bias correction needs ref_logp).
template <bool kSeqLevel>
GTALIGN_ALWAYS_INLINE void forward_chunk_kl(const Chunk& c, int64_t count, const ClipParams& p, bool has_ref,
                                            float seq_ratio, RowSums* sums) {
  if (!has_ref) {
    forward_chunk_objective<kSeqLevel, false, false>(c, count, p, seq_ratio, sums);
  } else if (p.bias_kl) {
    forward_chunk_objective<kSeqLevel, true, true>(c, count, p, seq_ratio, sums);
  } else {
    forward_chunk_objective<kSeqLevel, true, false>(c, count, p, seq_ratio, sums);
  }
}

// The instantiations behind two multi-versioned entry points.
GTALIGN_CPU_CLONES void forward_chunk_token(const Chunk& c, int64_t count, const ClipParams& p, bool has_ref,
                                            RowSums* sums) {
  forward_chunk_kl<false>(c, count, p, has_ref, 1.0f, sums);
}

GTALIGN_CPU_CLONES void forward_chunk_sequence(const Chunk& c, int64_t count, const ClipParams& p, bool has_ref,
                                               float seq_ratio, RowSums* sums) {
  forward_chunk_kl<true>(c, count, p, has_ref, seq_ratio, sums);
}

// Sum of the masked log-ratios of one chunk, and its token count (sequence level, first pass).
GTALIGN_CPU_CLONES void log_ratio_chunk(const Chunk& c, int64_t count, float* sum_out, float* count_out) {
  const float *logp = c.logp, *old = c.old, *valid_in = c.valid;  // locals: see forward_chunk_body
  float sum = 0, tokens = 0;
#pragma omp simd reduction(+ : sum, tokens)
  for (int64_t i = 0; i < count; ++i) {
    const bool valid = valid_in[i] != 0.0f;
    sum += blend(valid, logp[i] - old[i], 0.0f);
    tokens += indicator(valid);
  }
  *sum_out += sum;
  *count_out += tokens;
}

// Sum of the masked log-ratios of one chunk, each clamped to [-20, 20] (VESPO's sequence weight, TRL's).
GTALIGN_CPU_CLONES void clamped_log_ratio_chunk(const Chunk& c, int64_t count, float* sum_out) {
  const float *logp = c.logp, *old = c.old, *valid_in = c.valid;  // locals: see forward_chunk_body
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) {
    sum += blend(valid_in[i] != 0.0f, clamp_f32(logp[i] - old[i], -kLogRatioLimit, kLogRatioLimit), 0.0f);
  }
  *sum_out += sum;
}

// TRL's log of an IS ratio in VESPO's sequence weight: clamp(log(x), ln 1e-8, 20).
inline float clamped_log(float x) { return std::min(std::max(std::log(x), kVespoMinLogWeight), kLogRatioLimit); }

// The params of row b: with VESPO, its sequence weight (one pass over the row); else p itself.
template <typename scalar_t>
ClipParams row_params(const Inputs<scalar_t>& in, int64_t b, const ClipParams& p, Chunk* c) {
  ClipParams row = p;
  if (!p.vespo) return row;
  float sum = 0.0f;
  const bool is_tokens = in.is.data != nullptr && in.is.col != 0;  // per token (else per sequence, or none)
  for (int64_t start = 0; start < in.length; start += kChunk) {
    const int64_t count = std::min(kChunk, in.length - start);
    load_chunk(in, b, start, count, is_tokens, c);
    clamped_log_ratio_chunk(*c, count, &sum);
    if (is_tokens) {  // TRL: log w += sum_t clamp(log is_t, ln 1e-8, 20) (masked-out tokens skipped here)
      for (int64_t i = 0; i < count; ++i) sum += c->valid[i] != 0.0f ? clamped_log(c->is[i]) : 0.0f;
    }
  }
  if (in.is.data != nullptr && !is_tokens) sum += clamped_log(in.is.data[b * in.is.row]);  // once per sequence
  vespo_row(sum, &row);
  return row;
}

// GSPO's ratio of row b (exp of the masked mean log-ratio, clamped) and its derivative: one pass over the row.
template <typename scalar_t>
float sequence_ratio(const Inputs<scalar_t>& in, int64_t b, Chunk* c, float* dratio) {
  float lr_sum = 0.0f, tokens = 0.0f;
  for (int64_t start = 0; start < in.length; start += kChunk) {
    const int64_t count = std::min(kChunk, in.length - start);
    load_chunk(in, b, start, count, false, c);
    log_ratio_chunk(*c, count, &lr_sum, &tokens);
  }
  return clamped_exp(lr_sum / std::max(tokens, 1.0f), dratio);
}

template <typename scalar_t>
void forward_row(const Inputs<scalar_t>& in, int64_t b, const ClipParams& params, bool seq_level, bool row_metrics,
                 Chunk* c, float* stats) {
  const ClipParams p = row_params(in, b, params, c);
  float seq_ratio = 1.0f, seq_dratio = 1.0f;
  if (seq_level) seq_ratio = sequence_ratio(in, b, c, &seq_dratio);
  RowSums sums;
  for (int64_t start = 0; start < in.length; start += kChunk) {
    const int64_t count = std::min(kChunk, in.length - start);
    load_chunk(in, b, start, count, true, c);
    const bool has_ref = in.ref.data != nullptr;
    if (seq_level) {
      forward_chunk_sequence(*c, count, p, has_ref, seq_ratio, &sums);
    } else {
      forward_chunk_token(*c, count, p, has_ref, &sums);
    }
  }
  float low = sums.low, high = sums.high, ratio = sums.ratio;
  float region = low + high;  // exclusive: they need opposite signs of A
  if (row_metrics) {
    // Per-sequence ratio and advantage: one 0/1 indicator per row, as TRL's GSPO metrics.
    const float adv = in.adv.data[b * in.adv.row];
    const float coef_1 = std::min(seq_ratio, p.delta);
    low = (coef_1 < p.low_bound && adv < 0.0f) ? 1.0f : 0.0f;
    high = (coef_1 > p.high_bound && adv > 0.0f) ? 1.0f : 0.0f;
    region = std::max(low, high);
    ratio = seq_ratio;
    if (p.vespo) high = vespo_phi(adv, p);  // TRL's phi_seq (the other metrics are not reported for VESPO)
  }
  stats[kLossSum] = sums.loss;
  stats[kTokens] = sums.tokens;
  stats[kLow] = low;
  stats[kHigh] = high;
  stats[kRegion] = region;
  stats[kKlSum] = sums.kl;
  stats[kRatioSum] = ratio;
  stats[kSeqGrad] = seq_level ? sums.dpg * seq_dratio / std::max(sums.tokens, 1.0f) : 0.0f;
}

// Serial reduction over the B rows: metrics, per-row weights of the aggregation mode, the loss.
void finalize(const float* stats, int64_t batch, int64_t mode, double const_weight, const float* num_items,
              bool row_metrics, float* loss, float* metrics, float* weights) {
  double tokens = 0, low = 0, high = 0, region = 0, kl = 0, ratio = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const float* s = stats + b * kNumStats;
    tokens += s[kTokens];
    low += s[kLow];
    high += s[kHigh];
    region += s[kRegion];
    kl += s[kKlSum];
    ratio += s[kRatioSum];
  }
  const double total_tokens = std::max(tokens, 1.0);
  const double metric_count = row_metrics ? static_cast<double>(batch) : total_tokens;
  metrics[kMetricLow] = static_cast<float>(low / metric_count);
  metrics[kMetricHigh] = static_cast<float>(high / metric_count);
  metrics[kMetricRegion] = static_cast<float>(region / metric_count);
  metrics[kMetricKl] = static_cast<float>(kl / total_tokens);
  metrics[kMetricRatio] = static_cast<float>(ratio / metric_count);

  double shared_weight = const_weight;
  if (mode == kTokenMean) shared_weight = 1.0 / total_tokens;
  if (mode == kNormaliserTensor) shared_weight = 1.0 / static_cast<double>(*num_items);
  double total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const float* s = stats + b * kNumStats;
    const double weight =
        mode == kSeqMean ? 1.0 / (static_cast<double>(batch) * std::max<double>(s[kTokens], 1.0)) : shared_weight;
    weights[b] = static_cast<float>(weight);
    total += weight * s[kLossSum];
  }
  *loss = static_cast<float>(total);
}

// d loss / d logp (and d loss / d ref) of one chunk, scaled by the row's weight times the
// incoming gradient; masked tokens get exactly 0. Same structure as forward_chunk_body.
// With the bias correction (k3 * r): d / d logp gains beta * k3 * dr / dlogp (at sequence level already
// inside seq_grad) and the k3 gradient is weighted by r (seq_ratio at sequence level). kIs: the IS ratio
// weights the policy term (at sequence level seq_grad has it already).
template <bool kSeqLevel, int kObjective, bool kBiasKl, bool kIs>
GTALIGN_ALWAYS_INLINE void backward_chunk_body(const Chunk& c, int64_t count, const ClipParams params,
                                               float seq_grad, float seq_ratio, float row_scale, float* dlogp,
                                               float* dref) {
  const ClipParams p = params;  // local copies, as in forward_chunk_body
  const float *adv = c.adv, *valid_in = c.valid, *logp = c.logp, *is_in = c.is;
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const bool valid = valid_in[i] != 0.0f;
    const float ratio = kSeqLevel ? seq_ratio : c.ratio[i];
    const float kl_dratio = kBiasKl ? p.beta * c.kl[i] : 0.0f;
    const float weight = kIs ? is_in[i] : 1.0f;
    float policy_grad =
        kSeqLevel ? seq_grad
                  : (weight * objective_term<kObjective>(ratio, adv[i], logp[i], p).dloss_dratio + kl_dratio) *
                        c.dratio[i];
    // CISPO's and VESPO's gradients go to logp directly (their weights are detached), at either level.
    policy_grad += weight * direct_grad<kObjective>(ratio, adv[i], p);
    const float kl_grad = p.beta * c.dkl_dref[i] * (kBiasKl ? ratio : 1.0f);
    dlogp[i] = blend(valid, row_scale * (policy_grad - kl_grad), 0.0f);
    dref[i] = blend(valid, row_scale * kl_grad, 0.0f);
  }
}

// The bias-correction and IS branches outside the loop (bias_kl: TRL's k3 * r, with ref_logp given; VESPO
// has the IS ratio in its sequence weight, not as a weight).
template <bool kSeqLevel, int kObjective, bool kIs>
GTALIGN_ALWAYS_INLINE void backward_chunk_weighted(const Chunk& c, int64_t count, const ClipParams& p, bool bias_kl,
                                                   float seq_grad, float seq_ratio, float row_scale, float* dlogp,
                                                   float* dref) {
  if (bias_kl) {
    backward_chunk_body<kSeqLevel, kObjective, true, kIs>(c, count, p, seq_grad, seq_ratio, row_scale, dlogp, dref);
  } else {
    backward_chunk_body<kSeqLevel, kObjective, false, kIs>(c, count, p, seq_grad, seq_ratio, row_scale, dlogp, dref);
  }
}

template <bool kSeqLevel, int kObjective>
GTALIGN_ALWAYS_INLINE void backward_chunk_kl(const Chunk& c, int64_t count, const ClipParams& p, bool bias_kl,
                                             float seq_grad, float seq_ratio, float row_scale, float* dlogp,
                                             float* dref) {
  if (kObjective != kVespoObjective && p.has_is) {
    backward_chunk_weighted<kSeqLevel, kObjective, true>(c, count, p, bias_kl, seq_grad, seq_ratio, row_scale, dlogp,
                                                         dref);
  } else {
    backward_chunk_weighted<kSeqLevel, kObjective, false>(c, count, p, bias_kl, seq_grad, seq_ratio, row_scale,
                                                          dlogp, dref);
  }
}

GTALIGN_CPU_CLONES void backward_chunk_token(const Chunk& c, int64_t count, const ClipParams& p, bool bias_kl,
                                             float row_scale, float* dlogp, float* dref) {
  if (p.vespo) {
    backward_chunk_kl<false, kVespoObjective>(c, count, p, bias_kl, 0.0f, 1.0f, row_scale, dlogp, dref);
  } else if (p.cispo) {
    backward_chunk_kl<false, kCispoObjective>(c, count, p, bias_kl, 0.0f, 1.0f, row_scale, dlogp, dref);
  } else if (p.sapo) {
    backward_chunk_kl<false, kSapoObjective>(c, count, p, bias_kl, 0.0f, 1.0f, row_scale, dlogp, dref);
  } else {
    backward_chunk_kl<false, kClipObjective>(c, count, p, bias_kl, 0.0f, 1.0f, row_scale, dlogp, dref);
  }
}

GTALIGN_CPU_CLONES void backward_chunk_sequence(const Chunk& c, int64_t count, const ClipParams& p, bool bias_kl,
                                                float seq_grad, float seq_ratio, float row_scale, float* dlogp,
                                                float* dref) {
  // Only CISPO and VESPO have a per-token term besides seq_grad (the clip's and SAPO's are all in it).
  if (p.vespo) {
    backward_chunk_kl<true, kVespoObjective>(c, count, p, bias_kl, seq_grad, seq_ratio, row_scale, dlogp, dref);
  } else if (p.cispo) {
    backward_chunk_kl<true, kCispoObjective>(c, count, p, bias_kl, seq_grad, seq_ratio, row_scale, dlogp, dref);
  } else {
    backward_chunk_kl<true, kClipObjective>(c, count, p, bias_kl, seq_grad, seq_ratio, row_scale, dlogp, dref);
  }
}

template <typename scalar_t>
void backward_row(const Inputs<scalar_t>& in, int64_t b, const ClipParams& params, bool seq_level, float row_scale,
                  float seq_grad, Chunk* c, float* dlogp_buffer, float* dref_buffer, scalar_t* dlogp, scalar_t* dref) {
  // The bias-corrected KL of a sequence-level row weights each token's k3 gradient by the row's ratio;
  // CISPO's per-token gradient reads it too.
  const ClipParams p = row_params(in, b, params, c);
  const bool bias_kl = p.bias_kl && in.ref.data != nullptr;
  float seq_ratio = 1.0f, unused;
  if (seq_level && (bias_kl || p.cispo)) seq_ratio = sequence_ratio(in, b, c, &unused);
  for (int64_t start = 0; start < in.length; start += kChunk) {
    const int64_t count = std::min(kChunk, in.length - start);
    load_chunk(in, b, start, count, true, c);
    exp_chunk(c, count, in.ref.data != nullptr ? 1.0f : 0.0f, p.kl_clamp);
    scalar_t* dlogp_out = dlogp + b * in.length + start;
    scalar_t* dref_out = dref != nullptr ? dref + b * in.length + start : nullptr;
    // float32 gradients go straight into the outputs; other dtypes through the buffers.
    float* dlogp_chunk = dlogp_buffer;
    float* dref_chunk = dref_buffer;
    if constexpr (std::is_same_v<scalar_t, float>) {
      dlogp_chunk = dlogp_out;
      if (dref_out != nullptr) dref_chunk = dref_out;
    }
    if (seq_level) {
      backward_chunk_sequence(*c, count, p, bias_kl, seq_grad, seq_ratio, row_scale, dlogp_chunk, dref_chunk);
    } else {
      backward_chunk_token(*c, count, p, bias_kl, row_scale, dlogp_chunk, dref_chunk);
    }
    if constexpr (!std::is_same_v<scalar_t, float>) {
      store_as(dlogp_chunk, count, dlogp_out);
      if (dref_out != nullptr) store_as(dref_chunk, count, dref_out);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points (the layout checks: ../grpo_loss_common.h)

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                             const std::optional<at::Tensor>& ref_logp, const at::Tensor& advantages,
                             const at::Tensor& mask, const std::optional<at::Tensor>& is_ratio) {
  return {view_of<scalar_t>(logp), optional_view<scalar_t>(old_logp), optional_view<scalar_t>(ref_logp),
          view_of<float>(advantages), optional_view<float>(is_ratio), view_of<uint8_t>(mask), logp.size(1)};
}

void grpo_loss_fwd_cpu(const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                       const std::optional<at::Tensor>& ref_logp, const at::Tensor& advantages, const at::Tensor& mask,
                       const std::optional<at::Tensor>& num_items, const std::optional<at::Tensor>& is_ratio,
                       c10::ArrayRef<double> params, bool row_metrics, int64_t mode,
                       double const_weight, at::Tensor& loss, at::Tensor& metrics, at::Tensor& row_stats,
                       at::Tensor& row_weights, const std::optional<at::Tensor>& error_flag,
                       const std::optional<at::Tensor>& /*finalize_counter: the CUDA kernel's one-launch path*/) {
  // The error flag (gtalign_fast/ops/_device_checks.py) is for the CUDA kernel, which cannot raise
  // without a host sync; here a bad num_items raises directly (the flag is left untouched).
  error_flag_data(error_flag, logp, "grpo_loss");
  check_inputs(logp, old_logp, ref_logp, advantages, mask, is_ratio);
  const int64_t batch = logp.size(0);
  check_float_out(loss, 1, logp, "loss");
  check_float_out(metrics, kNumMetrics, logp, "metrics");
  check_float_out(row_stats, batch * kNumStats, logp, "row_stats");
  check_float_out(row_weights, batch, logp, "row_weights");
  TORCH_CHECK(mode != kNormaliserTensor || (num_items.has_value() && num_items->numel() == 1 &&
                                            num_items->scalar_type() == at::kFloat),
              "grpo_loss: num_items must be a float32 tensor of one element");
  if (mode == kNormaliserTensor) {
    const float n = num_items->data_ptr<float>()[0];
    TORCH_CHECK_VALUE(n > 0.0f && std::isfinite(n), "grpo_loss: num_items_in_batch must be finite and > 0, got ", n);
  }
  ClipParams clip = clip_params(params);
  clip.has_is = is_ratio.has_value() && is_ratio->defined();
  const bool seq_level = seq_level_of(params);
  float* stats = row_stats.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logp.scalar_type(), "grpo_loss_fwd_cpu", [&] {
    const Inputs<scalar_t> in = make_inputs<scalar_t>(logp, old_logp, ref_logp, advantages, mask, is_ratio);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(in.length, 1));
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      std::unique_ptr<Chunk> chunk(new Chunk());  // zeroed: absent inputs read as 0
      for (int64_t b = begin; b < end; ++b) {
        forward_row(in, b, clip, seq_level, row_metrics, chunk.get(), stats + b * kNumStats);
      }
    });
  });
  finalize(stats, batch, mode, const_weight, mode == kNormaliserTensor ? num_items->data_ptr<float>() : nullptr,
           row_metrics, loss.data_ptr<float>(), metrics.data_ptr<float>(), row_weights.data_ptr<float>());
}

void grpo_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& row_weights, const at::Tensor& row_stats,
                       const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                       const std::optional<at::Tensor>& ref_logp, const at::Tensor& advantages, const at::Tensor& mask,
                       const std::optional<at::Tensor>& is_ratio, c10::ArrayRef<double> params, at::Tensor& dlogp,
                       at::Tensor& dref) {
  check_inputs(logp, old_logp, ref_logp, advantages, mask, is_ratio);
  const int64_t batch = logp.size(0), length = logp.size(1);
  check_float_out(grad_loss, 1, logp, "grad_loss");
  check_float_out(row_weights, batch, logp, "row_weights");
  check_float_out(row_stats, batch * kNumStats, logp, "row_stats");
  TORCH_CHECK(dlogp.is_contiguous() && dlogp.scalar_type() == logp.scalar_type() && dlogp.numel() == batch * length,
              "grpo_loss: dlogp must be contiguous [B, T] in logp's dtype");
  const bool ref_grad = dref.numel() > 0;
  if (ref_grad) {
    TORCH_CHECK(ref_logp.has_value() && ref_logp->defined(), "grpo_loss: a ref_logp gradient needs ref_logp");
    TORCH_CHECK(dref.is_contiguous() && dref.scalar_type() == logp.scalar_type() && dref.numel() == batch * length,
                "grpo_loss: dref must be contiguous [B, T] in logp's dtype");
  }
  ClipParams clip = clip_params(params);
  clip.has_is = is_ratio.has_value() && is_ratio->defined();
  const bool seq_level = seq_level_of(params);
  const float grad = grad_loss.data_ptr<float>()[0];
  const float* weights = row_weights.data_ptr<float>();
  const float* stats = row_stats.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logp.scalar_type(), "grpo_loss_bwd_cpu", [&] {
    const Inputs<scalar_t> in = make_inputs<scalar_t>(logp, old_logp, ref_logp, advantages, mask, is_ratio);
    scalar_t* dlogp_data = dlogp.data_ptr<scalar_t>();
    scalar_t* dref_data = ref_grad ? dref.data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(length, 1));
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      std::unique_ptr<Chunk> chunk(new Chunk());  // zeroed: absent inputs read as 0
      std::vector<float> dlogp_buffer(kChunk), dref_buffer(kChunk);
      for (int64_t b = begin; b < end; ++b) {
        backward_row(in, b, clip, seq_level, grad * weights[b], stats[b * kNumStats + kSeqGrad], chunk.get(),
                     dlogp_buffer.data(), dref_buffer.data(), dlogp_data, dref_data);
      }
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace gtalign_fast

TORCH_LIBRARY_FRAGMENT(gtalign_fast_C, m) {
  m.def(
      "grpo_loss_fwd(Tensor logp, Tensor? old_logp, Tensor? ref_logp, Tensor advantages, Tensor mask, "
      "Tensor? num_items, Tensor? is_ratio, float[] params, bool row_metrics, int mode, float const_weight, "
      "Tensor(a!) loss, Tensor(b!) metrics, "
      "Tensor(c!) row_stats, Tensor(d!) row_weights, Tensor(e!)? error_flag=None, "
      "Tensor(f!)? finalize_counter=None) -> ()");
  m.def(
      "grpo_loss_bwd(Tensor grad_loss, Tensor row_weights, Tensor row_stats, Tensor logp, Tensor? old_logp, "
      "Tensor? ref_logp, Tensor advantages, Tensor mask, Tensor? is_ratio, float[] params, Tensor(a!) dlogp, "
      "Tensor(b!) dref) -> ()");
}

TORCH_LIBRARY_IMPL(gtalign_fast_C, CPU, m) {
  m.impl("grpo_loss_fwd", &gtalign_fast::cpu::grpo_loss_fwd_cpu);
  m.impl("grpo_loss_bwd", &gtalign_fast::cpu::grpo_loss_bwd_cpu);
}
