"""``grpo_loss``: the public op and its backends.

Forward and backward are two :class:`~gtalign_fast.ops._op.Op` (custom ops ``gtalign_fast::grpo_loss``
and ``gtalign_fast::grpo_loss_backward``); autograd links them. The forward returns, besides the
loss and the metrics, two small per-row tensors the backward needs: ``row_stats [B, NUM_SEQUENCE_STATS]``
(partial sums of each sequence, columns ``STAT_*`` of :mod:`gtalign_fast.ops._grpo_constants`) and
``row_weights [B]`` (the weight of each sequence's token sum in the loss, which the aggregation
mode fixes).
"""

from __future__ import annotations

import math

import torch
from typing_extensions import Unpack  # typing.Unpack from Python 3.11 (torch depends on typing_extensions)

from . import _device_checks, _grpo_objective
from ._device_checks import error_flag
from ._grpo_constants import NUM_METRICS, NUM_SEQUENCE_STATS
from ._grpo_objective import (
    FLOAT_DTYPES,
    GrpoLossOptions,
    GrpoOptions,
    aggregation,
    autograd_inside_op,
    document_options,
    kernel_mask,
    metrics_dict,
    reference_loss,
    write_metrics,
)
from ._op import Op, Output, backends, compiled_kernels

OP = "grpo_loss"


# ---------------------------------------------------------------------------------------------
# Kernel-side layout: every per-token input as a strided [B, T] view, float32 advantages, uint8 mask


def _kernel_advantages(advantages: torch.Tensor, shape) -> torch.Tensor:
    """float32 ``[B, T]`` view of the advantages (or of the IS ratio); ``[B]`` ones are expanded with
    time stride 0."""
    advantages = advantages.to(torch.float32)
    if advantages.dim() == 1:  # = unsqueeze(1).expand(shape), in one op (a few us less per call)
        return advantages.as_strided(shape, (advantages.stride(0), 0))
    return advantages


def _kernel_is_ratio(is_ratio: torch.Tensor | None, shape) -> torch.Tensor | None:
    """The IS ratio (``_grpo_objective.kernel_is_ratio``'s) as a ``[B, T]`` view; time stride 0: per sequence."""
    return None if is_ratio is None else _kernel_advantages(is_ratio, shape)


# ---------------------------------------------------------------------------------------------
# Forward


def _forward_outputs(logp, old_logp, ref_logp, advantages, mask, num_items_tensor, is_ratio, options):
    batch = logp.shape[0]
    return (
        Output((), torch.float32),  # loss
        Output((NUM_METRICS,), torch.float32),  # metrics, in METRIC_NAMES order
        Output((batch, NUM_SEQUENCE_STATS), torch.float32),  # row_stats
        Output((batch,), torch.float32),  # row_weights
    )


def _forward_reference(*args):
    *inputs, options, loss, metrics, row_stats, row_weights = args
    ref_loss, ref_metrics = reference_loss(*inputs, options)
    loss.copy_(ref_loss)
    write_metrics(ref_metrics, metrics)
    # The reference backward recomputes through autograd: the per-row tensors are not used.
    row_stats.zero_()
    row_weights.zero_()


def _forward_args(logp, old_logp, ref_logp, advantages, mask, num_items_tensor, is_ratio, options, *outputs) -> tuple:
    """The kernels' arguments (the same for the Triton, C++ CPU and CUDA launchers)."""
    mode, const_weight = aggregation(options.loss_type, logp.shape[0], options.max_completion_length,
                                     options.num_items_value, num_items_tensor is not None)
    row_metrics = _grpo_objective.row_metrics(options, advantages)
    return (
        logp, old_logp, ref_logp, _kernel_advantages(advantages, logp.shape), kernel_mask(mask), num_items_tensor,
        _kernel_is_ratio(is_ratio, logp.shape), kernel_params(options), row_metrics, mode, const_weight, *outputs,
    )


