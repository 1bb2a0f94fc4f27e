"""``grpo_loss``: the public op, its torch.library registration and its backends.

Forward and backward are two custom ops, ``gtalign_fast::grpo_loss`` and
``gtalign_fast::grpo_loss_backward``; autograd links them. Each resolves its backend at run time
(inside the op). The forward returns, besides the loss and the metrics, two small per-row
tensors the backward needs: ``row_stats [B, 8]`` (partial sums of each sequence, see
``kernels/grpo_loss.py``) and ``row_weights [B]`` (the weight of each sequence's token sum in the
loss, which the aggregation mode fixes).

Plain eager calls skip torch.library's per-call machinery (see :func:`_plain_eager`): they run
the same forward and backward through a ``torch.autograd.Function``. The custom ops serve
torch.compile, export, fake tensors and the other tracing modes.
"""

from __future__ import annotations

import contextlib
import math

import torch

from . import _backend, reference

OP = "grpo_loss"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LOSS_TYPES = reference.GRPO_LOSS_TYPES
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
METRIC_NAMES = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl", "ratio_mean")
NUM_STATS = 8

# Aggregation modes of the finalize step (same numbers in kernels/grpo_loss.py and the C++/CUDA code).
MODE_SEQ_MEAN = 0  # w_b = 1 / (B * max(n_b, 1))
MODE_TOKEN_MEAN = 1  # w_b = 1 / max(sum n_b, 1)
MODE_NORMALISER_TENSOR = 2  # w_b = 1 / num_items, read on the device
MODE_CONSTANT = 3  # w_b = const_weight


def aggregation(loss_type: str, batch: int, norm_length: int, num_items_value: float | None, has_num_items_tensor: bool):
    """The finalize mode and the constant per-row weight of ``loss_type`` (see the docstring of
    :func:`grpo_loss` for the formulas)."""
    if loss_type in ("grpo", "seq-mean-token-mean"):
        return MODE_SEQ_MEAN, 0.0
    if loss_type in ("bnpo", "token-mean"):
        return MODE_TOKEN_MEAN, 0.0
    if loss_type == "dr_grpo":
        return MODE_CONSTANT, 1.0 / (batch * norm_length)
    if loss_type == "dapo":
        if has_num_items_tensor:
            return MODE_NORMALISER_TENSOR, 0.0
        if num_items_value is not None:
            return MODE_CONSTANT, 1.0 / num_items_value
        return MODE_TOKEN_MEAN, 0.0
    if loss_type == "seq-mean-token-sum":
        return MODE_CONSTANT, 1.0 / batch
    if loss_type == "seq-mean-token-sum-norm":
        return MODE_CONSTANT, 1.0 / norm_length
    raise ValueError(f"grpo_loss: unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")


# ---------------------------------------------------------------------------------------------
# Kernel-side layout: every per-token input as a strided [B, T] view, float32 advantages, uint8 mask


def _kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """uint8 view of the mask, nonzero = counted (a bool mask is reinterpreted, not copied)."""
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    if mask.dtype == torch.uint8:
        return mask
    return (mask != 0).view(torch.uint8)


def _kernel_advantages(advantages: torch.Tensor, shape) -> torch.Tensor:
    """float32 ``[B, T]`` view of the advantages; ``[B]`` ones are expanded with time stride 0."""
    advantages = advantages.to(torch.float32)
    if advantages.dim() == 1:  # = unsqueeze(1).expand(shape), in one op (a few us less per call)
        return advantages.as_strided(shape, (advantages.stride(0), 0))
    return advantages


_EXTENSION_OPS: dict[tuple[str, str], object] = {}  # (name, dispatch key) -> op, once found


