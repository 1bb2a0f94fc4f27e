"""``welfare_advantages``: the public op and its backends.

One :class:`~gtalign_fast.ops._op.Op` (custom op ``gtalign_fast::welfare_advantages``) resolves its
backend at run time (inside the op, so a compiled graph keeps working when the backend changes)
and launches one kernel. Rewards are data, not parameters: the op is not differentiable (no
autograd is registered and the inputs are detached), but it has a fake kernel so
``torch.compile(fullgraph=True)`` traces it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import reference
from . import _device_checks
from ._device_checks import error_flag
from ._op import Op, Output, backends, extension_kernel
from ._welfare_constants import SCALES

OP = "welfare_advantages"


class WelfareAdvantages(NamedTuple):
    """Result of :func:`welfare_advantages` (G groups, N completions, T tokens)."""

    welfare: torch.Tensor  # [N] float32: W = U^alpha L^(1-alpha); NaN where a reward is missing
    advantages: torch.Tensor  # [N] float32: 0 for missing rewards and all-equal groups
    group_mean: torch.Tensor  # [G] float32: mean of the valid W (0 when there is none)
    group_std: torch.Tensor  # [G] float32: std of the valid W (0 below two, 0 when all equal)
    group_all_equal: torch.Tensor  # [G] bool: the valid W are all the same number (vacuous below two)
    token_advantages: torch.Tensor | None = None  # [N, T] float32 when a mask was given


# ---------------------------------------------------------------------------------------------
# Checks that need the data (they run inside the op, so torch.compile sees no branch on data)


def _check_offsets(offsets: torch.Tensor, n_rows: int) -> None:
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or last != n_rows:
        raise ValueError(
            f"welfare_advantages: group offsets must start at 0 and end at N = {n_rows}, got {first} .. {last}"
        )
    decreasing = offsets[1:] < offsets[:-1]
    if bool(decreasing.any()):
        at = int(decreasing.nonzero()[0, 0])
        raise ValueError(
            f"welfare_advantages: group offsets must be non-decreasing, but offsets[{at + 1}] = "
            f"{int(offsets[at + 1])} < offsets[{at}] = {int(offsets[at])}"
        )


def _check_rewards(user: torch.Tensor, llm: torch.Tensor) -> None:
    """Raise on the first negative or infinite reward (NaN is allowed: a missing reward)."""
    for name, values in (("user", user), ("llm", llm)):
        bad = (values < 0) | torch.isinf(values)
        if bool(bad.any()):
            at = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"welfare_advantages: {name}[{at}] = {float(values[at])}; rewards must be finite and >= 0 "
                "(Cobb-Douglas welfare is defined on non-negative rewards; use NaN for a missing reward)"
            )


# ---------------------------------------------------------------------------------------------
# The op


class WelfareOptions(NamedTuple):
    group_size: int  # fixed group size, or 0 when offsets are given
    alpha: float
    scale: str
    eps: float
    unbiased: bool


def _check_data(user, llm, offsets, mask, options, backend) -> None:
    """Host checks for the reference backend only: the C++ CPU kernel raises on bad offsets and
    rewards itself, the Triton and CUDA kernels set the device's error flag (see _launch)."""
    if backend == "reference":
        if offsets is not None:
            _check_offsets(offsets, user.numel())
        _check_rewards(user, llm)


def _explain(user, llm, offsets) -> None:
    """The precise error once a kernel flagged one (a host read: only then, or on CPU tensors)."""
    if offsets is not None:
        _check_offsets(offsets, user.numel())
    _check_rewards(user, llm)


def _outputs(user, llm, offsets, mask, options):
    n_rows = user.shape[0]
    n_groups = offsets.shape[0] - 1 if offsets is not None else n_rows // options.group_size
    return (
        Output((n_rows,), torch.float32),  # welfare
        Output((n_rows,), torch.float32),  # advantages
        Output((n_groups,), torch.float32),  # group_mean
        Output((n_groups,), torch.float32),  # group_std
        Output((n_groups,), torch.bool),  # group_all_equal
        Output(tuple(mask.shape) if mask is not None else (0,), torch.float32),  # token_advantages
    )


def _run_reference(user, llm, offsets, mask, options, *outputs):
    group = offsets if offsets is not None else options.group_size
    results = reference.welfare_advantages(
        user, llm, group, options.alpha, options.scale, options.eps, options.unbiased, mask
    )
    for out, value in zip(outputs, results):
        if value is not None and out.numel() > 0:
            out.copy_(value.reshape(out.shape))


def _kernel_args(user, llm, offsets, mask, options, *outputs) -> tuple:
    return (user, llm, offsets, options.group_size, options.alpha, SCALES[options.scale], options.eps,
            options.unbiased, mask, *outputs)


