// The inputs of the grpo_loss C++ CPU kernel (csrc/cpu/grpo_loss.cpp) as strided [B, T] views, and the
// chunks of a row it reads them in: float arrays, in place for contiguous float32, else converted copies in
// L1-resident buffers, so that every dtype and stride shares one vectorised loop.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "vec_math.h"

namespace gtalign_fast {
namespace cpu {
namespace grpo_chunk {

constexpr int64_t kChunk = 512;  // tokens per L1-resident chunk

// A strided [B, T] view: element (b, t) at data[b * row + t * col].
template <typename T>
struct View {
  const T* data;
  int64_t row, col;
};

template <typename T>
View<T> view_of(const at::Tensor& tensor) {
  return {tensor.data_ptr<T>(), tensor.stride(0), tensor.stride(1)};
}

template <typename T>
View<T> optional_view(const std::optional<at::Tensor>& tensor) {
  if (!tensor.has_value() || !tensor->defined()) return {nullptr, 0, 0};
  return view_of<T>(*tensor);
}

template <typename scalar_t>
struct Inputs {
  View<scalar_t> logp, old, ref;
  View<float> adv, is;  // is: the IS ratio (data nullptr: none; time stride 0: one per sequence)
  View<uint8_t> mask;
  int64_t length;
};

// One chunk of a row as float arrays, so that every dtype and stride shares one vectorised loop.
// The input pointers point straight into the tensors where a row is already contiguous float32
// (the usual case: no copy), else into the L1-resident buffers, which then hold a converted copy.
// On-policy, old = logp (log-ratio exactly 0, ratio exactly 1); without ref_logp, ref points to
// ref_buffer, which stays zero.
struct Chunk {
  const float *logp, *old, *ref, *adv, *valid, *is;
  float logp_buffer[kChunk], old_buffer[kChunk], ref_buffer[kChunk], adv_buffer[kChunk], valid_buffer[kChunk];
  float is_buffer[kChunk];
  // Filled by exp_chunk (backward only): token ratio and d ratio / d logp, k3 KL and d kl / d ref.
  float ratio[kChunk], dratio[kChunk], kl[kChunk], dkl_dref[kChunk];
};

// Tokens [start, start + count) of row b as floats: the tensor's own memory when it already is a
// contiguous float row, else a converted copy in `buffer`.
template <typename T>
const float* load_row_chunk(const View<T>& view, int64_t b, int64_t start, int64_t count, float* buffer) {
  const T* src = view.data + b * view.row + start * view.col;
  if constexpr (std::is_same_v<T, float>) {
    if (view.col == 1) return src;
  }
  if (view.col == 0) {  // one value per row (per-sequence advantages, expanded with time stride 0)
    std::fill_n(buffer, count, static_cast<float>(*src));
  } else {
    load_scaled(src, view.col, count, 1.0f, buffer);
  }
  return buffer;
}

inline const float* load_mask_chunk(const View<uint8_t>& view, int64_t b, int64_t start, int64_t count,
                                    float* buffer) {
  const uint8_t* src = view.data + b * view.row + start * view.col;
  const int64_t stride = view.col;
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) buffer[i] = static_cast<float>(src[i * stride] != 0);
  return buffer;
}

template <typename scalar_t>
void load_chunk(const Inputs<scalar_t>& in, int64_t b, int64_t start, int64_t count, bool need_adv, Chunk* c) {
  c->valid = load_mask_chunk(in.mask, b, start, count, c->valid_buffer);
  c->logp = load_row_chunk(in.logp, b, start, count, c->logp_buffer);
  c->old = in.old.data != nullptr ? load_row_chunk(in.old, b, start, count, c->old_buffer) : c->logp;
  c->ref = in.ref.data != nullptr ? load_row_chunk(in.ref, b, start, count, c->ref_buffer) : c->ref_buffer;
  c->adv = need_adv ? load_row_chunk(in.adv, b, start, count, c->adv_buffer) : c->adv_buffer;
  c->is = need_adv && in.is.data != nullptr ? load_row_chunk(in.is, b, start, count, c->is_buffer) : c->is_buffer;
}

}  // namespace grpo_chunk
}  // namespace cpu
}  // namespace gtalign_fast
