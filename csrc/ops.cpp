// The Python module of the compiled extension, gtalign_fast._C.
//
// The kernels themselves register as torch operators in the `gtalign_fast_C` namespace, one
// file per op: csrc/cpu/<op>.cpp defines the schema (TORCH_LIBRARY_FRAGMENT) and the CPU kernel,
// csrc/cuda/<op>.cu the CUDA kernel. Importing this module loads the shared library, which
// registers them; Python reaches them as torch.ops.gtalign_fast_C.<op>.
//
// Plain CPython API on purpose: this file needs nothing from torch, and skipping pybind11 and
// torch/extension.h saves a minute of compile time per build.
#include <Python.h>

static PyObject* with_cuda(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef GTALIGN_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef kMethods[] = {
    {"with_cuda", with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr},
};

static PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_C", "gtalign_fast compiled kernels (operators under torch.ops.gtalign_fast_C)", -1,
    kMethods,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
