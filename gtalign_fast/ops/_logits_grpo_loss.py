"""``logits_grpo_loss``: logits -> GRPO loss.

The maths is ``grpo_loss(token_logprobs(logits / T, targets), ...)``. A loss that reaches the
logits only through the target log-probs has the logits gradient
``dz_j = g_t / T * (1[j = t] - p_j)`` with ``g_t = d loss / d logp_t``, so the logits are handled
by the three steps of the chunk engine it shares with ``linear_grpo_loss``
(:mod:`gtalign_fast.ops._grpo_chunks`), here on one chunk, the whole ``[B, T, V]`` tensor:
``logits_grpo_loss`` runs the statistics pass and the GRPO forward in its forward, the GRPO
backward and the gradient pass in its backward (into a new tensor, or into the logits' storage
with ``inplace_backward=True``). The objective (options, validation, normaliser, reference) is
:mod:`gtalign_fast.ops._grpo_objective`.
"""

from __future__ import annotations

import torch
from typing_extensions import Unpack

from . import _device_checks
from ._grpo_chunks import (
    SKIP,
    check_targets,
    chunk_kernels,
    entropy_mean,
    fused_metrics,
    kernel_targets,
    loss_options,
    metrics_vector,
    reference_logp,
    validate_temperature,
)
from ._grpo_constants import NUM_METRICS, NUM_SEQUENCE_STATS
from ._grpo_objective import (
    FLOAT_DTYPES,
    GrpoOptions,
    autograd_inside_op,
    document_options,
    options_type,
    reference_loss,
)
from ._op import Op, Output, backends, chunk_drivers
from ._token_logprobs import rows_view
from ._token_logprobs_constants import NUM_SOFTMAX_STATS

OP = "logits_grpo_loss"


# ---------------------------------------------------------------------------------------------
# The op

LogitsGrpoLossOptions = options_type("LogitsGrpoLossOptions", temperature=float, inplace_backward=bool)



def _forward_outputs(logits, targets, old_logp, ref_logp, advantages, mask, num_items_tensor, is_ratio, options):
    batch, length = targets.shape
    return (
        Output((), torch.float32),  # loss
        Output((NUM_METRICS + 1,), torch.float32),  # grpo_loss' metrics, then the mean entropy
        Output((batch, length), torch.float32),  # logp (0 where masked out)
        Output((batch * length,), torch.float32),  # entropy per position
        Output((batch * length, NUM_SOFTMAX_STATS), torch.float32),  # (max z/T, log-sum) per row
        Output((batch, NUM_SEQUENCE_STATS), torch.float32),  # grpo row_stats
        Output((batch,), torch.float32),  # grpo row_weights
    )


def _forward_chunked(name, logits, targets, old_logp, ref_logp, advantages, mask, num_items_tensor, is_ratio, options,
                     loss, metrics, logp, entropy, stats, row_stats, weights):
    kernels = chunk_kernels(name, logits.device)
    grpo = options.grpo()
    kernels.stats(logits, kernel_targets(targets, mask), options.temperature, logp, entropy, stats)
    kernels.grpo_forward(logp, old_logp, ref_logp, advantages, mask, num_items_tensor, is_ratio, grpo, loss,
                         metrics[:NUM_METRICS], row_stats, weights)
    metrics[NUM_METRICS] = entropy_mean(entropy, mask)


def _forward_reference(logits, targets, old_logp, ref_logp, advantages, mask, num_items_tensor, is_ratio, options,
                       loss, metrics, logp, entropy, stats, row_stats, weights):
    ref_logp_values, ref_entropy = reference_logp(logits, targets, mask, options.temperature)
    ref_loss, ref_metrics = reference_loss(ref_logp_values, old_logp, ref_logp, advantages, mask, num_items_tensor,
                                           is_ratio,
                                           options.grpo())
    loss.copy_(ref_loss)
    metrics_vector(ref_metrics, ref_entropy, mask, metrics)
    logp.copy_(ref_logp_values)
    entropy.copy_(ref_entropy.reshape(-1))
    for unused in (stats, row_stats, weights):  # the reference backward recomputes through autograd
        unused.zero_()


def _check(logits, targets, old_logp, ref_logp, advantages, mask, num_items_tensor, is_ratio, options, backend) -> None:
    check_targets(OP, logits.device, targets, mask, logits.shape[-1], backend)


