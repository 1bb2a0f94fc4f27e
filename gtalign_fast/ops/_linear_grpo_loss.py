"""``linear_grpo_loss``: hidden states -> LM head -> GRPO loss, with the gradients computed in the forward.

The loss reaches the logits only through the target log-probs, and the weight of each sequence in
the loss is known from the mask before any logits exist (``_grpo_objective.row_weights``), so
the gradient of a chunk of tokens is final as soon as that chunk's logits are. Per chunk of
tokens (whole sequences at ``importance_sampling_level="sequence"``, whose ratio needs the whole
sequence):

1. ``Z = H_c @ W^T (+ b)`` into one reused ``[C, V]`` buffer (BLAS / cuBLAS);
2. the chunk kernels of ``_grpo_chunks`` (log-sum-exp / log-prob / entropy pass, the
   ``[C]``-sized GRPO terms, then ``dZ`` written over ``Z`` in place);
3. ``dH_c = dZ @ W`` and ``dW += dZ^T @ H_c`` (and ``db += sum dZ``).

Three GEMMs in all; the ``[N, V]`` logits never exist. The gradients are outputs of the forward
op that autograd hands out in the backward, scaled by ``grad_output``: they reach ``.grad``
through the ordinary AccumulateGrad nodes, so DDP's reducer hooks fire and gradient accumulation
adds up. Under ``torch.no_grad()`` (or with nothing requiring a gradient) only the first GEMM runs.
"""

from __future__ import annotations

import torch
from typing_extensions import Unpack

from . import _device_checks
from ._grpo_chunks import (
    SKIP,
    check_targets,
    chunk_kernels,
    fused_metrics,
    kernel_targets,
    loss_options,
    metrics_vector,
    reference_logp,
    validate_temperature,
)
from ._grpo_constants import (
    METRIC_HIGH,
    METRIC_KL,
    METRIC_LOW,
    METRIC_RATIO,
    METRIC_REGION,
    NUM_METRICS,
    NUM_SEQUENCE_STATS,
    STAT_HIGH,
    STAT_KL_SUM,
    STAT_LOSS_SUM,
    STAT_LOW,
    STAT_RATIO_SUM,
    STAT_REGION,
    STAT_TOKENS,
)
from ._grpo_objective import (
    FLOAT_DTYPES,
    GrpoOptions,
    autograd_inside_op,
    document_options,
    kernel_mask,
    options_type,
    reference_loss,
    row_metrics,
    row_weights,
)
from ._op import Op, Output, backends, chunk_drivers
from ._token_logprobs_constants import NUM_SOFTMAX_STATS

OP = "linear_grpo_loss"
# Bytes of one chunk of logits (the reused [C, V] buffer) when chunk_size is not given.
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}
MIN_CHUNK_TOKENS = 128  # below this the GEMMs lose efficiency; the budget is exceeded instead


