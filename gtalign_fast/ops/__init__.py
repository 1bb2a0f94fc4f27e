"""Public ops of gtalign_fast: one function per op, with a documented contract.

Every op dispatches to a backend (see :mod:`gtalign_fast.ops._backend`): ``backend=`` per call,
``GTALIGN_FAST_BACKEND[_<OP>]`` in the environment, or the default for the device;
:func:`last_backend` reports what ran. The ops are ``torch.library`` custom ops with fake
(meta) kernels and registered autograd, so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

from ._backend import available_backends, last_backend, poison_outputs
from ._decode_linear import decode_linear
from ._device_checks import check_device_errors
from ._grpo_loss import grpo_loss
from ._linear_grpo_loss import linear_grpo_loss
from ._linear_token_logprobs import linear_token_logprobs
from ._logits_grpo_loss import logits_grpo_loss
from ._sample import sample_
from ._token_logprobs import token_logprobs
from ._welfare_advantages import WelfareAdvantages, welfare_advantages

__all__ = [
    # ops
    "token_logprobs",
    "linear_token_logprobs",
    "welfare_advantages",
    "WelfareAdvantages",
    "grpo_loss",
    "logits_grpo_loss",
    "linear_grpo_loss",
    "sample_",
    "decode_linear",
    # backend control
    "last_backend",
    "available_backends",
    "poison_outputs",
    # errors the kernels found on the device (read once per step, one host sync)
    "check_device_errors",
]
