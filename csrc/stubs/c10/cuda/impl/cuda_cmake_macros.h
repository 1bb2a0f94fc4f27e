// Stand-in for a header that CMake generates in CUDA builds of torch and that the CPU wheel does
// not ship. Used only by the `nvcc -fsyntax-only`-style check of csrc/cuda/*.cu on machines
// without a CUDA torch (tests/test_cuda_sources.py); real CUDA builds use torch's own header.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
