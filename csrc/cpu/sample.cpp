// C++ CPU kernel for sample_ (see kernels/sample.py for the maths, the threshold bisection and
// the layout contract: logits [B, V] with any strides, modified in place; per-row parameters are
// contiguous [B] tensors; biases contiguous [B, K]; outputs contiguous [B]).
//
// Same algorithm and the same noise as the Triton kernel (Philox4x32-10 on (row seed, column),
// bit-for-bit), so both backends draw the same tokens up to float32 rounding of the scores.
// The CPU differs in one way: each thread converts its current row once into a row-sized float
// buffer (y) and a buffer of exp(y - max) (a few hundred KB per thread, never [B, V]), so the
// bisection probes are compare-and-sum loops over L2-resident floats. Rows run in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../sample_common.h"
#include "vec_math.h"

namespace gtalign_fast {
namespace cpu {
namespace {

using namespace gtalign_fast::sample;  // status words (../sample_common.h)

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
// Gumbel noise from u in [2^-25, 1 - 2^-25] lies in [-2.86, 17.33]: a token more than 20.2 below
// the row maximum can never win the draw, so its noise is not computed (exact, with margin).
constexpr float kNoiseReach = 21.0f;
constexpr int64_t kNoiseChunk = 256;

// ---------------------------------------------------------------------------------------------
// Philox4x32-10, first output word, counter (col, 0, 0, 0), key = the seed read as uint64
// (Triton's tl.randint(seed, col)).

static inline uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

static inline uint32_t philox_word(uint64_t seed, uint32_t col) {
  uint32_t c0 = col, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t old_c0 = c0, old_c2 = c2;
    c0 = mulhi32(0xCD9E8D57u, old_c2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, old_c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * old_c2;
    c3 = 0xD2511F53u * old_c0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

static inline float uniform_of(uint32_t word) {
  return (static_cast<float>(word >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

// Gumbel noise -log(-log u) for columns [start, start + count) of one row.
GTALIGN_CPU_CLONES void gumbel_chunk(uint64_t seed, int64_t start, int64_t count, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const float u = uniform_of(philox_word(seed, static_cast<uint32_t>(start + i)));
    out[i] = -log_f32(-log_f32(u));
  }
}

// ---------------------------------------------------------------------------------------------
// Order-preserving int keys of float32 values (see kernels/sample.py).

static inline int64_t key_of(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(float));
  return static_cast<int64_t>(bits ^ ((bits >> 31) & 0x7FFFFFFF));
}

static inline float value_of(int64_t key) {
  const int32_t k32 = static_cast<int32_t>(key);
  const int32_t bits = k32 ^ ((k32 >> 31) & 0x7FFFFFFF);
  float x;
  std::memcpy(&x, &bits, sizeof(float));
  return x;
}

struct Probe {
  int64_t count;
  float mass, v_min, v_max;
};

// Count and mass of y >= t, smallest value >= t, largest value < t.
GTALIGN_CPU_CLONES Probe probe(const float* y, const float* weight, int64_t n, float t) {
  int64_t count = 0;
  float mass = 0.0f, v_min = kPosInf, v_max = kNegInf;
#pragma omp simd reduction(+ : count, mass) reduction(min : v_min) reduction(max : v_max)
  for (int64_t i = 0; i < n; ++i) {
    const bool above = y[i] >= t;
    count += above ? 1 : 0;
    mass += above ? weight[i] : 0.0f;
    v_min = above ? std::min(v_min, y[i]) : v_min;
    v_max = above ? v_max : std::max(v_max, y[i]);
  }
  return {count, mass, v_min, v_max};
}

GTALIGN_CPU_CLONES float max_of(const float* y, int64_t n) {
  float result = kNegInf;
#pragma omp simd reduction(max : result)
  for (int64_t i = 0; i < n; ++i) result = y[i] > result ? y[i] : result;
  return result;
}

// weight[i] = exp(y[i] - m); returns their sum.
GTALIGN_CPU_CLONES float weights_and_sum(const float* y, int64_t n, float m, float* weight) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    weight[i] = exp_f32(y[i] - m);
    sum += weight[i];
  }
  return sum;
}

struct RowParams {
  float inv_t;
  bool greedy;
  int64_t top_k;
  float top_p, log_min_p;
  int64_t forced;
  uint64_t seed;
};

struct RowResult {
  int64_t token;
  float logprob, raw_logprob;
  int32_t status;
};

// The key of the top-k threshold (the k-th largest value), and the mass kept at it.
int64_t top_k_key(const float* y, const float* weight, int64_t n, float m, int64_t k, int64_t lo, float* mass_lo) {
  int64_t hi = key_of(m) + 1;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    const Probe p = probe(y, weight, n, value_of(mid));
    if (p.count >= k) {
      lo = key_of(p.v_min);
      *mass_lo = p.mass;
      if (p.count == k) hi = lo + 1;
    } else {
      hi = key_of(p.v_max) + 1;
    }
  }
  return lo;
}

// The key of the top-p threshold: the largest row value whose mass at or above is >= target.
int64_t top_p_key(const float* y, const float* weight, int64_t n, float m, float target, int64_t lo) {
  int64_t hi = key_of(m) + 1;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    const Probe p = probe(y, weight, n, value_of(mid));
    if (p.mass >= target) {
      lo = key_of(p.v_min);
    } else {
      hi = key_of(p.v_max) + 1;
    }
  }
  return lo;
}

template <typename scalar_t>
RowResult sample_row(scalar_t* row, int64_t stride_v, int64_t n, const RowParams& params, const int64_t* ids,
                     const float* bias, int64_t n_bias, float* y, float* weight, float* noise) {
  const bool is_forced = params.forced >= 0;
  const float forced_z = is_forced ? to_float(row[params.forced * stride_v]) : 0.0f;

  // A. raw statistics of y = z / T (temperature only); NaN / +inf check.
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(row[i * stride_v]) * params.inv_t;
    bad |= (v != v) || v == kPosInf;
    y[i] = v == 0.0f ? 0.0f : v;  // -0.0 -> +0.0: equal values get equal keys
  }
  if (bad) return {0, 0.0f, 0.0f, kStatusBadLogits};
  const float m_raw = max_of(y, n);
  if (m_raw == kNegInf) return {0, 0.0f, 0.0f, kStatusNoFiniteLogit};
  const float raw_lse = m_raw + std::log(weights_and_sum(y, n, m_raw, weight));

