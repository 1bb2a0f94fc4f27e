// The instruction set a CPU kernel with hand-written AVX-512 / AVX2 paths runs: the best this CPU
// has, or the one an environment variable names ("avx512", "avx2", "scalar"; the tests use it to run
// every path on one machine). Kernels call pick_isa once per process (a static) and map the answer to
// their own functions, so the wheel needs no -march flag.
#pragma once

#include <torch/types.h>

#include <cstdlib>
#include <string>

namespace gtalign_fast {
namespace cpu {

enum class Isa { kAvx512, kAvx2, kScalar };

// `env`: the variable's name; `op`: the op's name for the error; `avx2_needs_fma`: whether the AVX2
// path also uses FMA instructions. A bad or unsupported value raises (c10::Error).
inline Isa pick_isa(const char* env, const char* op, bool avx2_needs_fma) {
  const char* value = std::getenv(env);
  const std::string wanted = value ? value : "";
  bool avx512 = false, avx2 = false;
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  avx512 = __builtin_cpu_supports("avx512f");
  avx2 = __builtin_cpu_supports("avx2") && (!avx2_needs_fma || __builtin_cpu_supports("fma"));
#endif
  TORCH_CHECK(wanted.empty() || wanted == "avx512" || wanted == "avx2" || wanted == "scalar", op, ": ", env,
              " must be avx512, avx2 or scalar, got '", wanted, "'");
  TORCH_CHECK(wanted != "avx512" || avx512, op, ": ", env, "=avx512, but this CPU lacks it");
  TORCH_CHECK(wanted != "avx2" || avx2, op, ": ", env, "=avx2, but this CPU lacks it");
  if (avx512 && (wanted.empty() || wanted == "avx512")) return Isa::kAvx512;
  if (avx2 && (wanted.empty() || wanted == "avx2")) return Isa::kAvx2;
  return Isa::kScalar;
}

}  // namespace cpu
}  // namespace gtalign_fast
