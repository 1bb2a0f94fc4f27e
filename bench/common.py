"""The benchmark case model shared by ``bench/run.py`` and every ``bench/cases_<op>.py``.

A case is one (op, provider, mode, shape, dtype) row. ``make()`` builds the inputs once and
returns the closure that is timed; a peer that is not installed is a case with ``skip`` set, so
the table shows a visible "not installed" row instead of silently leaving it out.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

MODES = ("fwd", "bwd", "full")


@dataclass
class Case:
    """One benchmark row.

    Attributes
    ----------
    op : str
        Op name, e.g. ``"token_logprobs"``.
    provider : str
        Who computes it: ``"gtalign_fast[cpu]"``, ``"gtalign_fast[triton]"``, ``"torch-eager"``,
        ``"torch-compile"``, ``"trl"``, ``"liger"``, ``"flash-attn"``, ``"verl"``, ...
    mode : {"fwd", "bwd", "full"}
        Forward only, backward only (the forward is done in ``make``), or both.
    shape : dict
        The sizes, e.g. ``{"N": 2048, "V": 32000}``.
    dtype : str
        ``"float32"``, ``"bfloat16"``, ...
    make : callable returning a callable, or None
        Builds inputs (untimed) and returns the zero-argument closure that is timed.
    bytes : float
        Minimum bytes the op must move (reads + writes), for GB/s and the fraction of roofline.
    flops : float
        Minimum FLOPs the op must do (for compute-bound ops); 0 if bandwidth-bound.
    skip : str or None
        Why the row cannot run (e.g. ``"not installed: trl"``).
    """

    op: str
    provider: str
    mode: str
    shape: dict
    dtype: str
    make: Callable[[], Callable[[], Any]] | None
    bytes: float = 0.0
    flops: float = 0.0
    skip: str | None = None
    extra: dict = field(default_factory=dict)

    def shape_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.shape.items())


def missing(module: str) -> str | None:
    """``"not installed: <module>"`` when the module cannot be imported, else None."""
    if importlib.util.find_spec(module) is None:
        return f"not installed: {module}"
    return None


def skipped(op: str, provider: str, modes, shape: dict, dtype: str, reason: str) -> list[Case]:
    """Rows that say why a provider did not run."""
    return [Case(op, provider, mode, shape, dtype, None, skip=reason) for mode in modes]


def grad_closure(outputs, inputs, grads) -> Callable[[], Any]:
    """A closure that runs only the backward of an already computed forward (retain_graph)."""
    return lambda: torch.autograd.grad(outputs, inputs, grads, retain_graph=True)


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (``"float32"``, ``"bfloat16"``, ...)."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
    return dtypes[name]
