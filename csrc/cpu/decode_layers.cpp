// C++ CPU kernel for one decode step of a Llama-family decoder stack (gtalign_fast/sampling/native_decode.py):
// every layer of the model for one token per lane, from the fed tokens' embeddings to the final norm,
// in one call.
//
// Why: with the linear layers on decode_linear (decode_linear.cpp), a decode step of SmolLM2-135M at
// 8 lanes spent about half its time outside the weight stream (issue 24's profile: 26 ms of linear
// products in a 52 ms step): the eager Hugging Face layer runs about 60 small ATen ops per layer (the
// RMSNorms, RoPE, the cache write, the mask, SDPA, SiLU, the residual adds), each a few microseconds
// of dispatch plus the Python around it, for tensors of a few KB. Here a layer is 4 passes over the
// weights (q/k/v together, o, gate/up together, down; decode_linears) and a few loops over
// [lanes, hidden]-sized buffers in between; the attention over the cache runs in parallel over
// (lane, head). torch.compile would be the other way to get there; on this CPU it compiled for
// minutes and ran slower (issue 24), and this kernel ships compiled with the wheel.
//
// The maths is the Hugging Face modules' (LlamaRMSNorm, LlamaAttention with rotate-half RoPE and
// grouped-query attention, LlamaMLP with SiLU, Qwen2's q/k/v biases), in float32, with the cache
// layout of sampling/static_cache.py: keys [lanes, kv_heads, capacity, head_dim] stored after RoPE,
// the step's key and value written at column `column`, and lane r's query attending to the columns
// j <= column with visible[r, j]. Sums run in another order than ATen's (results agree to float32
// rounding; the tests compare with the float64 forward of the same model).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "decode_linear.h"
#include "isa.h"
#include "lane_sums.h"
#include "vec_math.h"
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define GTALIGN_X86 1
#endif

namespace gtalign_fast {
namespace cpu {
namespace {

// The tensors of one layer in the `weights` list, in this order (native_decode.py builds it).
enum Weight { kInputNorm, kQ, kK, kV, kO, kPostNorm, kGate, kUp, kDown, kWeightsPerLayer };
// The optional biases of one layer in the `biases` list.
enum Bias { kBiasQ, kBiasK, kBiasV, kBiasO, kBiasGate, kBiasUp, kBiasDown, kBiasesPerLayer };
constexpr int64_t kMaxRows = 16;  // decode_linear's limit

struct Dims {
  int64_t rows, hidden, heads, kv_heads, head_dim, inter, capacity, column;
  int64_t q_width() const { return heads * head_dim; }
  int64_t kv_width() const { return kv_heads * head_dim; }
};

const float* data_or_null(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// ---------------------------------------------------------------------------------------------
// Input checks: every size the loops below use is checked here, so no input reads out of bounds.

void check_tensor(const at::Tensor& t, at::IntArrayRef sizes, const char* what, at::ScalarType dtype = at::kFloat) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() && t.sizes() == sizes,
              "decode_layers: ", what, " must be a contiguous ", dtype, " CPU tensor of shape ", sizes, ", got ",
              t.scalar_type(), " ", t.sizes(), t.is_contiguous() ? "" : " (not contiguous)", " on ", t.device());
}

Dims check_inputs(const at::Tensor& hidden, at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& biases,
                  at::TensorList keys, at::TensorList values, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& visible, int64_t column, int64_t heads, int64_t kv_heads,
                  const at::Tensor& final_norm) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) >= 1 && hidden.size(0) <= kMaxRows,
              "decode_layers: hidden must be [rows, hidden] with 1 <= rows <= ", kMaxRows, ", got ", hidden.sizes());
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) > 0 && cos.size(1) % 2 == 0,
              "decode_layers: cos must be [rows, head_dim] with an even head_dim, got ", cos.sizes());
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "decode_layers: num_heads (", heads,
              ") must be a positive multiple of num_kv_heads (", kv_heads, ")");
  const int64_t layers = static_cast<int64_t>(keys.size());
  TORCH_CHECK(layers >= 1 && static_cast<int64_t>(values.size()) == layers &&
                  static_cast<int64_t>(weights.size()) == kWeightsPerLayer * layers &&
                  static_cast<int64_t>(biases.size()) == kBiasesPerLayer * layers,
              "decode_layers: per layer ", int(kWeightsPerLayer), " weights, ", int(kBiasesPerLayer),
              " biases, one key and one value buffer; got ", weights.size(), ", ", biases.size(), ", ", keys.size(),
              " and ", values.size());
  TORCH_CHECK(keys[0].dim() == 4, "decode_layers: key buffers must be [lanes, kv_heads, capacity, head_dim], got ",
              keys[0].sizes());
  TORCH_CHECK(weights[kGate].dim() == 2, "decode_layers: gate_proj must be 2-D, got ", weights[kGate].sizes());
  Dims d{hidden.size(0), hidden.size(1), heads, kv_heads, cos.size(1), weights[kGate].size(0), keys[0].size(2), column};
  check_tensor(hidden, {d.rows, d.hidden}, "hidden");
  check_tensor(cos, {d.rows, d.head_dim}, "cos");
  check_tensor(sin, {d.rows, d.head_dim}, "sin");
  check_tensor(visible, {d.rows, d.capacity}, "visible", at::kBool);
  check_tensor(final_norm, {d.hidden}, "final_norm");
  TORCH_CHECK(column >= 0 && column < d.capacity, "decode_layers: column ", column, " outside the cache's ",
              d.capacity, " columns");
  const std::vector<std::vector<int64_t>> weight_sizes = {
      {d.hidden}, {d.q_width(), d.hidden}, {d.kv_width(), d.hidden}, {d.kv_width(), d.hidden},
      {d.hidden, d.q_width()}, {d.hidden}, {d.inter, d.hidden}, {d.inter, d.hidden}, {d.hidden, d.inter}};
  const std::vector<int64_t> bias_sizes = {d.q_width(), d.kv_width(), d.kv_width(), d.hidden, d.inter, d.inter, d.hidden};
  for (int64_t l = 0; l < layers; ++l) {
    for (int w = 0; w < kWeightsPerLayer; ++w) check_tensor(weights[kWeightsPerLayer * l + w], weight_sizes[w], "a layer weight");
    for (int b = 0; b < kBiasesPerLayer; ++b) {
      const c10::optional<at::Tensor> bias = biases.get(kBiasesPerLayer * l + b);
      if (bias.has_value()) check_tensor(*bias, {bias_sizes[b]}, "a layer bias");
    }
    check_tensor(keys[l], {d.rows, d.kv_heads, d.capacity, d.head_dim}, "a key buffer");
    check_tensor(values[l], {d.rows, d.kv_heads, d.capacity, d.head_dim}, "a value buffer");
  }
  return d;
}

