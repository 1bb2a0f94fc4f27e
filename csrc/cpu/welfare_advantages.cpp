// C++ CPU kernel for welfare_advantages (see kernels/welfare_advantages.py for the maths and the
// layout contract): Cobb-Douglas welfare W = exp(alpha log U + (1 - alpha) log L), per-group
// statistics over the valid (non-NaN) rewards, advantages and, optionally, their scatter over the
// tokens of each completion, in one call.
//
// Groups are contiguous row ranges, given by a fixed size or by offsets [G+1]. Threads take
// contiguous runs of groups: W of a whole run is computed in one vectorised loop (the log and exp
// below are branch-free so `#pragma omp simd` vectorises them), then each group is reduced and
// written while its rows are still in L1. scale = "batch" needs the std of the whole batch before
// any advantage is written, so it runs in two parallel passes with a merge in between.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "../welfare_advantages_common.h"
#include "vec_math.h"

namespace gtalign_fast {
namespace cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Rows per unit of parallel work: enough that a thread's share amortises the fork.
constexpr int64_t kRowsPerTask = 4096;

// Scale modes, std and 1 / (std + eps), argument checks (../welfare_advantages_common.h).
using namespace gtalign_fast::welfare;

// W for rows [begin, end); NaN for a missing reward, -inf for an invalid one (negative or
// infinite U or L: the Python side turns that into a ValueError). A zero exponent drops its
// factor (0^0 = 1), so alpha = 0 gives W = L and alpha = 1 gives W = U.
GTALIGN_CPU_CLONES void welfare_rows(const float* user, const float* llm, int64_t begin, int64_t end, float alpha,
                                     float* welfare) {
  const float beta = 1.0f - alpha;
  const bool use_user = alpha > 0.0f, use_llm = beta > 0.0f;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float u = user[i], l = llm[i];
    // Both logs are always computed; a zero exponent then selects 0 instead of 0 * log(0) = NaN.
    const float log_u = blend(use_user, alpha * log_f32(u), 0.0f);
    const float log_l = blend(use_llm, beta * log_f32(l), 0.0f);
    const float w = exp_f32(log_u + log_l);
    const bool missing = (u != u) | (l != l);
    const bool invalid = (u < 0.0f) | (l < 0.0f) | (u == kInf) | (l == kInf);
    welfare[i] = blend(invalid, -kInf, blend(missing, kNaN, w));
  }
}

// Statistics of the valid rewards of one group (or of a whole batch, after merging).
struct Moments {
  double count = 0.0, mean = 0.0, m2 = 0.0;  // m2 = sum of squared deviations from the mean

  // Chan et al.'s parallel merge: exact for any split of the values.
  void merge(const Moments& other) {
    if (other.count == 0.0) return;
    const double total = count + other.count;
    const double delta = other.mean - mean;
    mean += delta * other.count / total;
    m2 += other.m2 + delta * delta * count * other.count / total;
    count = total;
  }
};

struct GroupResult {
  Moments moments;
  bool all_equal;
};

// Sums of the valid rewards of rows [begin, end); VECTOR picks the simd loop (long groups) or a
// plain one (short groups, where vector prologues and horizontal reductions cost more than they save).
template <bool VECTOR>
static inline void accumulate(const float* welfare, int64_t begin, int64_t end, double& sum, double& count,
                              float& lowest, float& highest) {
#pragma omp simd reduction(+ : sum, count) reduction(min : lowest) reduction(max : highest) if (VECTOR)
  for (int64_t i = begin; i < end; ++i) {
    const float w = welfare[i];
    const bool valid = w == w;
    sum += valid ? static_cast<double>(w) : 0.0;
    count += valid ? 1.0 : 0.0;
    lowest = std::min(lowest, valid ? w : kInf);
    highest = std::max(highest, valid ? w : -kInf);
  }
}

template <bool VECTOR>
static inline double squared_deviations(const float* welfare, int64_t begin, int64_t end, double mean) {
  double m2 = 0.0;
#pragma omp simd reduction(+ : m2) if (VECTOR)
  for (int64_t i = begin; i < end; ++i) {
    const float w = welfare[i];
    // Missing rewards contribute 0 (selected on bits and by a 0/1 factor: no branch).
    const double d = static_cast<double>(blend(w == w, w, 0.0f)) - mean;
    m2 += d * d * static_cast<double>(static_cast<int32_t>(w == w));
  }
  return m2;
}