  // B. biases in place (remembering the raw values), then the processed statistics.
  std::vector<float> original(static_cast<size_t>(n_bias), 0.0f);
  for (int64_t slot = 0; slot < n_bias; ++slot) {
    const int64_t id = ids[slot];
    if (id < 0) continue;
    original[slot] = to_float(row[id * stride_v]);
    row[id * stride_v] = static_cast<scalar_t>(original[slot] + bias[slot]);
    const float v = to_float(row[id * stride_v]) * params.inv_t;
    y[id] = v == 0.0f ? 0.0f : v;
  }
  const float m = n_bias > 0 ? max_of(y, n) : m_raw;
  if (m == kNegInf) return {0, 0.0f, 0.0f, kStatusNoFiniteLogitAfterBias};
  const float total = weights_and_sum(y, n, m, weight);

  // C, D. thresholds (skipped for forced rows: the kept set is the forced token).
  int64_t lo = key_of(kNegInf);
  float mass_lo = total;
  if (!is_forced && params.top_k > 0 && params.top_k < n) lo = top_k_key(y, weight, n, m, params.top_k, lo, &mass_lo);
  if (!is_forced && params.top_p < 1.0f) lo = top_p_key(y, weight, n, m, params.top_p * mass_lo, lo);
  const float tau = value_of(lo);