// ---------------------------------------------------------------------------------------------
// The element-wise pieces (buffers of [rows, width] floats, row-major)

// out = weight * (x * rsqrt(mean(x^2) + eps)): LlamaRMSNorm's order of operations.
GTALIGN_CPU_CLONES void rms_norm(const float* x, const float* weight, int64_t rows, int64_t n, float eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < n; ++i) squares += xr[i] * xr[i];
    const float scale = 1.0f / std::sqrt(squares / static_cast<float>(n) + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[r * n + i] = weight[i] * (xr[i] * scale);
  }
}

// Rotate-half RoPE in place on `heads` heads per row: v * cos + rotate_half(v) * sin, where
// rotate_half(v) = (-v[half:], v[:half]) and cos / sin [rows, head_dim] hold the row's position.
void rope(float* v, int64_t rows, int64_t heads, int64_t head_dim, const float* cos, const float* sin) {
  const int64_t half = head_dim / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + r * head_dim;
    const float* s = sin + r * head_dim;
    for (int64_t h = 0; h < heads; ++h) {
      float* x = v + (r * heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * c[i] - b * s[i];
        x[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}

// gate = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
GTALIGN_CPU_CLONES void silu_mul(float* gate, const float* up, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.0f + exp_f32(-gate[i])) * up[i];
}

GTALIGN_CPU_CLONES void add_into(float* x, const float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

// dot and axpy over one head (head_dim floats) are inlined into attend_group, and so compiled for
// each of its instruction-set clones (as clones of their own, each call went through the resolver).
GTALIGN_ALWAYS_INLINE float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

GTALIGN_ALWAYS_INLINE void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// ---------------------------------------------------------------------------------------------
// Attention over the cache

// keys/values[r, g, column, :] = the step's k / v of lane r, kv head g.
void store_kv(const Dims& d, const float* k, const float* v, float* keys, float* values) {
  for (int64_t r = 0; r < d.rows; ++r)
    for (int64_t g = 0; g < d.kv_heads; ++g) {
      const int64_t at = ((r * d.kv_heads + g) * d.capacity + d.column) * d.head_dim;
      std::copy_n(k + (r * d.kv_heads + g) * d.head_dim, d.head_dim, keys + at);
      std::copy_n(v + (r * d.kv_heads + g) * d.head_dim, d.head_dim, values + at);
    }
}

// weights[j] = exp(scores[j] - top) for the columns `seen` marks, 0 elsewhere; returns their sum.
GTALIGN_ALWAYS_INLINE float softmax_weights(const float* scores, const bool* seen, int64_t count, float top,
                                            float* weights) {
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < count; ++j) {
    weights[j] = blend(seen[j], exp_f32(scores[j] - top), 0.0f);
    total += weights[j];
  }
  return total;
}

// weights[g] = the softmax of scores[g] over the seen columns and inverse[g] = 1 / its sum, for the
// `group` rows of scores [group, count]; a row that sees no column gets zero weights and inverse 0.
GTALIGN_ALWAYS_INLINE void softmax_rows(const float* scores, const bool* seen, int64_t group, int64_t count,
                                        float* weights, float* inverse) {
  for (int64_t g = 0; g < group; ++g) {
    const float top = *std::max_element(scores + g * count, scores + (g + 1) * count);
    if (top == -kInfF32) {
      std::fill_n(weights + g * count, count, 0.0f);
      inverse[g] = 0.0f;
      continue;
    }
    inverse[g] = 1.0f / softmax_weights(scores + g * count, seen, count, top, weights + g * count);
  }
}

// Request one row of a cache (head_dim floats) ahead of its use, a line at a time.
GTALIGN_ALWAYS_INLINE void prefetch_row(const float* row, int64_t floats) {
  constexpr int64_t kLine = 16;  // floats per 64-byte line
  for (int64_t i = 0; i < floats; i += kLine) __builtin_prefetch(row + i);
}

// The `group` query heads q [group, head_dim] that share one kv head: o[g] = softmax_j(scaling *
// q[g] . keys[j]) @ values[j] over the columns j <= column that `seen` marks (keys / values: that kv
// head's [capacity, head_dim] rows). Each key and value row is read once for the whole group.
// scratch: (2 * (column + 1) + 1) * group floats, and column / 16 + 2 more for attend_group_avx512's
// masks. A head that sees no column gets zeros. next_keys / next_values (or nullptr): the next task's
// rows, prefetched a row at a time alongside this task's.
GTALIGN_CPU_CLONES void attend_group(const float* q, int64_t group, const float* keys, const float* values,
                                     const bool* seen, int64_t column, int64_t head_dim, float scaling, float* scratch,
                                     float* o, const float* next_keys, const float* next_values) {
  const int64_t count = column + 1;
  float* scores = scratch;                  // [group, count]
  float* weights = scratch + group * count;  // [group, count]
  float* inverse = weights + group * count;  // [group]: 1 / the softmax's sum
  for (int64_t j = 0; j < count; ++j) {
    if (next_keys) prefetch_row(next_keys + j * head_dim, head_dim);
    for (int64_t g = 0; g < group; ++g)
      scores[g * count + j] = seen[j] ? scaling * dot(q + g * head_dim, keys + j * head_dim, head_dim) : -kInfF32;
  }
  std::fill_n(o, group * head_dim, 0.0f);
  softmax_rows(scores, seen, group, count, weights, inverse);
  for (int64_t j = 0; j < count; ++j) {
    if (next_values) prefetch_row(next_values + j * head_dim, head_dim);
    if (!seen[j]) continue;
    for (int64_t g = 0; g < group; ++g) axpy(weights[g * count + j], values + j * head_dim, o + g * head_dim, head_dim);
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < head_dim; ++i) o[g * head_dim + i] *= inverse[g];
}

#ifdef GTALIGN_X86

// scores[g * count + j] = scaling * q[g] . keys[j] (or -inf where !seen[j]), 16 columns at a time.
template <int D>
__attribute__((target("avx512f"))) void scores_avx512(const float* q, int64_t group, const float* keys,
                                                     const uint16_t* seen_masks, int64_t count, float scaling,
                                                     float* scores, const float* next_keys) {
  constexpr int64_t kHeadDim = 16 * D;
  const __m512 scale = _mm512_set1_ps(scaling), minus_inf = _mm512_set1_ps(-kInfF32);
  for (int64_t g = 0; g < group; ++g) {
    __m512 qv[D];
    for (int d = 0; d < D; ++d) qv[d] = _mm512_loadu_ps(q + g * kHeadDim + 16 * d);
    for (int64_t j0 = 0; j0 < count; j0 += 16) {
      const int live = static_cast<int>(std::min<int64_t>(16, count - j0));
      const float* k = keys + j0 * kHeadDim;
      if (g == 0 && next_keys) prefetch_row(next_keys + j0 * kHeadDim, live * kHeadDim);
      __m512 acc[16];
      for (int c = 0; c < 16; ++c) {
        if (c < live) {
          acc[c] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k + c * kHeadDim));
          for (int d = 1; d < D; ++d)
            acc[c] = _mm512_fmadd_ps(qv[d], _mm512_loadu_ps(k + c * kHeadDim + 16 * d), acc[c]);
        } else {
          acc[c] = _mm512_setzero_ps();
        }
      }
      const __mmask16 live_mask = static_cast<__mmask16>((1u << live) - 1u);
      const __mmask16 seen_mask = seen_masks[j0 / 16];
      const __m512 s = _mm512_mask_blend_ps(seen_mask, minus_inf, _mm512_mul_ps(scale, sums16(acc)));
      _mm512_mask_storeu_ps(scores + g * count + j0, live_mask, s);
    }
  }
}

