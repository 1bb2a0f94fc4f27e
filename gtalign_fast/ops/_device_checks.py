"""Input errors found on the device, reported without a host synchronisation.

The kernels index memory with values they read from their inputs (target ids, group offsets, a
forced token id...). Checking those on the host first costs a device -> host copy per call on CUDA,
which stalls the CPU until the GPU catches up. Instead each kernel checks them itself: an index out
of range sets a code bit in a persistent per-device flag (``tl.atomic_or`` in Triton, ``atomicOr``
in CUDA) and the access is masked or clamped (the affected output row gets NaN, never memory outside
the tensors). The flag is read later, once per training step, where the caller synchronises anyway:

    flag = error_flag(device)              # int32 [1] on ``device``; pass it to the kernel
    ...launch...
    after_launch("token_logprobs", device)  # CPU: raise now; CUDA: only remember the op name
    ...
    check_device_errors()                  # one host sync: raise RuntimeError if a bit is set

On CPU tensors (the Triton interpreter in the tests) :func:`after_launch` reads the flag at once and
raises the same ``IndexError`` / ``ValueError`` the C++ CPU kernels raise. Setting the environment
variable ``GTALIGN_FAST_SYNC_CHECKS=1`` makes it do so on CUDA too (debug mode: the error points at
the call that caused it, at the price of one synchronisation per call).

The code bits are mirrored by ``csrc/device_checks_common.h`` for the CUDA kernels.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator, NamedTuple

import torch

# Code bits (OR-ed together in flag[0]). Mirrored by csrc/device_checks_common.h (enum ErrorCode).
ERR_TARGET_RANGE = 1  # a target / token id outside [0, V) that is not ignore_index
ERR_GROUP_OFFSETS = 2  # group / sequence offsets not increasing within [0, N]
ERR_NONFINITE_REWARD = 4  # welfare_advantages: a negative or infinite reward (NaN, a missing reward, is allowed)
ERR_FORCED_TOKEN = 8  # sample_'s forced token outside [0, V)
ERR_NUM_ITEMS = 16  # num_items_in_batch (a tensor) not a positive finite number
# sample_'s bad values found on the device (NaN / +inf logits, a row without a finite logit, bad bias
# values, duplicate bias ids, a per-row parameter out of range); its kernels take it from _sample_constants.
ERR_SAMPLE_INPUT = 1024

ENV_SYNC_CHECKS = "GTALIGN_FAST_SYNC_CHECKS"


class ErrorKind(NamedTuple):
    name: str
    meaning: str
    exception: type  # what after_launch raises on CPU tensors (the C++ CPU kernels raise the same)


ERROR_KINDS: dict[int, ErrorKind] = {
    ERR_TARGET_RANGE: ErrorKind(
        "ERR_TARGET_RANGE", "a target / token id outside [0, V) that is not ignore_index", IndexError
    ),
    ERR_GROUP_OFFSETS: ErrorKind(
        "ERR_GROUP_OFFSETS",
        "group / sequence offsets not increasing within [0, N] (or a length out of range)",
        ValueError,
    ),
    ERR_NONFINITE_REWARD: ErrorKind(
        "ERR_NONFINITE_REWARD", "a negative or infinite reward (NaN, a missing reward, is allowed)", ValueError
    ),
    ERR_FORCED_TOKEN: ErrorKind("ERR_FORCED_TOKEN", "a forced token id outside [0, V)", IndexError),
    ERR_NUM_ITEMS: ErrorKind("ERR_NUM_ITEMS", "num_items_in_batch is not a positive finite number", ValueError),
    ERR_SAMPLE_INPUT: ErrorKind(
        "ERR_SAMPLE_INPUT",
        "sample_: NaN/+inf logits, a row without a finite logit, a NaN/+inf bias value, duplicate bias ids"
        " or a per-row parameter out of range",
        ValueError,
    ),
}

_flags: dict[torch.device, torch.Tensor] = {}
_launched: dict[torch.device, dict[str, None]] = {}  # ops launched since the last check (ordered set)
_lock = threading.Lock()
_sync_checks = os.environ.get(ENV_SYNC_CHECKS, "0") == "1"
# Devices whose flag after_launch reads at once (a read costs no synchronisation there).
_IMMEDIATE_DEVICE_TYPES = frozenset({"cpu"})


def _key(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def error_flag(device: torch.device | str) -> torch.Tensor:
    """The persistent error flag of ``device``: an int32 tensor of shape ``[1]``, zero while no
    error was found, allocated once per device (so a CUDA graph may capture kernels that take it)."""
    flag = _flags.get(device)  # the fast path: a device object that was seen before
    if flag is not None:
        return flag
    key = _key(device)
    with _lock:
        flag = _flags.get(key)
        if flag is None:
            flag = _flags[key] = torch.zeros(1, dtype=torch.int32, device=key)
        if isinstance(device, torch.device) and (device.type != "cuda" or device.index is not None):
            _flags[device] = flag  # "cuda" without an index follows the current device: not cached
    return flag


def describe(code: int) -> str:
    """The error kinds of ``code``, e.g. ``"ERR_TARGET_RANGE (a target / token id outside ...)"``."""
    parts = [f"{kind.name} ({kind.meaning})" for bit, kind in ERROR_KINDS.items() if code & bit]
    unknown = code & ~sum(ERROR_KINDS)
    if unknown:
        parts.append(f"unknown code bits {unknown:#x}")
    return "; ".join(parts)


def _exception_for(code: int) -> type:
    for bit, kind in ERROR_KINDS.items():
        if code & bit:
            return kind.exception
    return ValueError


def _take(flag: torch.Tensor) -> int:
    """Read and clear the flag (the one host sync)."""
    code = int(flag.item())
    if code:
        flag.zero_()
    return code


def after_launch(op: str, device: torch.device | str, explain: Callable[[], None] | None = None) -> None:
    """Call after launching a kernel that was given :func:`error_flag` (``op``: the public op name).

    On CPU tensors (or with ``GTALIGN_FAST_SYNC_CHECKS=1``) it reads the flag now and raises
    ``IndexError`` / ``ValueError`` naming ``op`` and the error; on CUDA it only records ``op`` for
    :func:`check_device_errors` (no host synchronisation). ``explain``, optional, is called (with
    the flag already cleared) before that generic error is raised: a host-side check that raises a
    more precise one (which element, which value), worth its cost only once an error is known.
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type in _IMMEDIATE_DEVICE_TYPES or _sync_checks:
        code = _take(error_flag(device))
        if code:
            if explain is not None:
                explain()
            raise _exception_for(code)(f"gtalign_fast.{op}: invalid input found by the kernel: {describe(code)}")
        return
    launched = _launched.get(device)
    if launched is None:
        launched = _launched.setdefault(_key(device), {})
        if device.index is not None:
            _launched[device] = launched
    launched[op] = None


