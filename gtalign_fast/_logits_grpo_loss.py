"""``logits_grpo_loss``: logits -> GRPO loss, and the per-chunk engine ``linear_grpo_loss`` shares.

The maths is ``grpo_loss(token_logprobs(logits / T, targets), ...)``. A loss that reaches the
logits only through the target log-probs has the logits gradient
``dz_j = g_t / T * (1[j = t] - p_j)`` with ``g_t = d loss / d logp_t``, so one chunk of logits is
handled in three steps (:class:`ChunkKernels`), each one pass over what it reads:

1. ``stats``: per row, online log-sum-exp, target log-prob and entropy (``token_logprobs``'
   forward kernel; it saves ``(max z/T, log sum exp(z/T - max))`` per row);
2. ``grpo_forward`` / ``grpo_backward``: the loss terms, metrics and ``g`` from ``[B, T]``-sized
   inputs (``grpo_loss``' kernels, with the aggregation weights of the whole batch);
3. ``grad``: ``dz`` written to any strided view of the logits' shape, the logits themselves
   included (``kernels/logits_grpo_loss.py``, ``csrc/cpu/logits_grpo_loss.cpp``).

``logits_grpo_loss`` runs 1 and the forward of 2 in its forward, the backward of 2 and 3 in its
backward (into a new tensor, or into the logits' storage with ``inplace_backward=True``).
Positions where ``mask`` is 0 skip the vocabulary walk (their target is replaced by
:data:`SKIP`): their log-prob is 0 and their gradient row is zero.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, NamedTuple

import torch

from . import _backend, _device_checks, reference
from ._grpo_constants import METRIC_NAMES, NUM_METRICS, NUM_STATS
from ._grpo_loss import GrpoLossOptions, options_from_arguments
from ._grpo_loss import _validate as _validate_grpo
from ._op import Op, Output, extension_kernel
from ._token_logprobs import MIN_TEMPERATURE, check_target_range, rows_view
from ._token_logprobs_constants import NUM_STATS as NUM_ROW_STATS

OP = "logits_grpo_loss"
BACKENDS = ("triton", "cpu", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Kernel target of a masked-out position: the kernels treat it as ignore_index (no vocabulary
# walk, log-prob 0, zero gradient). No real token id can equal it.
SKIP = -(2**63)
ENTROPY_METRIC = "entropy"


# ---------------------------------------------------------------------------------------------
# Backend availability: Triton (CUDA, or CPU under the interpreter), the C++ CPU kernels, the
# reference. No CUDA C++ kernel for the gradient pass yet: on CUDA tensors the compiled backend is Triton.


def why_unavailable(name: str, device: torch.device) -> str | None:
    if name == "reference":
        return None
    if name == "triton":
        return _backend.why_unavailable("triton", device)
    if name == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs on cpu tensors, got {device.type} tensors"
        return _backend.why_unavailable("cpu", device)
    if name == "cuda":
        return "logits_grpo_loss / linear_grpo_loss have no CUDA C++ kernel; on CUDA tensors use 'triton'"
    return f"unknown backend {name!r}; choose one of {BACKENDS}"


def default_backend(device: torch.device) -> str:
    """Triton on CUDA, the C++ kernels on CPU; else the reference, with a RuntimeWarning as
    ``_backend`` gives (it materialises the logits and runs autograd: never a silent fallback)."""
    if device.type == "cuda":
        return "triton"
    reason = why_unavailable("cpu", device)
    if reason is None:
        return "cpu"
    warnings.warn(
        f"gtalign_fast.logits_grpo_loss / linear_grpo_loss: no compiled kernel for {device.type} tensors "
        f"({reason}); using the pure-PyTorch reference backend (same maths, slower, O(N V) memory)",
        RuntimeWarning,
        stacklevel=4,
    )
    return "reference"


# ---------------------------------------------------------------------------------------------
# The per-chunk kernels, by backend


class ChunkKernels(NamedTuple):
    """One backend's launchers, called through the ``_forward_kernel`` / ``_backward_kernel`` adapters
    of ``token_logprobs`` and ``grpo_loss`` (which own their kernels' argument lists and error flags)."""

    stats: Callable  # (logits, flat targets, temperature, logp, entropy, stats): token_logprobs forward
    grpo_forward: Callable  # grpo_loss' forward: (logp, old, ref, adv, mask, num_items, options, *outputs)
    grpo_backward: Callable  # grpo_loss' backward: (grad_loss, row_stats, row_weights, logp, ..., dlogp, dref)
    grad: Callable  # (logits3d, targets, g, stats, inv_t, ignore, out3d): this op's gradient pass


def chunk_kernels(name: str, device: torch.device) -> ChunkKernels:
    from . import _grpo_loss, _token_logprobs

    if name == "triton":
        from gtalign_fast.kernels import grpo_loss, logits_grpo_loss, token_logprobs

        launchers = (token_logprobs.token_logprobs_forward, grpo_loss.grpo_loss_forward,
                     grpo_loss.grpo_loss_backward, logits_grpo_loss.logits_grpo_grad)
    else:
        launchers = tuple(extension_kernel(kernel, device) for kernel in
                          ("token_logprobs_fwd", "grpo_loss_fwd", "grpo_loss_bwd", "logits_grpo_grad"))
    stats_launch, forward_launch, backward_launch, grad_launch = launchers

    def stats(logits, targets, temperature, logp, entropy, row_stats):
        options = _token_logprobs.TokenLogprobsOptions(temperature, True, SKIP)
        _token_logprobs._forward_kernel(stats_launch, logits, targets, options, logp, entropy, row_stats)

    return ChunkKernels(
        stats,
        functools.partial(_grpo_loss._forward_kernel, forward_launch),
        functools.partial(_grpo_loss._backward_kernel, backward_launch),
        grad_launch,
    )


def kernel_targets(targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Contiguous int64 ``[N]`` targets with :data:`SKIP` where the mask is 0."""
    return torch.where(mask != 0, targets, SKIP).reshape(-1)


def check_targets(op: str, logits_device: torch.device, targets: torch.Tensor, mask: torch.Tensor, vocab: int,
                  backend: str) -> None:
    """Target ids of counted positions (``mask`` nonzero) must be in ``[0, V)``. Checked here on CPU
    tensors (free: no device) and for the reference backend on any device (its gather has no
    device-side check: a bad id would end the CUDA context); the C++ CPU kernels check themselves,
    and on CUDA the Triton kernels set ERR_TARGET_RANGE in the device's error flag instead (no host
    sync; reported by ``check_device_errors``). The masked copy of the targets is only made here."""
    if backend == "reference" or (logits_device.type == "cpu" and backend != "cpu"):
        check_target_range(torch.where(mask != 0, targets, SKIP), vocab, SKIP, op=op)


def row_weights(mask: torch.Tensor, options: GrpoLossOptions, num_items_tensor: torch.Tensor | None) -> torch.Tensor:
    """float32 ``[B]``: the weight of each sequence's token-loss sum in the loss, known from the
    mask alone (so the gradient can be computed chunk by chunk, before the loss is summed)."""
    batch = mask.shape[0]
    tokens = (mask != 0).sum(dim=1, dtype=torch.float32)
    loss_type = options.loss_type
    if loss_type in ("grpo", "sapo", "seq-mean-token-mean"):
        return 1.0 / (batch * tokens.clamp(min=1.0))
    if loss_type in ("bnpo", "token-mean") or (
        loss_type == "dapo" and num_items_tensor is None and options.num_items_value is None
    ):
        return (1.0 / tokens.sum().clamp(min=1.0)).expand(batch).contiguous()  # the kernels read [B]
    if loss_type == "dapo" and num_items_tensor is not None:
        return (1.0 / num_items_tensor.to(torch.float32)).expand(batch).contiguous()
    constant = {
        "dr_grpo": 1.0 / (batch * options.max_completion_length),
        "dapo": 1.0 / (options.num_items_value or 1.0),
        "seq-mean-token-sum": 1.0 / batch,
        "luspo": 1.0 / batch,
        "seq-mean-token-sum-norm": 1.0 / options.max_completion_length,
    }[loss_type]
    return torch.full((batch,), constant, dtype=torch.float32, device=mask.device)


# ---------------------------------------------------------------------------------------------
# The op


class LogitsGrpoLossOptions(NamedTuple):
    beta: float
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    dual_clip: float | None
    loss_type: str
    sequence_level: bool
    max_completion_length: int
    num_items_value: float | None
    kl_clamp: float | None
    use_bias_correction_kl: bool
    sapo_temperature_pos: float
    sapo_temperature_neg: float
    temperature: float
    inplace_backward: bool

    def grpo(self) -> GrpoLossOptions:
        return GrpoLossOptions(*self[: len(GrpoLossOptions._fields)])


def _forward_outputs(logits, targets, old_logp, ref_logp, advantages, mask, num_items_tensor, options):
    batch, length = targets.shape
    return (
        Output((), torch.float32),  # loss
        Output((NUM_METRICS + 1,), torch.float32),  # grpo_loss' metrics, then the mean entropy
        Output((batch, length), torch.float32),  # logp (0 where masked out)
        Output((batch * length,), torch.float32),  # entropy per position
        Output((batch * length, NUM_ROW_STATS), torch.float32),  # (max z/T, log-sum) per row
        Output((batch, NUM_STATS), torch.float32),  # grpo row_stats
        Output((batch,), torch.float32),  # grpo row_weights
    )


def entropy_mean(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    valid = (mask != 0).reshape(-1)
    return (entropy * valid).sum() / valid.sum().clamp(min=1)


def _forward_chunked(name, logits, targets, old_logp, ref_logp, advantages, mask, num_items_tensor, options,
                     loss, metrics, logp, entropy, stats, row_stats, weights):
    kernels = chunk_kernels(name, logits.device)
    grpo = options.grpo()
    kernels.stats(logits, kernel_targets(targets, mask), options.temperature, logp, entropy, stats)
    kernels.grpo_forward(logp, old_logp, ref_logp, advantages, mask, num_items_tensor, grpo, loss,
                         metrics[:NUM_METRICS], row_stats, weights)
    metrics[NUM_METRICS] = entropy_mean(entropy, mask)


def reference_logp(logits, targets, mask, temperature, with_entropy=True):
    """float64 (for float64 logits; float32 otherwise) log-probs and entropies, 0 where masked out."""
    valid = mask != 0
    safe = torch.where(valid, targets, 0)
    logp, ent = reference.token_logprobs(logits, safe, temperature, with_entropy, -100)
    return torch.where(valid, logp, 0.0), None if ent is None else torch.where(valid, ent, 0.0)


def reference_loss(logp, old_logp, ref_logp, advantages, mask, num_items_tensor, options: GrpoLossOptions):
    num_items = num_items_tensor if num_items_tensor is not None else options.num_items_value
    return reference.grpo_loss(
        logp, old_logp, advantages, mask, ref_logp, options.beta, options.epsilon_low, options.epsilon_high,
        options.delta, options.dual_clip, options.loss_type, "sequence" if options.sequence_level else "token",
        options.max_completion_length, num_items, options.kl_clamp, options.use_bias_correction_kl,
        options.sapo_temperature_pos, options.sapo_temperature_neg,
    )


def metrics_vector(ref_metrics: dict, entropy: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> None:
    for index, name in enumerate(METRIC_NAMES):
        out[index] = ref_metrics[name] if name in ref_metrics else 0.0
    out[NUM_METRICS] = entropy_mean(entropy.reshape(-1), mask)


def _forward_reference(logits, targets, old_logp, ref_logp, advantages, mask, num_items_tensor, options,
                       loss, metrics, logp, entropy, stats, row_stats, weights):
    ref_logp_values, ref_entropy = reference_logp(logits, targets, mask, options.temperature)
    ref_loss, ref_metrics = reference_loss(ref_logp_values, old_logp, ref_logp, advantages, mask, num_items_tensor,
                                           options.grpo())
    loss.copy_(ref_loss)
    metrics_vector(ref_metrics, ref_entropy, mask, metrics)
    logp.copy_(ref_logp_values)
    entropy.copy_(ref_entropy.reshape(-1))
    for unused in (stats, row_stats, weights):  # the reference backward recomputes through autograd
        unused.zero_()


def _check(logits, targets, old_logp, ref_logp, advantages, mask, num_items_tensor, options, backend) -> None:
    check_targets(OP, logits.device, targets, mask, logits.shape[-1], backend)


FORWARD = Op(
    OP,
    inputs=("Tensor logits, Tensor targets, Tensor? old_logp, Tensor? ref_logp, Tensor advantages, Tensor mask, "
            "Tensor? num_items_tensor"),
    options=LogitsGrpoLossOptions,
    returns=("loss", "metrics", "logp", "entropy", "stats", "row_stats", "row_weights"),
    outputs=_forward_outputs,
    check=_check,
    backends={"triton": lambda *a: _forward_chunked("triton", *a), "cpu": lambda *a: _forward_chunked("cpu", *a),
              "reference": _forward_reference},
    availability=why_unavailable,
    default=default_backend,
)


def _backward_outputs(grad_loss, logits, targets, logp, stats, row_stats, weights, old_logp, ref_logp, advantages,
                      mask, num_items_tensor, options):
    # In place: the gradient goes into the logits' storage; the output is an empty placeholder.
    return (Output((0,) if options.inplace_backward else logits.shape, logits.dtype),)


def _backward_chunked(name, grad_loss, logits, targets, logp, stats, row_stats, weights, old_logp, ref_logp,
                      advantages, mask, num_items_tensor, options, dlogits):
    kernels = chunk_kernels(name, logits.device)
    grpo = options.grpo()
    dlogp = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    empty = dlogp.new_empty((0,))
    kernels.grpo_backward(grad_loss, row_stats, weights, logp, old_logp, ref_logp, advantages, mask, num_items_tensor,
                          False, grpo, dlogp, empty)
    rows = rows_view(logits)
    out = rows if options.inplace_backward else dlogits.view(rows.shape)
    kernels.grad(rows, kernel_targets(targets, mask), dlogp.view(-1), stats, 1.0 / options.temperature, SKIP, out)
    if logits.device.type != "cpu" or name == "triton":
        _device_checks.after_launch(OP, logits.device)


def _backward_reference(grad_loss, logits, targets, logp, stats, row_stats, weights, old_logp, ref_logp, advantages,
                        mask, num_items_tensor, options, dlogits):
    from ._grpo_loss import _autograd_inside_op

    with _autograd_inside_op():
        leaf = logits.detach().requires_grad_(True)
        values, _ = reference_logp(leaf, targets, mask, options.temperature, with_entropy=False)
        loss, _ = reference_loss(values, old_logp, ref_logp, advantages, mask, num_items_tensor, options.grpo())
        (grad,) = torch.autograd.grad(loss, [leaf], grad_loss.to(loss.dtype))
    (logits if options.inplace_backward else dlogits).copy_(grad)


BACKWARD = Op(
    "logits_grpo_loss_backward",
    key=OP,
    inputs=("Tensor grad_loss, Tensor(a!) logits, Tensor targets, Tensor logp, Tensor stats, Tensor row_stats, "
            "Tensor row_weights, Tensor? old_logp, Tensor? ref_logp, Tensor advantages, Tensor mask, "
            "Tensor? num_items_tensor"),
    options=LogitsGrpoLossOptions,
    returns=("dlogits",),
    outputs=_backward_outputs,
    mutates=("logits",),
    backends={"triton": lambda *a: _backward_chunked("triton", *a), "cpu": lambda *a: _backward_chunked("cpu", *a),
              "reference": _backward_reference},
    availability=why_unavailable,
    default=default_backend,
)


def _save(ctx, inputs, options, outputs) -> None:
    logits, targets, old_logp, ref_logp, advantages, mask, num_items_tensor = inputs
    _, _, logp, _, stats, row_stats, weights = outputs
    ctx.save_for_backward(logits, targets, logp, stats, row_stats, weights, old_logp, ref_logp, advantages, mask,
                          num_items_tensor)


def _backward(ctx, grad_loss, *_unused):
    if grad_loss is None:
        return (None,) * 7
    logits, targets, logp, stats, row_stats, weights, old_logp, ref_logp, advantages, mask, num_items = (
        ctx.saved_tensors
    )
    grad_loss = grad_loss.to(torch.float32).reshape(())
    (dlogits,) = BACKWARD.call_in_backward(ctx, grad_loss, logits, targets, logp, stats, row_stats, weights,
                                           old_logp, ref_logp, advantages, mask, num_items)
    # In place, the gradient is the logits tensor itself (its storage now holds dlogits).
    return (logits if ctx.options.inplace_backward else dlogits), None, None, None, None, None, None


FORWARD.register_autograd(_save, _backward, differentiable=(0,))


# ---------------------------------------------------------------------------------------------
# Public function


def validate_temperature(op: str, temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{op}: temperature must be a Python float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < MIN_TEMPERATURE:
        raise ValueError(f"{op}: temperature must be finite and >= {MIN_TEMPERATURE:.4g}, got {temperature}")


def grpo_options(op: str, batch: int, length: int, device: torch.device, old_logp, advantages, mask, ref_logp,
                 beta, epsilon_low, epsilon_high, delta, dual_clip, loss_type, importance_sampling_level,
                 max_completion_length, num_items_in_batch, kl_clamp=None, use_bias_correction_kl=False,
                 sapo_temperature_pos=1.0, sapo_temperature_neg=1.05):
    """Validate the grpo_loss arguments as grpo_loss does (errors name ``op``); returns the
    float32 old / ref log-probs, the normaliser tensor (or None) and the GrpoLossOptions."""
    converted = []
    for name, value in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if value is not None:
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{op}: {name} must be a tensor, got {type(value).__name__}")
            if value.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{op}: {name} must be a float tensor, got {value.dtype}")
            value = value.detach().to(torch.float32)
        converted.append(value)
    old_logp, ref_logp = converted
    probe = torch.empty((), dtype=torch.float32, device=device).expand(batch, length)  # shape / device only
    try:
        _validate_grpo(probe, old_logp, advantages, mask, ref_logp, beta, epsilon_low, epsilon_high, delta, dual_clip,
                       loss_type, importance_sampling_level, max_completion_length, num_items_in_batch, kl_clamp,
                       use_bias_correction_kl, sapo_temperature_pos, sapo_temperature_neg)
    except (TypeError, ValueError) as error:
        raise type(error)(str(error).replace("grpo_loss:", f"{op}:", 1).replace(" but logp is", " but targets are"))
    num_items_tensor, options = options_from_arguments(
        length, beta, epsilon_low, epsilon_high, delta, dual_clip, loss_type, importance_sampling_level,
        max_completion_length, num_items_in_batch, kl_clamp, use_bias_correction_kl, sapo_temperature_pos,
        sapo_temperature_neg,
    )
    return old_logp, ref_logp, num_items_tensor, options


def metrics_dict(metrics: torch.Tensor, has_ref: bool) -> dict[str, torch.Tensor]:
    values = metrics.detach().unbind()
    names = (*METRIC_NAMES, ENTROPY_METRIC)
    return {name: value for name, value in zip(names, values) if has_ref or name != "kl"}


def logits_grpo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
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
    kl_clamp: float | None = None,
    use_bias_correction_kl: bool = False,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    backend: str | None = None,
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
    advantages, mask, old_logp, ref_logp, beta, epsilon_low, epsilon_high, delta, dual_clip, loss_type,
    importance_sampling_level, max_completion_length, num_items_in_batch, kl_clamp, use_bias_correction_kl,
    sapo_temperature_pos, sapo_temperature_neg
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
    old_logp, ref_logp, num_items_tensor, grpo = grpo_options(
        OP, batch, length, logits.device, old_logp, advantages, mask, ref_logp, beta, epsilon_low, epsilon_high,
        delta, dual_clip, loss_type, importance_sampling_level, max_completion_length, num_items_in_batch,
        kl_clamp, use_bias_correction_kl, sapo_temperature_pos, sapo_temperature_neg)
    options = LogitsGrpoLossOptions(*grpo, temperature=float(temperature), inplace_backward=bool(inplace_backward))
    loss, metrics, *_ = FORWARD(logits, targets, old_logp, ref_logp, advantages.detach(), mask.detach(),
                                num_items_tensor, options=options, backend=backend or "")
    return loss, metrics_dict(metrics, ref_logp is not None)