// o[first + g] = inverse[first + g] * sum over the seen columns j of weights[first + g][j] * values[j],
// g < GB, accumulated in registers (attend_group's order of operations).
template <int D, int GB>
__attribute__((target("avx512f"))) void mix_avx512(const float* weights, int64_t first, const float* values,
                                                  const bool* seen, int64_t count, const float* inverse, float* o,
                                                  const float* next_values) {
  constexpr int64_t kHeadDim = 16 * D;
  __m512 acc[GB][D];
  for (int g = 0; g < GB; ++g)
    for (int d = 0; d < D; ++d) acc[g][d] = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; ++j) {
    if (next_values) prefetch_row(next_values + j * kHeadDim, kHeadDim);
    if (!seen[j]) continue;
    __m512 v[D];
    for (int d = 0; d < D; ++d) v[d] = _mm512_loadu_ps(values + j * kHeadDim + 16 * d);
    for (int g = 0; g < GB; ++g) {
      const __m512 w = _mm512_set1_ps(weights[(first + g) * count + j]);
      for (int d = 0; d < D; ++d) acc[g][d] = _mm512_fmadd_ps(w, v[d], acc[g][d]);
    }
  }
  for (int g = 0; g < GB; ++g) {
    const __m512 scale = _mm512_set1_ps(inverse[first + g]);
    for (int d = 0; d < D; ++d) _mm512_storeu_ps(o + (first + g) * kHeadDim + 16 * d, _mm512_mul_ps(acc[g][d], scale));
  }
}