def _launch(kernel, user, llm, offsets, *rest) -> None:
    """One launch; bad offsets or rewards set the device's error flag, which after_launch raises on
    at once for CPU tensors (the C++ CPU kernel raises itself first) and reports lazily, without a
    host sync, for CUDA ones (gtalign_fast.ops._device_checks)."""
    device = user.device
    kernel(*_kernel_args(user, llm, offsets, *rest), error_flag(device))
    _device_checks.after_launch(OP, device, explain=lambda: _explain(user, llm, offsets))


def _run_triton(*args):
    from gtalign_fast.kernels import welfare_advantages as triton_kernels

    _launch(triton_kernels.welfare_advantages, *args)


def _run_extension(*args):
    _launch(extension_kernel("welfare_advantages", args[0].device), *args)


OP_DEF = Op(
    "welfare_advantages",
    inputs="Tensor user, Tensor llm, Tensor? offsets, Tensor? mask",
    options=WelfareOptions,
    returns=("welfare", "advantages", "group_mean", "group_std", "group_all_equal", "token_advantages"),
    outputs=_outputs,
    check=_check_data,
    backends=backends(triton=_run_triton, cpu=_run_extension, cuda=_run_extension, reference=_run_reference),
)


# ---------------------------------------------------------------------------------------------
# Public function


def _check_number(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"welfare_advantages: {name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"welfare_advantages: {name} must be finite and in [{low}, {high}], got {value}")


def _validate_rewards(user, llm) -> None:
    for name, values in (("user", user), ("llm", llm)):
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"welfare_advantages: {name} must be a tensor, got {type(values).__name__}")
        if values.dtype != torch.float32:
            raise TypeError(f"welfare_advantages: {name} must be float32, got {values.dtype}")
        if values.dim() != 1 or values.shape[0] == 0:
            raise ValueError(
                f"welfare_advantages: {name} must be a non-empty 1-D tensor [N], got shape {tuple(values.shape)}"
            )
    if user.shape != llm.shape:
        raise ValueError(
            f"welfare_advantages: user {tuple(user.shape)} and llm {tuple(llm.shape)} must have the same shape"
        )
    if user.device != llm.device:
        raise ValueError(f"welfare_advantages: user on {user.device} but llm on {llm.device}")


def _validate_group(group, n_rows: int, device: torch.device) -> tuple[torch.Tensor | None, int]:
    """(offsets or None, fixed group size or 0)."""
    if isinstance(group, torch.Tensor):
        if group.dtype != torch.int64:
            raise TypeError(f"welfare_advantages: group offsets must be int64, got {group.dtype}")
        if group.dim() != 1 or group.shape[0] < 2:
            raise ValueError(
                f"welfare_advantages: group offsets must be 1-D [G+1] with G >= 1, got shape {tuple(group.shape)}"
            )
        if group.device != device:
            raise ValueError(f"welfare_advantages: group offsets on {group.device} but rewards on {device}")
        return group.contiguous(), 0
    if isinstance(group, bool) or not isinstance(group, int):
        raise TypeError(
            "welfare_advantages: group must be an int (group size) or an int64 offsets tensor, "
            f"got {type(group).__name__}"
        )
    if group < 1 or n_rows % group != 0:
        raise ValueError(f"welfare_advantages: group size {group} must be >= 1 and divide N = {n_rows}")
    return None, group


# Unsigned dtypes beyond uint8 (torch's "barebones" ones) that the kernels do not dispatch on.
_UNSIGNED_WIDE = (torch.uint16, torch.uint32, torch.uint64)