FORWARD = Op(
    OP,
    inputs=("Tensor logits, Tensor targets, Tensor? old_logp, Tensor? ref_logp, Tensor advantages, Tensor mask, "
            "Tensor? num_items_tensor, Tensor? is_ratio"),
    options=LogitsGrpoLossOptions,
    returns=("loss", "metrics", "logp", "entropy", "stats", "row_stats", "row_weights"),
    outputs=_forward_outputs,
    check=_check,
    backends=backends(**chunk_drivers(_forward_chunked, "triton", "cpu"), reference=_forward_reference),
)


def _backward_outputs(grad_loss, logits, targets, logp, stats, row_stats, weights, old_logp, ref_logp, advantages,
                      mask, num_items_tensor, is_ratio, options):
    # In place: the gradient goes into the logits' storage; the output is an empty placeholder.
    return (Output((0,) if options.inplace_backward else logits.shape, logits.dtype),)


def _backward_chunked(name, grad_loss, logits, targets, logp, stats, row_stats, weights, old_logp, ref_logp,
                      advantages, mask, num_items_tensor, is_ratio, options, dlogits):
    kernels = chunk_kernels(name, logits.device)
    grpo = options.grpo()
    dlogp = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    empty = dlogp.new_empty((0,))
    kernels.grpo_backward(grad_loss, row_stats, weights, logp, old_logp, ref_logp, advantages, mask, num_items_tensor,
                          is_ratio,
                          False, grpo, dlogp, empty)
    rows = rows_view(logits)
    out = rows if options.inplace_backward else dlogits.view(rows.shape)
    kernels.grad(rows, kernel_targets(targets, mask), dlogp.view(-1), stats, 1.0 / options.temperature, SKIP, out)
    if logits.device.type != "cpu" or name == "triton":
        _device_checks.after_launch(OP, logits.device)


def _backward_reference(grad_loss, logits, targets, logp, stats, row_stats, weights, old_logp, ref_logp, advantages,
                        mask, num_items_tensor, is_ratio, options, dlogits):
    with autograd_inside_op():
        leaf = logits.detach().requires_grad_(True)
        values, _ = reference_logp(leaf, targets, mask, options.temperature, with_entropy=False)
        loss, _ = reference_loss(values, old_logp, ref_logp, advantages, mask, num_items_tensor, is_ratio,
                                 options.grpo())
        (grad,) = torch.autograd.grad(loss, [leaf], grad_loss.to(loss.dtype))
    (logits if options.inplace_backward else dlogits).copy_(grad)


BACKWARD = Op(
    "logits_grpo_loss_backward",
    key=OP,
    inputs=("Tensor grad_loss, Tensor(a!) logits, Tensor targets, Tensor logp, Tensor stats, Tensor row_stats, "
            "Tensor row_weights, Tensor? old_logp, Tensor? ref_logp, Tensor advantages, Tensor mask, "
            "Tensor? num_items_tensor, Tensor? is_ratio"),
    options=LogitsGrpoLossOptions,
    returns=("dlogits",),
    outputs=_backward_outputs,
    mutates=("logits",),
    backends=backends(**chunk_drivers(_backward_chunked, "triton", "cpu"), reference=_backward_reference),
)


def _save(ctx, inputs, options, outputs) -> None:
    logits, targets, old_logp, ref_logp, advantages, mask, num_items_tensor, is_ratio = inputs
    _, _, logp, _, stats, row_stats, weights = outputs
    ctx.save_for_backward(logits, targets, logp, stats, row_stats, weights, old_logp, ref_logp, advantages, mask,
                          num_items_tensor, is_ratio)


def _backward(ctx, grad_loss, *_unused):
    if grad_loss is None:
        return (None,) * 8
    logits, targets, logp, stats, row_stats, weights, old_logp, ref_logp, advantages, mask, num_items, is_ratio = (
        ctx.saved_tensors
    )
    grad_loss = grad_loss.to(torch.float32).reshape(())
    (dlogits,) = BACKWARD.call_in_backward(ctx, grad_loss, logits, targets, logp, stats, row_stats, weights,
                                           old_logp, ref_logp, advantages, mask, num_items, is_ratio)
    # In place, the gradient is the logits tensor itself (its storage now holds dlogits).
    return (logits if ctx.options.inplace_backward else dlogits), None, None, None, None, None, None, None


