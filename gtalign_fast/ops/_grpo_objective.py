"""The GRPO objective, once, for the three ops that compute it and the code that calls them.

``grpo_loss`` (from log-probs), ``logits_grpo_loss`` (from logits) and ``linear_grpo_loss`` (from
hidden states) compute one objective: the clipped surrogate with k3 KL and a loss-type normaliser.
What they share lives here (as Liger's ``LigerFusedLinearPPOBase`` holds what every PPO-style loss
shares):

- :class:`GrpoLossOptions`, the op-level scalars, and :func:`options_type`, which builds the fused
  ops' option tuples from it (its fields, then theirs) instead of copying the fields;
- :func:`resolve_options`, the checks of the loss arguments (naming the op that was called) and
  their normalised form, the scalars checked once per distinct set of values;
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
from typing import Any, NamedTuple, TypedDict

import torch

from .. import reference
from ._grpo_constants import (
    LOSS_NORMALISERS,
    LOSS_TYPES,
    METRIC_HIGH,
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
    VESPO_METRIC,
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
    vespo_k_pos: float = 2.0  # loss_type="vespo" only (TRL's defaults)
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    @property
    def whole_rows(self) -> bool:
        """Whether a kernel row must be a whole sequence: the sequence ratio (GSPO) and VESPO's
        sequence weight are sums over the row (the fused ops then chunk by sequences)."""
        return self.sequence_level or self.loss_type == "vespo"


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


def check_inputs(op: str, shape, device, owner: str, dtype, old_logp, advantages, mask, ref_logp) -> None:
    """The loss tensors of ``op`` for ``[B, T] = shape`` tokens on ``device`` (``owner`` names the
    input that fixed them); ``old_logp`` / ``ref_logp`` must have ``dtype`` unless it is None."""
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


def check_scalars(op: str, has_ref: bool, o: dict) -> None:
    """The scalar options ``o`` (every option of :class:`GrpoOptions`, the defaults merged in; a
    ``num_items_in_batch`` tensor is checked by :func:`resolve_options`); ``has_ref``: whether
    ``ref_logp`` was given."""
    loss_type, level = o["loss_type"], o["importance_sampling_level"]
    if loss_type not in LOSS_NORMALISERS:
        raise ValueError(f"{op}: unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"{op}: importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}")
    check_number(op, "beta", o["beta"], low=0.0)
    if o["beta"] != 0.0 and not has_ref:
        raise ValueError(f"{op}: beta > 0 needs ref_logp (the reference model's log-probs)")
    check_number(op, "epsilon_low", o["epsilon_low"], low=0.0)
    check_number(op, "epsilon_high", o["epsilon_high"], low=0.0, optional=True)
    check_number(op, "delta", o["delta"], low=0.0, low_inclusive=False, optional=True)
    check_number(op, "dual_clip", o["dual_clip"], low=1.0, low_inclusive=False, optional=True)
    check_number(op, "kl_clamp", o["kl_clamp"], low=0.0, low_inclusive=False, optional=True)
    _check_objective(op, loss_type, o)
    if not isinstance(o["use_bias_correction_kl"], bool):
        raise TypeError(
            f"{op}: use_bias_correction_kl must be a bool, got {type(o['use_bias_correction_kl']).__name__}"
        )
    length = o["max_completion_length"]
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"{op}: max_completion_length must be an int, got {type(length).__name__}")
        if length < 1:
            raise ValueError(f"{op}: max_completion_length must be >= 1, got {length}")
    num_items_in_batch = o["num_items_in_batch"]
    if not isinstance(num_items_in_batch, torch.Tensor):
        check_number(op, "num_items_in_batch", num_items_in_batch, low=0.0, low_inclusive=False, optional=True)


def _check_num_items_tensor(op: str, num_items_in_batch: torch.Tensor, device, owner: str) -> None:
    check_tensor(op, "num_items_in_batch", num_items_in_batch, None, device, owner)
    if num_items_in_batch.numel() != 1:
        raise ValueError(f"{op}: num_items_in_batch must hold one number, got shape {tuple(num_items_in_batch.shape)}")
    if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
        raise TypeError(f"{op}: num_items_in_batch must be a real number, got {num_items_in_batch.dtype}")


def _check_is_ratio(op: str, is_ratio, shape, device, owner: str) -> None:
    check_tensor(op, "importance_sampling_ratio", is_ratio, None, device, owner, FLOAT_DTYPES)
    if is_ratio.shape not in ((shape[0],), (shape[0], 1), tuple(shape)):
        raise ValueError(
            f"{op}: importance_sampling_ratio must have shape [B] = ({shape[0]},), [B, 1] or [B, T] = {tuple(shape)}, "
            f"got {tuple(is_ratio.shape)}"
        )


def kernel_is_ratio(is_ratio: torch.Tensor | None) -> torch.Tensor | None:
    """The importance-sampling ratio as the kernels take it: float32, detached, ``[B]`` (per sequence;
    ``[B, 1]`` too) or ``[B, T]`` with a nonzero time stride (an expanded per-token view is copied:
    the kernels read a time stride of 0 as one ratio per sequence, which VESPO adds once)."""
    if is_ratio is None:
        return None
    is_ratio = is_ratio.detach().to(torch.float32)
    if is_ratio.dim() == 2 and is_ratio.shape[1] == 1:
        return is_ratio.reshape(-1)
    if is_ratio.dim() == 2 and is_ratio.stride(1) == 0:
        return is_ratio.contiguous()
    return is_ratio


_UNCLIPPED = ("sapo", "cispo", "vespo")  # objectives that replace the clip (delta and dual_clip refused)


def _check_objective(op: str, loss_type: str, o: dict) -> None:
    """The options of the objectives other than the clip, checked only when selected."""
    if loss_type == "sapo":
        check_number(op, "sapo_temperature_pos", o["sapo_temperature_pos"], low=0.0, low_inclusive=False)
        check_number(op, "sapo_temperature_neg", o["sapo_temperature_neg"], low=0.0, low_inclusive=False)
    elif loss_type == "vespo":
        for name in ("vespo_k_pos", "vespo_k_neg"):
            check_number(op, name, o[name], low=0.0)
        for name in ("vespo_lambda_pos", "vespo_lambda_neg"):
            check_number(op, name, o[name], low=0.0, low_inclusive=False)
    if loss_type in _UNCLIPPED and (o["delta"] is not None or o["dual_clip"] is not None):
        raise ValueError(f"{op}: loss_type={loss_type!r} replaces the clip: delta and dual_clip must be None")


def resolve_options(op: str, shape, device, owner: str, dtype, old_logp, advantages, mask, ref_logp,
                    options: dict) -> tuple[torch.Tensor | None, GrpoLossOptions, torch.Tensor | None]:
    """The ops' ``**options`` (:class:`GrpoOptions`) for the loss tensors, checked and normalised:
    ``(num_items_tensor, options, is_ratio)``. The tensors are checked on every call
    (:func:`check_inputs`); the scalars once per distinct set of values (:func:`scalar_options`).
    A keyword that is not an option is a TypeError naming ``op``."""
    if not _OPTION_NAMES >= options.keys():
        unknown = sorted(options.keys() - _OPTION_NAMES)[0]
        raise TypeError(f"{op}() got an unexpected keyword argument {unknown!r}")
    check_inputs(op, shape, device, owner, dtype, old_logp, advantages, mask, ref_logp)
    num_items = options.get("num_items_in_batch")
    is_ratio = options.get("importance_sampling_ratio")
    num_items_is_tensor = isinstance(num_items, torch.Tensor)
    scalars = options
    if num_items_is_tensor or "importance_sampling_ratio" in options:  # the tensors stay out of the cache key
        scalars = {name: value for name, value in options.items() if name not in _PER_CALL_OPTIONS}
        if not num_items_is_tensor:
            scalars["num_items_in_batch"] = num_items
    grpo = scalar_options(op, shape[1], ref_logp is not None, scalars)
    if num_items_is_tensor:
        _check_num_items_tensor(op, num_items, device, owner)
    if is_ratio is not None:
        _check_is_ratio(op, is_ratio, shape, device, owner)
    num_items_tensor = checked_normaliser(op, num_items) if num_items_is_tensor else None
    return num_items_tensor, grpo, None if is_ratio is None else kernel_is_ratio(is_ratio)


# The options that may be tensors: checked on every call, never part of scalar_options' cache key.
_PER_CALL_OPTIONS = ("num_items_in_batch", "importance_sampling_ratio")

# scalar_options' cache: (T, has_ref, the options' items, their types) -> GrpoLossOptions. Types are
# part of the key because 1 == 1.0 == True (a bool beta or an int use_bias_correction_kl is refused).
_SCALAR_OPTIONS: dict[tuple, GrpoLossOptions] = {}
_SCALAR_OPTIONS_MAX = 256  # distinct option sets (num_items_in_batch given as a number varies per step)


def scalar_options(op: str, length: int, has_ref: bool, scalars: dict) -> GrpoLossOptions:
    """The scalar options ``scalars`` (no tensor) checked by :func:`check_scalars` and normalised by
    :func:`options_from_arguments`, once per distinct set of values: every op call resolves its
    options, and the checks cost more than the smallest kernels. A set that fails a check is not
    stored, so it raises on every call with the same message. ``length`` is T."""
    key = (length, has_ref, tuple(scalars.items()), tuple(map(type, scalars.values())))
    try:
        options = _SCALAR_OPTIONS.get(key)
    except TypeError:  # an unhashable value: the checks refuse it, with their own message
        key, options = None, None
    if options is None:
        merged = {**OPTION_DEFAULTS, **scalars}
        check_scalars(op, has_ref, merged)
        options = options_from_arguments(length, merged)
        if key is not None:
            if len(_SCALAR_OPTIONS) >= _SCALAR_OPTIONS_MAX:
                _SCALAR_OPTIONS.clear()
            _SCALAR_OPTIONS[key] = options
    return options


def options_from_arguments(length: int, o: dict) -> GrpoLossOptions:
    """The (checked) scalar options ``o`` as ``GrpoLossOptions`` (``num_items_in_batch`` as
    ``num_items_value`` when it is a number; a tensor is the op's input instead). ``length`` is T,
    the default ``max_completion_length``."""
    num_items_in_batch = o["num_items_in_batch"]
    num_items_value = None if num_items_in_batch is None else float(num_items_in_batch)
    epsilon_high, delta, dual_clip = o["epsilon_high"], o["delta"], o["dual_clip"]
    max_completion_length, kl_clamp = o["max_completion_length"], o["kl_clamp"]
    return GrpoLossOptions(
        beta=float(o["beta"]),
        epsilon_low=float(o["epsilon_low"]),
        epsilon_high=float(o["epsilon_low"] if epsilon_high is None else epsilon_high),
        delta=None if delta is None else float(delta),
        dual_clip=None if dual_clip is None else float(dual_clip),
        loss_type=o["loss_type"],
        sequence_level=o["importance_sampling_level"] == "sequence",
        max_completion_length=int(length if max_completion_length is None else max_completion_length),
        num_items_value=num_items_value,
        kl_clamp=None if kl_clamp is None else float(kl_clamp),
        use_bias_correction_kl=bool(o["use_bias_correction_kl"]),
        **{name: float(o[name]) for name in _OBJECTIVE_FLOATS},
    )


# The float options of the objectives beyond the clip (GrpoLossOptions' last fields).
_OBJECTIVE_FLOATS = ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                     "vespo_lambda_neg")


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


def reference_loss(logp, old_logp, ref_logp, advantages, mask, num_items_tensor, is_ratio, options: GrpoLossOptions):
    """``reference.grpo_loss`` with the op's options (what every op's reference backend computes)."""
    num_items = num_items_tensor if num_items_tensor is not None else options.num_items_value
    return reference.grpo_loss(
        logp, old_logp, advantages, mask, ref_logp, options.beta, options.epsilon_low, options.epsilon_high,
        options.delta, options.dual_clip, options.loss_type, "sequence" if options.sequence_level else "token",
        options.max_completion_length, num_items, options.kl_clamp, options.use_bias_correction_kl,
        options.sapo_temperature_pos, options.sapo_temperature_neg, options.vespo_k_pos, options.vespo_lambda_pos,
        options.vespo_k_neg, options.vespo_lambda_neg, is_ratio,
    )


def row_metrics(options: GrpoLossOptions, advantages: torch.Tensor) -> bool:
    """Whether the metrics are means over the ``B`` sequences (one value per row, as TRL's): the
    ratio (GSPO) or VESPO's weight, and the advantage, are per sequence."""
    return options.whole_rows and advantages.dim() == 1


def write_metrics(ref_metrics: dict, out: torch.Tensor) -> None:
    """The reference's metrics dict into the first ``NUM_METRICS`` entries of the metrics vector."""
    for index, name in enumerate(METRIC_NAMES):
        out[index] = ref_metrics[name] if name in ref_metrics else 0.0
    if VESPO_METRIC in ref_metrics:
        out[METRIC_HIGH] = ref_metrics[VESPO_METRIC]


_NOT_VESPO = frozenset(("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "ratio_mean"))


def metrics_dict(metrics: torch.Tensor, has_ref: bool, extra: tuple[str, ...] = (),
                 vespo: bool = False) -> dict[str, torch.Tensor]:
    """The metrics vector as the ops return it: ``METRIC_NAMES`` then ``extra``, without ``kl``
    when no ``ref_logp`` was given; for VESPO (``vespo``) TRL's ``vespo/phi_seq_mean`` instead of
    the clip ratios and ``ratio_mean``."""
    values = metrics.detach().unbind()  # one call for the 0-dim views
    names = METRIC_NAMES + extra if extra else METRIC_NAMES
    out = {name: value for name, value in zip(names, values) if has_ref or name != "kl"}
    if vespo:
        out = {VESPO_METRIC: values[METRIC_HIGH]} | {k: v for k, v in out.items() if k not in _NOT_VESPO}
    return out


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


# The options of the three GRPO ops, documented once: every op's docstring shows this text in place
# of its ``%(grpo_options)s`` line (:func:`document_options`), and so does GrpoObjective's.
OPTION_DOCS = """\
    beta : float, default 0.0
        Weight of the k3 KL, added to each token's loss before aggregation (as TRL does).
    epsilon_low, epsilon_high : float, default 0.2 and ``epsilon_low``
        Clip range ``[1 - epsilon_low, 1 + epsilon_high]`` (``epsilon_high > epsilon_low``:
        DAPO's clip-higher; ``loss_type="cispo"``: the ratio cap is ``epsilon_high`` itself).
    delta : float, optional
        Upper cap on the unclipped ratio (TRL's ``delta``, two-sided GRPO), ``> 0``.
    dual_clip : float, optional
        verl's ``clip_ratio_c`` (``> 1``, usually 3): for ``A < 0`` the token loss is at most
        ``-dual_clip * A``.
    importance_sampling_ratio : Tensor, shape ``[B]``, ``[B, 1]`` or ``[B, T]``, any float dtype, optional
        Per-sequence or per-token weights ``>= 0`` of the policy term, no gradient: TRL's vLLM
        ``importance_sampling_ratio`` (truncated or masked IS of ``vllm_importance_sampling_mode``),
        verl's ``rollout_is_weights``. ``loss_t = is_t * pg_t + beta * kl_t``; the clip metrics are
        counted before weighting. With ``loss_type="vespo"`` the ratio enters the sequence weight
        instead, as TRL: ``log w += sum_t mask * clip(log is_t, ln 1e-8, 20)`` (per sequence: once).
    loss_type : str, default "grpo"
        The objective and the aggregation, with ``S_b = sum_t mask * loss_t``, ``n_b`` the tokens of
        row ``b``, ``N = sum_b n_b`` (counts are clamped to >= 1) and ``L = max_completion_length``:

        - ``"grpo"``, ``"sapo"`` (SAPO's objective), ``"seq-mean-token-mean"``: ``mean_b(S_b / n_b)``
        - ``"bnpo"``, ``"token-mean"``: ``sum_b S_b / N``
        - ``"dr_grpo"``: ``sum_b S_b / (B * L)``
        - ``"dapo"``, ``"cispo"``, ``"vespo"`` (CISPO's and VESPO's objectives):
          ``sum_b S_b / num_items_in_batch`` (default ``N``)
        - ``"luspo"`` (TRL's name), ``"seq-mean-token-sum"`` (verl's): ``mean_b S_b``
        - ``"seq-mean-token-sum-norm"``: ``sum_b S_b / L`` (verl's Dr. GRPO form)

        ``"sapo"``, ``"cispo"`` and ``"vespo"`` replace the clip and refuse ``delta`` and ``dual_clip``.
    importance_sampling_level : {"token", "sequence"}, default "token"
        Per-token ratios, or one per sequence (GSPO: the exp of the masked mean log-ratio).
    max_completion_length : int, optional
        ``L`` above (``dr_grpo`` and ``seq-mean-token-sum-norm`` only); default ``T``.
    num_items_in_batch : int, float or 0-dim Tensor, optional
        ``dapo``, ``cispo`` and ``vespo`` only: the global number of completion tokens across
        processes, finite and ``> 0`` (a CUDA tensor is read and checked by the kernel on the device,
        without a host sync: a bad one gives a NaN loss and an error from ``check_device_errors``;
        a CPU tensor is checked like the number). Ignored by the other loss types.
    kl_clamp : float, optional
        Bound on each token's k3 value, ``> 0``: ``kl = clip(kl, -kl_clamp, kl_clamp)``, no KL
        gradient where it binds. verl's ``low_var_kl`` clamps at 10
        (:data:`gtalign_fast.ops._grpo_constants.KL_LIMIT`; verl's plugin passes it); TRL and Liger do
        not clamp, nor does the default (None). Either way ``d`` is clamped to [-20, 20] first, as
        verl does (TRL does not; it only matters where TRL's KL exceeds ``exp(20) - 21``, 4.9e8).
    use_bias_correction_kl : bool, default False
        TRL's ``use_bias_correction_kl`` (its ``GRPOConfig`` default is True): the k3 term is
        multiplied by the importance ratio ``r`` (the sequence's at sequence level, before
        ``delta``), with its gradient through ``r``; the ``kl`` metric is then that product, as
        TRL logs it.
    sapo_temperature_pos, sapo_temperature_neg : float, default 1.0 and 1.05
        SAPO's temperatures (TRL's names and defaults), ``> 0``; ``loss_type="sapo"`` only. The clip
        metrics still report where ``r`` leaves ``[1 - epsilon_low, 1 + epsilon_high]``.
    vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg : float, default 2.0, 3.0, 3.0, 2.0
        VESPO's Gamma weight (TRL's names and defaults; ``loss_type="vespo"`` only): ``k >= 0``, the
        power, and ``lambda > 0``, the decay (used as ``max(lambda, 1e-4)``, as TRL), the ``_pos``
        pair where ``A >= 0``, else the ``_neg`` pair.
"""


def document_options(function):
    """Put :data:`OPTION_DOCS` in place of the ``%(grpo_options)s`` line of ``function``'s docstring."""
    if function.__doc__:  # None under python -OO
        function.__doc__ = function.__doc__.replace("    %(grpo_options)s\n", OPTION_DOCS)
    return function


@dataclasses.dataclass(frozen=True)
class GrpoObjective:
    """The GRPO objective's hyper-parameters, named as the ops' keyword arguments (TRL's names):
    the one declaration of the GRPO options (names, types, defaults) of ``grpo_loss``,
    ``logits_grpo_loss`` and ``linear_grpo_loss``, whose ``**options`` are :class:`GrpoOptions`.

    Built once (by the trainer from its config; by the TRL and verl adapters from theirs through
    :func:`cached_objective`) and passed to whichever op computes the loss as
    ``**objective.op_kwargs(num_items_in_batch)``.

    Parameters
    ----------
    %(grpo_options)s
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
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

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
            vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
            vespo_lambda_neg=args.vespo_lambda_neg,
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
document_options(GrpoObjective)

# The ops' option keywords: GrpoObjective's fields and the per-call num_items_in_batch. GrpoOptions is
# generated from GrpoObjective (so the options are declared once) for the ops' ``**options: Unpack[...]``.
OPTION_DEFAULTS: dict[str, Any] = {field.name: field.default for field in dataclasses.fields(GrpoObjective)}
OPTION_DEFAULTS["num_items_in_batch"] = None
OPTION_DEFAULTS["importance_sampling_ratio"] = None
_OPTION_NAMES = OPTION_DEFAULTS.keys()
GrpoOptions = TypedDict(  # noqa: UP013 (generated from GrpoObjective's fields: the class syntax cannot be)
    "GrpoOptions",
    {**typing.get_type_hints(GrpoObjective), "num_items_in_batch": int | float | torch.Tensor | None,
     "importance_sampling_ratio": torch.Tensor | None},
    total=False,
)
GrpoOptions.__doc__ = "The GRPO ops' option keywords (see :class:`GrpoObjective`), all optional."


@functools.lru_cache(maxsize=256)
def cached_objective(**fields: Any) -> GrpoObjective:
    """``GrpoObjective(**fields)``, built once per distinct set of values: for adapters that get
    their settings on every call (TRL's ``_compute_loss``, verl's policy-loss function), so a call
    costs a cache lookup rather than a construction."""
    return GrpoObjective(**fields)