// Groups at most this long are reduced with plain loops.
constexpr int64_t kShortGroup = 32;

// Two passes over the group's welfare (mean, then squared deviations: no cancellation), in float64.
static inline GroupResult reduce_group(const float* welfare, int64_t begin, int64_t end) {
  double sum = 0.0, count = 0.0;
  float lowest = kInf, highest = -kInf;
  const bool short_group = end - begin <= kShortGroup;
  if (short_group) {
    accumulate<false>(welfare, begin, end, sum, count, lowest, highest);
  } else {
    accumulate<true>(welfare, begin, end, sum, count, lowest, highest);
  }
  GroupResult result;
  result.moments.count = count;
  result.moments.mean = count > 0.0 ? sum / count : 0.0;
  // Exact comparison: std == 0 iff every valid reward is the same number (vacuous below 2).
  result.all_equal = count < 2.0 || lowest == highest;
  if (!result.all_equal) {
    result.moments.m2 = short_group ? squared_deviations<false>(welfare, begin, end, result.moments.mean)
                                    : squared_deviations<true>(welfare, begin, end, result.moments.mean);
  }
  return result;
}

// advantages[i] = (W_i - mean) * inv_denominator; 0 for missing rewards and all-equal groups.
template <bool VECTOR>
static inline void centre_and_scale(const float* welfare, int64_t begin, int64_t end, float mean,
                                    float inv_denominator, float* advantages) {
#pragma omp simd if (VECTOR)
  for (int64_t i = begin; i < end; ++i) {
    const float w = welfare[i];
    advantages[i] = (blend(w == w, w, mean) - mean) * inv_denominator;  // missing: (mean - mean) * inv = 0
  }
}

static inline void write_advantages(const float* welfare, int64_t begin, int64_t end, float mean,
                                    float inv_denominator, bool zero, float* advantages) {
  if (zero) {
    std::fill(advantages + begin, advantages + end, 0.0f);
  } else if (end - begin <= kShortGroup) {
    centre_and_scale<false>(welfare, begin, end, mean, inv_denominator, advantages);
  } else {
    centre_and_scale<true>(welfare, begin, end, mean, inv_denominator, advantages);
  }
}

// The optional [N, T] mask, read in place with its strides; rows == nullptr when there is none.
template <typename mask_t>
struct TokenScatter {
  const mask_t* mask;
  int64_t stride0, stride1, tokens;
  float* token_advantages;  // contiguous [N, T]

  // token_advantages[i, t] = advantages[i] where mask[i, t] != 0, else 0, for rows [begin, end).
  void rows(const float* advantages, int64_t begin, int64_t end) const {
    if (mask == nullptr) return;
    const mask_t zero = static_cast<mask_t>(0);
    for (int64_t i = begin; i < end; ++i) {
      const float value = advantages[i];
      const mask_t* mask_row = mask + i * stride0;
      float* out_row = token_advantages + i * tokens;
      if (stride1 == 1) {
#pragma omp simd
        for (int64_t t = 0; t < tokens; ++t) out_row[t] = mask_row[t] != zero ? value : 0.0f;
      } else {
        for (int64_t t = 0; t < tokens; ++t) out_row[t] = mask_row[t * stride1] != zero ? value : 0.0f;
      }
    }
  }
};

struct GroupLayout {
  const int64_t* offsets;  // [G + 1], or nullptr for fixed-size groups
  int64_t group_size, count;
  int64_t start(int64_t g) const { return offsets != nullptr ? offsets[g] : g * group_size; }
};

struct Outputs {
  float *welfare, *advantages, *group_mean, *group_std;
  bool* group_all_equal;
};

static inline void store_group(const GroupResult& result, bool unbiased, int64_t g, const Outputs& out) {
  out.group_mean[g] = static_cast<float>(result.moments.mean);
  out.group_std[g] = result.all_equal ? 0.0f : static_cast<float>(std_of(result.moments.count, result.moments.m2, unbiased));
  out.group_all_equal[g] = result.all_equal;
}