def _extension_op(name: str, device: torch.device):
    """The extension's kernel ``name``, or a clear error when the built extension predates it."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    op = _EXTENSION_OPS.get((name, key))
    if op is not None:
        return op
    ops = torch.ops.gtalign_fast_C
    if not hasattr(ops, name) or not torch._C._dispatch_has_kernel_for_dispatch_key(f"gtalign_fast_C::{name}", key):
        raise RuntimeError(
            f"gtalign_fast.grpo_loss: the compiled extension has no {key} {name} kernel; rebuild it "
            "(python setup.py build_ext --inplace)"
        )
    op = _EXTENSION_OPS[(name, key)] = getattr(ops, name)
    return op


# ---------------------------------------------------------------------------------------------
# Backends


def _reference_loss(logp, old_logp, ref_logp, advantages, mask, num_items_tensor, beta, epsilon_low, epsilon_high,
                    delta, dual_clip, loss_type, sequence_level, max_completion_length, num_items_value):
    num_items = num_items_tensor if num_items_tensor is not None else num_items_value
    return reference.grpo_loss(
        logp, old_logp, advantages, mask, ref_logp, beta, epsilon_low, epsilon_high, delta, dual_clip, loss_type,
        "sequence" if sequence_level else "token", max_completion_length, num_items,
    )


def _forward_reference(args, loss, metrics, row_stats, row_weights):
    ref_loss, ref_metrics = _reference_loss(*args)
    loss.copy_(ref_loss)
    for index, name in enumerate(METRIC_NAMES):
        metrics[index] = ref_metrics[name] if name in ref_metrics else 0.0
    # The reference backward recomputes through autograd: the per-row tensors are not used.
    row_stats.zero_()
    row_weights.zero_()


def _run_forward(name, args, mode, const_weight, row_metrics, loss, metrics, row_stats, row_weights):
    (logp, old_logp, ref_logp, advantages, mask, num_items_tensor, beta, epsilon_low, epsilon_high, delta, dual_clip,
     _loss_type, sequence_level, _length, _num_items_value) = args
    if name == "reference":
        _forward_reference(args, loss, metrics, row_stats, row_weights)
        return
    kernel_args = (
        logp, old_logp, ref_logp, _kernel_advantages(advantages, logp.shape), _kernel_mask(mask), num_items_tensor,
        beta, epsilon_low, epsilon_high, math.inf if delta is None else delta, 0.0 if dual_clip is None else dual_clip,
        sequence_level, row_metrics, mode, const_weight, loss, metrics, row_stats, row_weights,
    )
    if name == "triton":
        from gtalign_fast.kernels import grpo_loss as triton_kernels

        triton_kernels.grpo_loss_forward(*kernel_args)
    else:  # "cpu" and "cuda": the compiled extension, dispatched by device
        _extension_op("grpo_loss_fwd", logp.device)(*kernel_args)


@contextlib.contextmanager
def _autograd_inside_op():
    """Re-enable autograd inside a custom op (which runs below the autograd dispatch keys), so the
    reference backward is autograd through the reference itself, not a second hand-written formula."""
    keys = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView)
    with contextlib.ExitStack() as stack:
        for key in keys:
            stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(key, False))
        stack.enter_context(torch.enable_grad())
        yield


def _backward_reference(grad_loss, args, ref_grad, dlogp, dref):
    logp, ref_logp = args[0], args[2]
    with _autograd_inside_op():
        leaves = [logp.detach().requires_grad_(True)]
        ref_leaf = ref_logp.detach().requires_grad_(True) if ref_grad else ref_logp
        if ref_grad:
            leaves.append(ref_leaf)
        loss, _ = _reference_loss(leaves[0], args[1], ref_leaf, *args[3:])
        grads = torch.autograd.grad(loss, leaves, grad_loss.to(loss.dtype))
    dlogp.copy_(grads[0])
    if ref_grad:
        dref.copy_(grads[1])


def _run_backward(name, grad_loss, args, row_stats, row_weights, ref_grad, dlogp, dref):
    (logp, old_logp, ref_logp, advantages, mask, _num_items_tensor, beta, epsilon_low, epsilon_high, delta,
     dual_clip, _loss_type, sequence_level, _length, _num_items_value) = args
    if name == "reference":
        _backward_reference(grad_loss, args, ref_grad, dlogp, dref)
        return
    kernel_args = (
        grad_loss, row_weights, row_stats, logp, old_logp, ref_logp, _kernel_advantages(advantages, logp.shape),
        _kernel_mask(mask), beta, epsilon_low, epsilon_high, math.inf if delta is None else delta,
        0.0 if dual_clip is None else dual_clip, sequence_level,
    )
    if name == "triton":
        from gtalign_fast.kernels import grpo_loss as triton_kernels

        triton_kernels.grpo_loss_backward(*kernel_args, dlogp, dref if ref_grad else None)
    else:
        _extension_op("grpo_loss_bwd", logp.device)(*kernel_args, dlogp, dref)


# ---------------------------------------------------------------------------------------------
# Custom ops


def _forward(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    num_items_tensor: torch.Tensor | None,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    dual_clip: float | None,
    loss_type: str,
    sequence_level: bool,
    max_completion_length: int,
    num_items_value: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward op's body: (loss, metrics, row_stats, row_weights)."""
    name = _backend.resolve(OP, logp.device, backend)
    _backend.record(OP, name)
    batch = logp.shape[0]
    mode, const_weight = aggregation(loss_type, batch, max_completion_length, num_items_value, num_items_tensor is not None)
    row_metrics = sequence_level and advantages.dim() == 1
    loss = _backend.new_output((), torch.float32, logp.device)
    metrics = _backend.new_output((len(METRIC_NAMES),), torch.float32, logp.device)
    row_stats = _backend.new_output((batch, NUM_STATS), torch.float32, logp.device)
    row_weights = _backend.new_output((batch,), torch.float32, logp.device)
    args = (logp, old_logp, ref_logp, advantages, mask, num_items_tensor, beta, epsilon_low, epsilon_high, delta,
            dual_clip, loss_type, sequence_level, max_completion_length, num_items_value)
    _run_forward(name, args, mode, const_weight, row_metrics, loss, metrics, row_stats, row_weights)
    return loss, metrics, row_stats, row_weights


