// C++ CPU kernel for decode_linear (gtalign_fast/ops/_decode_linear.py): y = x @ W^T (+ b) for a
// skinny x, [M, K] with M <= 16 rows: the shape of every linear layer and the LM head in a decode
// step of a batch of lanes.
//
// Why a kernel of its own: at M = 8 the BLAS paths of PyTorch's CPU linear read the weights at
// 12.5 GB/s ([8, 576] x [576, 1536] took 284 us; issue 24), a third of this machine's copy
// bandwidth, so the decode step of a 135M model spends most of its time there. A decode-shaped
// product does 2 * M flops per weight read: it is a stream over W. This kernel reads each row of
// W (K contiguous floats, nn.Linear's own layout, no repacking) exactly once: a block of 3 rows (AVX2:
// 2) is multiplied with up to 8 rows of x at once (24 vector accumulators), the x rows coming from L1;
// for M > 8 the block is reused from L1 for the next 8 rows. Each accumulator holds 16 (AVX-512) or
// 8 (AVX2) partial sums over k, reduced once per output: summation order differs from a BLAS
// (the results agree to float32 rounding; the tests compare with the float64 reference).
//
// Threads take contiguous runs of W's rows (at::parallel_for). The instruction set is chosen at
// run time (AVX-512F, AVX2 + FMA, or plain C++), so the wheel needs no -march flag.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "decode_linear.h"
#include "isa.h"
#include "lane_sums.h"
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define GTALIGN_X86 1
#endif

