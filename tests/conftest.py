"""Test configuration shared by every test file.

Without a GPU, Triton kernels run on CPU tensors under the Triton interpreter, which must be
switched on before any ``@triton.jit`` function is defined, so it is set here, before gtalign_fast
is imported. With a GPU the compiled kernels are tested (set TRITON_INTERPRET=1 yourself to
interpret them there too).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from gtalign_fast.ops import _backend  # noqa: E402

# Backends the kernel tests compare with the reference on this machine (CPU tensors); on a GPU
# machine the CUDA backends are added and the tensors move there.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kernel_backends(op: str | None = None) -> list[str]:
    """Every non-reference backend (of ``op``, when given) that can run on DEVICE."""
    return [b for b in _backend.available_backends(DEVICE, op) if b != "reference"]


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Every op output is allocated pre-filled with NaN, so an element a kernel does not write
    fails the comparison with the reference."""
    with _backend.poison_outputs(True):
        yield