# The custom op runs the same function; the plain one stays callable for the eager path below.
_grpo_loss_op = torch.library.custom_op("gtalign_fast::grpo_loss", mutates_args=())(_forward)


@_grpo_loss_op.register_fake
def _(logp, old_logp, ref_logp, advantages, mask, num_items_tensor, beta, epsilon_low, epsilon_high, delta, dual_clip,
      loss_type, sequence_level, max_completion_length, num_items_value, backend):
    batch = logp.shape[0]
    return (
        logp.new_empty((), dtype=torch.float32),
        logp.new_empty((len(METRIC_NAMES),), dtype=torch.float32),
        logp.new_empty((batch, NUM_STATS), dtype=torch.float32),
        logp.new_empty((batch,), dtype=torch.float32),
    )


def _backward_impl(
    grad_loss: torch.Tensor,
    row_stats: torch.Tensor,
    row_weights: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    num_items_tensor: torch.Tensor | None,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    dual_clip: float | None,
    loss_type: str,
    sequence_level: bool,
    max_completion_length: int,
    num_items_value: float | None,
    ref_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward op's body: (dlogp, dref)."""
    name = _backend.resolve(OP, logp.device, backend)
    _backend.record(OP, name)
    dlogp = _backend.new_output(logp.shape, logp.dtype, logp.device)
    dref = _backend.new_output(ref_logp.shape if ref_grad else (0,), logp.dtype, logp.device)
    args = (logp, old_logp, ref_logp, advantages, mask, num_items_tensor, beta, epsilon_low, epsilon_high, delta,
            dual_clip, loss_type, sequence_level, max_completion_length, num_items_value)
    grad_loss = grad_loss.to(torch.float32).reshape(())
    _run_backward(name, grad_loss, args, row_stats, row_weights, ref_grad, dlogp, dref)
    return dlogp, dref


_grpo_loss_backward_op = torch.library.custom_op("gtalign_fast::grpo_loss_backward", mutates_args=())(_backward_impl)


@_grpo_loss_backward_op.register_fake
def _(grad_loss, row_stats, row_weights, logp, old_logp, ref_logp, advantages, mask, num_items_tensor, beta,
      epsilon_low, epsilon_high, delta, dual_clip, loss_type, sequence_level, max_completion_length, num_items_value,
      ref_grad, backend):
    dlogp = torch.empty(logp.shape, dtype=logp.dtype, device=logp.device)  # contiguous, like the kernels'
    dref = torch.empty(ref_logp.shape if ref_grad else (0,), dtype=logp.dtype, device=logp.device)
    return dlogp, dref


def _setup_context(ctx, inputs, output):
    (logp, old_logp, ref_logp, advantages, mask, num_items_tensor, *scalars, backend) = inputs
    _, _, row_stats, row_weights = output
    ctx.save_for_backward(logp, old_logp, ref_logp, advantages, mask, num_items_tensor, row_stats, row_weights)
    ctx.scalars, ctx.backend = scalars, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_metrics, _grad_row_stats, _grad_row_weights, backward_fn=None):
    n_inputs = 16
    if grad_loss is None:
        return (None,) * n_inputs
    logp, old_logp, ref_logp, advantages, mask, num_items_tensor, row_stats, row_weights = ctx.saved_tensors
    ref_grad = ref_logp is not None and ctx.needs_input_grad[2]
    dlogp, dref = (backward_fn or _grpo_loss_backward_op)(
        grad_loss, row_stats, row_weights, logp, old_logp, ref_logp, advantages, mask, num_items_tensor,
        *ctx.scalars, ref_grad, ctx.backend,
    )
    grads = [None] * n_inputs
    grads[0] = dlogp
    grads[2] = dref if ref_grad else None
    return tuple(grads)