namespace gtalign_fast {
namespace cpu {
namespace {

constexpr int64_t kMaxRows = 16;   // M above this is not decode-shaped: F.linear's BLAS path is right there
constexpr int kRowBlock = 8;       // rows of x multiplied with one block of W at once
// Rows of W per block: 3 x 8 accumulators, 3 rows of W and one row of x fill 28 of the 32 zmm
// registers. Each x vector is loaded once and used for 3 FMAs: with 2 rows of W the compiler folded
// x's loads into the FMAs (18 loads per 16 FMAs) and the loads, not the FMAs, set the pace. On the
// Xeon of issue 24 (3 interleaved rounds, 2 threads): a 400 MB W at M = 8 went from 22.1-23.7 to
// 24.5-25.3 GB/s and SmolLM2's decode step from 31.1-33.5 to 29.4-30.7 ms (an L2-resident W in a
// stand-alone test: 13-14 GB/s a core with the folded loads, 21-26 with x in a register).
constexpr int kWeightBlock = 3;
// Parallel work: each thread's share of W's rows has at least kBlocksPerShare blocks (63 rows, 145 KB
// at K = 576), and is taken kBlocksPerChunk blocks (24 rows) at a time (see Share).
constexpr int64_t kBlocksPerShare = 21;
constexpr int64_t kBlocksPerChunk = 8;
// Software prefetches run in two streams ahead of the block being multiplied (one core keeps too
// few misses in flight on its own: measured on the Xeon of issue 24, one thread, 5.6 GB/s without
// prefetches, 9.4-10.5 GB/s with):
// - far: the rows about kPrefetchBytes ahead (at least kPrefetchRows rows), into L2;
// - near: the rows kWeightBlock ahead (the next AVX-512 block), into L1, so that a block starts on
//   lines at hand.
// Measured there (425 MB of [*, 576] weights, 8 rows of x, 2 threads, 3 interleaved rounds; the
// standalone copy of this kernel): one stream of L1 prefetches 16 KB ahead, as before, 15.8-16.8 ms;
// the two streams with the far one 32 KB ahead 13.3-13.6 ms, 64 KB ahead 13.1-13.5 ms, where one
// row of x streams in 13.0 ms. At K = 1536 (down_proj) the two designs are level (16.8-17.5 ms).
constexpr int64_t kPrefetchRows = 4;
constexpr int64_t kPrefetchBytes = 65536;

struct Problem {
  const float* x;
  int64_t ldx;
  const float* w;
  int64_t ldw;
  const float* bias;  // nullptr: none
  float* y;
  int64_t ldy;
  int64_t m, k;
  int64_t n;             // rows of W
  int64_t far_rows;      // see kPrefetchBytes
  const Problem* after;  // the call's next weight (nullptr: none), whose rows follow W's in the stream
};

// The row `ahead` rows after row `row` of W, read on into the weights after it (one call's weights
// multiply the same x, so their rows are as long): the prefetches run on across q / k / v and gate /
// up. nullptr past the last: nothing to fetch.
inline const float* row_ahead(const Problem& p, int64_t row, int64_t ahead) {
  const Problem* weight = &p;
  int64_t at = row + ahead;
  while (weight && at >= weight->n) {
    at -= weight->n;
    weight = weight->after;
  }
  return weight ? weight->w + at * weight->ldw : nullptr;
}

// Plain C++: any CPU. One output at a time, sequential sum over k.
void rows_scalar(const Problem& p, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const float* w = p.w + n * p.ldw;
    for (int64_t m = 0; m < p.m; ++m) {
      const float* x = p.x + m * p.ldx;
      float acc = 0.0f;
      for (int64_t i = 0; i < p.k; ++i) acc += x[i] * w[i];
      p.y[m * p.ldy + n] = acc + (p.bias ? p.bias[n] : 0.0f);
    }
  }
}

#ifdef GTALIGN_X86

// The far and near prefetch rows of the NB rows of W at `n`, on the first pass over x's rows only
// (a second pass, M > 8, finds the block in L1).
template <int NB>
struct Ahead {
  const float* far[NB];
  const float* near[NB];
  Ahead(const Problem& p, int64_t n, int64_t m0) {
    for (int j = 0; j < NB; ++j) {
      far[j] = m0 == 0 ? row_ahead(p, n + j, p.far_rows) : nullptr;
      near[j] = m0 == 0 ? row_ahead(p, n + j, kWeightBlock) : nullptr;
    }
  }
  // Request the 64-byte line at column i of every row ahead.
  void fetch(int64_t i) const {
    for (int j = 0; j < NB; ++j) {
      if (far[j]) _mm_prefetch(reinterpret_cast<const char*>(far[j] + i), _MM_HINT_T1);
      if (near[j]) _mm_prefetch(reinterpret_cast<const char*>(near[j] + i), _MM_HINT_T0);
    }
  }
};

// ---- AVX-512F -------------------------------------------------------------------------------

// acc[j][r] += x[m0 + r] . w[n + j] for the MB rows of x starting at m0 and NB rows of W at n.
template <int NB, int MB>
__attribute__((target("avx512f"))) void block_avx512(const Problem& p, int64_t n, int64_t m0) {
  __m512 acc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < MB; ++r) acc[j][r] = _mm512_setzero_ps();
  const float* w[NB];
  for (int j = 0; j < NB; ++j) w[j] = p.w + (n + j) * p.ldw;
  const float* x = p.x + m0 * p.ldx;
  const Ahead<NB> ahead(p, n, m0);
  int64_t i = 0;
  for (; i + 16 <= p.k; i += 16) {
    ahead.fetch(i);
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_ps(w[j] + i);
    for (int r = 0; r < MB; ++r) {
      __m512 xv = _mm512_loadu_ps(x + r * p.ldx + i);
      asm("" : "+v"(xv));  // x stays in a register for the NB FMAs: no reload folded into each (see kWeightBlock)
      for (int j = 0; j < NB; ++j) acc[j][r] = _mm512_fmadd_ps(xv, wv[j], acc[j][r]);
    }
  }
  if (i < p.k) {  // the K % 16 tail, masked (no read past a row's end)
    const __mmask16 mask = static_cast<__mmask16>((1u << (p.k - i)) - 1u);
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, w[j] + i);
    for (int r = 0; r < MB; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * p.ldx + i);
      for (int j = 0; j < NB; ++j) acc[j][r] = _mm512_fmadd_ps(xv, wv[j], acc[j][r]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const float b = p.bias ? p.bias[n + j] : 0.0f;
    float* y = p.y + m0 * p.ldy + n + j;
    if constexpr (MB == 8) {
      store_sums8(acc[j], b, y, p.ldy);
    } else {
      for (int r = 0; r < MB; ++r) y[r * p.ldy] = _mm512_reduce_add_ps(acc[j][r]) + b;
    }
  }
}

template <int NB>
__attribute__((target("avx512f"))) void rows_of_x_avx512(const Problem& p, int64_t n) {
  for (int64_t m0 = 0; m0 < p.m; m0 += kRowBlock) {
    switch (std::min<int64_t>(kRowBlock, p.m - m0)) {
      case 1: block_avx512<NB, 1>(p, n, m0); break;
      case 2: block_avx512<NB, 2>(p, n, m0); break;
      case 3: block_avx512<NB, 3>(p, n, m0); break;
      case 4: block_avx512<NB, 4>(p, n, m0); break;
      case 5: block_avx512<NB, 5>(p, n, m0); break;
      case 6: block_avx512<NB, 6>(p, n, m0); break;
      case 7: block_avx512<NB, 7>(p, n, m0); break;
      default: block_avx512<NB, 8>(p, n, m0); break;
    }
  }
}

__attribute__((target("avx512f"))) void rows_avx512(const Problem& p, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kWeightBlock <= n_end; n += kWeightBlock) rows_of_x_avx512<kWeightBlock>(p, n);
  for (; n < n_end; ++n) rows_of_x_avx512<1>(p, n);
}
static_assert(kWeightBlock * kRowBlock + kWeightBlock + 1 <= 32, "the AVX-512 block must fit the zmm registers");

