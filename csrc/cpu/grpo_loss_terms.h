// Per-token terms of the grpo_loss C++ CPU kernel (csrc/cpu/grpo_loss.cpp): the policy objectives (clip,
// SAPO, CISPO, VESPO), the clamped ratio and the k3 KL. Branch-free (selects only) and always inlined, so
// that the chunk loops of grpo_loss.cpp that call them vectorise.
#pragma once

#include <cstdint>

#include "../grpo_loss_common.h"
#include "vec_math.h"

namespace gtalign_fast {
namespace cpu {
namespace grpo_terms {

using namespace gtalign_fast::grpo;  // ClipParams, PolicyTerm, limits (../grpo_loss_common.h)

// GTALIGN_ALWAYS_INLINE (vec_math.h): the per-token helpers must be inlined into the `omp simd`
// loops for those to vectorise.

// 1.0f where c holds, else 0.0f, for the counts in the `omp simd reduction` loops below. Not
// static_cast<float>(c): GCC 12 does vectorise such a loop but then keeps only its scalar copy
// (the vector one lands on a dead path), so the whole reduction ran scalar in every clone.
GTALIGN_ALWAYS_INLINE float indicator(bool c) { return blend(c, 1.0f, 0.0f); }

// Per-token policy loss, d loss / d ratio, and coef_1 = min(ratio, delta). Branch-free (selects
// only), so that the chunk loops below vectorise.
GTALIGN_ALWAYS_INLINE PolicyTerm policy_term(float ratio, float adv, const ClipParams& p) {
  // Selections through blend (vec_math.h), not ?: : GCC turns ?: into branches, which stop vectorisation.
  const float coef_1 = blend(ratio <= p.delta, ratio, p.delta);
  const float gate_1 = indicator(ratio <= p.delta);
  const float coef_2 = clamp_f32(ratio, p.low_bound, p.high_bound);
  const float gate_2 = indicator((ratio >= p.low_bound) & (ratio <= p.high_bound));
  const float s1 = coef_1 * adv, s2 = coef_2 * adv;
  // torch.min splits the gradient evenly between equal arguments (on-policy every token ties).
  const float gate = blend(s1 < s2, gate_1, blend(s1 > s2, gate_2, 0.5f * (gate_1 + gate_2)));
  float loss = -blend(s1 < s2, s1, s2);
  float dloss = -adv * gate;
  // verl's dual clip: the loss of a negative-advantage token is capped at -c * A.
  // Bitwise & on bools, not &&: short-circuits are branches, and branches stop vectorisation.
  const bool dual = p.has_dual_clip & (adv < 0.0f);
  const float cap = -adv * p.dual_clip;
  const bool capped = dual & (loss > cap);
  const bool tie = dual & (loss == cap);
  dloss = blend(capped, 0.0f, blend(tie, 0.5f * dloss, dloss));
  loss = blend(capped, cap, loss);
  return {loss, dloss, coef_1};
}

// TRL's SAPO objective: -sigmoid(tau (r - 1)) * 4 / tau * A, d / d r = -4 A s (1 - s); coef_1 = r (the
// clip metrics keep their meaning of where r leaves [1 - eps_low, 1 + eps_high]).
GTALIGN_ALWAYS_INLINE PolicyTerm sapo_term(float ratio, float adv, const ClipParams& p) {
  const float tau = blend(adv > 0.0f, p.sapo_tau_pos, p.sapo_tau_neg);
  const float s = 1.0f / (1.0f + exp_f32(-tau * (ratio - 1.0f)));
  return {-s * 4.0f / tau * adv, -4.0f * adv * s * (1.0f - s), ratio};
}

// TRL's CISPO objective: -sg(min(r, eps_high)) * A * logp (p.high_bound is eps_high itself). No gradient
// through r (dloss_dratio = 0): its d / d logp, -min(r, eps_high) * A, is cispo_grad; coef_1 = r.
GTALIGN_ALWAYS_INLINE float cispo_grad(float ratio, float adv, const ClipParams& p) {
  return -blend(ratio < p.high_bound, ratio, p.high_bound) * adv;
}

// TRL's VESPO objective: -sg(phi) * A * logp, phi = exp(lambda + k log w - lambda w) of the row's sequence
// weight (p.log_w, p.w: vespo_row), k and lambda the *_pos pair where A >= 0. No gradient through phi: its
// d / d logp, -phi * A, is vespo_grad. An exponent past float's range gives phi = 0 (TRL's nan_to_num of inf).
GTALIGN_ALWAYS_INLINE float vespo_phi(float adv, const ClipParams& p) {
  const bool nonneg = adv >= 0.0f;
  const float k = blend(nonneg, p.vespo_k_pos, p.vespo_k_neg);
  const float lambda = blend(nonneg, p.vespo_lambda_pos, p.vespo_lambda_neg);
  const float x = lambda + k * p.log_w - lambda * p.w;
  return blend(x <= 88.72f, exp_f32(x), 0.0f);  // NaN fails the test too: 0, as TRL's nan_to_num
}

GTALIGN_ALWAYS_INLINE float vespo_grad(float adv, const ClipParams& p) { return -vespo_phi(adv, p) * adv; }

// The policy objective, a template argument so that its branch stays outside the token loops.
constexpr int kClipObjective = 0, kSapoObjective = 1, kCispoObjective = 2, kVespoObjective = 3;

// The objective's direct d / d logp (CISPO's and VESPO's detached weight times A; 0 for the others).
template <int kObjective>
GTALIGN_ALWAYS_INLINE float direct_grad(float ratio, float adv, const ClipParams& p) {
  if constexpr (kObjective == kCispoObjective) return cispo_grad(ratio, adv, p);
  if constexpr (kObjective == kVespoObjective) return vespo_grad(adv, p);
  return 0.0f;
}

template <int kObjective>
GTALIGN_ALWAYS_INLINE PolicyTerm objective_term(float ratio, float adv, float logp, const ClipParams& p) {
  if constexpr (kObjective == kSapoObjective) {
    return sapo_term(ratio, adv, p);
  } else if constexpr (kObjective == kCispoObjective || kObjective == kVespoObjective) {
    return {direct_grad<kObjective>(ratio, adv, p) * logp, 0.0f, ratio};
  } else {
    return policy_term(ratio, adv, p);
  }
}

// exp(clamp(l, -20, 20)) and its derivative w.r.t. l (0 where clamped, torch.clamp's convention).
GTALIGN_ALWAYS_INLINE float clamped_exp(float log_ratio, float* dratio) {
  const float clamped = clamp_f32(log_ratio, -kLogRatioLimit, kLogRatioLimit);
  const float ratio = exp_f32(clamped);
  *dratio = blend((log_ratio >= -kLogRatioLimit) & (log_ratio <= kLogRatioLimit), ratio, 0.0f);
  return ratio;
}

// k3 KL clamp(exp(d) - d - 1, -c, c) with d = clamp(ref - logp, -20, 20), and d kl / d ref
// (c = kl_clamp; +inf: no clamp, TRL's k3).
GTALIGN_ALWAYS_INLINE float k3_term(float logp, float ref, float kl_clamp, float* dkl_dref) {
  const float d = ref - logp;
  const float d_clamped = clamp_f32(d, -kLogRatioLimit, kLogRatioLimit);
  const float e = exp_f32(d_clamped);
  const float kl = e - d_clamped - 1.0f;
  const bool pass = (d >= -kLogRatioLimit) & (d <= kLogRatioLimit) & (kl >= -kl_clamp) & (kl <= kl_clamp);
  *dkl_dref = blend(pass, e - 1.0f, 0.0f);
  return clamp_f32(kl, -kl_clamp, kl_clamp);
}

}  // namespace grpo_terms
}  // namespace cpu
}  // namespace gtalign_fast