_grpo_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Eager path
#
# A call of the custom op costs more than the B=16, T=1024 CPU kernel itself: with autograd on,
# torch.library rebuilds the argument list of its 16-argument schema about 17 times per call
# (torch/_library/utils.py fill_defaults, ~80 us), and the dispatch through Python adds ~20 us
# per op. Ordinary eager calls therefore run the same _forward / _backward_impl through a plain
# autograd.Function (~10 us); everything else goes through the custom ops.


def _plain_eager(*tensors) -> bool:
    """Whether this is an ordinary eager call: not traced by torch.compile, no torch-function or
    dispatch mode (fake tensors, make_fx, export), no functorch transform (vmap, grad), and only
    plain tensors and Parameters (no subclasses such as DTensor)."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


class _EagerGrpoLoss(torch.autograd.Function):
    """The custom op's forward and backward (same functions, same kernels) without torch.library."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = _forward(*inputs)
        _setup_context(ctx, inputs, outputs)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        return _backward(ctx, *grads, backward_fn=_backward_impl)


def _run(*inputs):
    """(loss, metrics, row_stats, row_weights) of the op's ``inputs``, by the cheapest route."""
    logp, old_logp, ref_logp, advantages, mask, num_items_tensor = inputs[:6]
    if not _plain_eager(logp, old_logp, ref_logp, advantages, mask, num_items_tensor):
        return _grpo_loss_op(*inputs)
    if torch.is_grad_enabled() and (logp.requires_grad or (ref_logp is not None and ref_logp.requires_grad)):
        return _EagerGrpoLoss.apply(*inputs)
    return _forward(*inputs)


# ---------------------------------------------------------------------------------------------
# Public function