  // E. kept mask, kept mass, Gumbel-max draw, write-back.
  float kept_mass = 0.0f, best_score = kNegInf, best_y = 0.0f, best_z = 0.0f;
  int64_t best_index = 0;
  const float reach = m - kNoiseReach;
  for (int64_t start = 0; start < n; start += kNoiseChunk) {
    const int64_t count = std::min(kNoiseChunk, n - start);
    if (!params.greedy && !is_forced) gumbel_chunk(params.seed, start, count, noise);
    for (int64_t i = start; i < start + count; ++i) {
      const float v = y[i];
      const bool keep = is_forced ? i == params.forced : (v >= tau && v - m >= params.log_min_p);
      if (keep) {
        kept_mass += weight[i];
        const float score = params.greedy || is_forced ? v : (v < reach ? kNegInf : v + noise[i - start]);
        if (score > best_score) {  // strict: ties keep the lowest index
          best_score = score;
          best_index = i;
          best_y = v;
          best_z = to_float(row[i * stride_v]);  // the biased logit, before the write-back below
        }
      }
      row[i * stride_v] = static_cast<scalar_t>(keep ? v : kNegInf);
    }
  }
  const int64_t token = is_forced ? params.forced : best_index;
  float raw_z = is_forced ? forced_z : best_z;
  // A biased token's raw logit is its value from before the bias.
  for (int64_t slot = 0; slot < n_bias && !is_forced; ++slot) {
    if (ids[slot] == token) raw_z = original[slot];
  }
  const float logprob = is_forced ? 0.0f : best_y - m - std::log(kept_mass);
  return {token, logprob, raw_z * params.inv_t - raw_lse, kStatusOk};
}

void check_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.dim() == 1 && t.numel() == n, "sample_: ", name,
              " must be a contiguous ", dtype, " tensor of ", n, " elements");
}

void sample_cpu(at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                const at::Tensor& min_p, const at::Tensor& forced, const at::Tensor& seeds,
                const std::optional<at::Tensor>& bias_ids, const std::optional<at::Tensor>& bias_values,
                at::Tensor& tokens, at::Tensor& logprobs, at::Tensor& raw_logprobs, at::Tensor& status) {
  TORCH_CHECK(logits.dim() == 2, "sample_: logits must be [B, V]");
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  check_vector(temperature, batch, at::kFloat, "temperature");
  check_vector(top_k, batch, at::kLong, "top_k");
  check_vector(top_p, batch, at::kFloat, "top_p");
  check_vector(min_p, batch, at::kFloat, "min_p");
  check_vector(forced, batch, at::kLong, "forced");
  check_vector(seeds, batch, at::kLong, "seeds");
  check_vector(tokens, batch, at::kLong, "tokens");
  check_vector(logprobs, batch, at::kFloat, "logprobs");
  check_vector(raw_logprobs, batch, at::kFloat, "raw_logprobs");
  check_vector(status, batch, at::kInt, "status");
  const bool has_bias = bias_ids.has_value() && bias_ids->defined() && bias_ids->size(1) > 0;
  int64_t n_bias = 0;
  if (has_bias) {
    TORCH_CHECK(bias_values.has_value() && bias_values->defined(), "sample_: bias_values missing");
    n_bias = bias_ids->size(1);
    TORCH_CHECK(bias_ids->scalar_type() == at::kLong && bias_ids->is_contiguous() && bias_ids->dim() == 2 &&
                    bias_ids->size(0) == batch,
                "sample_: bias_ids must be contiguous int64 [B, K]");
    TORCH_CHECK(bias_values->scalar_type() == at::kFloat && bias_values->is_contiguous() &&
                    bias_values->sizes() == bias_ids->sizes(),
                "sample_: bias_values must be contiguous float32 [B, K]");
  }
  if (batch == 0) return;
  // The ids the row loop indexes the logits with (forced tokens, bias ids) are in [-1, V): a pre-pass
  // over the [B] and [B, K] ids, so a direct call of the registered op cannot write outside a row.
  {
    const int64_t* f = forced.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK_INDEX(f[b] >= -1 && f[b] < vocab, "sample_: forced token ", f[b], " of row ", b,
                        " is neither -1 (none) nor in [0, ", vocab, ")");
    }
    if (has_bias) {
      const int64_t* ids = bias_ids->data_ptr<int64_t>();
      for (int64_t i = 0; i < batch * n_bias; ++i) {
        TORCH_CHECK_INDEX(ids[i] >= -1 && ids[i] < vocab, "sample_: bias id ", ids[i], " of row ", i / n_bias,
                          " is neither -1 (padding) nor in [0, ", vocab, ")");
      }
    }
  }
  const float* t_ptr = temperature.data_ptr<float>();
  const int64_t* k_ptr = top_k.data_ptr<int64_t>();
  const float* p_ptr = top_p.data_ptr<float>();
  const float* min_p_ptr = min_p.data_ptr<float>();
  const int64_t* forced_ptr = forced.data_ptr<int64_t>();
  const int64_t* seed_ptr = seeds.data_ptr<int64_t>();
  const int64_t* ids_ptr = has_bias ? bias_ids->data_ptr<int64_t>() : nullptr;
  const float* bias_ptr = has_bias ? bias_values->data_ptr<float>() : nullptr;
  int64_t* token_out = tokens.data_ptr<int64_t>();
  float* logprob_out = logprobs.data_ptr<float>();
  float* raw_out = raw_logprobs.data_ptr<float>();
  int32_t* status_out = status.data_ptr<int32_t>();
  const int64_t stride_b = logits.stride(0), stride_v = logits.stride(1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_cpu", [&] {
    scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> y(vocab), weight(vocab), noise(kNoiseChunk);
      for (int64_t b = begin; b < end; ++b) {
        RowParams params;
        params.greedy = t_ptr[b] == 0.0f;
        params.inv_t = 1.0f / (params.greedy ? 1.0f : t_ptr[b]);
        params.top_k = k_ptr[b];
        params.top_p = p_ptr[b];
        params.log_min_p = min_p_ptr[b] > 0.0f ? std::log(min_p_ptr[b]) : kNegInf;
        params.forced = forced_ptr[b];
        params.seed = static_cast<uint64_t>(seed_ptr[b]);
        const RowResult result =
            sample_row<scalar_t>(base + b * stride_b, stride_v, vocab, params, has_bias ? ids_ptr + b * n_bias : nullptr,
                                 has_bias ? bias_ptr + b * n_bias : nullptr, n_bias, y.data(), weight.data(),
                                 noise.data());
        token_out[b] = result.token;
        logprob_out[b] = result.logprob;
        raw_out[b] = result.raw_logprob;
        status_out[b] = result.status;
      }
    });
  });
}