// attend_group for head_dim = 16 * D on AVX-512 (its arguments; head_dim is D's): the scores of 16
// columns at a time (one key row's FMAs per column, their sums in one shuffle tree) and the values
// mixed into accumulators held in registers. On the Xeon of issue 24 (a task of SmolLM2's shape,
// 3 heads of 64 over 101 columns, L2-resident) 2.8 us against attend_group's 6.0 us; the portable
// loops reduced each score on its own and kept the outputs in memory. The scores' sums run in
// another order than attend_group's (float32 rounding apart; the mixing keeps its bits).
template <int D>
__attribute__((target("avx512f"))) void attend_group_avx512(const float* q, int64_t group, const float* keys,
                                                           const float* values, const bool* seen, int64_t column,
                                                           int64_t /*head_dim*/, float scaling, float* scratch,
                                                           float* o, const float* next_keys, const float* next_values) {
  const int64_t count = column + 1;
  float* scores = scratch;
  float* weights = scratch + group * count;
  float* inverse = weights + group * count;
  // Bit c of mask i: column 16 * i + c is seen (in the scratch floats after inverse, only ever
  // read and written as uint16_t).
  uint16_t* seen_masks = reinterpret_cast<uint16_t*>(inverse + group);
  for (int64_t j0 = 0; j0 < count; j0 += 16) {
    uint16_t m = 0;
    for (int64_t c = 0; c < 16 && j0 + c < count; ++c) m |= static_cast<uint16_t>(seen[j0 + c]) << c;
    seen_masks[j0 / 16] = m;
  }
  scores_avx512<D>(q, group, keys, seen_masks, count, scaling, scores, next_keys);
  softmax_rows(scores, seen, group, count, weights, inverse);
  constexpr int kMaxHeads = D == 1 ? 4 : 16 / D;  // heads per pass over the values: at most 16 accumulators
  for (int64_t first = 0; first < group; first += kMaxHeads) {
    const float* ahead = first == 0 ? next_values : nullptr;
    switch (std::min<int64_t>(kMaxHeads, group - first)) {
      case 1: mix_avx512<D, 1>(weights, first, values, seen, count, inverse, o, ahead); break;
      case 2: mix_avx512<D, 2>(weights, first, values, seen, count, inverse, o, ahead); break;
      case 3:
        if constexpr (kMaxHeads >= 3) mix_avx512<D, 3>(weights, first, values, seen, count, inverse, o, ahead);
        break;
      default:
        if constexpr (kMaxHeads >= 4) mix_avx512<D, 4>(weights, first, values, seen, count, inverse, o, ahead);
        break;
    }
  }
}