FORWARD.register_autograd(_save, _backward, differentiable=(0,))


# ---------------------------------------------------------------------------------------------
# Public function


@document_options
def logits_grpo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    backend: str | None = None,
    **options: Unpack[GrpoOptions],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss straight from logits: ``grpo_loss(token_logprobs(logits, targets, temperature), ...)``
    without the ``[B, T]`` log-prob round trip through autograd, and optionally with the logits
    gradient written into the logits' own storage.

    Forward: one pass over the vocabulary per counted position (log-sum-exp, target log-prob,
    entropy) and one over the tokens (loss terms, metrics). Backward: one pass over the tokens
    (``g = d loss / d logp``) and one over the logits that writes ``dz = g / T (onehot - p)``.
    Masked-out positions cost nothing and get a zero gradient row.

    Parameters
    ----------
    logits : Tensor, shape ``[B, T, V]``, float16 / bfloat16 / float32 (float64 accepted)
        Any strides with unit-mergeable rows: the ``[:, :-1]`` slice of ``[B, T+1, V]`` model logits
        is read (and, in place, written) without a copy.
    targets : Tensor, shape ``[B, T]``, int64
        Token ids in ``[0, V)`` wherever ``mask`` is nonzero (any value elsewhere).
    advantages, mask, old_logp, ref_logp
        As :func:`gtalign_fast.ops.grpo_loss` (``old_logp`` / ``ref_logp``: any float dtype, used in
        float32; ``old_logp=None``: on-policy, ratio 1, the true gradient).
    temperature : float, default 1.0
        The logits are divided by it before the softmax (as the sampler does).
    inplace_backward : bool, default False
        The backward writes dlogits into ``logits``' storage and returns that tensor as the
        gradient (as Liger's GRPO loss does): no second ``[B, T, V]`` buffer. The logits' values
        are destroyed by the backward; use it only when nothing else reads them afterwards.
    backend : {"triton", "cpu", "reference"}, optional
        Default: ``GTALIGN_FAST_BACKEND[_LOGITS_GRPO_LOSS]``, else the C++ kernels on CPU and Triton on CUDA.
    %(grpo_options)s

    Returns
    -------
    loss : Tensor, 0-dim, float32
    metrics : dict of 0-dim float32 Tensors
        ``grpo_loss``' metrics plus ``"entropy"``, the mean entropy of ``softmax(z / T)`` over the
        counted positions.

    Raises
    ------
    TypeError, ValueError
        As ``grpo_loss`` for the loss arguments; logits not ``[B, T, V]`` float, targets not int64
        ``[B, T]``, devices, temperature.
    IndexError
        A counted target outside ``[0, V)`` (CPU tensors; on CUDA the kernel sets ERR_TARGET_RANGE in
        the device error flag, read by ``ops.check_device_errors()`` without a sync per call).
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"{OP}: logits and targets must be tensors")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() != 3 or logits.shape[-1] < 1:
        raise ValueError(f"{OP}: logits must be [B, T, V] with V >= 1, got shape {tuple(logits.shape)}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{OP}: targets must be int64 token ids, got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"{OP}: targets must have shape {tuple(logits.shape[:2])}, got {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"{OP}: targets are on {targets.device} but logits are on {logits.device}")
    validate_temperature(OP, temperature)
    if inplace_backward and logits.requires_grad and logits.is_leaf:
        raise ValueError(f"{OP}: inplace_backward=True would overwrite a leaf tensor that requires grad")
    batch, length, _ = logits.shape
    old_logp, ref_logp, num_items_tensor, is_ratio, grpo = loss_options(
        OP, batch, length, logits.device, old_logp, advantages, mask, ref_logp, options)
    options = LogitsGrpoLossOptions(*grpo, temperature=float(temperature), inplace_backward=bool(inplace_backward))
    loss, metrics, *_ = FORWARD(logits, targets, old_logp, ref_logp, advantages.detach(), mask.detach(),
                                num_items_tensor, is_ratio, options=options, backend=backend or "")
    return loss, fused_metrics(metrics, ref_logp is not None, grpo.loss_type == "vespo")
