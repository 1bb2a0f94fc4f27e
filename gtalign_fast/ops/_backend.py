"""Backend selection shared by every op.

Each op runs on one of four backends:

``"triton"``     the Triton kernel in ``gtalign_fast.kernels`` (CUDA tensors; CPU tensors only under
                 ``TRITON_INTERPRET=1``, which is how the tests run it);
``"cuda"``       the CUDA C++ kernel of the compiled extension ``gtalign_fast._C``;
``"cpu"``        the C++ CPU kernel of the compiled extension (OpenMP);
``"reference"``  the pure-PyTorch specification in ``gtalign_fast.reference``.

The backend is chosen, in this order, by the ``backend=`` argument of the call, the environment
variable ``GTALIGN_FAST_BACKEND_<OP>`` (e.g. ``GTALIGN_FAST_BACKEND_TOKEN_LOGPROBS=triton``), the
environment variable ``GTALIGN_FAST_BACKEND``, and finally the default for the device. A backend that
was asked for but cannot run raises; the default never silently changes the maths, and when it
has to fall back to the reference (no extension on CPU) it says so once with a warning.
:func:`last_backend` reports what ran, and every launch logs one line at DEBUG level.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import warnings
from typing import Iterator

import torch

logger = logging.getLogger("gtalign_fast")

BACKENDS = ("triton", "cuda", "cpu", "reference")
ENV_BACKEND = "GTALIGN_FAST_BACKEND"

# Which backend an op uses by default on CUDA tensors: the faster of Triton and CUDA C++ in
# bench/results/nvidia-h100-80gb-hbm3-default.json (H100, torch 2.11, triton 3.6). An op missing
# here uses Triton: token_logprobs (Triton 2.0x faster fwd+bwd at N=8192 V=151936 bf16; CUDA C++
# wins only at float32 V=32000) and sample_ (no CUDA C++ kernel).
CUDA_DEFAULTS: dict[str, str] = {
    "welfare_advantages": "cuda",  # 0.049 ms vs Triton 0.080 ms at N=65536, groups of 8
    "grpo_loss": "cuda",  # fwd+bwd 0.69 ms vs Triton 0.81 ms at B=16 T=1024 (fwd 0.042 vs 0.51)
}

# Backends an op does not have, with the reason (every other op has every backend of BACKENDS).
MISSING_BACKENDS: dict[str, dict[str, str]] = {
    "sample": {"cuda": "sample_ has no CUDA C++ kernel; on CUDA tensors its compiled backend is 'triton'"},
    "logits_grpo_loss": {"cuda": "logits_grpo_loss has no CUDA C++ kernel; on CUDA tensors it runs 'triton'"},
    "linear_grpo_loss": {"cuda": "linear_grpo_loss has no CUDA C++ kernel; on CUDA tensors it runs 'triton'"},
}

_last_backend: dict[str, str] = {}
_warned_fallback: set[str] = set()
_poison_outputs = os.environ.get("GTALIGN_FAST_POISON", "0") == "1"

# ---------------------------------------------------------------------------------------------
# The compiled extension


def _load_extension():
    if importlib.util.find_spec("gtalign_fast._C") is None:
        return None, "not built (installed with GTALIGN_FAST_NO_EXT=1, or the build was skipped)"
    try:
        from gtalign_fast import _C  # noqa: F401  (importing registers the torch.ops.gtalign_fast_C ops)

        return _C, None
    except ImportError as error:  # e.g. built against another torch: rebuild with pip install -e .
        return None, f"import failed: {error}; rebuild it against this torch (pip install -e . --no-build-isolation)"


_EXTENSION, _EXTENSION_ERROR = _load_extension()


def extension_available() -> bool:
    """Whether the compiled extension ``gtalign_fast._C`` imported."""
    return _EXTENSION is not None


def extension_has_cuda() -> bool:
    """Whether the compiled extension holds the CUDA kernels."""
    return _EXTENSION is not None and bool(_EXTENSION.with_cuda())


def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return False, f"triton is not installed ({error})"
    return True, ""


def triton_interpreted() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Resolution


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """Return why ``backend`` cannot run on ``device``, or None when it can."""
    if backend == "reference":
        return None
    if backend == "triton":
        ok, reason = _triton_status()
        if not ok:
            return reason
        if device.type == "cpu" and not triton_interpreted():
            return "Triton needs CUDA tensors (or TRITON_INTERPRET=1 set before import, for testing)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {device.type} tensors"
        return None
    if backend in ("cpu", "cuda"):
        if _EXTENSION is None:
            return f"the compiled extension gtalign_fast._C is not available ({_EXTENSION_ERROR})"
        if backend != device.type:
            return f"the {backend!r} backend runs on {backend} tensors, got {device.type} tensors"
        if backend == "cuda" and not extension_has_cuda():
            return "the extension was built without CUDA kernels"
        return None
    return f"unknown backend {backend!r}; choose one of {BACKENDS}"


def available_backends(device: torch.device | str, op: str | None = None) -> list[str]:
    """The backends that can run on ``device`` (those of ``op``, when given), in the order of
    :data:`BACKENDS` (not a speed ranking: the default per device is :data:`CUDA_DEFAULTS`)."""
    device = torch.device(device)
    missing = MISSING_BACKENDS.get(op, {}) if op else {}
    return [b for b in BACKENDS if b not in missing and why_unavailable(b, device) is None]


def _default_backend(op: str, device: torch.device) -> str:
    if device.type == "cuda":
        preferred = CUDA_DEFAULTS.get(op, "triton")
        runnable = available_backends(device, op)
        for candidate in (preferred, "triton", "cuda"):
            if candidate in runnable:
                return candidate
    elif device.type == "cpu" and why_unavailable("cpu", device) is None:
        return "cpu"
    if op not in _warned_fallback:
        _warned_fallback.add(op)
        warnings.warn(
            f"gtalign_fast.{op}: no compiled kernel for {device.type} tensors "
            f"({why_unavailable('cpu' if device.type == 'cpu' else 'triton', device)}); "
            "using the pure-PyTorch reference backend (same maths, slower, more memory)",
            RuntimeWarning,
            stacklevel=4,
        )
    return "reference"


def resolve(op: str, device: torch.device, requested: str | None, *, availability=None, default=None) -> str:
    """Pick the backend for one call of ``op`` on ``device``.

    ``availability(name, device)`` (why a backend cannot run, or None) and ``default(device)``
    replace this module's rules for an op whose backends differ (``linear_token_logprobs`` runs its
    "cpu"/"cuda" paths in PyTorch, without the extension); the precedence (argument, then
    environment, then default) stays the same.

    Raises
    ------
    ValueError
        If the name is not a backend.
    RuntimeError
        If the backend that was asked for (argument or environment) cannot run here.
    """
    check = availability or why_unavailable
    source = "backend="
    if not requested:
        requested = os.environ.get(_env_key(op)) or os.environ.get(ENV_BACKEND)
        source = "environment"
    if not requested or requested == "auto":
        return _cached_default(op, device, default)
    if requested not in BACKENDS:
        raise ValueError(f"gtalign_fast.{op}: unknown backend {requested!r} (from {source}); choose one of {BACKENDS}")
    reason = MISSING_BACKENDS.get(op, {}).get(requested) or check(requested, device)
    if reason is not None:
        raise RuntimeError(f"gtalign_fast.{op}: backend {requested!r} (from {source}) cannot run: {reason}")
    return requested


@functools.cache
def _env_key(op: str) -> str:
    return f"{ENV_BACKEND}_{op.upper()}"


# (op, device type, op's own default rule) -> the default backend. What can run is fixed once the
# package is imported (the extension, Triton, TRITON_INTERPRET), so the default is worked out once:
# every op call resolves a backend, and the checks cost more than the smallest kernels.
_DEFAULTS: dict[tuple, str] = {}


def _cached_default(op: str, device: torch.device, default) -> str:
    key = (op, device.type, default)
    name = _DEFAULTS.get(key)
    if name is None:
        name = _DEFAULTS[key] = default(device) if default is not None else _default_backend(op, device)
    return name


def record(op: str, backend: str) -> None:
    """Remember (and log at DEBUG) which backend ran ``op``."""
    _last_backend[op] = backend
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("gtalign_fast.%s ran on backend %r", op, backend)


def last_backend(op: str) -> str | None:
    """The backend that ran the most recent call of ``op`` (e.g. ``"token_logprobs"``), or None."""
    return _last_backend.get(op)


# ---------------------------------------------------------------------------------------------
# Output allocation (poisoning for tests)


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate an op output. Under :func:`poison_outputs` it is filled with NaN (or -1 for
    integers) so that an element the kernel fails to write makes a test fail."""
    if not _poison_outputs:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Context manager: outputs allocated by the ops are pre-filled with NaN (tests use this)."""
    global _poison_outputs
    previous = _poison_outputs
    _poison_outputs = enabled
    try:
        yield
    finally:
        _poison_outputs = previous