#endif  // GTALIGN_X86

using AttendGroup = void (*)(const float*, int64_t, const float*, const float*, const bool*, int64_t, int64_t, float,
                            float*, float*, const float*, const float*);

// attend_group_avx512 where the CPU has AVX-512 and head_dim is 16, 32, 64 or 128, else the portable
// loops. GTALIGN_FAST_DECODE_LAYERS_ISA=avx2 or scalar forces the portable loops (the tests run
// both; read once per process).
AttendGroup pick_attend_group(int64_t head_dim) {
  static const Isa isa = pick_isa("GTALIGN_FAST_DECODE_LAYERS_ISA", "decode_layers", /*avx2_needs_fma=*/false);
#ifdef GTALIGN_X86
  if (isa == Isa::kAvx512) {
    switch (head_dim) {
      case 16: return attend_group_avx512<1>;
      case 32: return attend_group_avx512<2>;
      case 64: return attend_group_avx512<4>;
      case 128: return attend_group_avx512<8>;
      default: break;
    }
  }
#endif
  return attend_group;
}

// out[r, h] for every lane r and query head h (grouped-query attention: heads h of kv head g =
// h / (heads / kv_heads) are one task, see attend_group). A lane that sees no column gets zeros (only
// a lane fed nothing can, and its output is never read).
//
// Threads take tasks one at a time from a shared counter, each claiming its next task before it
// computes the current one, so that the next task's key and value rows (two short streams whose
// misses would otherwise be paid in full) are prefetched a row at a time alongside the current
// task's (attend_group). Before, each thread had a fixed half of the tasks and prefetched a task's
// rows in one burst ahead of it: the burst stalled once the core's fill buffers were full (the
// prefetch loop held 2.8% of a generation's profile, bench/real_generation_profile.py).
void attention(const Dims& d, const float* q, const float* keys, const float* values, const bool* visible,
               float scaling, float* out) {
  const int64_t group = d.heads / d.kv_heads;
  const int64_t stride = d.capacity * d.head_dim;  // floats of one (lane, kv head)
  const int64_t tasks = d.rows * d.kv_heads;       // task = lane * kv_heads + kv head
  const AttendGroup attend = pick_attend_group(d.head_dim);
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    // scores and weights [group, columns], 1 / sums [group], and a 16-bit seen mask per 16 columns
    std::vector<float> scratch((2 * (d.column + 1) + 1) * group + (d.column + 1) / 16 + 2);
    int64_t task = next_task.fetch_add(1, std::memory_order_relaxed);
    while (task < tasks) {
      const int64_t next = next_task.fetch_add(1, std::memory_order_relaxed);
      const bool ahead = next < tasks;
      const int64_t lane = task / d.kv_heads;
      attend(q + task * group * d.head_dim, group, keys + task * stride, values + task * stride,
             visible + lane * d.capacity, d.column, d.head_dim, scaling, scratch.data(),
             out + task * group * d.head_dim, ahead ? keys + next * stride : nullptr,
             ahead ? values + next * stride : nullptr);
      task = next;
    }
  });
}