def _validate_mask(mask, n_rows: int, device: torch.device) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"welfare_advantages: mask must be a tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"welfare_advantages: mask must be bool, integer or real, got {mask.dtype}")
    if mask.dim() != 2 or mask.shape[0] != n_rows:
        raise ValueError(f"welfare_advantages: mask must be [N, T] with N = {n_rows}, got shape {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"welfare_advantages: mask on {mask.device} but rewards on {device}")


def welfare_advantages(
    user: torch.Tensor,
    llm: torch.Tensor,
    group,
    *,
    alpha: float = 0.5,
    scale: str = "group",
    eps: float = 1e-6,
    unbiased: bool = True,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> WelfareAdvantages:
    """Cobb-Douglas welfare and GRPO group advantages, fused in one launch.

    ``W = U^alpha * L^(1 - alpha)`` computed in log space, per-group mean / std / all-equal flag
    over the valid rewards, the normalised advantages, and optionally their scatter over each
    completion's tokens.

    Parameters
    ----------
    user, llm : Tensor, shape ``[N]``, float32
        The user's and the LLM's reward U and L per completion (GTAlign section 3). Finite and
        ``>= 0``; NaN marks a missing reward (excluded from the statistics, advantage 0).
    group : int or Tensor
        A fixed group size (``num_generations``) that divides N, or int64 offsets ``[G+1]``
        (``offsets[0] = 0``, ``offsets[-1] = N``, non-decreasing; empty groups allowed) for groups of
        different sizes. Groups are contiguous runs of completions.
    alpha : float in [0, 1], default 0.5
        The user's weight; 0.5 is GTAlign's ``sqrt(U * L)``. A zero exponent drops its factor
        (``0^0 = 1``): alpha = 0 gives ``W = L``, alpha = 1 gives ``W = U``; otherwise U = 0 or L = 0
        gives W = 0.
    scale : {"group", "batch", "none"}, default "group"
        ``A = (W - mean_g) / (std_g + eps)``; ``(W - mean_g) / (std_batch + eps)`` (TRL's
        ``scale_rewards="batch"``: std over every valid reward of the batch); or ``W - mean_g``.
    eps : float >= 0, default 1e-6
        verl / GTAlign use 1e-6, TRL 1e-4. If ``std + eps`` is 0 the advantages are 0.
    unbiased : bool, default True
        Bessel-corrected std (``n - 1``, TRL and verl) or population std (``n``).
    mask : Tensor, shape ``[N, T]``, optional
        Completion-token mask (bool, integer or float; read in place, any strides). When given,
        ``token_advantages[i, t] = A_i`` where ``mask[i, t] != 0`` and 0 elsewhere.
    backend : {"triton", "cuda", "cpu", "reference"}, optional
        Force a backend; default: ``GTALIGN_FAST_BACKEND[_WELFARE_ADVANTAGES]``, else the C++ kernel
        on CPU and the CUDA C++ kernel on CUDA (the faster there, see ``_backend.CUDA_DEFAULTS``).

    Returns
    -------
    WelfareAdvantages
        Named tuple ``(welfare [N], advantages [N], group_mean [G], group_std [G],
        group_all_equal [G] bool, token_advantages [N, T] or None)``, float32 but for the flags.

        Groups with fewer than two valid rewards (verl gives such a group mean 0 and std 1; we do
        not): ``group_mean`` is the mean of the valid rewards (0 if there is none), ``group_std``
        is 0, ``group_all_equal`` is True and the advantages are 0. Groups whose valid rewards are
        all equal have std exactly 0 and advantages exactly 0 (TRL logs the fraction of such groups:
        ``group_all_equal.float().mean()``). ``std`` is never below 0 and is 0 only for such groups.

    Raises
    ------
    TypeError
        Non-float32 rewards, non-int64 offsets, a group that is neither, non-float alpha / eps.
    ValueError
        Empty or mismatched shapes, devices, a group size that does not divide N, bad offsets,
        alpha outside [0, 1], eps < 0, an unknown scale, a negative or infinite reward. On CUDA
        tensors the last three are found by the kernel and raised (as a RuntimeError) by
        :func:`gtalign_fast.ops.check_device_errors`, or at once with ``GTALIGN_FAST_SYNC_CHECKS=1``.

    Notes
    -----
    Not differentiable: rewards are data, so the inputs are detached. Every backend runs one
    kernel (the C++ CPU kernel parallelises over groups with OpenMP). The checks that need the data
    (offsets, negative or infinite rewards) run inside the kernels: on CUDA tensors they raise
    lazily, from :func:`gtalign_fast.ops.check_device_errors` (no host sync per call), or at once
    with ``GTALIGN_FAST_SYNC_CHECKS=1``; on CPU tensors at once.
    """
    _validate_rewards(user, llm)
    n_rows = user.shape[0]
    offsets, group_size = _validate_group(group, n_rows, user.device)
    _validate_mask(mask, n_rows, user.device)
    _check_number("alpha", alpha, 0.0, 1.0)
    _check_number("eps", eps, 0.0, math.inf)
    if scale not in SCALES:
        raise ValueError(f"welfare_advantages: scale must be one of {tuple(SCALES)}, got {scale!r}")
    options = WelfareOptions(group_size, float(alpha), scale, float(eps), bool(unbiased))
    if mask is not None and mask.dtype in _UNSIGNED_WIDE:  # no kernel reads these: a bool copy
        mask = mask != 0
    welfare, advantages, group_mean, group_std, all_equal, tokens = OP_DEF(
        user.detach().contiguous(), llm.detach().contiguous(), offsets, mask.detach() if mask is not None else None,
        options=options, backend=backend or "",
    )
    token_advantages = tokens if mask is not None else None
    return WelfareAdvantages(welfare, advantages, group_mean, group_std, all_equal, token_advantages)
