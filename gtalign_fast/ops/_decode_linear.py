"""``decode_linear``: ``x @ weight.T + bias`` for a decode-shaped ``x`` (at most 16 rows), on the CPU.

A decode step multiplies a few rows (one per lane) with every weight matrix of the model: it reads
each weight once and does 2 flops per weight per row, so it is a stream over the weights and its
floor is the memory bandwidth. PyTorch's CPU linear reads them at about a third of that at 8 rows
(issue 24: [8, 576] x [576, 1536] in 284 us, 12.5 GB/s); the C++ kernel
(``csrc/cpu/decode_linear.cpp``) streams each weight row once with AVX-512 (AVX2, plain C++:
chosen at run time; ``GTALIGN_FAST_DECODE_LINEAR_ISA=avx2|scalar`` forces one, read once per
process) and is what the sampler's CPU decode step uses for the model's linear layers
and LM head (``gtalign_fast/sampling/fast_decode.py``).

Not differentiable (a decode step runs without gradients: the public function refuses inputs that
need one). The result equals the float64 reference to float32 rounding; the summation order
differs from a BLAS (16 partial sums per output).
"""

from __future__ import annotations

import torch

from .. import reference
from ._op import Op, Output, backends, extension_kernel

OP = "decode_linear"
MAX_ROWS = 16
"""The most rows ``x`` may have (mirrors ``kMaxRows`` in csrc/cpu/decode_linear.cpp): beyond that a
BLAS GEMM reuses each weight from cache across rows, which is what ``F.linear`` already does well."""


def _outputs(x, weight, bias):
    return (Output((x.shape[0], weight.shape[0]), torch.float32),)


def _run_extension(x, weight, bias, out):
    extension_kernel("decode_linear_out", x.device)(x, weight, bias, out)


def _run_reference(x, weight, bias, out):
    out.copy_(reference.decode_linear(x, weight, bias))


OP_DEF = Op(
    OP,
    inputs="Tensor x, Tensor weight, Tensor? bias",
    returns=("out",),
    outputs=_outputs,
    backends=backends(cpu=_run_extension, reference=_run_reference),  # a CPU op: on CUDA, F.linear is cuBLAS
)


def _validate(x, weight, bias) -> None:
    for name, value in (("x", x), ("weight", weight), ("bias", bias)):
        if value is None and name == "bias":
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"decode_linear: {name} must be a tensor, got {type(value).__name__}")
        if value.dtype != torch.float32:
            raise TypeError(f"decode_linear: {name} must be float32, got {value.dtype}")
        if value.device.type != "cpu":
            raise ValueError(f"decode_linear: {name} is on {value.device}; decode_linear runs on CPU tensors "
                             "(on CUDA use torch.nn.functional.linear)")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"decode_linear: x must be [M, K] and weight [N, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"decode_linear: x must have 1 to {MAX_ROWS} rows (decode-shaped), got {x.shape[0]}; "
                         "use torch.nn.functional.linear for more")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"decode_linear: x has K = {x.shape[1]} columns, weight has K = {weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"decode_linear: bias must be [N] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (x, weight, bias)):
        raise RuntimeError("decode_linear has no gradient (a decode step needs none): call it under "
                           "torch.no_grad(), or use torch.nn.functional.linear where a gradient is needed")


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  backend: str | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for at most 16 rows of ``x``, streaming the weights once (CPU).

    Parameters
    ----------
    x : Tensor ``[M, K]`` float32, ``1 <= M <= 16``
    weight : Tensor ``[N, K]`` float32 (``nn.Linear``'s layout)
    bias : Tensor ``[N]`` float32 or None
    backend : {"cpu", "reference"}, optional
        ``"cpu"``: the C++ kernel (default where the extension is built); ``"reference"``: float64.

    Returns
    -------
    Tensor ``[M, N]`` float32

    Raises
    ------
    TypeError, ValueError
        Wrong types, dtypes, devices or shapes (M outside ``[1, 16]``, K mismatch).
    RuntimeError
        An input needs a gradient while grad mode is on (the op has none), or the backend asked
        for cannot run.
    """
    _validate(x, weight, bias)
    x = x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    return OP_DEF(x, weight, bias, backend=backend or "")[0]
