"""The GRPO objective, once, for the three ops that compute it and the code that calls them.

``grpo_loss`` (from log-probs), ``logits_grpo_loss`` (from logits) and ``linear_grpo_loss`` (from
hidden states) compute one objective: the clipped surrogate with k3 KL and a loss-type normaliser.
What they share lives here (as Liger's ``LigerFusedLinearPPOBase`` holds what every PPO-style loss
shares):

- :class:`GrpoLossOptions`, the op-level scalars, and :func:`options_type`, which builds the fused
  ops' option tuples from it (its fields, then theirs) instead of copying the fields;
- :func:`validate`, the checks of the loss arguments, naming the op that was called;
- :func:`aggregation` and :func:`row_weights`, the kernels' view of the normaliser table
  (``_grpo_constants.LOSS_NORMALISERS``, the only place a loss type's normaliser is written);
- :func:`reference_loss` and :func:`metrics_dict`, the reference adapter and the metrics;
- :class:`GrpoObjective`, the hyper-parameters as one value: the trainer and the TRL / verl
  adapters build it once and pass :meth:`GrpoObjective.op_kwargs` to whichever op runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import typing
from typing import Any, NamedTuple

import torch

from .. import reference
from ._grpo_constants import (
    LOSS_NORMALISERS,
    LOSS_TYPES,
    METRIC_NAMES,
    MICRO_BATCH_SHARES,
    MODE_CONSTANT,
    MODE_NORMALISER_TENSOR,
    MODE_SEQ_MEAN,
    MODE_TOKEN_MEAN,
    NORM_LENGTH,
    NORM_NUM_ITEMS,
    NORM_ROW_TOKENS,
    NORM_ROWS,
    NORM_ROWS_LENGTH,
    NORM_TOKENS,
)
from ._op import plain_eager

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


class GrpoLossOptions(NamedTuple):
    """The scalar arguments of the GRPO loss, as the public functions normalised them."""

    beta: float
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    dual_clip: float | None
    loss_type: str
    sequence_level: bool
    max_completion_length: int  # L of dr_grpo / seq-mean-token-sum-norm
    num_items_value: float | None  # dapo's normaliser when given as a number
    kl_clamp: float | None = None  # |k3| bound (verl's low_var_kl: 10); None: unclamped, as TRL
    use_bias_correction_kl: bool = False  # TRL's: the k3 term weighted by the importance ratio
    sapo_temperature_pos: float = 1.0  # loss_type="sapo" only (TRL's defaults)
    sapo_temperature_neg: float = 1.05


_N_GRPO = len(GrpoLossOptions._fields)


def options_type(name: str, **extra: Any) -> type:
    """A NamedTuple class whose fields are :class:`GrpoLossOptions`' then ``extra`` (name -> type),
    with ``grpo()`` giving back the GrpoLossOptions part. The ops' schemas take flat scalars, so the
    composition is of fields; they are generated from GrpoLossOptions, never listed twice."""
    hints = typing.get_type_hints(GrpoLossOptions)
    fields = [(field, hints[field]) for field in GrpoLossOptions._fields] + list(extra.items())
    base = NamedTuple(f"_{name}Fields", fields)

    def grpo(self) -> GrpoLossOptions:
        return GrpoLossOptions(*self[:_N_GRPO])

    return type(name, (base,), {"__slots__": (), "grpo": grpo, "__doc__": f"GrpoLossOptions, then {list(extra)}."})


# ---------------------------------------------------------------------------------------------
# The normaliser table, as the kernels read it


def aggregation(
    loss_type: str, batch: int, norm_length: int, num_items_value: float | None, has_num_items_tensor: bool
):
    """The finalize mode and the constant per-row weight of ``loss_type`` (its normaliser in
    ``LOSS_NORMALISERS``)."""
    normaliser = LOSS_NORMALISERS.get(loss_type)
    if normaliser == NORM_ROW_TOKENS:
        return MODE_SEQ_MEAN, 0.0
    if normaliser == NORM_TOKENS:
        return MODE_TOKEN_MEAN, 0.0
    if normaliser == NORM_ROWS_LENGTH:
        return MODE_CONSTANT, 1.0 / (batch * norm_length)
    if normaliser == NORM_NUM_ITEMS:
        if has_num_items_tensor:
            return MODE_NORMALISER_TENSOR, 0.0
        if num_items_value is not None:
            return MODE_CONSTANT, 1.0 / num_items_value
        return MODE_TOKEN_MEAN, 0.0
    if normaliser == NORM_ROWS:
        return MODE_CONSTANT, 1.0 / batch
    if normaliser == NORM_LENGTH:
        return MODE_CONSTANT, 1.0 / norm_length
    raise ValueError(f"grpo_loss: unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")


def row_weights(mask: torch.Tensor, options: GrpoLossOptions, num_items_tensor: torch.Tensor | None) -> torch.Tensor:
    """float32 ``[B]``: the weight of each sequence's token-loss sum in the loss, known from the
    mask alone (so the gradient can be computed chunk by chunk, before the loss is summed): the
    finalize step's weights (:func:`aggregation`) as a tensor."""
    batch = mask.shape[0]
    mode, constant = aggregation(options.loss_type, batch, options.max_completion_length, options.num_items_value,
                                 num_items_tensor is not None)
    if mode == MODE_SEQ_MEAN:
        tokens = (mask != 0).sum(dim=1, dtype=torch.float32)
        return 1.0 / (batch * tokens.clamp(min=1.0))
    if mode == MODE_TOKEN_MEAN:
        tokens = (mask != 0).sum(dtype=torch.float32)
        return (1.0 / tokens.clamp(min=1.0)).expand(batch).contiguous()  # the kernels read [B]
    if mode == MODE_NORMALISER_TENSOR:
        return (1.0 / num_items_tensor.to(torch.float32)).expand(batch).contiguous()
    return torch.full((batch,), constant, dtype=torch.float32, device=mask.device)