LinearJob job(const at::Tensor& weight, const c10::optional<at::Tensor>& bias, float* y) {
  return LinearJob{weight.data_ptr<float>(), weight.size(1), data_or_null(bias), weight.size(0), y, weight.size(0)};
}

}  // namespace

// One decode step through every layer; returns the final-normed hidden state [rows, hidden].
at::Tensor decode_layers_cpu(const at::Tensor& hidden, at::TensorList weights,
                             const c10::List<c10::optional<at::Tensor>>& biases, at::TensorList keys,
                             at::TensorList values, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& visible, int64_t column, int64_t num_heads, int64_t num_kv_heads,
                             double eps, double scaling, const at::Tensor& final_norm) {
  const Dims d = check_inputs(hidden, weights, biases, keys, values, cos, sin, visible, column, num_heads,
                              num_kv_heads, final_norm);
  const int64_t rows = d.rows, width = d.hidden;
  std::vector<float> x(hidden.data_ptr<float>(), hidden.data_ptr<float>() + rows * width);  // the residual stream
  std::vector<float> normed(rows * width), delta(rows * width);
  std::vector<float> q(rows * d.q_width()), k(rows * d.kv_width()), v(rows * d.kv_width()), mixed(rows * d.q_width());
  std::vector<float> gate(rows * d.inter), up(rows * d.inter);
  const float eps_f = static_cast<float>(eps);
  for (size_t l = 0; l < keys.size(); ++l) {
    const at::Tensor* w = &weights[kWeightsPerLayer * l];
    auto bias = [&](int b) { return biases.get(kBiasesPerLayer * l + b); };
    // Attention block
    rms_norm(x.data(), w[kInputNorm].data_ptr<float>(), rows, width, eps_f, normed.data());
    const LinearJob qkv[3] = {job(w[kQ], bias(kBiasQ), q.data()), job(w[kK], bias(kBiasK), k.data()),
                              job(w[kV], bias(kBiasV), v.data())};
    decode_linears(normed.data(), width, rows, width, qkv, 3);
    rope(q.data(), rows, d.heads, d.head_dim, cos.data_ptr<float>(), sin.data_ptr<float>());
    rope(k.data(), rows, d.kv_heads, d.head_dim, cos.data_ptr<float>(), sin.data_ptr<float>());
    store_kv(d, k.data(), v.data(), keys[l].data_ptr<float>(), values[l].data_ptr<float>());
    attention(d, q.data(), keys[l].data_ptr<float>(), values[l].data_ptr<float>(), visible.data_ptr<bool>(),
              static_cast<float>(scaling), mixed.data());
    const LinearJob out_proj = job(w[kO], bias(kBiasO), delta.data());
    decode_linears(mixed.data(), d.q_width(), rows, d.q_width(), &out_proj, 1);
    add_into(x.data(), delta.data(), rows * width);
    // MLP block
    rms_norm(x.data(), w[kPostNorm].data_ptr<float>(), rows, width, eps_f, normed.data());
    const LinearJob gate_up[2] = {job(w[kGate], bias(kBiasGate), gate.data()), job(w[kUp], bias(kBiasUp), up.data())};
    decode_linears(normed.data(), width, rows, width, gate_up, 2);
    silu_mul(gate.data(), up.data(), rows * d.inter);
    const LinearJob down = job(w[kDown], bias(kBiasDown), delta.data());
    decode_linears(gate.data(), d.inter, rows, d.inter, &down, 1);
    add_into(x.data(), delta.data(), rows * width);
  }
  at::Tensor out = at::empty({rows, width}, hidden.options());
  rms_norm(x.data(), final_norm.data_ptr<float>(), rows, width, eps_f, out.data_ptr<float>());
  return out;
}

}  // namespace cpu
}  // namespace gtalign_fast

TORCH_LIBRARY_FRAGMENT(gtalign_fast_C, m) {
  m.def(
      "decode_layers(Tensor hidden, Tensor[] weights, Tensor?[] biases, Tensor(a!)[] keys, Tensor(b!)[] values, "
      "Tensor cos, Tensor sin, Tensor visible, int column, int num_heads, int num_kv_heads, float eps, float scaling, "
      "Tensor final_norm) -> Tensor");
}

TORCH_LIBRARY_IMPL(gtalign_fast_C, CPU, m) { m.impl("decode_layers", &gtalign_fast::cpu::decode_layers_cpu); }