int64_t groups_per_task(const GroupLayout& groups, int64_t n_rows) {
  const int64_t average_size = std::max<int64_t>(1, n_rows / std::max<int64_t>(1, groups.count));
  return std::max<int64_t>(1, kRowsPerTask / average_size);
}

// Groups [g_begin, g_end): W, statistics and (unless scale = "batch") advantages. With
// `batch` set, their moments are merged into it. One multi-versioned call per run of groups:
// the per-group helpers are inlined into each instruction-set clone.
GTALIGN_CPU_CLONES void groups_pass(const float* user, const float* llm, const GroupLayout& groups, int64_t g_begin,
                                    int64_t g_end, float alpha, int64_t scale_mode, double eps, bool unbiased,
                                    const Outputs& out, Moments* batch) {
  welfare_rows(user, llm, groups.start(g_begin), groups.start(g_end), alpha, out.welfare);
  for (int64_t g = g_begin; g < g_end; ++g) {
    const GroupResult result = reduce_group(out.welfare, groups.start(g), groups.start(g + 1));
    store_group(result, unbiased, g, out);
    if (batch != nullptr) batch->merge(result.moments);
  }
  if (batch != nullptr) return;
  // A second loop, so that the divisions of one group overlap with the work of the next
  // (statistics and advantages of a group form one long dependency chain).
  for (int64_t g = g_begin; g < g_end; ++g) {
    const float inv = inverse_denominator(scale_mode, out.group_std[g], eps);
    write_advantages(out.welfare, groups.start(g), groups.start(g + 1), out.group_mean[g], inv,
                     out.group_all_equal[g] || inv == 0.0f, out.advantages);
  }
}

// scale = "batch", second pass: advantages of groups [g_begin, g_end) with the batch's 1 / (std + eps).
GTALIGN_CPU_CLONES void batch_advantages_pass(const GroupLayout& groups, int64_t g_begin, int64_t g_end, float inv,
                                              const Outputs& out) {
  for (int64_t g = g_begin; g < g_end; ++g) {
    write_advantages(out.welfare, groups.start(g), groups.start(g + 1), out.group_mean[g], inv,
                     out.group_all_equal[g] || inv == 0.0f, out.advantages);
  }
}

template <typename mask_t>
void run_group_or_none(const float* user, const float* llm, const GroupLayout& groups, int64_t n_rows, float alpha,
                       int64_t scale_mode, double eps, bool unbiased, const Outputs& out,
                       const TokenScatter<mask_t>& scatter) {
  at::parallel_for(0, groups.count, groups_per_task(groups, n_rows), [&](int64_t g_begin, int64_t g_end) {
    groups_pass(user, llm, groups, g_begin, g_end, alpha, scale_mode, eps, unbiased, out, nullptr);
    scatter.rows(out.advantages, groups.start(g_begin), groups.start(g_end));
  });
}

template <typename mask_t>
void run_batch(const float* user, const float* llm, const GroupLayout& groups, int64_t n_rows, float alpha,
               double eps, bool unbiased, const Outputs& out, const TokenScatter<mask_t>& scatter) {
  const int64_t grain = groups_per_task(groups, n_rows);
  Moments batch;
  std::mutex batch_lock;
  at::parallel_for(0, groups.count, grain, [&](int64_t g_begin, int64_t g_end) {
    Moments local;
    groups_pass(user, llm, groups, g_begin, g_end, alpha, kScaleBatch, eps, unbiased, out, &local);
    const std::lock_guard<std::mutex> guard(batch_lock);
    batch.merge(local);
  });
  const float inv = inverse_denominator(kScaleBatch, std_of(batch.count, batch.m2, unbiased), eps);
  at::parallel_for(0, groups.count, grain, [&](int64_t g_begin, int64_t g_end) {
    batch_advantages_pass(groups, g_begin, g_end, inv, out);
    scatter.rows(out.advantages, groups.start(g_begin), groups.start(g_end));
  });
}