def kernel_params(options: GrpoLossOptions) -> tuple[float, ...]:
    """The objective's parameters as the kernels take them: one ``float[]`` argument, in the order of
    ``_grpo_constants.PARAM_*`` (C++: ``grpo::Param``), bools as 0 / 1 (a compiled op's float arguments
    cost ~0.3 us each to pass, a list's elements about half that). No delta is +inf, no dual clip is 0,
    no KL clamp is +inf (clamping to +-inf changes nothing), the SAPO temperatures are 0 unless
    loss_type="sapo" (a positive sapo_tau_pos selects the SAPO objective); cispo selects TRL's CISPO
    objective (whose ratio cap, and high-clip metric bound, is epsilon_high itself), vespo TRL's VESPO
    objective (the kernels floor its lambdas at VESPO_MIN_LAMBDA, as TRL)."""
    loss_type = options.loss_type
    sapo = loss_type == "sapo"
    return (  # PARAM_BETA, ..., PARAM_SEQ_LEVEL (tests/test_grpo_loss.py checks the order)
        options.beta,
        options.epsilon_low,
        options.epsilon_high,
        math.inf if options.delta is None else options.delta,
        0.0 if options.dual_clip is None else options.dual_clip,
        math.inf if options.kl_clamp is None else options.kl_clamp,
        1.0 if options.use_bias_correction_kl else 0.0,
        options.sapo_temperature_pos if sapo else 0.0,
        options.sapo_temperature_neg if sapo else 0.0,
        1.0 if loss_type == "cispo" else 0.0,
        options.vespo_k_pos,
        options.vespo_lambda_pos,
        options.vespo_k_neg,
        options.vespo_lambda_neg,
        1.0 if loss_type == "vespo" else 0.0,
        1.0 if options.sequence_level else 0.0,
    )


_FINALIZE_COUNTERS: dict[tuple, torch.Tensor] = {}