// ---- AVX2 + FMA -----------------------------------------------------------------------------

__attribute__((target("avx2,fma"))) inline float reduce_avx2(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
}

// 2 x 4 accumulators of 8 floats (of 16 ymm registers); the K % 8 tail is summed in scalar code.
template <int NB, int MB>
__attribute__((target("avx2,fma"))) void block_avx2(const Problem& p, int64_t n, int64_t m0) {
  __m256 acc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < MB; ++r) acc[j][r] = _mm256_setzero_ps();
  const float* w[NB];
  for (int j = 0; j < NB; ++j) w[j] = p.w + (n + j) * p.ldw;
  const float* x = p.x + m0 * p.ldx;
  const Ahead<NB> ahead(p, n, m0);
  int64_t i = 0;
  for (; i + 8 <= p.k; i += 8) {
    if ((i & 15) == 0) ahead.fetch(i);  // one prefetch per 64-byte line
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm256_loadu_ps(w[j] + i);
    for (int r = 0; r < MB; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * p.ldx + i);
      for (int j = 0; j < NB; ++j) acc[j][r] = _mm256_fmadd_ps(xv, wv[j], acc[j][r]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const float b = p.bias ? p.bias[n + j] : 0.0f;
    for (int r = 0; r < MB; ++r) {
      float sum = reduce_avx2(acc[j][r]);
      for (int64_t t = i; t < p.k; ++t) sum += x[r * p.ldx + t] * w[j][t];
      p.y[(m0 + r) * p.ldy + n + j] = sum + b;
    }
  }
}

template <int NB>
__attribute__((target("avx2,fma"))) void rows_of_x_avx2(const Problem& p, int64_t n) {
  for (int64_t m0 = 0; m0 < p.m; m0 += 4) {
    switch (std::min<int64_t>(4, p.m - m0)) {
      case 1: block_avx2<NB, 1>(p, n, m0); break;
      case 2: block_avx2<NB, 2>(p, n, m0); break;
      case 3: block_avx2<NB, 3>(p, n, m0); break;
      default: block_avx2<NB, 4>(p, n, m0); break;
    }
  }
}

__attribute__((target("avx2,fma"))) void rows_avx2(const Problem& p, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 2 <= n_end; n += 2) rows_of_x_avx2<2>(p, n);  // 2 x 4 accumulators of the 16 ymm registers
  for (; n < n_end; ++n) rows_of_x_avx2<1>(p, n);
}

#endif  // GTALIGN_X86

using RowsKernel = void (*)(const Problem&, int64_t, int64_t);