def check_device_errors(device: torch.device | str | None = None) -> None:
    """Raise if a kernel found an invalid input since the last check (one host sync per device).

    Call it where the caller synchronises anyway (e.g. when logging the loss once per step).

    Parameters
    ----------
    device : torch.device or str, optional
        The device to check; default: every device that has an error flag.

    Raises
    ------
    RuntimeError
        Naming the error kinds and the ops launched since the last check; the flag is cleared, so
        the next check starts afresh.
    """
    if device is not None:
        keys = [_key(device)]
    else:
        keys = list(dict.fromkeys(_key(d) for d in list(_flags) if d.type != "cuda" or d.index is not None))
    failures = []
    for key in keys:
        flag = _flags.get(key)
        code = _take(flag) if flag is not None else 0
        launched = _launched.get(key)
        ops = list(launched) if launched else []
        if launched:
            launched.clear()
        if code:
            failures.append(
                f"on {key}: {describe(code)}; ops launched since the last check: {', '.join(ops) or 'unknown'}"
            )
    if failures:
        raise RuntimeError("gtalign_fast: a kernel found invalid input " + " | ".join(failures))


@contextlib.contextmanager
def sync_checks(enabled: bool = True) -> Iterator[None]:
    """Context manager: :func:`after_launch` checks synchronously on every device (what
    ``GTALIGN_FAST_SYNC_CHECKS=1`` does for the whole process)."""
    global _sync_checks
    previous = _sync_checks
    _sync_checks = enabled
    try:
        yield
    finally:
        _sync_checks = previous