# ---------------------------------------------------------------------------------------------
# Validation (every message names the op that was called)


def check_number(op: str, name: str, value, *, low: float, low_inclusive: bool = True, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value) or value < low or (value == low and not low_inclusive):
        bound = f">= {low}" if low_inclusive else f"> {low}"
        raise ValueError(f"{op}: {name} must be finite and {bound}, got {value}")


def check_tensor(op: str, name: str, tensor, shape, device, owner: str, dtypes=None) -> None:
    """``owner``: what the device is compared with, as the message says it ("logp is")."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(tensor).__name__}")
    if dtypes is not None and tensor.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be one of {dtypes}, got {tensor.dtype}")
    if shape is not None and tensor.shape != shape:  # torch.Size is a tuple: no conversion per check
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{op}: {name} is on {tensor.device} but {owner} on {device}")


def validate(op: str, shape, device, owner: str, dtype, old_logp, advantages, mask, ref_logp, beta, epsilon_low,
             epsilon_high, delta, dual_clip, loss_type, importance_sampling_level, max_completion_length,
             num_items_in_batch, kl_clamp=None, use_bias_correction_kl=False, sapo_temperature_pos=1.0,
             sapo_temperature_neg=1.05) -> None:
    """The loss arguments of ``op`` for ``[B, T] = shape`` tokens on ``device`` (``owner`` names
    the input that fixed them); ``old_logp`` / ``ref_logp`` must have ``dtype`` unless it is None."""
    shape = tuple(shape)
    for name, other in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if other is not None:
            check_tensor(op, name, other, shape, device, owner)
            if dtype is not None and other.dtype != dtype:
                raise TypeError(f"{op}: {name} must have logp's dtype {dtype}, got {other.dtype}")
    check_tensor(op, "advantages", advantages, None, device, owner, FLOAT_DTYPES)
    if advantages.shape not in ((shape[0],), shape):
        raise ValueError(
            f"{op}: advantages must have shape [B] = ({shape[0]},) or [B, T] = {shape}, "
            f"got {tuple(advantages.shape)}"
        )
    check_tensor(op, "mask", mask, shape, device, owner)
    if mask.dtype.is_complex:
        raise TypeError(f"{op}: mask must be bool, integer or float, got {mask.dtype}")
    if loss_type not in LOSS_NORMALISERS:
        raise ValueError(f"{op}: unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"{op}: importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
            f"got {importance_sampling_level!r}"
        )
    check_number(op, "beta", beta, low=0.0)
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"{op}: beta > 0 needs ref_logp (the reference model's log-probs)")
    check_number(op, "epsilon_low", epsilon_low, low=0.0)
    check_number(op, "epsilon_high", epsilon_high, low=0.0, optional=True)
    check_number(op, "delta", delta, low=0.0, low_inclusive=False, optional=True)
    check_number(op, "dual_clip", dual_clip, low=1.0, low_inclusive=False, optional=True)
    check_number(op, "kl_clamp", kl_clamp, low=0.0, low_inclusive=False, optional=True)
    if loss_type == "sapo":  # the temperatures are read by SAPO only (checked there: a few us per call)
        check_number(op, "sapo_temperature_pos", sapo_temperature_pos, low=0.0, low_inclusive=False)
        check_number(op, "sapo_temperature_neg", sapo_temperature_neg, low=0.0, low_inclusive=False)
        if delta is not None or dual_clip is not None:
            raise ValueError(f"{op}: loss_type='sapo' replaces the clip: delta and dual_clip must be None")
    elif loss_type == "cispo" and (delta is not None or dual_clip is not None):
        raise ValueError(f"{op}: loss_type='cispo' replaces the clip: delta and dual_clip must be None")
    if not isinstance(use_bias_correction_kl, bool):
        raise TypeError(f"{op}: use_bias_correction_kl must be a bool, got {type(use_bias_correction_kl).__name__}")
    if max_completion_length is not None:
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int):
            raise TypeError(f"{op}: max_completion_length must be an int, got {type(max_completion_length).__name__}")
        if max_completion_length < 1:
            raise ValueError(f"{op}: max_completion_length must be >= 1, got {max_completion_length}")
    if isinstance(num_items_in_batch, torch.Tensor):
        check_tensor(op, "num_items_in_batch", num_items_in_batch, None, device, owner)
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"{op}: num_items_in_batch must hold one number, got shape {tuple(num_items_in_batch.shape)}"
            )
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise TypeError(f"{op}: num_items_in_batch must be a real number, got {num_items_in_batch.dtype}")
    else:
        check_number(op, "num_items_in_batch", num_items_in_batch, low=0.0, low_inclusive=False, optional=True)


def options_from_arguments(op: str, length: int, beta, epsilon_low, epsilon_high, delta, dual_clip, loss_type,
                           importance_sampling_level, max_completion_length, num_items_in_batch, kl_clamp=None,
                           use_bias_correction_kl=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05):
    """The (validated) keyword arguments of the GRPO-loss ops as ``GrpoLossOptions``, plus
    ``num_items_in_batch`` as a float32 tensor when it was given as one (else None: it is an option).
    ``length`` is T, the default ``max_completion_length``."""
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_tensor, num_items_value = checked_normaliser(op, num_items_in_batch), None
    else:
        num_items_tensor = None
        num_items_value = None if num_items_in_batch is None else float(num_items_in_batch)
    options = GrpoLossOptions(
        beta=float(beta),
        epsilon_low=float(epsilon_low),
        epsilon_high=float(epsilon_low if epsilon_high is None else epsilon_high),
        delta=None if delta is None else float(delta),
        dual_clip=None if dual_clip is None else float(dual_clip),
        loss_type=loss_type,
        sequence_level=importance_sampling_level == "sequence",
        max_completion_length=int(length if max_completion_length is None else max_completion_length),
        num_items_value=num_items_value,
        kl_clamp=None if kl_clamp is None else float(kl_clamp),
        use_bias_correction_kl=bool(use_bias_correction_kl),
        sapo_temperature_pos=float(sapo_temperature_pos),
        sapo_temperature_neg=float(sapo_temperature_neg),
    )
    return num_items_tensor, options


def checked_normaliser(op: str, num_items: torch.Tensor) -> torch.Tensor:
    """The tensor ``num_items_in_batch`` as a 0-dim float32, refused like the number when it is not
    finite and > 0: a CPU tensor is read on the host in an eager call (a ValueError) and checked
    with ``torch._assert_async`` when traced. A CUDA tensor is checked by the kernel, which sets the
    device's error flag (no host sync; a device-side assert would end the CUDA context): the loss is
    NaN and :func:`gtalign_fast.ops.check_device_errors` raises (at once with
    ``GTALIGN_FAST_SYNC_CHECKS=1``)."""
    value = num_items.detach().reshape(()).to(torch.float32)
    if value.device.type != "cpu":
        return value
    if plain_eager(value):
        explain_normaliser(op, value)
    else:
        torch._assert_async(torch.isfinite(value) & (value > 0), f"{op}: num_items_in_batch must be finite and > 0")
    return value


def explain_normaliser(op: str, num_items: torch.Tensor) -> None:
    number = float(num_items.reshape(-1)[0])
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{op}: num_items_in_batch must be finite and > 0, got {number}")


# ---------------------------------------------------------------------------------------------
# Reference loss and metrics


def reference_loss(logp, old_logp, ref_logp, advantages, mask, num_items_tensor, options: GrpoLossOptions):
    """``reference.grpo_loss`` with the op's options (what every op's reference backend computes)."""
    num_items = num_items_tensor if num_items_tensor is not None else options.num_items_value
    return reference.grpo_loss(
        logp, old_logp, advantages, mask, ref_logp, options.beta, options.epsilon_low, options.epsilon_high,
        options.delta, options.dual_clip, options.loss_type, "sequence" if options.sequence_level else "token",
        options.max_completion_length, num_items, options.kl_clamp, options.use_bias_correction_kl,
        options.sapo_temperature_pos, options.sapo_temperature_neg,
    )


def write_metrics(ref_metrics: dict, out: torch.Tensor) -> None:
    """The reference's metrics dict into the first ``NUM_METRICS`` entries of the metrics vector."""
    for index, name in enumerate(METRIC_NAMES):
        out[index] = ref_metrics[name] if name in ref_metrics else 0.0