// The best instruction set this CPU has, or the one GTALIGN_FAST_DECODE_LINEAR_ISA names (isa.h).
RowsKernel pick_kernel() {
  switch (pick_isa("GTALIGN_FAST_DECODE_LINEAR_ISA", "decode_linear", /*avx2_needs_fma=*/true)) {
#ifdef GTALIGN_X86
    case Isa::kAvx512: return rows_avx512;
    case Isa::kAvx2: return rows_avx2;
#endif
    default: return rows_scalar;
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "decode_linear: CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "decode_linear: float32 x and weight expected, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "decode_linear: x [M, K] and weight [N, K] expected, got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "decode_linear: 1 <= M <= ", kMaxRows, " rows, got ",
              x.size(0));
  TORCH_CHECK(x.size(1) == weight.size(1), "decode_linear: x has K = ", x.size(1), ", weight has K = ",
              weight.size(1));
  TORCH_CHECK(x.stride(1) == 1 && weight.stride(1) == 1, "decode_linear: x and weight need contiguous rows");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == weight.size(0) && bias->is_contiguous(),
                "decode_linear: bias must be a contiguous float32 CPU vector of N = ", weight.size(0), " values");
  }
}

}  // namespace

// A contiguous share of the blocks, [front, back). Its own thread takes chunks from the front, in
// order, so that its stream and prefetches run on from one chunk into the next; a thread that has
// finished its own share takes chunks from the back of another's. Both ends live in one atomic word
// (front in the low 32 bits), so a take is one compare-and-swap.
//
// Why not a static split: the two cores of a cloud VM do not run at one speed (a neighbour on a
// core's sibling thread, the VM's own Python on one of them), and with halves fixed in advance the
// faster core waited for the slower one at the end of every product: libgomp's barrier held 8.5% of
// a generation's profile (bench/real_generation_profile.py on SmolLM2).
class alignas(64) Share {
 public:
  void reset(int64_t front, int64_t back) { bounds_.store(pack(front, back), std::memory_order_relaxed); }

  // Up to `chunk` blocks [lo, hi) from the front or the back; false when the share is empty.
  bool take(bool from_front, int64_t chunk, int64_t& lo, int64_t& hi) {
    uint64_t seen = bounds_.load(std::memory_order_relaxed);
    while (true) {
      const int64_t front = static_cast<int64_t>(seen & 0xffffffffu), back = static_cast<int64_t>(seen >> 32);
      if (front >= back) return false;
      const int64_t size = std::min(chunk, back - front);
      lo = from_front ? front : back - size;
      hi = lo + size;
      // The blocks' outputs are published by the parallel region's closing barrier: relaxed is enough.
      if (bounds_.compare_exchange_weak(seen, from_front ? pack(hi, back) : pack(front, lo), std::memory_order_relaxed))
        return true;
    }
  }

 private:
  static uint64_t pack(int64_t front, int64_t back) {
    return static_cast<uint64_t>(front) | static_cast<uint64_t>(back) << 32;
  }
  std::atomic<uint64_t> bounds_{0};
};

// The blocks of kWeightBlock rows of a call's weights, numbered across its jobs (blocks never
// straddle two jobs), and how many threads share them (each at least kBlocksPerShare blocks).
struct Blocks {
  std::vector<int64_t> first{0};  // first[j]: job j's first block; first[count]: every block
  int64_t threads = 1;

  Blocks(const LinearJob* jobs, int count) {
    for (int j = 0; j < count; ++j) first.push_back(first.back() + (jobs[j].n + kWeightBlock - 1) / kWeightBlock);
    threads = std::clamp<int64_t>(total() / kBlocksPerShare, 1, at::get_num_threads());
  }
  int64_t total() const { return first.back(); }
  int64_t share_begin(int64_t owner) const { return total() * owner / threads; }
};