def _check_number(name: str, value, *, low: float, low_inclusive: bool = True, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"grpo_loss: {name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value) or value < low or (value == low and not low_inclusive):
        bound = f">= {low}" if low_inclusive else f"> {low}"
        raise ValueError(f"grpo_loss: {name} must be finite and {bound}, got {value}")


def _check_tensor(name: str, tensor, shape, device, dtypes=None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"grpo_loss: {name} must be a tensor, got {type(tensor).__name__}")
    if dtypes is not None and tensor.dtype not in dtypes:
        raise TypeError(f"grpo_loss: {name} must be one of {dtypes}, got {tensor.dtype}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"grpo_loss: {name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"grpo_loss: {name} is on {tensor.device} but logp is on {device}")


def _validate(logp, old_logp, advantages, mask, ref_logp, beta, epsilon_low, epsilon_high, delta, dual_clip,
              loss_type, importance_sampling_level, max_completion_length, num_items_in_batch) -> None:
    if not isinstance(logp, torch.Tensor):
        raise TypeError(f"grpo_loss: logp must be a tensor, got {type(logp).__name__}")
    if logp.dtype not in FLOAT_DTYPES:
        raise TypeError(f"grpo_loss: logp must be float16, bfloat16, float32 or float64, got {logp.dtype}")
    if logp.dim() != 2 or logp.shape[0] == 0 or logp.shape[1] == 0:
        raise ValueError(f"grpo_loss: logp must be [B, T] with B >= 1 and T >= 1, got shape {tuple(logp.shape)}")
    shape, device = logp.shape, logp.device
    for name, other in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if other is not None:
            _check_tensor(name, other, shape, device)
            if other.dtype != logp.dtype:
                raise TypeError(f"grpo_loss: {name} must have logp's dtype {logp.dtype}, got {other.dtype}")
    _check_tensor("advantages", advantages, None, device, FLOAT_DTYPES)
    if tuple(advantages.shape) not in ((shape[0],), tuple(shape)):
        raise ValueError(
            f"grpo_loss: advantages must have shape [B] = ({shape[0]},) or [B, T] = {tuple(shape)}, "
            f"got {tuple(advantages.shape)}"
        )
    _check_tensor("mask", mask, shape, device)
    if mask.dtype.is_complex:
        raise TypeError(f"grpo_loss: mask must be bool, integer or float, got {mask.dtype}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo_loss: unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"grpo_loss: importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
            f"got {importance_sampling_level!r}"
        )
    _check_number("beta", beta, low=0.0)
    if beta != 0.0 and ref_logp is None:
        raise ValueError("grpo_loss: beta > 0 needs ref_logp (the reference model's log-probs)")
    _check_number("epsilon_low", epsilon_low, low=0.0)
    _check_number("epsilon_high", epsilon_high, low=0.0, optional=True)
    _check_number("delta", delta, low=0.0, low_inclusive=False, optional=True)
    _check_number("dual_clip", dual_clip, low=1.0, low_inclusive=False, optional=True)
    if max_completion_length is not None:
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int):
            raise TypeError(
                f"grpo_loss: max_completion_length must be an int, got {type(max_completion_length).__name__}"
            )
        if max_completion_length < 1:
            raise ValueError(f"grpo_loss: max_completion_length must be >= 1, got {max_completion_length}")
    if isinstance(num_items_in_batch, torch.Tensor):
        _check_tensor("num_items_in_batch", num_items_in_batch, None, device)
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"grpo_loss: num_items_in_batch must hold one number, got shape {tuple(num_items_in_batch.shape)}"
            )
    else:
        _check_number("num_items_in_batch", num_items_in_batch, low=0.0, low_inclusive=False, optional=True)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    dual_clip: float | None = None,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate GRPO / PPO / GSPO policy loss with k3 KL and its metrics, fused.

    One pass over the tokens forward (plus a tiny reduction over the ``B`` sequences) and one pass
    backward, in float32 whatever the input dtype. Conventions are TRL's and verl's (see
    ``/work/shared/ANCHORS.md``); ``gtalign_fast.reference.grpo_loss`` is the specification.

    Per token, with the log-ratio ``l = logp - old_logp`` clamped to [-20, 20] and ``r = exp(l)``::

        coef_1 = min(r, delta)                    (delta: TRL's two-sided clip; default none)
        coef_2 = clip(r, 1 - epsilon_low, 1 + epsilon_high)
        pg     = -min(coef_1 * A, coef_2 * A)
        pg     = min(pg, -dual_clip * A)  where A < 0   (verl's dual clip; default none)
        kl     = clip(exp(d) - d - 1, -10, 10),  d = clip(ref_logp - logp, -20, 20)
        loss_t = pg + beta * kl

    At ``importance_sampling_level="sequence"`` (GSPO) ``r`` is one number per sequence, the exp
    of the masked mean log-ratio (clamped), as TRL computes it; its gradient flows to every token
    of the sequence through that mean.

    Parameters
    ----------
    logp : Tensor, shape ``[B, T]``, float32 / bfloat16 / float16 / float64
        Per-token log-probs of the policy being trained (e.g. from ``token_logprobs``). Strided
        views are read in place.
    old_logp : Tensor, shape ``[B, T]``, same dtype as ``logp``, or None
        Log-probs of the policy that sampled the completions. None: on-policy,
        ``old_logp = logp.detach()`` (ratio 1, non-zero gradient). Receives no gradient.
    advantages : Tensor, shape ``[B]`` or ``[B, T]``, any float dtype
        Per-sequence or per-token advantages. Receive no gradient.
    mask : Tensor, shape ``[B, T]``, bool / integer / float
        Nonzero = the token is part of the completion and counts. Rows may be empty.
    ref_logp : Tensor, shape ``[B, T]``, same dtype as ``logp``, optional
        Reference-model log-probs. Needed when ``beta > 0``; when given, the ``kl`` metric is
        reported. Gets a gradient only if it requires one.
    beta : float, default 0.0
        Weight of the k3 KL, added to each token's loss before aggregation (as TRL does).
    epsilon_low, epsilon_high : float, default 0.2 and ``epsilon_low``
        Clip range ``[1 - epsilon_low, 1 + epsilon_high]`` (``epsilon_high > epsilon_low``:
        DAPO's clip-higher).
    delta : float, optional
        Upper cap on the unclipped ratio (TRL's ``delta``, two-sided GRPO), ``> 0``.
    dual_clip : float, optional
        verl's ``clip_ratio_c`` (``> 1``, usually 3): for ``A < 0`` the token loss is at most
        ``-dual_clip * A``.
    loss_type : str, default "grpo"
        Aggregation, with ``S_b = sum_t mask * loss_t``, ``n_b`` the tokens of row ``b``,
        ``N = sum_b n_b`` (counts are clamped to >= 1) and ``L = max_completion_length``:

        - ``"grpo"``, ``"seq-mean-token-mean"``: ``mean_b(S_b / n_b)``
        - ``"bnpo"``, ``"token-mean"``: ``sum_b S_b / N``
        - ``"dr_grpo"``: ``sum_b S_b / (B * L)``
        - ``"dapo"``: ``sum_b S_b / num_items_in_batch`` (default ``N``)
        - ``"seq-mean-token-sum"``: ``mean_b S_b``
        - ``"seq-mean-token-sum-norm"``: ``sum_b S_b / L`` (verl's Dr. GRPO form)
    importance_sampling_level : {"token", "sequence"}, default "token"
    max_completion_length : int, optional
        ``L`` above (``dr_grpo`` and ``seq-mean-token-sum-norm`` only); default ``T``.
    num_items_in_batch : int, float or 0-dim Tensor, optional
        ``dapo`` only: the global number of completion tokens across processes (a tensor is read
        on the device, without a host sync). Ignored by the other loss types.
    backend : {"triton", "cuda", "cpu", "reference"}, optional
        Force a backend; default: ``GTALIGN_FAST_BACKEND[_GRPO_LOSS]``, else the C++ kernel on CPU
        and the CUDA C++ kernel on CUDA (the faster there, see ``_backend.CUDA_DEFAULTS``).

    Returns
    -------
    loss : Tensor, 0-dim, float32
    metrics : dict of 0-dim float32 Tensors (no gradient)
        ``"clip_ratio/low_mean"`` (``coef_1 < 1 - epsilon_low`` and ``A < 0``),
        ``"clip_ratio/high_mean"`` (``coef_1 > 1 + epsilon_high`` and ``A > 0``),
        ``"clip_ratio/region_mean"`` (either), ``"ratio_mean"`` (mean ``r``) and, when ``ref_logp``
        is given, ``"kl"`` (mean k3). Means over the masked tokens, or, as TRL's GSPO metrics,
        over the ``B`` sequences when both the ratio and ``advantages`` are per sequence.

    Raises
    ------
    TypeError
        Non-tensor inputs, unsupported dtypes, ``old_logp`` / ``ref_logp`` of another dtype than
        ``logp``, non-number hyper-parameters.
    ValueError
        Shapes (``B = 0`` or ``T = 0`` included), devices, unknown ``loss_type`` or level,
        out-of-range hyper-parameters, ``beta > 0`` without ``ref_logp``.

    Notes
    -----
    A mask with no token at all gives loss 0 and metrics 0 (every count is clamped to >= 1, as
    TRL does), so a micro-batch of truncated-and-masked completions does not produce NaN.
    """
    _validate(logp, old_logp, advantages, mask, ref_logp, beta, epsilon_low, epsilon_high, delta, dual_clip,
              loss_type, importance_sampling_level, max_completion_length, num_items_in_batch)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_tensor, num_items_value = num_items_in_batch.reshape(()).to(torch.float32), None
    else:
        num_items_tensor = None
        num_items_value = None if num_items_in_batch is None else float(num_items_in_batch)
    loss, metrics, _, _ = _run(
        logp,
        None if old_logp is None else old_logp.detach(),
        ref_logp,
        advantages.detach(),
        mask.detach(),
        num_items_tensor,
        float(beta),
        float(epsilon_low),
        float(epsilon_low if epsilon_high is None else epsilon_high),
        None if delta is None else float(delta),
        None if dual_clip is None else float(dual_clip),
        loss_type,
        importance_sampling_level == "sequence",
        int(logp.shape[1] if max_completion_length is None else max_completion_length),
        num_items_value,
        backend or "",
    )
    names = METRIC_NAMES if ref_logp is not None else tuple(n for n in METRIC_NAMES if n != "kl")
    metrics = metrics.detach()
    return loss, {name: metrics[METRIC_NAMES.index(name)] for name in names}
