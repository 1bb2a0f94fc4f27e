// The Python module of the compiled extension, gtalign_fast._C.
//
// The kernels themselves register as torch operators in the `gtalign_fast_C` namespace, one
// file per op: csrc/cpu/<op>.cpp defines the schema (TORCH_LIBRARY_FRAGMENT) and the CPU kernel,
// csrc/cuda/<op>.cu the CUDA kernel. Importing this module loads the library, which registers
// them; Python reaches them as torch.ops.gtalign_fast_C.<op>.
#include <torch/extension.h>

static bool with_cuda() {
#ifdef GTALIGN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gtalign_fast compiled kernels (operators under torch.ops.gtalign_fast_C)";
  m.def("with_cuda", &with_cuda, "Whether the CUDA kernels were compiled in");
}
