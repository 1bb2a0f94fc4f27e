"""The CPU decode step's linear layers on :func:`gtalign_fast.ops.decode_linear`.

A decode step of ``lanes`` rows multiplies ``lanes`` (at most 16) rows with every weight matrix of
the model once: PyTorch's CPU linear reads the weights at about a third of the copy bandwidth at
that shape (issue 24), and the weights are most of what the step reads. While the sampler decodes
on the CPU, :class:`DecodeLinears` points the forward of the model's float32 ``nn.Linear`` layers
(the LM head included) at the C++ kernel for inputs of at most 16 rows; wider calls (prefill,
re-fed payoff blocks) keep ``F.linear``. The model object is restored when decoding ends, and
nothing is copied: the kernel reads ``nn.Linear``'s own weight layout, so an optimizer step between
two ``generate`` calls is seen at once.

The products equal ``F.linear``'s to float32 rounding (the kernel sums in another order); the tests
check that the sampler draws the same tokens with and without it for the same seeds.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from ..ops import _backend
from ..ops._decode_linear import MAX_ROWS
from ..ops._op import extension_kernel

__all__ = ["DecodeLinears", "decode_kernel_unavailable", "routed_by_decode_linears"]


def decode_kernel_unavailable() -> str | None:
    """Why the decode kernel cannot run here (the compiled extension is missing), or None."""
    return _backend.why_unavailable("cpu", torch.device("cpu"))


def _linear_layers(model: Any) -> list[torch.nn.Linear]:
    """The float32 CPU ``nn.Linear`` layers of ``model`` (quantized and half layers keep their own forward)."""
    return [module for module in model.modules() if isinstance(module, torch.nn.Linear)
            and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
            and module.weight.stride(-1) == 1 and "forward" not in module.__dict__]


def routed_by_decode_linears(module: torch.nn.Module) -> bool:
    """Whether ``module``'s replaced ``forward`` is :class:`DecodeLinears`' routing (the same
    product as ``nn.Linear``'s own forward), not someone else's."""
    forward = module.__dict__.get("forward")
    return getattr(getattr(forward, "__func__", None), "routed_by_decode_linears", False)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _decode_forward(kernel, layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The kernel for a decode-shaped float32 call without grad or autocast on plain tensors (FSDP's
    DTensor shards and tensor subclasses keep ``F.linear``), else ``F.linear``."""
    rows = x.numel() // max(1, x.shape[-1])
    if (1 <= rows <= MAX_ROWS and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and type(x) in _PLAIN and type(layer.weight) in _PLAIN
            and x.device.type == "cpu"):
        out = kernel(x.reshape(rows, x.shape[-1]), layer.weight, layer.bias)
        return out.view(*x.shape[:-1], out.shape[-1])
    return torch.nn.functional.linear(x, layer.weight, layer.bias)


class DecodeLinears:
    """Context manager: inside it, the model's float32 linear layers run decode-shaped inputs
    (at most 16 rows) through the ``decode_linear`` kernel (see the module docstring).

    Parameters
    ----------
    model : torch.nn.Module
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.layers: list[torch.nn.Linear] = []

    def __enter__(self) -> "DecodeLinears":
        kernel = extension_kernel("decode_linear", torch.device("cpu"))
        self.layers = _linear_layers(self.model)
        for layer in self.layers:
            layer.forward = types.MethodType(lambda layer, x: _decode_forward(kernel, layer, x), layer)
            layer.forward.__func__.routed_by_decode_linears = True
        return self

    def __exit__(self, *exc_info) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        self.layers = []
