"""welfare_advantages: every backend against the float64 reference (outputs poisoned by the
autouse fixture), awkward groupings, every option, the token scatter, errors, torch.compile."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gtalign_fast import ops, reference
from gtalign_fast.ops import _backend, _device_checks

from .conftest import DEVICE, kernel_backends

BACKENDS = kernel_backends() + ["reference"]
# log(0) = -inf is intended (a zero reward gives W = 0): numpy under the Triton interpreter warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
# Every backend computes W in float32 and accumulates the statistics in float64, so only a few
# float32 roundings separate it from the float64 reference (stricter than Liger's fp32 bar of 2e-5 / 1e-3).
ATOL, RTOL = 1e-5, 1e-4
FIELDS = ("welfare", "advantages", "group_mean", "group_std", "group_all_equal", "token_advantages")


def _triton_size_ok(backend: str, n_rows: int) -> bool:
    # The Triton interpreter is slow on CPU: keep its inputs small there.
    return not (backend == "triton" and DEVICE.type == "cpu" and n_rows > 5000)


def _rewards(n_rows: int, seed: int, missing: float = 0.1, zeros: float = 0.05):
    """U, L in GTAlign's range [1e-4, ~0.92], with some missing (NaN) and some zero rewards."""
    generator = torch.Generator().manual_seed(seed)
    user = torch.rand(n_rows, generator=generator) * 0.92 + 1e-4
    llm = torch.rand(n_rows, generator=generator) * 0.92 + 1e-4
    user[torch.rand(n_rows, generator=generator) < missing] = float("nan")
    llm[torch.rand(n_rows, generator=generator) < missing / 2] = float("nan")
    user[torch.rand(n_rows, generator=generator) < zeros] = 0.0
    llm[torch.rand(n_rows, generator=generator) < zeros] = 0.0
    return user.to(DEVICE), llm.to(DEVICE)


def _offsets(sizes) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64, device=DEVICE)


def _make_all_equal(user, llm, start: int, end: int) -> None:
    user[start:end], llm[start:end] = 0.37, 0.61


def _check(user, llm, group, backend, *, mask=None, atol=ATOL, rtol=RTOL, **options):
    result = ops.welfare_advantages(user, llm, group, mask=mask, backend=backend, **options)
    assert ops.last_backend("welfare_advantages") == backend
    assert isinstance(result, ops.WelfareAdvantages)
    expected = reference.welfare_advantages(user.double(), llm.double(), group, mask=mask, **options)
    for name, got, want in zip(FIELDS, result, expected):
        if want is None:
            assert got is None, name
            continue
        assert got.device == user.device and got.shape == want.shape, name
        if want.dtype == torch.bool:
            assert got.dtype == torch.bool and torch.equal(got, want), f"{backend} {name}"
            continue
        assert got.dtype == torch.float32, name
        # NaN only where the reference has one (a missing reward's W): catches unwritten outputs.
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, equal_nan=True, msg=f"{backend} {name}")
        if name != "welfare":
            assert not torch.isnan(got).any(), f"{backend} {name} has NaN"
    return result


# ---------------------------------------------------------------------------------------------
# The maths