def default_chunk_tokens(n_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk: as many as fit one chunk of logits in :data:`CHUNK_BYTES` (64 MiB on CPU:
    512 tokens at V = 32000 float32; 512 MiB on CUDA: 2048 tokens at V = 131072 bf16), rounded
    down to a multiple of 128, at least 128, at most ``n_tokens``. Few large chunks keep the GEMMs
    efficient (each is ``[C, H] x [H, V]``); the budget bounds the memory beyond the gradients."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    tokens = budget // (vocab * torch.finfo(dtype).bits // 8)
    tokens = max(MIN_CHUNK_TOKENS, tokens // MIN_CHUNK_TOKENS * MIN_CHUNK_TOKENS)
    return max(1, min(n_tokens, tokens))


LinearGrpoLossOptions = options_type(
    "LinearGrpoLossOptions",
    temperature=float,
    chunk_size=int,  # tokens per chunk; 0 = default_chunk_tokens
    need_hidden=bool,
    need_weight=bool,
    need_bias=bool,
)


def _outputs(hidden, weight, bias, targets, old_logp, ref_logp, advantages, mask, num_items_tensor, is_ratio, options):
    return (
        Output((), torch.float32),  # loss
        Output((NUM_METRICS + 1,), torch.float32),  # grpo_loss' metrics, then the mean entropy
        Output(tuple(targets.shape), torch.float32),  # logp (0 where masked out)
        Output(hidden.shape if options.need_hidden else (0,), hidden.dtype),  # d loss / d hidden
        Output(weight.shape if options.need_weight else (0,), weight.dtype),  # d loss / d weight
        Output(bias.shape if options.need_bias else (0,), hidden.dtype),  # d loss / d bias
    )


def _forward_chunks(name, hidden, weight, bias, targets, old_logp, ref_logp, advantages, mask, num_items_tensor,
                    is_ratio, options, loss, metrics, logp, dhidden, dweight, dbias):
    device = hidden.device
    kernels = chunk_kernels(name, device)
    grpo = options.grpo()
    batch, length = targets.shape
    n_tokens, vocab = batch * length, weight.shape[0]
    need_grad = options.need_hidden or options.need_weight or options.need_bias
    inv_t = 1.0 / options.temperature
    seq = grpo.whole_rows
    chunk = options.chunk_size or default_chunk_tokens(n_tokens, vocab, hidden.dtype, device)

    ktargets = kernel_targets(targets, mask)
    weights_b = row_weights(mask, grpo, num_items_tensor)
    logp_flat = logp.view(-1)
    entropy = torch.empty(n_tokens, dtype=torch.float32, device=device)
    if seq:  # rows of the GRPO kernels = sequences; a chunk holds whole sequences (GSPO's ratio, VESPO's weight)
        rows_per_chunk, row_len = max(1, chunk // length), length
        w_rows, row_inputs, row_is = weights_b, (logp, old_logp, ref_logp, advantages, mask), is_ratio
    else:  # rows = single tokens ([N, 1] views): a chunk may cut a sequence anywhere
        rows_per_chunk, row_len = chunk, 1
        # repeat_interleave, not expand().reshape(): at B = 1 the reshape keeps the stride-0 view, and
        # the kernels read row_weights as a contiguous float32 [rows] tensor.
        w_rows = weights_b.repeat_interleave(length)
        adv = advantages.to(torch.float32)
        adv = adv.unsqueeze(1).expand(batch, length) if adv.dim() == 1 else adv
        row_inputs = tuple(None if x is None else x.reshape(n_tokens, 1)
                           for x in (logp, old_logp, ref_logp, adv, kernel_mask(mask)))
        row_is = None  # the IS ratio per token ([N, 1]: each row one token)
        if is_ratio is not None:
            row_is = (is_ratio.repeat_interleave(length) if is_ratio.dim() == 1 else is_ratio).reshape(n_tokens, 1)
    n_rows = row_inputs[0].shape[0]
    chunk_tokens = min(n_tokens, rows_per_chunk * row_len)
    row_stats = torch.empty(n_rows, NUM_SEQUENCE_STATS, dtype=torch.float32, device=device)
    buffer = torch.empty(chunk_tokens, vocab, dtype=hidden.dtype, device=device)
    stats = torch.empty(chunk_tokens, NUM_SOFTMAX_STATS, dtype=torch.float32, device=device)
    dlogp = torch.empty(chunk_tokens, dtype=torch.float32, device=device)
    scratch = [torch.empty(shape, dtype=torch.float32, device=device)
               for shape in ((), (NUM_METRICS,), (min(n_rows, rows_per_chunk),))]
    one, no_dref = torch.ones((), dtype=torch.float32, device=device), dlogp.new_empty((0,))
    weight_t = weight.t()
    if options.need_weight:
        dweight.zero_()
    dbias_acc = torch.zeros(vocab, dtype=torch.float32, device=device) if options.need_bias else None

    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(n_rows, r0 + rows_per_chunk)
        t0, t1 = r0 * row_len, r1 * row_len
        n = t1 - t0
        h, z = hidden[t0:t1], buffer[:n]
        if bias is None:
            torch.mm(h, weight_t, out=z)
        else:
            torch.addmm(bias, h, weight_t, out=z)
        z3 = z.view(1, n, vocab)
        kernels.stats(z3, ktargets[t0:t1], options.temperature, logp_flat[t0:t1], entropy[t0:t1], stats[:n])
        chunk_inputs = tuple(None if x is None else x[r0:r1] for x in row_inputs)
        chunk_is = None if row_is is None else row_is[r0:r1]
        kernels.grpo_forward(*chunk_inputs, num_items_tensor, chunk_is, grpo, scratch[0], scratch[1], row_stats[r0:r1],
                             scratch[2][: r1 - r0])
        if not need_grad:
            continue
        g = dlogp[:n]
        kernels.grpo_backward(one, row_stats[r0:r1], w_rows[r0:r1], *chunk_inputs, None, chunk_is, False, grpo,
                              g.view(chunk_inputs[0].shape), no_dref)
        kernels.grad(z3, ktargets[t0:t1], g, stats[:n], inv_t, SKIP, z3)  # dZ over Z, in place
        if options.need_hidden:
            torch.mm(z, weight, out=dhidden[t0:t1])
        if options.need_weight:
            dweight.addmm_(z.t(), h)
        if dbias_acc is not None:
            dbias_acc += z.sum(dim=0, dtype=torch.float32)
    if dbias_acc is not None:
        dbias.copy_(dbias_acc)
    if name == "triton" and need_grad:  # the gradient kernel's target check (CPU: raise; CUDA: recorded)
        _device_checks.after_launch(OP, device)
    _finish(row_stats, w_rows, entropy, mask, row_metrics(grpo, advantages), batch, loss, metrics)


def _finish(row_stats, w_rows, entropy, mask, row_metrics, batch, loss, metrics) -> None:
    """Loss and metrics from the per-row sums of every chunk (what grpo_loss' finalize step does)."""
    torch.dot(w_rows, row_stats[:, STAT_LOSS_SUM], out=loss)
    sums = row_stats.sum(dim=0)
    tokens = sums[STAT_TOKENS].clamp(min=1.0)
    count = batch if row_metrics else tokens
    for metric, stat in ((METRIC_LOW, STAT_LOW), (METRIC_HIGH, STAT_HIGH), (METRIC_REGION, STAT_REGION),
                         (METRIC_RATIO, STAT_RATIO_SUM)):
        metrics[metric] = sums[stat] / count
    metrics[METRIC_KL] = sums[STAT_KL_SUM] / tokens
    metrics[NUM_METRICS] = torch.dot(entropy, (mask != 0).reshape(-1).to(torch.float32)) / tokens


def _forward_reference(hidden, weight, bias, targets, old_logp, ref_logp, advantages, mask, num_items_tensor,
                       is_ratio, options, loss, metrics, logp, dhidden, dweight, dbias):
    """Materialised float64 (float32 for half inputs) logits and autograd through the reference."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    with autograd_inside_op():
        leaves = [hidden.detach().to(dtype).requires_grad_(True), weight.detach().to(dtype).requires_grad_(True)]
        if bias is not None:
            leaves.append(bias.detach().to(dtype).requires_grad_(True))
        logits = torch.nn.functional.linear(*leaves).view(*targets.shape, weight.shape[0])
        values, entropy = reference_logp(logits, targets, mask, options.temperature)
        ref_loss, ref_metrics = reference_loss(values, old_logp, ref_logp, advantages, mask, num_items_tensor,
                                               is_ratio, options.grpo())
        grads = torch.autograd.grad(ref_loss, leaves)
    loss.copy_(ref_loss)
    metrics_vector(ref_metrics, entropy.detach(), mask, metrics)
    logp.copy_(values.detach())
    for out, grad, need in zip((dhidden, dweight, dbias), grads + (None,), (options.need_hidden, options.need_weight,
                                                                            options.need_bias)):
        if need:
            out.copy_(grad)


def _check(hidden, weight, bias, targets, old_logp, ref_logp, advantages, mask, num_items_tensor, is_ratio, options,
           backend) -> None:
    check_targets(OP, hidden.device, targets, mask, weight.shape[0], backend)
    if backend == "triton" and hidden.dtype == torch.float64:
        raise TypeError(f"{OP}: the 'triton' backend takes float16 / bfloat16 / float32, got float64")


FORWARD = Op(
    OP,
    inputs=("Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor? old_logp, Tensor? ref_logp, "
            "Tensor advantages, Tensor mask, Tensor? num_items_tensor, Tensor? is_ratio"),
    options=LinearGrpoLossOptions,
    returns=("loss", "metrics", "logp", "dhidden", "dweight", "dbias"),
    outputs=_outputs,
    check=_check,
    backends=backends(**chunk_drivers(_forward_chunks, "triton", "cpu"), reference=_forward_reference),
)


def _save(ctx, inputs, options, outputs) -> None:
    # Plain attributes, not save_for_backward: the backward scales these buffers in place and hands
    # them to autograd, which then holds the only reference (AccumulateGrad can take them over
    # without a copy). They are non-differentiable outputs: no reference cycle through ctx.
    ctx.grads = outputs[3:]


def _backward(ctx, grad_loss, *_unused):
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError(
            f"{OP}: the backward ran twice through one forward (retain_graph=True); the gradients computed in "
            "the forward were handed out already: call the op again"
        )
    if grad_loss is None:
        return (None,) * 10
    scale = grad_loss.reshape(())
    options = ctx.options
    out = []
    for grad, need in zip(grads, (options.need_hidden, options.need_weight, options.need_bias)):
        out.append(grad.mul_(scale.to(grad.dtype)) if need else None)
    return (*out, None, None, None, None, None, None, None)


FORWARD.register_autograd(_save, _backward, differentiable=(0,))


@document_options
def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_logp: bool = False,
    backend: str | None = None,
    **options: Unpack[GrpoOptions],
):
    """GRPO loss from the final hidden states: ``grpo_loss(token_logprobs((hidden @ weight.T + bias) / T,
    targets), ...)`` in chunks of tokens, with dhidden / dweight / dbias computed in the forward.

    Exactly three GEMMs per chunk (logits, ``dH = dZ @ W``, ``dW += dZ^T @ H``) and one reused
    ``[C, V]`` logits buffer; the ``[N, V]`` logits never exist. The backward only multiplies the
    stored gradients by ``grad_output`` (they flow through autograd, so DDP all-reduces them and
    gradient accumulation adds them up).

    Parameters
    ----------
    hidden : Tensor, shape ``[B, T, H]``, float16 / bfloat16 / float32 (float64 accepted)
        Hidden states whose LM-head logits predict ``targets`` (e.g. ``h[:, :-1]``); any strides
        (a non-contiguous view is copied once into ``[N, H]``).
    weight : Tensor, shape ``[V, H]``, hidden's dtype
    targets : Tensor, shape ``[B, T]``, int64
        Token ids in ``[0, V)`` where ``mask`` is nonzero (any value elsewhere).
    advantages, mask, old_logp, ref_logp
        As :func:`gtalign_fast.ops.grpo_loss` (``old_logp`` / ``ref_logp`` any float dtype, used in
        float32; ``old_logp=None``: on-policy, ratio 1, the true gradient).
    bias : Tensor, shape ``[V]``, hidden's dtype, optional
    temperature : float, default 1.0
        The logits are divided by it before the softmax.
    chunk_size : int, optional
        Tokens per chunk (at sequence level and for ``loss_type="vespo"`` rounded down to whole
        sequences, at least one).
        Default: :func:`default_chunk_tokens`, as many as keep one chunk of logits within 64 MiB
        on CPU / 512 MiB on CUDA (a multiple of 128, at least 128): few chunks keep the GEMMs
        large, the budget bounds the memory beyond the gradients.
    return_logp : bool, default False
        Also return the per-token log-probs (float32 ``[B, T]``, 0 where masked out, no gradient),
        e.g. to keep as ``old_logp`` for the next iterations.
    backend : {"triton", "cpu", "reference"}, optional
        The chunk kernels (GEMMs always on the BLAS / cuBLAS). Default:
        ``GTALIGN_FAST_BACKEND[_LINEAR_GRPO_LOSS]``, else C++ on CPU and Triton on CUDA.
    %(grpo_options)s

    Returns
    -------
    loss : Tensor, 0-dim, float32
    metrics : dict of 0-dim float32 Tensors
        ``grpo_loss``' metrics plus ``"entropy"`` (mean over the counted tokens).
    logp : Tensor, ``[B, T]``, float32
        Only with ``return_logp=True``.

    Raises
    ------
    TypeError, ValueError
        As ``grpo_loss`` for the loss arguments; dtypes, shapes and devices of hidden / weight / bias /
        targets; temperature; chunk_size.
    IndexError
        A counted target outside ``[0, V)`` (CPU tensors; on CUDA the gradient kernel sets
        ERR_TARGET_RANGE in the device error flag, see ``ops.check_device_errors``).
    RuntimeError
        A second backward through the same forward (``retain_graph=True``).

    Notes
    -----
    Extra memory: one ``[C, V]`` chunk of logits in hidden's dtype, ``O(N)`` float32 per-token
    buffers, a float32 ``[V]`` accumulator with a bias; the gradients are in the inputs' dtypes
    (dW is accumulated in weight's dtype across chunks, as Liger does).
    """
    named = {"hidden": hidden, "weight": weight, "targets": targets} | ({"bias": bias} if bias is not None else {})
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a tensor, got {type(value).__name__}")
        if value.device != hidden.device:
            raise ValueError(f"{OP}: {name} is on {value.device} but hidden is on {hidden.device}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    for name in ("weight", "bias"):
        if name in named and named[name].dtype != hidden.dtype:
            raise TypeError(f"{OP}: {name} dtype {named[name].dtype} must equal hidden's {hidden.dtype}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{OP}: targets must be int64 token ids, got {targets.dtype}")
    if hidden.dim() != 3 or hidden.shape[0] == 0 or hidden.shape[1] == 0 or hidden.shape[2] == 0:
        raise ValueError(f"{OP}: hidden must be [B, T, H] with B, T, H >= 1, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"{OP}: weight must be [V, H] with H = {hidden.shape[2]}, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{OP}: bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"{OP}: targets must have shape {tuple(hidden.shape[:2])}, got {tuple(targets.shape)}")
    validate_temperature(OP, temperature)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
        raise TypeError(f"{OP}: chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{OP}: chunk_size must be >= 1, got {chunk_size}")
    batch, length, size = hidden.shape
    old_logp, ref_logp, num_items_tensor, is_ratio, grpo = loss_options(
        OP, batch, length, hidden.device, old_logp, advantages, mask, ref_logp, options)
    grad = torch.is_grad_enabled()
    options = LinearGrpoLossOptions(
        *grpo, temperature=float(temperature), chunk_size=int(chunk_size or 0),
        need_hidden=grad and hidden.requires_grad, need_weight=grad and weight.requires_grad,
        need_bias=grad and bias is not None and bias.requires_grad,
    )
    loss, metrics, logp, *_ = FORWARD(hidden.reshape(batch * length, size), weight, bias, targets, old_logp, ref_logp,
                                      advantages.detach(), mask.detach(), num_items_tensor, is_ratio, options=options,
                                      backend=backend or "")
    result = (loss, fused_metrics(metrics, ref_logp is not None, grpo.loss_type == "vespo"))
    return (*result, logp.detach()) if return_logp else result