// A negative or infinite reward gets W = -inf, which makes its group's mean non-finite: scan the
// [G] means (cheap), and only then the inputs, to raise a ValueError naming the first bad reward.
void raise_on_bad_rewards(const float* user, const float* llm, int64_t n_rows, const float* group_mean,
                          int64_t n_groups) {
  bool suspicious = false;
  for (int64_t g = 0; g < n_groups; ++g) suspicious |= !std::isfinite(group_mean[g]);
  if (!suspicious) return;
  const char* names[2] = {"user", "llm"};
  const float* values[2] = {user, llm};
  for (int k = 0; k < 2; ++k) {
    for (int64_t i = 0; i < n_rows; ++i) {
      const float v = values[k][i];
      TORCH_CHECK_VALUE(!(v < 0.0f || std::isinf(v)), "welfare_advantages: ", names[k], "[", i, "] = ", v,
                        "; rewards must be finite and >= 0 (Cobb-Douglas welfare is defined on non-negative "
                        "rewards; use NaN for a missing reward)");
    }
  }
}

void welfare_advantages_cpu(const at::Tensor& user, const at::Tensor& llm, const std::optional<at::Tensor>& offsets,
                            int64_t group_size, double alpha, int64_t scale_mode, double eps, bool unbiased,
                            const std::optional<at::Tensor>& mask, at::Tensor& welfare, at::Tensor& advantages,
                            at::Tensor& group_mean, at::Tensor& group_std, at::Tensor& group_all_equal,
                            at::Tensor& token_advantages) {
  const int64_t n_rows = user.numel();
  const int64_t n_groups = check_inputs(user, llm, offsets, group_size, scale_mode);
  const bool has_offsets = offsets.has_value() && offsets->defined();
  check_outputs(welfare, advantages, group_mean, group_std, group_all_equal, n_rows, n_groups);
  const bool has_mask = mask.has_value() && mask->defined();
  if (has_mask) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == n_rows, "welfare_advantages: mask must be [N, T]");
    check_output(token_advantages, n_rows * mask->size(1), at::kFloat, "token_advantages");
  }
  if (n_rows == 0 && n_groups == 0) return;

  const GroupLayout groups{has_offsets ? offsets->data_ptr<int64_t>() : nullptr, group_size, n_groups};
  const Outputs out{welfare.data_ptr<float>(), advantages.data_ptr<float>(), group_mean.data_ptr<float>(),
                    group_std.data_ptr<float>(), group_all_equal.data_ptr<bool>()};
  const float* user_ptr = user.data_ptr<float>();
  const float* llm_ptr = llm.data_ptr<float>();
  const float alpha_f = static_cast<float>(alpha);
  // Without a mask the dispatch still picks one instantiation (bool) whose scatter does nothing.
  const at::ScalarType mask_type = has_mask ? mask->scalar_type() : at::kBool;
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask_type, "welfare_advantages_cpu", [&] {
    TokenScatter<scalar_t> scatter{nullptr, 0, 0, 0, nullptr};
    if (has_mask && mask->size(1) > 0) {
      scatter = {mask->data_ptr<scalar_t>(), mask->stride(0), mask->stride(1), mask->size(1),
                 token_advantages.data_ptr<float>()};
    }
    if (scale_mode == kScaleBatch) {
      run_batch(user_ptr, llm_ptr, groups, n_rows, alpha_f, eps, unbiased, out, scatter);
    } else {
      run_group_or_none(user_ptr, llm_ptr, groups, n_rows, alpha_f, scale_mode, eps, unbiased, out, scatter);
    }
  });
  raise_on_bad_rewards(user_ptr, llm_ptr, n_rows, out.group_mean, n_groups);
}

}  // namespace
}  // namespace cpu
}  // namespace gtalign_fast

TORCH_LIBRARY_FRAGMENT(gtalign_fast_C, m) {
  m.def(
      "welfare_advantages(Tensor user, Tensor llm, Tensor? offsets, int group_size, float alpha, int scale_mode, "
      "float eps, bool unbiased, Tensor? mask, Tensor(a!) welfare, Tensor(b!) advantages, Tensor(c!) group_mean, "
      "Tensor(d!) group_std, Tensor(e!) group_all_equal, Tensor(f!) token_advantages) -> ()");
}

TORCH_LIBRARY_IMPL(gtalign_fast_C, CPU, m) {
  m.impl("welfare_advantages", &gtalign_fast::cpu::welfare_advantages_cpu);
}
