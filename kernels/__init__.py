"""Triton kernels of gtalign_fast, one file per op (installed as ``gtalign_fast.kernels``).

Each file holds the ``@triton.jit`` kernels of one op and the functions that launch them on
tensors the caller has already validated and allocated; dispatch, autograd and checks live in
``gtalign_fast``. Under ``TRITON_INTERPRET=1`` (set before import) they run on CPU tensors.
"""
