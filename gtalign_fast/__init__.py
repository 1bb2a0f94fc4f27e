"""gtalign_fast: fused kernels, a GRPO trainer and a steering sampler for GTAlign.

Import cost is kept small: the ops load eagerly; the trainer, the sampler and the game module
load on first use.
"""

from __future__ import annotations

import importlib

from . import ops
from .ops._backend import available_backends, last_backend

__version__ = "0.1.0"

# name -> module that defines it, imported on first attribute access
_LAZY = {
    "game": "gtalign_fast.game",
    "GRPOConfig": "gtalign_fast.training.grpo_config",
    "GRPOTrainer": "gtalign_fast.training.trainer",
    "SteeringSampler": "gtalign_fast.sampling.sampler",
}

__all__ = ["ops", "available_backends", "last_backend", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if name == "game" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gtalign_fast' has no attribute {name!r}")