@pytest.mark.parametrize("backend", BACKENDS)
def test_worked_example(backend):
    # The GTAlign paper's worked example (arXiv 2510.08872, section 3): right answer U = 0.673,
    # L = 0.872 -> W = 0.766; wrong answer 0.285.
    user = torch.tensor([0.673, 0.173], device=DEVICE)
    llm = torch.tensor([0.872, 0.472], device=DEVICE)
    result = ops.welfare_advantages(user, llm, 2, backend=backend)
    assert abs(float(result.welfare[0]) - 0.766) < 1e-3
    assert abs(float(result.welfare[1]) - 0.285) < 1e-3
    torch.testing.assert_close(result.welfare, torch.sqrt(user * llm), atol=1e-6, rtol=1e-6)
    # Two members: unbiased std = |W0 - W1| / sqrt(2), so the advantages are +-1/sqrt(2).
    expected = torch.tensor([1.0, -1.0], device=DEVICE) / math.sqrt(2)
    torch.testing.assert_close(result.advantages, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_fixed_groups(backend, scale, unbiased):
    user, llm = _rewards(8 * 23, seed=1)
    _make_all_equal(user, llm, 16, 24)  # an all-equal group
    user[40:48] = float("nan")  # a group with no valid reward
    user[49:56] = float("nan")  # a group with one valid reward
    _check(user, llm, 8, backend, scale=scale, unbiased=unbiased)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_uneven_groups(backend, scale):
    # Empty groups, groups of one, a group larger than a Triton chunk, awkward sizes.
    sizes = [3, 0, 1, 7, 1, 0, 2000, 5, 16, 33, 0, 2, 1]
    user, llm = _rewards(sum(sizes), seed=2)
    _make_all_equal(user, llm, 11, 18)
    _check(user, llm, _offsets(sizes), backend, scale=scale, eps=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [1, 5, 1000, "one-offset"])
def test_group_extremes(backend, group):
    # Groups of one (advantage 0 everywhere), a handful, one group holding the whole batch.
    user, llm = _rewards(1000, seed=3)
    if group == "one-offset":
        group = _offsets([1000])
    result = _check(user, llm, group, backend)
    if isinstance(group, int) and group == 1:
        assert torch.equal(result.advantages, torch.zeros_like(result.advantages))
        assert bool(result.group_all_equal.all()) and bool((result.group_std == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_completion(backend):
    user, llm = torch.tensor([0.5], device=DEVICE), torch.tensor([0.8], device=DEVICE)
    result = _check(user, llm, 1, backend)
    assert float(result.advantages[0]) == 0.0 and bool(result.group_all_equal[0])
    assert float(result.group_std[0]) == 0.0
    torch.testing.assert_close(result.group_mean, result.welfare)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_alpha(backend, alpha):
    user, llm = _rewards(96, seed=4)
    result = _check(user, llm, 6, backend, alpha=alpha)
    valid = ~(torch.isnan(user) | torch.isnan(llm))
    # alpha = 0 is the LLM-only welfare, alpha = 1 the user-only one (0^0 = 1: a zero U or L
    # only zeroes W when its exponent is positive).
    if alpha == 0.0:
        torch.testing.assert_close(result.welfare[valid], llm[valid], atol=1e-6, rtol=1e-6)
    if alpha == 1.0:
        torch.testing.assert_close(result.welfare[valid], user[valid], atol=1e-6, rtol=1e-6)
    if 0.0 < alpha < 1.0:
        zero = valid & ((user == 0) | (llm == 0))
        assert bool((result.welfare[zero] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 1e-4, 0.5])
def test_eps(backend, eps):
    user, llm = _rewards(64, seed=5)
    _make_all_equal(user, llm, 0, 8)  # eps = 0 with std = 0 must still give 0, not NaN
    _check(user, llm, 8, backend, eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_and_all_equal_rules(backend):
    user, llm = _rewards(32, seed=6, missing=0.0, zeros=0.0)
    _make_all_equal(user, llm, 0, 8)
    user[3] = float("nan")  # missing inside an all-equal group: still all equal
    llm[9] = float("nan")
    result = _check(user, llm, 8, backend)
    assert math.isnan(float(result.welfare[9])) and float(result.advantages[9]) == 0.0
    assert result.group_all_equal.tolist() == [True, False, False, False]
    assert float(result.group_std[0]) == 0.0
    assert bool((result.advantages[:8] == 0).all())
    # Valid advantages of a group are centred: they sum to 0.
    assert abs(float(result.advantages[8:16].sum())) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_equal_rewards(backend):
    # Tiny but non-zero spread: not flagged, and the normalisation keeps them at unit scale.
    user = torch.full((8,), 0.5, device=DEVICE) + torch.arange(8, device=DEVICE) * 1e-4
    llm = torch.full((8,), 0.5, device=DEVICE)
    result = _check(user, llm, 8, backend, eps=0.0, atol=2e-3, rtol=2e-3)
    assert not bool(result.group_all_equal[0])
    assert abs(float(result.advantages.std()) - 1.0) < 2e-3


# The C++ kernel reduces fixed groups of 8 eight at a time with AVX2 / AVX-512 intrinsics; the
# same groups given as offsets take its generic path, which must give the same bits. Checked on
# this CPU's best variant and, in a subprocess, on the AVX2 and plain ones (ATEN_CPU_CAPABILITY).
_GROUPS_OF_8_CHECK = """
import torch
from gtalign_fast import ops
generator = torch.Generator().manual_seed(21)
n_rows = 8 * (3 * 64 + 5)  # several chunks of 64 groups and a tail of 5 groups
user = torch.rand(n_rows, generator=generator) * 0.92 + 1e-4
llm = torch.rand(n_rows, generator=generator) * 0.92 + 1e-4
user[torch.rand(n_rows, generator=generator) < 0.1] = float("nan")
user[torch.rand(n_rows, generator=generator) < 0.05] = 0.0
user[8:16], llm[8:16] = 0.37, 0.61  # all equal
user[40:48] = float("nan")  # no valid reward
user[49:56] = float("nan")  # one valid reward
offsets = torch.arange(0, n_rows + 1, 8, dtype=torch.int64)
for scale in ("group", "none"):
    for unbiased in (True, False):
        for eps in (1e-6, 0.0):
            options = dict(scale=scale, unbiased=unbiased, eps=eps, backend="cpu")
            fixed = ops.welfare_advantages(user, llm, 8, **options)
            generic = ops.welfare_advantages(user, llm, offsets, **options)
            for name, a, b in zip(fixed._fields, fixed[:5], generic[:5]):
                if a.dtype != torch.bool:  # compare the bits (NaN == NaN)
                    a, b = a.view(torch.int32), b.view(torch.int32)
                assert torch.equal(a, b), (scale, unbiased, eps, name)
"""


@pytest.mark.skipif(_backend.why_unavailable("cpu", torch.device("cpu")) is not None, reason="no C++ CPU kernel")
@pytest.mark.parametrize("capability", ["best", "avx2", "default"])
def test_cpu_groups_of_8_match_generic_path(capability):
    if capability == "best":
        exec(_GROUPS_OF_8_CHECK, {})
        return
    root = Path(__file__).resolve().parents[1]
    environment = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", _GROUPS_OF_8_CHECK], capture_output=True, text=True, timeout=120,
                         cwd=root, env=environment)
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------------------------
# Token scatter


def _masks(n_rows: int, tokens: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    on = torch.rand(n_rows, tokens, generator=generator) < 0.7
    wide = torch.rand(n_rows, 2 * tokens + 1, generator=generator) < 0.7
    return {
        "bool": on.to(DEVICE),
        "float": on.float().to(DEVICE),
        "int64": on.long().to(DEVICE),
        "strided": wide.to(DEVICE)[:, 1::2],  # non-unit token stride, read in place
        "transposed": on.t().contiguous().t().to(DEVICE),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float", "int64", "strided", "transposed"])
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_token_scatter(backend, kind, scale):
    sizes = [4, 0, 1, 9, 6]
    user, llm = _rewards(sum(sizes), seed=7)
    mask = _masks(sum(sizes), 13, seed=8)[kind]
    result = _check(user, llm, _offsets(sizes), backend, mask=mask, scale=scale)
    assert result.token_advantages.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_scatter_empty_tokens(backend):
    user, llm = _rewards(12, seed=9)
    result = _check(user, llm, 4, backend, mask=torch.ones(12, 0, dtype=torch.bool, device=DEVICE))
    assert result.token_advantages.shape == (12, 0)


# ---------------------------------------------------------------------------------------------
# Large batches (the C++ kernel and the reference only: the Triton interpreter is too slow)


def _eager_fixed_groups(user, llm, group_size, unbiased=True, eps=1e-6):
    """The eager torch chain of the same maths for fixed groups, in float64: a second oracle."""
    w = torch.sqrt(user.double() * llm.double()).view(-1, group_size)
    valid = ~torch.isnan(w)
    count = valid.sum(1)
    mean = torch.where(valid, w, 0).sum(1) / count.clamp_min(1)
    deviation = torch.where(valid, w - mean[:, None], 0)
    std = torch.sqrt((deviation**2).sum(1) / (count - (1 if unbiased else 0)).clamp_min(1))
    lowest = torch.where(valid, w, math.inf).amin(1)
    highest = torch.where(valid, w, -math.inf).amax(1)
    equal = (count < 2) | (lowest == highest)
    std = torch.where(equal, 0, std)
    advantages = torch.where(valid & ~equal[:, None], deviation / (std[:, None] + eps), 0)
    return w.view(-1), advantages.view(-1), mean, std, equal


# The per-group reference loop is too slow for 131072 groups: the eager float64 chain is the oracle.
@pytest.mark.parametrize("backend", [b for b in kernel_backends() if b != "triton" or DEVICE.type == "cuda"])
def test_million_completions_groups_of_8(backend):
    n_rows = 1 << 20
    user, llm = _rewards(n_rows, seed=10)
    result = ops.welfare_advantages(user, llm, 8, backend=backend)
    for name, got, want in zip(FIELDS, result, _eager_fixed_groups(user, llm, 8)):
        if want.dtype == torch.bool:
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL, equal_nan=True, msg=name)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton" or DEVICE.type == "cuda"])
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_million_completions_uneven(backend, scale):
    n_rows = 1 << 20
    generator = torch.Generator().manual_seed(11)
    cuts = torch.randint(0, n_rows, (600,), generator=generator).sort().values
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([n_rows])]).to(DEVICE)  # some groups empty
    user, llm = _rewards(n_rows, seed=12)
    _check(user, llm, offsets, backend, scale=scale)


def test_triton_many_tiles():
    # More groups than one tile holds, and a batch-mode walk over several tiles.
    if "triton" not in BACKENDS:
        pytest.skip("Triton is not available")
    user, llm = _rewards(4 * 700, seed=13)
    for scale in ("group", "batch"):
        _check(user, llm, 4, "triton", scale=scale)


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["user", "llm"])
@pytest.mark.parametrize("value", [-0.1, math.inf, -math.inf])
def test_bad_reward_values(backend, name, value):
    user, llm = _rewards(24, seed=14)
    (user if name == "user" else llm)[17] = value
    # CUDA tensors are checked on the device, without a host sync: the synchronous mode raises at the call.
    with _device_checks.sync_checks(), pytest.raises(ValueError, match=rf"welfare_advantages: {name}\[17\]"):
        ops.welfare_advantages(user, llm, 8, backend=backend)


@pytest.mark.parametrize(
    "group, error, match",
    [
        (5, ValueError, "must be >= 1 and divide N = 24"),
        (0, ValueError, "must be >= 1"),
        (True, TypeError, "group must be an int"),
        (8.0, TypeError, "group must be an int"),
        ("offsets-float", TypeError, "offsets must be int64"),
        ("offsets-2d", ValueError, r"1-D \[G\+1\]"),
        ("offsets-short", ValueError, r"1-D \[G\+1\]"),
        ("offsets-start", ValueError, "start at 0 and end at N = 24"),
        ("offsets-end", ValueError, "start at 0 and end at N = 24"),
        ("offsets-decreasing", ValueError, "non-decreasing"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_groups(backend, group, error, match):
    user, llm = _rewards(24, seed=15)
    bad_offsets = {
        "offsets-float": torch.tensor([0.0, 24.0]),
        "offsets-2d": torch.tensor([[0, 24]]),
        "offsets-short": torch.tensor([0]),
        "offsets-start": torch.tensor([1, 24]),
        "offsets-end": torch.tensor([0, 10, 23]),
        "offsets-decreasing": torch.tensor([0, 10, 5, 24]),
    }
    if isinstance(group, str):
        group = bad_offsets[group].to(DEVICE)
    # CUDA tensors are checked on the device, without a host sync: the synchronous mode raises at the call.
    with _device_checks.sync_checks(), pytest.raises(error, match=match):
        ops.welfare_advantages(user, llm, group, backend=backend)


def test_bad_arguments():
    user, llm = _rewards(24, seed=16)
    cases = [
        (dict(user=user.double()), TypeError, "user must be float32"),
        (dict(llm=llm.half()), TypeError, "llm must be float32"),
        (dict(user=[0.5] * 24), TypeError, "user must be a tensor"),
        (dict(user=user[:0], llm=llm[:0]), ValueError, "non-empty 1-D"),
        (dict(user=user.view(4, 6)), ValueError, "non-empty 1-D"),
        (dict(llm=llm[:16]), ValueError, "same shape"),
        (dict(alpha=1.5), ValueError, r"alpha must be finite and in \[0.0, 1.0\]"),
        (dict(alpha=-0.1), ValueError, "alpha"),
        (dict(alpha=math.nan), ValueError, "alpha"),
        (dict(alpha="0.5"), TypeError, "alpha must be a Python float"),
        (dict(eps=-1e-6), ValueError, "eps"),
        (dict(eps=math.inf), ValueError, "eps"),
        (dict(scale="std"), ValueError, "scale must be one of"),
        (dict(mask=torch.ones(24, device=DEVICE)), ValueError, r"mask must be \[N, T\]"),
        (dict(mask=torch.ones(23, 5, device=DEVICE)), ValueError, r"mask must be \[N, T\] with N = 24"),
        (dict(mask=torch.ones(24, 5, dtype=torch.complex64, device=DEVICE)), TypeError, "mask must be bool"),
        (dict(backend="nope"), ValueError, "unknown backend"),
    ]
    for overrides, error, match in cases:
        arguments = dict(user=user, llm=llm, group=8) | overrides
        group = arguments.pop("group")
        with pytest.raises(error, match=match):
            ops.welfare_advantages(arguments.pop("user"), arguments.pop("llm"), group, **arguments)


# ---------------------------------------------------------------------------------------------
# Integration: not differentiable, torch.compile, registration


def test_rewards_are_data():
    user, llm = _rewards(16, seed=17)
    user.requires_grad_(True)
    result = ops.welfare_advantages(user, llm, 4, mask=torch.ones(16, 3, device=DEVICE))
    assert not any(t.requires_grad for t in result)


@pytest.mark.parametrize("with_mask", [False, True])
def test_torch_compile_fullgraph(with_mask):
    backend = kernel_backends()[0] if kernel_backends() else "reference"
    sizes = [3, 5, 0, 4]
    user, llm = _rewards(sum(sizes), seed=18)
    offsets = _offsets(sizes)
    mask = _masks(sum(sizes), 6, seed=19)["bool"] if with_mask else None

    def step(user_reward, llm_reward):
        fixed = ops.welfare_advantages(user_reward, llm_reward, 4, scale="batch", backend=backend)
        uneven = ops.welfare_advantages(user_reward, llm_reward, offsets, alpha=0.3, mask=mask, backend=backend)
        return fixed.advantages * 2, uneven.group_mean, uneven.group_all_equal, uneven.token_advantages

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for eager, traced in zip(step(user, llm), compiled(user, llm)):
        if eager is None:
            assert traced is None
        else:
            torch.testing.assert_close(traced, eager, equal_nan=True)


def test_custom_op_registration():
    from gtalign_fast.ops import _welfare_advantages

    backend = kernel_backends()[0] if kernel_backends() else "reference"
    user, llm = _rewards(12, seed=20, missing=0.0)  # opcheck compares outputs without equal_nan
    offsets = _offsets([5, 0, 7])
    mask = torch.ones(12, 4, dtype=torch.bool, device=DEVICE)
    for args in [
        (user, llm, None, None, 4, 0.5, "group", 1e-6, True, backend),
        (user, llm, offsets, mask, 0, 0.3, "batch", 1e-4, False, backend),
    ]:
        torch.library.opcheck(
            _welfare_advantages.OP_DEF.custom_op, args,
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
        )


@pytest.mark.skipif(DEVICE.type != "cuda", reason="counts CUDA kernel launches")
@pytest.mark.parametrize("backend", [b for b in kernel_backends() if b in ("triton", "cuda")])
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_one_launch_on_cuda(backend, scale):
    """The whole op is one kernel launch: bad offsets and rewards are flagged by the kernel itself
    (gtalign_fast.ops._device_checks), with no reduction or host read after it."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    from gtalign_fast.ops import _backend

    user, llm = _rewards(65536, seed=30)
    mask = torch.ones(65536, 16, dtype=torch.bool, device=DEVICE)
    ops.welfare_advantages(user, llm, 8, scale=scale, mask=mask, backend=backend)  # compile, warm up
    torch.cuda.synchronize()
    with _backend.poison_outputs(False), profile(activities=[ProfilerActivity.CUDA]) as trace:
        ops.welfare_advantages(user, llm, 8, scale=scale, mask=mask, backend=backend)
        torch.cuda.synchronize()
    kernels = [event.name for event in trace.events()
               if event.device_type == DeviceType.CUDA and not event.name.startswith(("Memcpy", "Memset"))]
    listing = "\n".join(kernels)
    assert sum("welfare_advantages" in name for name in kernels) == 1, listing
    assert len(kernels) == 1, listing
