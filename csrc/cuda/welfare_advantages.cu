// CUDA kernel for welfare_advantages (see kernels/welfare_advantages.py for the maths and the
// layout contract): Cobb-Douglas welfare, per-group statistics over the valid (non-NaN) rewards,
// advantages and their scatter over each completion's tokens, in one launch.
//
// A team of TEAM threads owns one group at a time (a warp for small groups, the whole block for
// large ones) and walks the groups with a grid-stride loop; the 1-D grid over blocks allows G in
// the millions. Every thread of a team reads back only the elements it wrote itself, except in the
// token scatter, which follows a team barrier. scale = "batch" needs the batch std before any
// advantage is written; a grid has no barrier, so that mode runs as a single block that visits
// every group twice (one launch; slower at very large N).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <type_traits>

#include "../device_checks_common.h"
#include "../welfare_advantages_common.h"

namespace gtalign_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Groups at most this long (on average) get a warp each; longer ones the whole block.
constexpr int64_t kWarpTeamMaxAverage = 64;

// Scale modes, std and 1 / (std + eps), argument checks (../welfare_advantages_common.h).
using namespace gtalign_fast::welfare;

template <typename mask_t>
struct Params {
  const float* __restrict__ user;
  const float* __restrict__ llm;
  const int64_t* __restrict__ offsets;  // nullptr: fixed-size groups
  int64_t group_size, n_groups, n_rows;
  float alpha;
  double eps;
  int64_t scale_mode;
  bool unbiased;
  const mask_t* __restrict__ mask;  // nullptr: no token scatter
  int64_t tokens, mask_stride0, mask_stride1;
  float* __restrict__ welfare;
  float* __restrict__ advantages;
  float* __restrict__ group_mean;
  float* __restrict__ group_std;
  bool* __restrict__ group_all_equal;
  float* __restrict__ token_advantages;
  int* error_flag;  // int32 [1]: bits of ErrorCode (../device_checks_common.h); nullptr: not reported

  __device__ int64_t start(int64_t g) const { return offsets != nullptr ? offsets[g] : g * group_size; }
  // Rows [begin, end) of group g, clamped into [0, n_rows] with begin <= end, so no offsets (a
  // direct call of the low-level op may pass anything) make a thread read or write outside the
  // [N] / [N, T] buffers. A no-op for valid offsets; invalid ones (not 0 first, N last,
  // non-decreasing) set kErrGroupOffsets in the error flag, which the wrapper reports.
  __device__ void rows(int64_t g, int64_t& begin, int64_t& end) const {
    const int64_t first = start(g), last = start(g + 1);
    if (offsets != nullptr && error_flag != nullptr &&
        (last < first || (g == 0 && first != 0) || (g == n_groups - 1 && last != n_rows))) {
      atomicOr(error_flag, static_cast<int>(kErrGroupOffsets));
    }
    begin = first < 0 ? 0 : (first > n_rows ? n_rows : first);
    end = last < begin ? begin : (last > n_rows ? n_rows : last);
  }
};

// W in log space; NaN for a missing reward; -inf for a negative or infinite one (which sets the
// error flag). A zero exponent drops its factor (0^0 = 1).
__device__ __forceinline__ float cobb_douglas(float u, float l, float alpha) {
  const float log_u = alpha > 0.0f ? alpha * logf(u) : 0.0f;
  const float log_l = alpha < 1.0f ? (1.0f - alpha) * logf(l) : 0.0f;
  float w = expf(log_u + log_l);
  if (isnan(u) || isnan(l)) w = CUDART_NAN_F;
  if (u < 0.0f || l < 0.0f || isinf(u) || isinf(l)) w = -CUDART_INF_F;
  return w;
}

// mask[i, t] != 0 for every mask dtype (half / bfloat16 compare as float: their != is ambiguous).
template <typename T>
__device__ __forceinline__ bool nonzero(T value) {
  if constexpr (std::is_integral_v<T> || std::is_floating_point_v<T>) {
    return value != T(0);
  } else {
    return static_cast<float>(value) != 0.0f;
  }
}

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MinOp {
  __device__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduce over the team; every thread of the team gets the result.
template <int TEAM, typename T, typename Op>
__device__ T team_reduce(T value, Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_xor_sync(0xffffffff, value, offset));
  if constexpr (TEAM == 32) {
    return value;
  } else {
    __shared__ T warp_values[kWarps];
    __syncthreads();  // the previous reduction has finished reading warp_values
    if (threadIdx.x % 32 == 0) warp_values[threadIdx.x / 32] = value;
    __syncthreads();
    T result = warp_values[0];
    for (int w = 1; w < kWarps; ++w) result = op(result, warp_values[w]);
    return result;
  }
}

