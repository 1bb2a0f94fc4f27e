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

# What each backend needs to run, besides tensors on its device (the rules of why_unavailable). An op
# may declare a "cpu" / "cuda" backend that is PyTorch code on that device instead ("torch"; see
# gtalign_fast.ops._op.backends).
NEEDS = {"triton": "triton", "cuda": "extension", "cpu": "extension", "reference": "torch"}

# Which backends each op has and what each needs: op key -> {backend: need}, in BACKENDS order. The
# one source of truth, filled by each op's declaration (gtalign_fast.ops._op.Op) when its module is
# imported; every question about an op's backends (available_backends, resolve, the trainer's
# choice of loss path) reads it.
DECLARED: dict[str, dict[str, str]] = {}

# A missing backend, as the error names it: (what it would be, the tensors it would run on), and the
# compiled backends that run on each device type (named as the alternative).
_MISSING_KIND = {
    "triton": ("Triton kernel", "cuda"),
    "cuda": ("CUDA C++ kernel", "cuda"),
    "cpu": ("C++ CPU kernel", "cpu"),
}
_COMPILED_ON = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}

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


def declare(op: str, needs: dict[str, str]) -> None:
    """Record ``op``'s backends (name -> what it needs, see :data:`NEEDS`). An op's forward and
    backward share its key and must declare the same backends."""
    unknown = [name for name in needs if name not in BACKENDS]
    if unknown or "reference" not in needs:
        raise ValueError(f"gtalign_fast.{op}: backends must be some of {BACKENDS}, the reference included; "
                         f"got {list(needs)}")
    ordered = {name: needs[name] for name in BACKENDS if name in needs}
    if DECLARED.setdefault(op, ordered) != ordered:
        raise ValueError(f"gtalign_fast.{op}: declared twice with different backends ({DECLARED[op]} vs {ordered})")


def why_unavailable(backend: str, device: torch.device, op: str | None = None) -> str | None:
    """Return why ``backend`` cannot run on ``device`` (for ``op``, when given: it may lack the
    backend, or run it as PyTorch code), or None when it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS}"
    if op is None:
        return _why_unmet(backend, NEEDS[backend], device)
    declared = _declared(op)
    if backend not in declared:
        return _missing(op, backend, declared)
    return _why_unmet(backend, declared[backend], device)


def _declared(op: str) -> dict[str, str]:
    declared = DECLARED.get(op)
    if declared is None:
        raise ValueError(f"gtalign_fast: unknown op {op!r}; the ops are {sorted(DECLARED)}")
    return declared


def _missing(op: str, backend: str, declared: dict[str, str]) -> str:
    kind, device_type = _MISSING_KIND[backend]
    instead = [name for name in _COMPILED_ON[device_type] if name in declared]
    if instead:
        return f"{op} has no {kind}; on {device_type.upper()} tensors it runs {instead[0]!r}"
    return f"{op} has no {kind}; its backends are {list(declared)}"


def _why_unmet(backend: str, needs: str, device: torch.device) -> str | None:
    """Why a backend that needs ``needs`` (see :data:`NEEDS`) cannot run on ``device``."""
    if needs == "torch":  # PyTorch code: the reference anywhere, a "cpu" / "cuda" path on its device
        if backend != "reference" and backend != device.type:
            return f"the {backend!r} backend runs on {backend} tensors, got {device.type} tensors"
        return None
    if needs == "triton":
        ok, reason = _triton_status()
        if not ok:
            return reason
        if device.type == "cpu" and not triton_interpreted():
            return "Triton needs CUDA tensors (or TRITON_INTERPRET=1 set before import, for testing)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {device.type} tensors"
        return None
    if needs == "extension":
        if _EXTENSION is None:
            return f"the compiled extension gtalign_fast._C is not available ({_EXTENSION_ERROR})"
        if backend != device.type:
            return f"the {backend!r} backend runs on {backend} tensors, got {device.type} tensors"
        if backend == "cuda" and not extension_has_cuda():
            return "the extension was built without CUDA kernels"
        return None
    raise ValueError(f"unknown need {needs!r} of backend {backend!r}; see NEEDS")


def available_backends(device: torch.device | str, op: str | None = None) -> list[str]:
    """The backends that can run on ``device`` (those of ``op``, when given: ``"token_logprobs"``,
    ``"sample"``, ...), in the order of :data:`BACKENDS` (not a speed ranking: the default per device
    is :data:`CUDA_DEFAULTS`)."""
    device = torch.device(device)
    return [b for b in BACKENDS if why_unavailable(b, device, op) is None]


def _default_backend(op: str, device: torch.device) -> str:
    if device.type == "cuda":
        preferred = CUDA_DEFAULTS.get(op, "triton")
        runnable = available_backends(device, op)
        for candidate in (preferred, "triton", "cuda"):
            if candidate in runnable:
                return candidate
    elif device.type == "cpu" and why_unavailable("cpu", device, op) is None:
        return "cpu"
    if op not in _warned_fallback:
        _warned_fallback.add(op)
        warnings.warn(
            f"gtalign_fast.{op}: no compiled kernel for {device.type} tensors "
            f"({why_unavailable('cpu' if device.type == 'cpu' else 'triton', device, op)}); "
            "using the pure-PyTorch reference backend (same maths, slower, more memory)",
            RuntimeWarning,
            stacklevel=4,
        )
    return "reference"


def resolve(op: str, device: torch.device, requested: str | None) -> str:
    """Pick the backend for one call of ``op`` on ``device``: the argument, then the environment,
    then the device's default (what runs is decided by ``op``'s declared backends, :data:`DECLARED`).

    Raises
    ------
    ValueError
        If the name is not a backend.
    RuntimeError
        If the backend that was asked for (argument or environment) cannot run here.
    """
    source = "backend="
    if not requested:
        requested = os.environ.get(_env_key(op)) or os.environ.get(ENV_BACKEND)
        source = "environment"
    if not requested or requested == "auto":
        return default_backend(op, device)
    if requested not in BACKENDS:
        raise ValueError(f"gtalign_fast.{op}: unknown backend {requested!r} (from {source}); choose one of {BACKENDS}")
    reason = why_unavailable(requested, device, op)
    if reason is not None:
        raise RuntimeError(f"gtalign_fast.{op}: backend {requested!r} (from {source}) cannot run: {reason}")
    return requested


@functools.cache
def _env_key(op: str) -> str:
    return f"{ENV_BACKEND}_{op.upper()}"


# (op, device type) -> the default backend. What can run is fixed once the package is imported (the
# extension, Triton, TRITON_INTERPRET), so the default is worked out once: every op call resolves a
# backend, and the checks cost more than the smallest kernels.
_DEFAULTS: dict[tuple[str, str], str] = {}


def default_backend(op: str, device: torch.device) -> str:
    """The backend a call of ``op`` on ``device`` runs when none is asked for: on CUDA tensors
    :data:`CUDA_DEFAULTS` (else Triton, else CUDA C++), on CPU tensors the C++ kernel; else the
    reference, said once with a RuntimeWarning."""
    key = (op, device.type)
    name = _DEFAULTS.get(key)
    if name is None:
        name = _DEFAULTS[key] = _default_backend(op, device)
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