// y_j = x @ W_j^T (+ b_j) for every job j (decode_linear.h): one parallel region over the rows of
// all the weights, so that a layer's q, k and v (or gate and up) products are one pass of threads.
void decode_linears(const float* x, int64_t ldx, int64_t m, int64_t k, const LinearJob* jobs, int count) {
  static const RowsKernel kernel = pick_kernel();
  const Blocks blocks(jobs, count);
  std::vector<Problem> problems(count);
  const int64_t far_rows = std::max<int64_t>(kPrefetchRows, kPrefetchBytes / std::max<int64_t>(1, k * 4));
  for (int j = 0; j < count; ++j) {
    const LinearJob& job = jobs[j];
    problems[j] = Problem{x, ldx, job.w, job.ldw, job.bias, job.y, job.ldy, m, k, job.n, far_rows,
                          j + 1 < count ? &problems[j + 1] : nullptr};
  }
  if (k == 0) {  // an empty sum: y = b
    for (const Problem& p : problems)
      for (int64_t r = 0; r < m; ++r)
        for (int64_t n = 0; n < p.n; ++n) p.y[r * p.ldy + n] = p.bias ? p.bias[n] : 0.0f;
    return;
  }
  TORCH_CHECK(blocks.total() < (int64_t{1} << 32), "decode_linears: ", blocks.total(),
              " blocks of rows, more than a share can hold");
  // Blocks [lo, hi) of the numbering across the jobs. Blocks never straddle two chunks (a split
  // inside one would fall back to 1-row blocks).
  auto run = [&](int64_t lo, int64_t hi) {
    for (int j = 0; j < count; ++j) {
      const int64_t begin = std::max(lo, blocks.first[j]), end = std::min(hi, blocks.first[j + 1]);
      if (begin < end)
        kernel(problems[j], kWeightBlock * (begin - blocks.first[j]),
               std::min(kWeightBlock * (end - blocks.first[j]), problems[j].n));
    }
  };
  const int64_t threads = blocks.threads;
  std::unique_ptr<Share[]> shares(new Share[threads]);
  for (int64_t t = 0; t < threads; ++t) shares[t].reset(blocks.share_begin(t), blocks.share_begin(t + 1));
  // One index per thread (parallel_for gives each of `threads` threads one; run inline, the first
  // index takes every share).
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t owner = begin; owner < end; ++owner) {
      int64_t lo, hi;
      while (shares[owner].take(/*from_front=*/true, kBlocksPerChunk, lo, hi)) run(lo, hi);
      for (int64_t i = 1; i < threads; ++i)
        while (shares[(owner + i) % threads].take(/*from_front=*/false, kBlocksPerChunk, lo, hi)) run(lo, hi);
    }
  });
}

// out[M, N] = x[M, K] @ weight[N, K]^T (+ bias[N]).
void decode_linear_out_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& out) {
  check_inputs(x, weight, bias);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.dim() == 2 &&
                  out.size(0) == x.size(0) && out.size(1) == weight.size(0) && out.stride(1) == 1,
              "decode_linear: out must be a float32 [M, N] CPU tensor with contiguous rows");
  const LinearJob job{weight.data_ptr<float>(), weight.stride(0), bias.has_value() ? bias->data_ptr<float>() : nullptr,
                      weight.size(0), out.data_ptr<float>(), out.stride(0)};
  decode_linears(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), &job, 1);
}

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_inputs(x, weight, bias);
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  decode_linear_out_cpu(x, weight, bias, out);
  return out;
}

at::Tensor decode_linear_meta(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "decode_linear: x [M, K] and weight [N, K] expected, got ", x.sizes(), " and ", weight.sizes());
  return at::empty({x.size(0), weight.size(0)}, x.options());
}

}  // namespace cpu
}  // namespace gtalign_fast

TORCH_LIBRARY_FRAGMENT(gtalign_fast_C, m) {
  m.def("decode_linear_out(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(gtalign_fast_C, CPU, m) {
  m.impl("decode_linear_out", &gtalign_fast::cpu::decode_linear_out_cpu);
  m.impl("decode_linear", &gtalign_fast::cpu::decode_linear_cpu);
}

TORCH_LIBRARY_IMPL(gtalign_fast_C, Meta, m) { m.impl("decode_linear", &gtalign_fast::cpu::decode_linear_meta); }