template <int TEAM>
__device__ __forceinline__ void team_sync() {
  if constexpr (TEAM == 32) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

struct Moments {
  double count, mean, m2;
  bool all_equal;
};

// Statistics of one group; writes W. Each thread reads back only its own elements.
template <int TEAM, typename mask_t>
__device__ Moments group_moments(const Params<mask_t>& p, int64_t begin, int64_t end, int lane) {
  double sum = 0.0, count = 0.0;
  float lowest = CUDART_INF_F, highest = -CUDART_INF_F;
  for (int64_t i = begin + lane; i < end; i += TEAM) {
    const float w = cobb_douglas(p.user[i], p.llm[i], p.alpha);
    // A negative or infinite reward: reported through the error flag (no host sync).
    if (w == -CUDART_INF_F && p.error_flag != nullptr) atomicOr(p.error_flag, static_cast<int>(kErrNonfiniteReward));
    p.welfare[i] = w;
    if (!isnan(w)) {
      sum += w;
      count += 1.0;
      lowest = fminf(lowest, w);
      highest = fmaxf(highest, w);
    }
  }
  Moments m;
  m.count = team_reduce<TEAM>(count, SumOp{});
  const double total = team_reduce<TEAM>(sum, SumOp{});
  lowest = team_reduce<TEAM>(lowest, MinOp{});
  highest = team_reduce<TEAM>(highest, MaxOp{});
  m.mean = m.count > 0.0 ? total / m.count : 0.0;
  // Exact comparison: std == 0 iff every valid reward is the same number (vacuous below 2).
  m.all_equal = m.count < 2.0 || lowest == highest;
  double m2 = 0.0;
  if (!m.all_equal) {
    for (int64_t i = begin + lane; i < end; i += TEAM) {
      const float w = p.welfare[i];
      if (!isnan(w)) {
        const double d = static_cast<double>(w) - m.mean;
        m2 += d * d;
      }
    }
  }
  m.m2 = team_reduce<TEAM>(m2, SumOp{});
  return m;
}

// Advantages of one group, then (after a team barrier) its tokens.
template <int TEAM, typename mask_t>
__device__ void write_group(const Params<mask_t>& p, int64_t begin, int64_t end, int lane, float mean, float inv,
                            bool zero) {
  for (int64_t i = begin + lane; i < end; i += TEAM) {
    const float w = p.welfare[i];
    p.advantages[i] = (zero || isnan(w)) ? 0.0f : (w - mean) * inv;
  }
  if (p.mask == nullptr) return;
  team_sync<TEAM>();  // advantages of other lanes are read below
  for (int64_t flat = begin * p.tokens + lane; flat < end * p.tokens; flat += TEAM) {
    const int64_t row = flat / p.tokens, col = flat - row * p.tokens;
    const bool on = nonzero(p.mask[row * p.mask_stride0 + col * p.mask_stride1]);
    p.token_advantages[flat] = on ? p.advantages[row] : 0.0f;
  }
}

template <int TEAM, typename mask_t>
__device__ void store_stats(const Params<mask_t>& p, int64_t g, const Moments& m, int lane, double* std_out) {
  const double std = m.all_equal ? 0.0 : std_of(m.count, m.m2, p.unbiased);
  if (lane == 0) {
    p.group_mean[g] = static_cast<float>(m.mean);
    p.group_std[g] = static_cast<float>(std);
    p.group_all_equal[g] = m.all_equal;
  }
  *std_out = std;
}

template <int TEAM, typename mask_t>
__global__ void __launch_bounds__(kThreads) welfare_advantages_kernel(Params<mask_t> p) {
  constexpr int kTeamsPerBlock = kThreads / TEAM;
  const int lane = threadIdx.x % TEAM;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTeamsPerBlock + threadIdx.x / TEAM;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kTeamsPerBlock;
  // Every thread of a warp belongs to one team, so a team's loop trip count is uniform.
  if (p.scale_mode != kScaleBatch) {
    for (int64_t g = first; g < p.n_groups; g += stride) {
      int64_t begin, end;
      p.rows(g, begin, end);
      const Moments m = group_moments<TEAM>(p, begin, end, lane);
      double std;
      store_stats<TEAM>(p, g, m, lane, &std);
      const float inv = inverse_denominator(p.scale_mode, static_cast<float>(std), p.eps);
      write_group<TEAM>(p, begin, end, lane, static_cast<float>(m.mean), inv, m.all_equal || inv == 0.0f);
    }
    return;
  }
  // scale = "batch": a single block. Each team merges its groups (Chan et al.), then the teams.
  __shared__ double team_count[kTeamsPerBlock], team_mean[kTeamsPerBlock], team_m2[kTeamsPerBlock];
  __shared__ float batch_inv;
  double count = 0.0, mean = 0.0, m2 = 0.0;
  for (int64_t g = first; g < p.n_groups; g += stride) {
    int64_t begin, end;
    p.rows(g, begin, end);
    const Moments m = group_moments<TEAM>(p, begin, end, lane);
    double std;
    store_stats<TEAM>(p, g, m, lane, &std);
    if (m.count > 0.0) {
      const double total = count + m.count, delta = m.mean - mean;
      mean += delta * m.count / total;
      m2 += m.m2 + delta * delta * count * m.count / total;
      count = total;
    }
  }
  if (lane == 0) {
    team_count[threadIdx.x / TEAM] = count;
    team_mean[threadIdx.x / TEAM] = mean;
    team_m2[threadIdx.x / TEAM] = m2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double c = 0.0, mu = 0.0, s = 0.0;
    for (int t = 0; t < kTeamsPerBlock; ++t) {
      if (team_count[t] == 0.0) continue;
      const double total = c + team_count[t], delta = team_mean[t] - mu;
      mu += delta * team_count[t] / total;
      s += team_m2[t] + delta * delta * c * team_count[t] / total;
      c = total;
    }
    batch_inv = inverse_denominator(kScaleBatch, std_of(c, s, p.unbiased), p.eps);
  }
  __syncthreads();  // also makes the group statistics stored above visible to the whole block
  const float inv = batch_inv;
  for (int64_t g = first; g < p.n_groups; g += stride) {
    int64_t begin, end;
    p.rows(g, begin, end);
    write_group<TEAM>(p, begin, end, lane, p.group_mean[g], inv, p.group_all_equal[g] || inv == 0.0f);
  }
}

template <int TEAM, typename mask_t>
void launch(const Params<mask_t>& params, cudaStream_t stream) {
  constexpr int64_t kTeamsPerBlock = kThreads / TEAM;
  int64_t blocks = (params.n_groups + kTeamsPerBlock - 1) / kTeamsPerBlock;
  blocks = params.scale_mode == kScaleBatch ? 1 : std::min<int64_t>(blocks, INT32_MAX);
  welfare_advantages_kernel<TEAM, mask_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(params);
}

void welfare_advantages_cuda(const at::Tensor& user, const at::Tensor& llm, const std::optional<at::Tensor>& offsets,
                             int64_t group_size, double alpha, int64_t scale_mode, double eps, bool unbiased,
                             const std::optional<at::Tensor>& mask, at::Tensor& welfare, at::Tensor& advantages,
                             at::Tensor& group_mean, at::Tensor& group_std, at::Tensor& group_all_equal,
                             at::Tensor& token_advantages, const std::optional<at::Tensor>& error_flag) {
  int* flag = error_flag_data(error_flag, user, "welfare_advantages");
  const int64_t n_rows = user.numel();
  const int64_t n_groups = check_inputs(user, llm, offsets, group_size, scale_mode);
  const bool has_offsets = offsets.has_value() && offsets->defined();
  check_outputs(welfare, advantages, group_mean, group_std, group_all_equal, n_rows, n_groups);
  const bool has_mask = mask.has_value() && mask->defined() && mask->numel() > 0;
  if (has_mask) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == n_rows && token_advantages.is_contiguous() &&
                    token_advantages.numel() == mask->numel() && mask->device() == user.device() &&
                    token_advantages.device() == user.device() && token_advantages.scalar_type() == at::kFloat,
                "welfare_advantages: mask must be [N, T] and token_advantages contiguous [N, T]");
  }
  if (n_groups == 0) return;
  const c10::cuda::CUDAGuard guard(user.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t average = n_rows / n_groups;
  const at::ScalarType mask_type = has_mask ? mask->scalar_type() : at::kBool;
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask_type, "welfare_advantages_cuda", [&] {
    Params<scalar_t> params{user.data_ptr<float>(),
                            llm.data_ptr<float>(),
                            has_offsets ? offsets->data_ptr<int64_t>() : nullptr,
                            group_size,
                            n_groups,
                            n_rows,
                            static_cast<float>(alpha),
                            eps,
                            scale_mode,
                            unbiased,
                            has_mask ? mask->data_ptr<scalar_t>() : nullptr,
                            has_mask ? mask->size(1) : 0,
                            has_mask ? mask->stride(0) : 0,
                            has_mask ? mask->stride(1) : 0,
                            welfare.data_ptr<float>(),
                            advantages.data_ptr<float>(),
                            group_mean.data_ptr<float>(),
                            group_std.data_ptr<float>(),
                            group_all_equal.data_ptr<bool>(),
                            has_mask ? token_advantages.data_ptr<float>() : nullptr,
                            flag};
    if (average <= kWarpTeamMaxAverage) {
      launch<32>(params, stream);
    } else {
      launch<kThreads>(params, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda
}  // namespace gtalign_fast

TORCH_LIBRARY_IMPL(gtalign_fast_C, CUDA, m) {
  m.impl("welfare_advantages", &gtalign_fast::cuda::welfare_advantages_cuda);
}