def _current_stream(device: torch.device) -> int:
    """The current stream's raw handle: one C call where torch has it (torch.cuda.current_stream
    builds a Python Stream object, microseconds per call)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def finalize_counter(device: torch.device) -> torch.Tensor:
    """The zeroed int32 ``[1]`` counter that makes the Triton and CUDA forward one launch (the last
    program to finish reduces the rows and resets it), one per (device, stream): launches on one
    stream run one after the other, so each finds it at zero; two streams must not share one. The
    C++ CPU kernel ignores it."""
    stream = _current_stream(device) if device.type == "cuda" else 0
    counter = _FINALIZE_COUNTERS.get((device, stream))
    if counter is None:
        counter = _FINALIZE_COUNTERS[(device, stream)] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def forward_kernel(launch, *args) -> None:
    """One call of the launcher (one kernel launch on CUDA; also the launch adapter of the fused
    ops' chunk engine, ``_grpo_chunks``); a ``num_items_tensor`` that is not
    finite and > 0 sets the device's error flag (the loss is NaN), raised at once for CPU tensors,
    lazily (no host sync) for CUDA ones."""
    device = args[0].device
    launch(*_forward_args(*args), error_flag(device), finalize_counter(device))
    num_items_tensor = args[5]
    if num_items_tensor is not None:
        explain = lambda: _grpo_objective.explain_normaliser(OP, num_items_tensor)  # noqa: E731
        _device_checks.after_launch(OP, device, explain=explain)


FORWARD = Op(
    "grpo_loss",
    inputs=("Tensor logp, Tensor? old_logp, Tensor? ref_logp, Tensor advantages, Tensor mask, "
            "Tensor? num_items_tensor, Tensor? is_ratio"),
    options=GrpoLossOptions,
    returns=("loss", "metrics", "row_stats", "row_weights"),
    outputs=_forward_outputs,
    backends=backends(
        **compiled_kernels(forward_kernel, triton="grpo_loss.grpo_loss_forward", extension="grpo_loss_fwd"),
        reference=_forward_reference,
    ),
)


# ---------------------------------------------------------------------------------------------
# Backward


def _backward_outputs(grad_loss, row_stats, row_weights, logp, old_logp, ref_logp, *rest):
    *_, ref_grad, _options = rest
    return (
        Output(logp.shape, logp.dtype),  # dlogp, contiguous
        Output(ref_logp.shape if ref_grad else (0,), logp.dtype),  # dref
    )


def _backward_reference(grad_loss, row_stats, row_weights, logp, old_logp, ref_logp, advantages, mask,
                        num_items_tensor, is_ratio, ref_grad, options, dlogp, dref):
    with autograd_inside_op():
        leaves = [logp.detach().requires_grad_(True)]
        ref_leaf = ref_logp.detach().requires_grad_(True) if ref_grad else ref_logp
        if ref_grad:
            leaves.append(ref_leaf)
        loss, _ = reference_loss(leaves[0], old_logp, ref_leaf, advantages, mask, num_items_tensor, is_ratio, options)
        grads = torch.autograd.grad(loss, leaves, grad_loss.to(loss.dtype))
    dlogp.copy_(grads[0])
    if ref_grad:
        dref.copy_(grads[1])


def _backward_args(grad_loss, row_stats, row_weights, logp, old_logp, ref_logp, advantages, mask,
                   _num_items_tensor, is_ratio, _ref_grad, options) -> tuple:
    """The kernels' arguments before the outputs (the same for every launcher)."""
    return (
        grad_loss.to(torch.float32).reshape(()), row_weights, row_stats, logp, old_logp, ref_logp,
        _kernel_advantages(advantages, logp.shape), kernel_mask(mask), _kernel_is_ratio(is_ratio, logp.shape),
        kernel_params(options),
    )


def backward_kernel(launch, *args) -> None:
    """The backward launch adapter (also the chunk engine's, ``_grpo_chunks``)."""
    *inputs, dlogp, dref = args
    launch(*_backward_args(*inputs), dlogp, dref)  # dref is empty ([0]) when ref_logp needs no gradient


BACKWARD = Op(
    "grpo_loss_backward",
    key="grpo_loss",
    inputs=(
        "Tensor grad_loss, Tensor row_stats, Tensor row_weights, Tensor logp, Tensor? old_logp, Tensor? ref_logp, "
        "Tensor advantages, Tensor mask, Tensor? num_items_tensor, Tensor? is_ratio, bool ref_grad"
    ),
    options=GrpoLossOptions,
    returns=("dlogp", "dref"),
    outputs=_backward_outputs,
    backends=backends(
        **compiled_kernels(backward_kernel, triton="grpo_loss.grpo_loss_backward", extension="grpo_loss_bwd"),
        reference=_backward_reference,
    ),
)


def _save(ctx, inputs, options, outputs) -> None:
    _, _, row_stats, row_weights = outputs
    ctx.save_for_backward(*inputs, row_stats, row_weights)


def _backward(ctx, grad_loss, _grad_metrics, _grad_row_stats, _grad_row_weights):
    if grad_loss is None:
        return (None,) * 7
    logp, old_logp, ref_logp, advantages, mask, num_items_tensor, is_ratio, row_stats, row_weights = ctx.saved_tensors
    ref_grad = ref_logp is not None and ctx.needs_grad[2]
    dlogp, dref = BACKWARD.call_in_backward(
        ctx, grad_loss, row_stats, row_weights, logp, old_logp, ref_logp, advantages, mask, num_items_tensor, is_ratio,
        ref_grad,
    )
    return dlogp, None, dref if ref_grad else None, None, None, None, None


FORWARD.register_autograd(_save, _backward, differentiable=(0,))


# ---------------------------------------------------------------------------------------------
# Public function


def _check_logp(logp) -> None:
    """``logp`` here; the loss arguments are checked by :func:`gtalign_fast.ops._grpo_objective.resolve_options`."""
    if not isinstance(logp, torch.Tensor):
        raise TypeError(f"grpo_loss: logp must be a tensor, got {type(logp).__name__}")
    if logp.dtype not in FLOAT_DTYPES:
        raise TypeError(f"grpo_loss: logp must be float16, bfloat16, float32 or float64, got {logp.dtype}")
    if logp.dim() != 2 or logp.shape[0] == 0 or logp.shape[1] == 0:
        raise ValueError(f"grpo_loss: logp must be [B, T] with B >= 1 and T >= 1, got shape {tuple(logp.shape)}")


@document_options
def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    backend: str | None = None,
    **options: Unpack[GrpoOptions],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate GRPO / PPO / GSPO policy loss with k3 KL and its metrics, fused.

    One pass over the tokens forward (plus a tiny reduction over the ``B`` sequences) and one pass
    backward, in float32 whatever the input dtype. Conventions are TRL's (``GRPOTrainer._compute_loss``)
    and verl's (``compute_policy_loss``, ``agg_loss``); ``gtalign_fast.reference.grpo_loss`` is the specification.

    Per token, with the log-ratio ``l = logp - old_logp`` clamped to [-20, 20] and ``r = exp(l)``::

        coef_1 = min(r, delta)                    (delta: TRL's two-sided clip; default none)
        coef_2 = clip(r, 1 - epsilon_low, 1 + epsilon_high)
        pg     = -min(coef_1 * A, coef_2 * A)
        pg     = min(pg, -dual_clip * A)  where A < 0   (verl's dual clip; default none)
        pg     = -sigmoid(tau (r - 1)) * 4 / tau * A     (loss_type="sapo", TRL's SAPO, instead of the
                                                          clip; tau = sapo_temperature_pos where A > 0,
                                                          else sapo_temperature_neg)
        pg     = -sg(min(r, epsilon_high)) * A * logp    (loss_type="cispo", TRL's CISPO, instead of the
                                                          clip; sg: no gradient through the capped
                                                          ratio, so d pg / d logp = -min(r, epsilon_high) A)
        pg     = -sg(phi) * A * logp                      (loss_type="vespo", TRL's VESPO, instead of the
                                                          clip: phi = exp(lambda + k log w - lambda w),
                                                          log w = clip(sum_t mask * l_t, ln 1e-8, 20), the
                                                          sequence's; k, lambda: vespo_*_pos where A >= 0)
        kl     = exp(d) - d - 1,  d = clip(ref_logp - logp, -20, 20)
        kl     = clip(kl, -kl_clamp, kl_clamp)          (verl's low_var_kl: kl_clamp=10; default none)
        kl     = kl * r                                  (TRL's use_bias_correction_kl; default off)
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
    backend : {"triton", "cuda", "cpu", "reference"}, optional
        Force a backend; default: ``GTALIGN_FAST_BACKEND[_GRPO_LOSS]``, else the C++ kernel on CPU
        and the CUDA C++ kernel on CUDA (the faster there, see ``_backend.CUDA_DEFAULTS``).
    %(grpo_options)s

    Returns
    -------
    loss : Tensor, 0-dim, float32
    metrics : dict of 0-dim float32 Tensors (no gradient)
        ``"clip_ratio/low_mean"`` (``coef_1 < 1 - epsilon_low`` and ``A < 0``),
        ``"clip_ratio/high_mean"`` (``coef_1 > 1 + epsilon_high`` and ``A > 0``),
        ``"clip_ratio/region_mean"`` (either), ``"ratio_mean"`` (mean ``r``) and, when ``ref_logp``
        is given, ``"kl"`` (mean k3). Means over the masked tokens, or, as TRL's GSPO metrics,
        over the ``B`` sequences when both the ratio and ``advantages`` are per sequence.
        ``loss_type="cispo"``: ``"clip_ratio/high_mean"`` is TRL's ``cispo_clip_ratio``
        (``r > epsilon_high`` where ``A > 0``). ``loss_type="vespo"``: ``"vespo/phi_seq_mean"``
        (TRL's: the mean ``phi``, over the sequences with ``[B]`` advantages) and ``"kl"`` only.

    Raises
    ------
    TypeError
        A keyword that is not an option; non-tensor inputs, unsupported dtypes, ``old_logp`` /
        ``ref_logp`` of another dtype than ``logp``, non-number hyper-parameters.
    ValueError
        Shapes (``B = 0`` or ``T = 0`` included), devices, unknown ``loss_type`` or level,
        out-of-range hyper-parameters, ``beta > 0`` without ``ref_logp``.

    Notes
    -----
    A mask with no token at all gives loss 0 and metrics 0 (every count is clamped to >= 1, as
    TRL does), so a micro-batch of truncated-and-masked completions does not produce NaN.
    """
    _check_logp(logp)
    num_items_tensor, options, is_ratio = _grpo_objective.resolve_options(
        OP, logp.shape, logp.device, "logp is", logp.dtype, old_logp, advantages, mask, ref_logp, options
    )
    old_logp = None if old_logp is None else old_logp.detach()
    loss, metrics, _, _ = FORWARD(logp, old_logp, ref_logp, advantages.detach(), mask.detach(), num_items_tensor,
                                  is_ratio, options=options, backend=backend or "")
    return loss, metrics_dict(metrics, ref_logp is not None, vespo=options.loss_type == "vespo")