// The noise sample_ draws, for tests: out[b, j] = u(seeds[b], j).
void sample_uniform_cpu(const at::Tensor& seeds, at::Tensor& out) {
  TORCH_CHECK(seeds.scalar_type() == at::kLong && seeds.is_contiguous() && seeds.dim() == 1,
              "sample_uniform: seeds must be contiguous int64 [B]");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == seeds.size(0),
              "sample_uniform: out must be contiguous float32 [B, V]");
  const int64_t vocab = out.size(1);
  const int64_t* seed_ptr = seeds.data_ptr<int64_t>();
  float* out_ptr = out.data_ptr<float>();
  for (int64_t b = 0; b < seeds.size(0); ++b) {
    for (int64_t j = 0; j < vocab; ++j) {
      out_ptr[b * vocab + j] = uniform_of(philox_word(static_cast<uint64_t>(seed_ptr[b]), static_cast<uint32_t>(j)));
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace gtalign_fast

TORCH_LIBRARY_FRAGMENT(gtalign_fast_C, m) {
  m.def(
      "sample(Tensor(a!) logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor forced, "
      "Tensor seeds, Tensor? bias_ids, Tensor? bias_values, Tensor(b!) tokens, Tensor(c!) logprobs, "
      "Tensor(d!) raw_logprobs, Tensor(e!) status) -> ()");
  m.def("sample_uniform(Tensor seeds, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(gtalign_fast_C, CPU, m) {
  m.impl("sample", &gtalign_fast::cpu::sample_cpu);
  m.impl("sample_uniform", &gtalign_fast::cpu::sample_uniform_cpu);
}
