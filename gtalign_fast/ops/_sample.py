"""``sample_``: the public op and its backends.

One :class:`~gtalign_fast.ops._op.Op` (custom op ``gtalign_fast::sample_``) mutates the logits buffer
in place and returns the tokens, both log-probs and a per-row status word. No host
synchronisation on CUDA: the public function checks scalar arguments and metadata on the host,
and the values of CUDA tensors (per-row parameters, forced ids, bias ids, NaN logits) are checked
by the Triton kernel, which sets a bit of the device error flag (:mod:`gtalign_fast.ops._device_checks`,
raised by :func:`~gtalign_fast.ops.check_device_errors` or at once with
``GTALIGN_FAST_SYNC_CHECKS=1``). On CPU tensors every check runs on the host before the kernel and
a bad row raises after it, with the row and the value. Sampling has no gradient, so no autograd is
registered.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import reference
from . import _device_checks
from . import _sample_constants as constants
from ._device_checks import error_flag
from ._op import Op, Output, backends, extension_kernel
from ._seeds import GOLDEN, signed64
from ._token_logprobs import MIN_TEMPERATURE

# The key for backend resolution: last_backend("sample"), GTALIGN_FAST_BACKEND_SAMPLE.
OP = "sample"
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Bias slots per row: the Triton kernel holds them in registers.
MAX_BIASES = 1024

# What a row's status word (written by every backend) means.
_STATUS_MESSAGES = {
    constants.STATUS_BAD_LOGITS: "contains NaN or +inf logits",
    constants.STATUS_NO_FINITE_LOGIT: "has no finite logit (all -inf)",
    constants.STATUS_NO_FINITE_LOGIT_AFTER_BIAS: "has no finite logit left after the biases (all -inf)",
}


# ---------------------------------------------------------------------------------------------
# Backends


def _status_reference(logits: torch.Tensor, biased: torch.Tensor) -> torch.Tensor:
    bad = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1)
    no_raw = torch.isneginf(logits).all(dim=-1)
    no_processed = torch.isneginf(biased).all(dim=-1)
    status = torch.where(no_processed, constants.STATUS_NO_FINITE_LOGIT_AFTER_BIAS, constants.STATUS_OK)
    status = torch.where(no_raw, constants.STATUS_NO_FINITE_LOGIT, status)
    return torch.where(bad, constants.STATUS_BAD_LOGITS, status).to(torch.int32)


def _run_reference(logits, temperature, top_k, top_p, min_p, forced, seeds, bias_ids, bias_values,
                   tokens, logprobs, raw_logprobs, status):
    # The specification checks everything on the host, on any device (it is not a hot path).
    _check_values(logits.shape[1], temperature, top_k, top_p, min_p, forced, bias_ids, bias_values)
    ref_tokens, ref_logprobs, ref_raw, processed = reference.sample(
        logits, temperature, top_k, top_p, min_p, bias_ids, bias_values, forced, seeds
    )
    # The status needs the biased row; the reference's processed row has it where rows are fine.
    biased = logits.clone()
    if bias_ids is not None:
        valid = bias_ids >= 0
        rows = torch.arange(logits.shape[0], device=logits.device)[:, None].expand_as(bias_ids)[valid]
        biased[rows, bias_ids[valid]] = (biased[rows, bias_ids[valid]].float() + bias_values[valid]).to(logits.dtype)
    status.copy_(_status_reference(logits, biased))
    logits.copy_(processed)
    tokens.copy_(ref_tokens)
    logprobs.copy_(ref_logprobs)
    raw_logprobs.copy_(ref_raw)
    _raise_on_status(status)


def _run_triton(logits, temperature, top_k, top_p, min_p, forced, seeds, bias_ids, bias_values,
                tokens, logprobs, raw_logprobs, status):
    from gtalign_fast.kernels import sample as triton_kernels

    _check_layout(logits, temperature, top_k, top_p, min_p, forced, seeds, bias_ids, bias_values)
    device = logits.device
    flag = error_flag(device)
    if bias_ids is not None and bias_ids.shape[1] > 1:
        _flag_duplicate_biases(bias_ids, flag)
    triton_kernels.sample(logits, temperature, top_k, top_p, min_p, forced, seeds, bias_ids, bias_values,
                          tokens, logprobs, raw_logprobs, status, flag)
    _device_checks.after_launch(
        "sample_",
        device,
        explain=lambda: (
            _check_values(logits.shape[1], temperature, top_k, top_p, min_p, forced, bias_ids, bias_values),
            _raise_on_status(status),
        ),
    )


def _run_cpu(*args):
    extension_kernel("sample", args[0].device)(*args)


def _duplicate_bias_rows(bias_ids: torch.Tensor) -> torch.Tensor:
    """bool ``[B]``: the rows that name a token twice (padding ``-1`` aside). Device ops only."""
    ordered = bias_ids.sort(dim=1).values
    return ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(dim=1)


def _flag_duplicate_biases(bias_ids: torch.Tensor, flag: torch.Tensor) -> None:
    """Set ERR_SAMPLE_INPUT when a row names a token twice, with device ops only (no host sync)."""
    duplicate = _duplicate_bias_rows(bias_ids).any()
    flag.bitwise_or_(duplicate.to(torch.int32) * _device_checks.ERR_SAMPLE_INPUT)


def _check_layout(logits, temperature, top_k, top_p, min_p, forced, seeds, bias_ids, bias_values) -> None:
    """What the Triton kernel assumes of its arguments' metadata (the low-level op can be called
    directly): dtypes, ``[B]`` / ``[B, K]`` shapes, contiguity, one device. Metadata only."""
    batch = logits.shape[0]
    vectors = {"temperature": (temperature, torch.float32), "top_k": (top_k, torch.int64),
               "top_p": (top_p, torch.float32), "min_p": (min_p, torch.float32),
               "forced": (forced, torch.int64), "seeds": (seeds, torch.int64)}
    for name, (value, dtype) in vectors.items():
        if value.dtype != dtype or value.shape != (batch,) or not value.is_contiguous():
            raise ValueError(f"sample_: {name} must be a contiguous {dtype} [B] = [{batch}] tensor, got "
                             f"{value.dtype} {tuple(value.shape)}")
    if (bias_ids is None) != (bias_values is None):
        raise ValueError("sample_: bias_ids and bias_values must be given together")
    if bias_ids is not None:
        good = (bias_ids.dtype == torch.int64 and bias_values.dtype == torch.float32 and bias_ids.dim() == 2
                and bias_ids.shape[0] == batch and bias_values.shape == bias_ids.shape
                and bias_ids.is_contiguous() and bias_values.is_contiguous() and bias_ids.shape[1] <= MAX_BIASES)
        if not good:
            raise ValueError(f"sample_: bias_ids / bias_values must be contiguous int64 / float32 [B, K] with "
                             f"K <= {MAX_BIASES}, got {bias_ids.dtype} {tuple(bias_ids.shape)} and "
                             f"{bias_values.dtype} {tuple(bias_values.shape)}")
    others = [temperature, top_k, top_p, min_p, forced, seeds] + ([] if bias_ids is None else [bias_ids, bias_values])
    if any(value.device != logits.device for value in others):
        raise ValueError(f"sample_: every tensor must be on the logits' device {logits.device}")


def _raise_on_status(status: torch.Tensor) -> None:
    """Raise for the first row whose status word is not OK (reads the status: a host sync)."""
    row = _first_bad(status != constants.STATUS_OK)
    if row is not None:
        raise ValueError(f"sample_: logits row {row} {_STATUS_MESSAGES.get(int(status[row]), 'is invalid')}")


def uniform_noise(seeds: torch.Tensor, vocab: int, backend: str = "reference") -> torch.Tensor:
    """The ``[B, vocab]`` uniform noise a backend draws for row seeds ``seeds`` (``[B]`` int64).
    Every backend draws the same bits; exposed so tests can check that."""
    seeds = seeds.to(torch.int64).contiguous()
    if backend == "triton":
        from gtalign_fast.kernels import sample as triton_kernels

        return triton_kernels.uniform_noise(seeds, vocab)
    if backend == "cpu":
        out = torch.empty((seeds.shape[0], vocab), dtype=torch.float32, device=seeds.device)
        extension_kernel("sample_uniform", seeds.device)(seeds, out)
        return out
    if backend != "reference":
        raise ValueError(f"uniform_noise: backend must be 'triton', 'cpu' or 'reference', got {backend!r}")
    return reference.philox_uniform(seeds, vocab)


# ---------------------------------------------------------------------------------------------
# The op


def _outputs(logits, *_per_row):
    batch = logits.shape[0]
    return (
        Output((batch,), torch.int64),  # tokens
        Output((batch,), torch.float32),  # logprobs
        Output((batch,), torch.float32),  # raw_logprobs
        Output((batch,), torch.int32),  # status
    )


OP_DEF = Op(
    "sample_",
    key=OP,
    inputs=(
        "Tensor(a!) logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor forced, "
        "Tensor seeds, Tensor? bias_ids, Tensor? bias_values"
    ),
    mutates=("logits",),
    returns=("tokens", "logprobs", "raw_logprobs", "status"),
    outputs=_outputs,
    backends=backends(triton=_run_triton, cpu=_run_cpu, reference=_run_reference),  # no CUDA C++ kernel
)


# ---------------------------------------------------------------------------------------------
# Validation: every argument becomes a contiguous [B] (or [B, K]) tensor on the logits' device


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# The value rules of the per-row parameters: name -> (mask of bad values in a tensor, whether a
# Python scalar is good, the rule in words). The public function applies them on the host to scalars
# (plain Python: no tensor op) and to CPU tensors; on CUDA the Triton kernel checks the same rules
# (kernels/sample.py, _reduce_kernel) without a host sync.
def _bad_temperature(t):
    return ~torch.isfinite(t) | (t < 0) | ((t > 0) & (t < MIN_TEMPERATURE))


_RULES = {
    "temperature": (_bad_temperature, lambda t: t == 0 or MIN_TEMPERATURE <= t < math.inf,
                    f"finite and >= 0 (0: greedy; a positive T >= {MIN_TEMPERATURE:.4g})"),
    "top_k": (lambda k: k < 0, lambda k: k >= 0, ">= 0 (0 = off)"),
    "top_p": (lambda p: ~((p > 0) & (p <= 1)), lambda p: 0 < p <= 1, "in (0, 1]"),
    "min_p": (lambda p: ~((p >= 0) & (p <= 1)), lambda p: 0 <= p <= 1, "in [0, 1]"),
}


def _per_row(value, name: str, batch: int, device: torch.device, integer: bool) -> torch.Tensor:
    """A scalar or ``[B]`` tensor as a contiguous ``[B]`` float32 / int64 tensor; a scalar's value
    is checked here, on the host (free: no device tensor is read)."""
    dtype = torch.int64 if integer else torch.float32
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(
                f"sample_: {name} must be a scalar or a [B] = [{batch}] tensor, got shape {tuple(value.shape)}"
            )
        if value.device != device:
            raise ValueError(f"sample_: {name} is on {value.device} but logits are on {device}")
        if integer and (value.dtype.is_floating_point or value.dtype == torch.bool):
            raise TypeError(f"sample_: {name} must hold integers, got {value.dtype}")
        if not integer and value.dtype == torch.bool:
            raise TypeError(f"sample_: {name} must hold numbers, got {value.dtype}")
        return value.to(dtype).contiguous()
    if integer and not (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
        raise TypeError(f"sample_: {name} must be an int or a [B] int tensor, got {type(value).__name__}")
    if not integer and not _is_number(value):
        raise TypeError(f"sample_: {name} must be a float or a [B] tensor, got {type(value).__name__}")
    if name in _RULES and not _RULES[name][1](value):
        raise ValueError(f"sample_: {name} must be {_RULES[name][2]}, got {value}")
    return torch.full((batch,), value, dtype=dtype, device=device)


def _first_bad(bad: torch.Tensor) -> int | None:
    """Index of the first True in a [B] mask, or None (one host sync)."""
    flat = bad.reshape(-1)
    if not bool(flat.any()):
        return None
    return int(flat.nonzero()[0, 0])


def _check_range(values: torch.Tensor, bad: torch.Tensor, name: str, rule: str, error=ValueError) -> None:
    row = _first_bad(bad)
    if row is not None:
        raise error(f"sample_: {name} must be {rule}; row {row} has {values.reshape(-1)[row].item()}")


def _check_rule(name: str, values: torch.Tensor) -> None:
    bad, _, rule = _RULES[name]
    _check_range(values, bad(values), name, rule)


def _check_values(vocab, temperature, top_k, top_p, min_p, forced, bias_ids, bias_values) -> None:
    """Every value check of the converted arguments, on the host (host syncs on CUDA: used for CPU
    tensors, the reference backend and to explain an error the kernel flagged)."""
    for name, values in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
        _check_rule(name, values)
    _check_range(
        forced, (forced < -1) | (forced >= vocab), "forced", f"-1 (none) or a token id in [0, {vocab})", IndexError
    )
    if bias_ids is None:
        return
    _check_range(bias_ids, (bias_ids < -1) | (bias_ids >= vocab), "bias_ids", f"-1 (padding) or in [0, {vocab})",
                 IndexError)
    # A bias may ban a token (-inf) but not force one (+inf) or be NaN: use `forced` for that.
    bad_value = torch.isnan(bias_values) | torch.isposinf(bias_values)
    _check_range(bias_values, bad_value.any(dim=1), "bias_values", "finite or -inf")
    row = _first_bad(_duplicate_bias_rows(bias_ids))
    if row is not None:
        raise ValueError(f"sample_: bias_ids row {row} names a token twice; give each token one bias")


def _row_seeds(seed: int, batch: int, device: torch.device) -> torch.Tensor:
    """``seed + row * GOLDEN`` mod 2**64 (``gtalign_fast.ops._seeds.batch_row_seeds``), built on the
    device: int64 arithmetic wraps mod 2**64, and no host -> device copy (a sync on CUDA) is made."""
    rows = torch.arange(batch, dtype=torch.int64, device=device)
    return rows * signed64(GOLDEN) + signed64(seed)


def _validate_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"sample_: logits must be a tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"sample_: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"sample_: logits must be [B, V], got shape {tuple(logits.shape)}")
    batch, vocab = logits.shape
    if batch == 0 or vocab == 0:
        raise ValueError(f"sample_: logits must have B >= 1 rows and V >= 1 columns, got {tuple(logits.shape)}")
    if vocab >= 2**31:
        raise ValueError(f"sample_: V = {vocab} must be below 2**31 (the noise counter is 32-bit)")
    # The buffer is written in place: refuse what torch's own in-place ops refuse (metadata only).
    if logits.requires_grad and torch.is_grad_enabled():
        kind = "a leaf tensor" if logits.is_leaf else "a tensor"
        raise RuntimeError(
            f"sample_: logits is {kind} that requires grad and is written in place (sample_ has no "
            "gradient); pass logits.detach() or call it under torch.no_grad()"
        )
    if _rows_overlap(logits):
        raise RuntimeError(
            f"sample_: logits (shape {tuple(logits.shape)}, strides {logits.stride()}) has elements that share "
            "memory (an expand()ed or overlapping as_strided view) and is written in place; pass .clone()"
        )


def _rows_overlap(logits: torch.Tensor) -> bool:
    """Whether two elements of ``[B, V]`` logits may share memory, from the sizes and strides only.

    torch's own check first (a zero stride, ...); then the exact test for the plain layouts: with
    the dimensions of size > 1 sorted by stride, each stride must be at least the extent of the
    inner one. Non-overlapping but interleaved layouts (which nothing produces in practice) are
    refused too: a false alarm costs a clone, a missed overlap corrupts the tokens."""
    if torch._debug_has_internal_overlap(logits) == 1:  # MemOverlap::Yes
        return True
    dims = sorted((abs(stride), size) for size, stride in zip(logits.shape, logits.stride()) if size > 1)
    extent = 1
    for stride, size in dims:
        if stride < extent:
            return True
        extent = stride * size
    return False


def _validate_biases(bias_ids, bias_values, batch: int, device: torch.device):
    """Metadata checks and conversion of the biases (values: :func:`_check_values`)."""
    if bias_ids is None and bias_values is None:
        return None, None
    if bias_ids is None or bias_values is None:
        raise ValueError("sample_: bias_ids and bias_values must be given together")
    if not isinstance(bias_ids, torch.Tensor) or not isinstance(bias_values, torch.Tensor):
        raise TypeError("sample_: bias_ids and bias_values must be tensors")
    if bias_ids.dtype.is_floating_point or bias_ids.dtype == torch.bool:
        raise TypeError(f"sample_: bias_ids must be an integer tensor, got {bias_ids.dtype}")
    if not bias_values.dtype.is_floating_point:
        raise TypeError(f"sample_: bias_values must be a float tensor, got {bias_values.dtype}")
    if bias_ids.dim() != 2 or bias_ids.shape[0] != batch or bias_values.shape != bias_ids.shape:
        raise ValueError(
            f"sample_: bias_ids and bias_values must both be [B, K] with B = {batch}, got "
            f"{tuple(bias_ids.shape)} and {tuple(bias_values.shape)}"
        )
    if bias_ids.device != device or bias_values.device != device:
        raise ValueError(f"sample_: bias tensors must be on the logits' device {device}")
    if bias_ids.shape[1] > MAX_BIASES:
        raise ValueError(f"sample_: at most {MAX_BIASES} biases per row, got K = {bias_ids.shape[1]}")
    if bias_ids.shape[1] == 0:
        return None, None
    return bias_ids.to(torch.int64).contiguous(), bias_values.to(torch.float32).contiguous()


def sample_(
    logits: torch.Tensor,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    bias_ids: torch.Tensor | None = None,
    bias_values: torch.Tensor | None = None,
    forced=None,
    seed=None,
    backend: str | None = None,
):
    """Sample one token per row, in place on the logits, with the whole logits-processing chain fused.

    Per row, in this order: sparse biases, temperature, top-k, top-p, min-p, forced token, then a
    seeded Gumbel-max draw (``argmax(y + g)``, ``g = -log(-log u)``, ``u`` from Philox on
    (row seed, column)). The buffer ends up holding the processed logits (``y`` where kept,
    ``-inf`` elsewhere) in its own dtype. No ``[B, V]`` float32 copy is made: the thresholds are
    found exactly, without sorting (a radix select on the Triton backend, several programs per row;
    bisection on the C++ one; see ``kernels/sample.py``), so every backend keeps the same tokens
    and, drawing the same noise, gives the same token for the same seed (a top-p boundary within
    float32 rounding of ``p`` aside).

    Parameters
    ----------
    logits : Tensor, shape ``[B, V]``, float32 / bfloat16 / float16
        Modified in place. Rows may be strided (e.g. ``model_logits[:, -1, :]``).
    temperature : float or Tensor ``[B]``, default 1.0
        ``0`` or ``>= MIN_TEMPERATURE`` (~2.9e-39: 1/T is a finite float32); ``y = (z + bias) / T``.
        ``0`` is greedy: the argmax of the processed logits, with
        both log-probs then reported at ``T = 1``.
    top_k : int or Tensor ``[B]`` of int, default 0
        ``>= 0``; keep the tokens ``>=`` the k-th largest processed value (every token tied with it
        is kept). ``0`` or ``>= V``: off.
    top_p : float or Tensor ``[B]``, default 1.0
        In ``(0, 1]``; of the top-k tokens keep the smallest head (whole tie groups) whose mass is
        ``>= p`` of the top-k mass. ``1``: off.
    min_p : float or Tensor ``[B]``, default 0.0
        In ``[0, 1]``; keep tokens with ``p >= min_p * p_max``. ``0``: off.
    bias_ids, bias_values : Tensor ``[B, K]``, optional
        Sparse logit biases: ids (int, ``-1`` = unused slot, no id twice in a row) and values
        (float, finite or ``-inf`` to ban a token), added to the logits before the temperature.
    forced : int or Tensor ``[B]`` of int, optional
        A token per row to emit regardless of the distribution (``-1`` = none). A forced row's
        processed distribution is that one token: its ``logprobs`` is 0 and the buffer row is
        ``-inf`` except at the forced token.
    seed : int or Tensor ``[B]`` of int64, optional
        A tensor gives each row its own seed (a row's draw then depends only on its seed, not on
        its position in the batch); an int seeds row ``b`` with ``seed + b * 0x9E3779B97F4A7C15``;
        None draws a seed from torch's default CPU generator. The same seeds give the same tokens
        on the same backend (the CPU and Triton backends draw the same noise bits).
    backend : {"triton", "cpu", "reference"}, optional
        Default: ``GTALIGN_FAST_BACKEND[_SAMPLE]``, else the C++ kernel on CPU, Triton on CUDA.

    Returns
    -------
    tokens : Tensor ``[B]``, int64
    logprobs : Tensor ``[B]``, float32
        Log-prob of the token under the processed distribution (what was sampled from).
    raw_logprobs : Tensor ``[B]``, float32
        Log-prob of the token under ``softmax(z / T)``: temperature only, no bias or filter
        (what a trainer recomputes).

    Raises
    ------
    The value checks (ValueError / IndexError below) of arguments given as CUDA tensors, and the
    NaN / no-finite-logit checks of CUDA logits, run in the kernel without a host sync: a bad row
    gets token 0 and NaN log-probs, and the error is raised by
    :func:`gtalign_fast.ops.check_device_errors` (or at once under ``GTALIGN_FAST_SYNC_CHECKS=1``).
    Python scalars, metadata and CPU tensors are checked at once.

    TypeError
        Non-float logits or float64, wrong argument types.
    ValueError
        Bad shapes, an empty batch, ``T < 0``, ``top_k < 0``, ``top_p`` outside ``(0, 1]``,
        ``min_p`` outside ``[0, 1]``, NaN / +inf bias values, a token biased twice in a row, NaN or
        +inf logits, a row without a finite logit (the buffer is then partly processed).
    IndexError
        A forced token or bias id outside ``[0, V)`` (other than -1).
    RuntimeError
        Logits that require grad (under grad mode) or whose elements share memory (an ``expand``
        or overlapping ``as_strided`` view), as torch's own in-place ops refuse them.
    """
    _validate_logits(logits)
    batch, vocab = logits.shape
    device = logits.device
    temperature = _per_row(temperature, "temperature", batch, device, integer=False)
    top_k = _per_row(top_k, "top_k", batch, device, integer=True)
    top_p = _per_row(top_p, "top_p", batch, device, integer=False)
    min_p = _per_row(min_p, "min_p", batch, device, integer=False)
    if isinstance(forced, numbers.Integral) and not isinstance(forced, bool) and not -1 <= forced < vocab:
        raise IndexError(f"sample_: forced must be -1 (none) or a token id in [0, {vocab}), got {forced}")
    forced = _per_row(-1 if forced is None else forced, "forced", batch, device, integer=True)
    ids, values = _validate_biases(bias_ids, bias_values, batch, device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))  # torch's default CPU generator: no device sync
    if isinstance(seed, torch.Tensor):
        seeds = _per_row(seed, "seed", batch, device, integer=True)
    elif isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seeds = _row_seeds(int(seed), batch, device)
    else:
        raise TypeError(f"sample_: seed must be an int, a [B] int64 tensor or None, got {type(seed).__name__}")
    # On the host only where reading values is free; CUDA tensors are checked by the kernel.
    on_host = device.type == "cpu"
    if on_host:
        _check_values(vocab, temperature, top_k, top_p, min_p, forced, ids, values)

    tokens, logprobs, raw_logprobs, status = OP_DEF(
        logits, temperature, top_k, top_p, min_p, forced, seeds, ids, values, backend=backend or ""
    )
    if on_host:
        _raise_on_status(status)
    return tokens, logprobs, raw_logprobs