def metrics_dict(metrics: torch.Tensor, has_ref: bool, extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The metrics vector as the ops return it: ``METRIC_NAMES`` then ``extra``, without ``kl``
    when no ``ref_logp`` was given."""
    values = metrics.detach().unbind()  # one call for the 0-dim views
    names = METRIC_NAMES + extra if extra else METRIC_NAMES
    return {name: value for name, value in zip(names, values) if has_ref or name != "kl"}


@contextlib.contextmanager
def autograd_inside_op():
    """Re-enable autograd inside a custom op (which runs below the autograd dispatch keys), so the
    reference backward is autograd through the reference itself, not a second hand-written formula."""
    keys = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView)
    with contextlib.ExitStack() as stack:
        for key in keys:
            stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(key, False))
        stack.enter_context(torch.enable_grad())
        yield


def kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """uint8 view of the mask, nonzero = counted (a bool mask is reinterpreted, not copied)."""
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    if mask.dtype == torch.uint8:
        return mask
    return (mask != 0).view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# The objective as one value


@dataclasses.dataclass(frozen=True)
class GrpoObjective:
    """The GRPO objective's hyper-parameters, named as the ops' keyword arguments (TRL's names).

    Built once (by the trainer from its config; by the TRL and verl adapters from theirs through
    :func:`cached_objective`) and passed to whichever op computes the loss as
    ``**objective.op_kwargs(num_items_in_batch)``.
    """

    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    dual_clip: float | None = None
    loss_type: str = "grpo"
    importance_sampling_level: str = "token"
    max_completion_length: int | None = None
    kl_clamp: float | None = None
    use_bias_correction_kl: bool = False
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_NORMALISERS:
            raise ValueError(f"GrpoObjective: unknown loss_type {self.loss_type!r}; choose one of {LOSS_TYPES}")
        # the op keywords, built once: a call adds only num_items_in_batch
        object.__setattr__(self, "_kwargs", {name: getattr(self, name) for name in _OBJECTIVE_FIELDS})

    @classmethod
    def from_config(cls, args) -> GrpoObjective:
        """From a :class:`~gtalign_fast.GRPOConfig` (TRL's field names)."""
        return cls(
            beta=args.beta, epsilon_low=args.epsilon, epsilon_high=args.epsilon_high, delta=args.delta,
            dual_clip=args.dual_clip, loss_type=args.loss_type,
            importance_sampling_level=args.importance_sampling_level,
            max_completion_length=args.max_completion_length, use_bias_correction_kl=args.use_bias_correction_kl,
            sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
        )

    @property
    def normaliser(self) -> str:
        """The loss type's normaliser (``_grpo_constants.NORM_*``)."""
        return LOSS_NORMALISERS[self.loss_type]

    @property
    def micro_batch_share(self) -> str:
        """"global_tokens", "sequences" or "local_tokens" (``_grpo_constants.MICRO_BATCH_SHARES``)."""
        return MICRO_BATCH_SHARES[self.normaliser]

    def op_kwargs(self, num_items_in_batch=None) -> dict[str, Any]:
        """The keyword arguments of ``grpo_loss`` / ``logits_grpo_loss`` / ``linear_grpo_loss``."""
        return {**self._kwargs, "num_items_in_batch": num_items_in_batch}


_OBJECTIVE_FIELDS = tuple(field.name for field in dataclasses.fields(GrpoObjective))


@functools.lru_cache(maxsize=256)
def cached_objective(**fields: Any) -> GrpoObjective:
    """``GrpoObjective(**fields)``, built once per distinct set of values: for adapters that get
    their settings on every call (TRL's ``_compute_loss``, verl's policy-loss function), so a call
    costs a cache lookup rather than a construction."""
    return GrpoObjective(**fields)
