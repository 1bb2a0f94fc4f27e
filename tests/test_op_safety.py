"""Reliability at the edges of the ops (issue 15): in-place writes into aliased or grad-tracked
buffers, higher-order gradients, infinite inputs, degenerate scalars, and the low-level registered
ops called directly with ids that point outside the tensors."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from gtalign_fast import ops
from gtalign_fast.ops import _device_checks as checks

from .conftest import DEVICE, kernel_backends

# The smallest temperature with a finite float32 1/T (gtalign_fast.ops._token_logprobs.MIN_TEMPERATURE).
MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max

# ---------------------------------------------------------------------------------------------
# Item 8: sample_ writes in place; refuse what torch's in-place ops refuse


def _aliased_views():
    base = torch.randn(1, 16, device=DEVICE)
    flat = torch.randn(64, device=DEVICE)
    return {
        "expand": base.expand(4, 16),
        "overlapping_as_strided": flat.as_strided((4, 16), (3, 1)),
        "zero_column_stride": flat.as_strided((4, 16), (16, 0)),
    }


@pytest.mark.parametrize("backend", kernel_backends("sample") + ["reference"])
@pytest.mark.parametrize("view", ["expand", "overlapping_as_strided", "zero_column_stride"])
def test_sample_refuses_rows_that_share_memory(view, backend):
    logits = _aliased_views()[view]
    before = logits.clone()
    with pytest.raises(RuntimeError, match="share memory"):
        ops.sample_(logits, seed=0, backend=backend)
    assert torch.equal(logits, before)  # refused before anything was written
    # Strided rows that do not overlap are still written in place.
    parent = torch.randn(4, 3, 16, device=DEVICE)
    for rows in (parent[:, -1, :], parent[:, :, 2], parent.transpose(1, 2)[:, :, 0], parent[::2, 0, ::3]):
        expected = ops.sample_(rows.clone(), seed=5, backend=backend)
        torch.testing.assert_close(ops.sample_(rows, seed=5, backend=backend), expected)


@pytest.mark.parametrize("backend", kernel_backends("sample") + ["reference"])
def test_sample_refuses_logits_that_require_grad(backend):
    parameter = torch.nn.Parameter(torch.randn(3, 11, device=DEVICE))
    before = parameter.detach().clone()
    with pytest.raises(RuntimeError, match="requires grad"):
        ops.sample_(parameter, seed=0, top_k=2, backend=backend)
    assert torch.equal(parameter.detach(), before)
    non_leaf = parameter * 1.0
    with pytest.raises(RuntimeError, match="requires grad"):
        ops.sample_(non_leaf, seed=0, backend=backend)
    # As torch's in-place ops: allowed under no_grad, and on the detached tensor.
    with torch.no_grad():
        ops.sample_(parameter.detach().clone().requires_grad_(True), seed=0, backend=backend)
    ops.sample_(parameter.detach().clone(), seed=0, backend=backend)


# ---------------------------------------------------------------------------------------------
# Item 10: create_graph, infinite inputs, degenerate scalars, wide unsigned masks


def _grad_cases(backend):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=generator).to(DEVICE).requires_grad_(True)
    targets = torch.randint(0, 7, (2, 3), generator=generator).to(DEVICE)
    logp = torch.randn(2, 5, generator=generator).to(DEVICE).requires_grad_(True)
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    hidden = torch.randn(4, 8, generator=generator).to(DEVICE).requires_grad_(True)
    weight = torch.randn(16, 8, generator=generator).to(DEVICE).requires_grad_(True)
    ids = torch.randint(0, 16, (4,), generator=generator).to(DEVICE)
    return {
        "token_logprobs": (lambda: ops.token_logprobs(logits, targets, backend=backend).sum(), logits),
        "grpo_loss": (
            lambda: ops.grpo_loss(logp, logp.detach() + 0.3, torch.ones(2, device=DEVICE), mask, backend=backend)[0],
            logp,
        ),
        "linear_token_logprobs": (
            lambda: ops.linear_token_logprobs(hidden, weight, ids, with_entropy=True, backend=backend)[1].sum(),
            hidden,
        ),
    }


def _backends_of(op):
    return kernel_backends(op) + ["reference"]


@pytest.mark.parametrize(
    "op,backend",
    [(op, b) for op in ("token_logprobs", "grpo_loss", "linear_token_logprobs") for b in _backends_of(op)],
)
@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_create_graph_raises_instead_of_a_gradient_without_graph(op, backend, path):
    """The backward kernels give a first-order gradient only: create_graph=True must say so,
    on the eager path (once_differentiable) as through the torch.library custom op."""
    from torch.overrides import TorchFunctionMode

    class _Passthrough(TorchFunctionMode):  # forces the custom-op path (not plain eager)
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    loss_fn, leaf = _grad_cases(backend)[op]
    with _Passthrough() if path == "custom_op" else contextlib.nullcontext():
        loss = loss_fn()
    first = torch.autograd.grad(loss, leaf, retain_graph=True)[0]  # first order still works
    assert torch.isfinite(first).all()
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(loss, leaf, create_graph=True)


def _infinite_linear_inputs(where, seed):
    """Float32 LM-head inputs with one infinite value at ``where``."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(5, 8, generator=generator, dtype=torch.float64).abs() + 0.1
    weight = torch.randn(16, 8, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 16, (5,), generator=generator)
    targets[targets == 3] = 4  # never target the -inf token (its log-prob is -inf either way)
    bias = None
    if where == "weight_neg_inf":
        weight[3, 0] = -math.inf  # logit 3 is -inf in every row (hidden > 0)
    elif where == "weight_pos_inf":
        weight[3, 0] = math.inf
    elif where == "hidden_inf":
        hidden[1, 2] = math.inf
    else:
        bias = torch.zeros(16, dtype=torch.float64)
        bias[3] = -math.inf
    hidden, weight = hidden.float(), weight.float()
    bias = None if bias is None else bias.float()
    return hidden, weight, bias, targets


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("where", ["weight_neg_inf", "weight_pos_inf", "hidden_inf", "bias_neg_inf"])
def test_linear_cpu_entropy_with_infinite_inputs_matches_the_logits_path(where, seed):
    """An infinite weight or hidden value gives -inf / +inf / nan logits: the CPU chunks agree with
    token_logprobs on the materialised logits (a -inf logit has p = 0 and adds nothing)."""
    hidden, weight, bias, targets = _infinite_linear_inputs(where, seed)
    logp, entropy = ops.linear_token_logprobs(hidden, weight, targets, bias=bias, with_entropy=True, backend="cpu")
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    ref_logp, ref_entropy = ops.token_logprobs(logits, targets, with_entropy=True, backend="reference")
    torch.testing.assert_close(entropy, ref_entropy.float(), atol=1e-4, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(logp, ref_logp.float(), atol=1e-4, rtol=1e-4, equal_nan=True)
    if where in ("weight_neg_inf", "bias_neg_inf"):  # the old code gave NaN entropy here
        assert torch.isfinite(entropy).all() and torch.isfinite(logp).all()


@pytest.mark.parametrize("backend", _backends_of("grpo_loss"))
@pytest.mark.parametrize("value", [0, 0.0, -3.0, math.nan, math.inf])
def test_grpo_num_items_tensor_is_refused_like_the_number(value, backend):
    logp = torch.randn(2, 5, device=DEVICE)
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    kwargs = dict(loss_type="dapo", backend=backend)
    with pytest.raises(ValueError, match="num_items_in_batch must be finite and > 0"):
        ops.grpo_loss(logp, logp + 0.1, torch.ones(2, device=DEVICE), mask, num_items_in_batch=value, **kwargs)
    tensor = torch.tensor(value, device="cpu")
    with pytest.raises(ValueError, match="num_items_in_batch must be finite and > 0"):
        ops.grpo_loss(logp.cpu(), logp.cpu() + 0.1, torch.ones(2), mask.cpu(), num_items_in_batch=tensor,
                      loss_type="dapo", backend=backend if backend != "cuda" else "cpu")


def test_grpo_num_items_tensor_is_checked_on_the_device_when_compiled():
    logp = torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)

    def loss(num_items):
        return ops.grpo_loss(logp, logp + 0.1, torch.ones(2), mask, loss_type="dapo", num_items_in_batch=num_items)[0]

    compiled = torch.compile(loss, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(torch.tensor(4.0)), loss(torch.tensor(4.0)))
    with pytest.raises(RuntimeError, match="num_items_in_batch must be finite and > 0"):
        compiled(torch.tensor(0.0))


@pytest.mark.parametrize("temperature", [1e-39, 2e-39, 5e-45])
def test_temperature_whose_inverse_overflows_is_refused(temperature):
    assert 1.0 / temperature > torch.finfo(torch.float32).max
    logits = torch.randn(2, 5, device=DEVICE)
    targets = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="temperature"):
        ops.token_logprobs(logits, targets, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        ops.linear_token_logprobs(logits, torch.randn(7, 5, device=DEVICE), targets, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        ops.sample_(logits.clone(), temperature=temperature, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        ops.sample_(logits.clone(), temperature=torch.tensor([1.0, temperature], device=DEVICE), seed=0)
    # The smallest accepted temperature still runs, and 0 (greedy) stays allowed.
    zeros = torch.zeros(2, 5, device=DEVICE)  # 0 / T stays finite
    logp = ops.token_logprobs(zeros, targets, temperature=MIN_TEMPERATURE * 1.01)
    torch.testing.assert_close(logp, torch.full((2,), -math.log(5), device=DEVICE))
    ops.sample_(zeros.clone(), temperature=0.0, seed=0)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_welfare_accepts_wide_unsigned_masks_on_every_backend(dtype):
    generator = torch.Generator().manual_seed(0)
    user, llm = torch.rand(4, generator=generator).to(DEVICE), torch.rand(4, generator=generator).to(DEVICE)
    bool_mask = torch.rand(4, 6, generator=generator).to(DEVICE) > 0.4
    for backend in _backends_of("welfare_advantages"):
        expected = ops.welfare_advantages(user, llm, 2, mask=bool_mask, backend=backend).token_advantages
        got = ops.welfare_advantages(user, llm, 2, mask=(bool_mask.to(torch.int32) * 7).to(dtype), backend=backend)
        torch.testing.assert_close(got.token_advantages, expected)


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a crash there does not take pytest down)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# Item 9: the registered low-level C++ CPU kernels check the ids they index with


_LOW_LEVEL_CALLS = {
    "token_logprobs_fwd": """
        logits = torch.randn(1, 4, 7)
        targets = torch.tensor([1, {bad}, 2, -100])
        kernel.token_logprobs_fwd(logits, targets, 1.0, -100, torch.empty(4), torch.empty(4), torch.empty(4, 2))
    """,
    "token_logprobs_bwd": """
        logits = torch.randn(1, 4, 7)
        targets = torch.tensor([1, {bad}, 2, -100])
        kernel.token_logprobs_bwd(torch.ones(4), None, logits, targets, torch.zeros(4, 2), torch.empty(0), 1.0, -100,
                                  torch.empty(4, 7))
    """,
    "sample_forced": """
        b = 3
        f, i = torch.ones(b), torch.zeros(b, dtype=torch.int64)
        forced = torch.tensor([-1, {bad}, 0])
        kernel.sample(torch.randn(b, 7), f, i, f, f * 0, forced, i, None, None, torch.empty(b, dtype=torch.int64),
                      torch.empty(b), torch.empty(b), torch.empty(b, dtype=torch.int32))
    """,
    "sample_bias_ids": """
        b = 3
        f, i = torch.ones(b), torch.zeros(b, dtype=torch.int64)
        ids = torch.tensor([[0, -1], [{bad}, 1], [2, 3]])
        kernel.sample(torch.randn(b, 7), f, i, f, f * 0, i - 1, i, ids, torch.ones(b, 2),
                      torch.empty(b, dtype=torch.int64), torch.empty(b), torch.empty(b),
                      torch.empty(b, dtype=torch.int32))
    """,
    "welfare_offsets": """
        n = 6
        offsets = torch.tensor({bad})
        g = offsets.numel() - 1
        kernel.welfare_advantages(torch.rand(n), torch.rand(n), offsets, 0, 0.5, 0, 1e-6, True, None,
                                  torch.empty(n), torch.empty(n), torch.empty(g), torch.empty(g),
                                  torch.empty(g, dtype=torch.bool), torch.empty(0))
    """,
}

# What each call raises: an id outside the tensor is an IndexError, invalid group offsets a
# ValueError (as the public op and gtalign_fast.ops._device_checks.ERR_GROUP_OFFSETS raise them).
_EXPECTED_ERROR = {"welfare_offsets": "ValueError"}

_BAD_VALUES = {
    "token_logprobs_fwd": ["1000000000", "-5", "7"],
    "token_logprobs_bwd": ["1000000000", "-5", "7"],
    "sample_forced": ["1000000000", "-2", "7"],
    "sample_bias_ids": ["1000000000", "-3", "7"],
    "welfare_offsets": ["[0, 3, 1000000]", "[0, 4, 2, 6]", "[-5, 3, 6]", "[0, 3, 5]"],
}


@pytest.mark.parametrize("call", sorted(_LOW_LEVEL_CALLS))
def test_low_level_cpu_kernels_refuse_out_of_range_ids(call):
    """Called directly (no Python validation in front), the compiled CPU kernels raise on an id or
    offset outside the tensors instead of reading or writing out of bounds (run in a child
    process: on the old kernels such a call may crash the interpreter or corrupt memory)."""
    error = _EXPECTED_ERROR.get(call, "IndexError")
    for bad in _BAD_VALUES[call]:
        body = textwrap.indent(textwrap.dedent(_LOW_LEVEL_CALLS[call]).format(bad=bad), "    ")
        code = (
            "import torch\nimport gtalign_fast.ops\nkernel = torch.ops.gtalign_fast_C\ntry:\n"
            f"{body}\n    print('NO ERROR')\nexcept {error} as error:\n    print('{error}:', error)\n"
        )
        result = _run_isolated(code)
        assert result.returncode == 0, (bad, result.returncode, result.stderr[-2000:])
        assert result.stdout.startswith(f"{error}:"), (bad, result.stdout, result.stderr[-2000:])
    good = {"token_logprobs_fwd": "3", "token_logprobs_bwd": "-100", "sample_forced": "6",
            "sample_bias_ids": "-1", "welfare_offsets": "[0, 3, 3, 6]"}[call]
    body = textwrap.indent(textwrap.dedent(_LOW_LEVEL_CALLS[call]).format(bad=good), "")
    result = _run_isolated("import torch\nimport gtalign_fast.ops\nkernel = torch.ops.gtalign_fast_C\n" + body)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Item 9: the Triton launchers bound what they index with (masks / clamps inside the kernels, no
# host sync). The interpreter does not raise on an out-of-bounds access: it reads and writes the
# raw memory. So every buffer is a view into a larger poisoned one: a read of the padding turns an
# output into NaN, a write into it changes the poison.

_PAD = 64
_POISON = -12345.0


def _triton_kernels(name: str):
    pytest.importorskip("triton")
    if "triton" not in _backend_names():
        pytest.skip("no Triton backend on this device")
    import importlib

    return importlib.import_module(f"gtalign_fast.kernels.{name}")


def _backend_names() -> list[str]:
    from gtalign_fast.ops import _backend

    return list(_backend.available_backends(DEVICE))


def _padded(shape, dtype=torch.float32, fill=None, poison=_POISON):
    """A contiguous view of ``shape`` inside a buffer with _PAD poisoned elements on each side."""
    n = math.prod(shape)
    buffer = torch.full((n + 2 * _PAD,), poison, dtype=dtype, device=DEVICE)
    view = buffer[_PAD:_PAD + n].view(shape)
    if fill is not None:
        view.copy_(fill)
    return buffer, view


def _assert_padding_untouched(buffer, poison=_POISON):
    for edge in (buffer[:_PAD], buffer[-_PAD:]):
        assert torch.equal(edge, torch.full_like(edge, poison)), "a kernel wrote outside its buffer"


@pytest.mark.parametrize("scale_mode", ["group", "batch", "none"])
@pytest.mark.parametrize("offsets", [[0, 3, 9], [-5, 3, 6], [0, 5, 2, 6], [-3, 8], [2, 1, 7], [7, 9, 6]])
def test_triton_welfare_clamps_group_offsets_into_the_rows(offsets, scale_mode):
    from gtalign_fast.ops import _welfare_constants as constants

    kernels = _triton_kernels("welfare_advantages")
    n, t, g = 6, 5, len(offsets) - 1
    generator = torch.Generator().manual_seed(1)
    # NaN in the padding of the inputs: a read there would show as NaN in an output.
    user_buf, user = _padded((n,), fill=torch.rand(n, generator=generator) + 0.5, poison=math.nan)
    llm_buf, llm = _padded((n,), fill=torch.rand(n, generator=generator) + 0.5, poison=math.nan)
    mask_buf, mask = _padded((n, t), fill=torch.rand(n, t, generator=generator) > 0.3, dtype=torch.bool, poison=True)
    outputs = [_padded((n,)), _padded((n,)), _padded((g,)), _padded((g,)), _padded((g,), dtype=torch.bool, poison=True),
               _padded((n, t))]
    mode = {"group": constants.SCALE_GROUP, "batch": constants.SCALE_BATCH, "none": constants.SCALE_NONE}[scale_mode]
    flag_buf, flag = _padded((1,), dtype=torch.int32, fill=0, poison=-7)
    kernels.welfare_advantages(
        user, llm, torch.tensor(offsets, dtype=torch.int64, device=DEVICE), 0, 0.5, mode, 1e-6, True, mask,
        *[view for _, view in outputs], flag,
    )
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    for (buffer, _), poison in zip(outputs, [_POISON] * 4 + [True, _POISON]):
        _assert_padding_untouched(buffer, poison)
    _assert_padding_untouched(flag_buf, -7)
    assert int(flag[0]) == checks.ERR_GROUP_OFFSETS  # every offsets list above is invalid for N = 6
    welfare, advantages, token_advantages = outputs[0][1], outputs[1][1], outputs[5][1]
    # Rows inside some (clamped) group were computed from in-bounds inputs only.
    covered = torch.zeros(n, dtype=torch.bool)
    for begin, end in zip(offsets[:-1], offsets[1:]):
        begin = min(max(begin, 0), n)
        covered[begin:min(max(end, begin), n)] = True
    covered = covered.to(DEVICE)
    assert torch.isfinite(welfare[covered]).all() and torch.isfinite(advantages[covered]).all()
    assert torch.isfinite(token_advantages[covered]).all()
    assert not torch.isnan(outputs[2][1]).any() and not torch.isnan(outputs[3][1]).any()


def test_triton_welfare_clamps_leave_valid_offsets_unchanged():
    from gtalign_fast.ops import _welfare_constants as constants

    kernels = _triton_kernels("welfare_advantages")
    generator = torch.Generator().manual_seed(2)
    user = (torch.rand(7, generator=generator) + 0.1).to(DEVICE)
    llm = (torch.rand(7, generator=generator) + 0.1).to(DEVICE)
    offsets = torch.tensor([0, 3, 3, 7], dtype=torch.int64, device=DEVICE)
    expected = ops.welfare_advantages(user, llm, offsets, unbiased=False, backend="reference")
    out = [torch.empty(7, device=DEVICE), torch.empty(7, device=DEVICE), torch.empty(3, device=DEVICE),
           torch.empty(3, device=DEVICE), torch.empty(3, dtype=torch.bool, device=DEVICE),
           torch.empty(0, device=DEVICE)]
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    kernels.welfare_advantages(user, llm, offsets, 0, 0.5, constants.SCALE_GROUP, 1e-6, False, None, *out, flag)
    assert int(flag[0]) == 0
    torch.testing.assert_close(out[0], expected.welfare)
    torch.testing.assert_close(out[1], expected.advantages)


_BAD_TARGETS = [7, 10, -5, 10**9, -(10**9)]  # V = 7; ignore_index = -100


@pytest.mark.parametrize("bad", _BAD_TARGETS)
def test_triton_token_logprobs_bounds_the_target_column(bad):
    kernels = _triton_kernels("token_logprobs")
    d0, d1, v = 2, 3, 7
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(d0, d1, v, generator=generator)
    logits_buf, logits = _padded((d0, d1, v), fill=values, poison=math.nan)
    targets = torch.tensor([1, bad, -100, 6, bad, bad], device=DEVICE)  # the last row reads past the row
    logp_buf, logp = _padded((d0 * d1,))
    entropy_buf, entropy = _padded((d0 * d1,))
    stats_buf, stats = _padded((d0 * d1, 2))
    flag_buf, flag = _padded((1,), dtype=torch.int32, fill=0, poison=-7)
    kernels.token_logprobs_forward(logits, targets, 1.0, -100, logp, entropy, stats, flag)
    for buffer in (logp_buf, entropy_buf, stats_buf):
        _assert_padding_untouched(buffer)
    _assert_padding_untouched(flag_buf, -7)
    # The bad rows are flagged and NaN; every other output is finite (nothing read the padding).
    assert int(flag[0]) == checks.ERR_TARGET_RANGE
    bad_rows = (targets != -100) & ((targets < 0) | (targets >= v))
    assert torch.isnan(logp[bad_rows]).all() and torch.isfinite(logp[~bad_rows]).all()
    assert torch.isfinite(entropy).all() and torch.isfinite(stats).all()
    lse = torch.logsumexp(values.reshape(-1, v), dim=-1).to(DEVICE)
    torch.testing.assert_close(logp[[0, 3]], values.reshape(-1, v).to(DEVICE)[[0, 3], [1, 6]] - lse[[0, 3]])

    dlogits_buf, dlogits = _padded((d0 * d1, v))
    grad = torch.ones(d0 * d1, device=DEVICE)
    kernels.token_logprobs_backward(grad, grad, logits, targets, stats, entropy, 1.0, -100, dlogits)
    _assert_padding_untouched(dlogits_buf)
    assert torch.isfinite(dlogits).all()
    # An out-of-range target matches no column: that row's one-hot term is absent.
    p = torch.softmax(values.reshape(-1, v), dim=-1).to(DEVICE)
    h = -(p * p.log()).sum(-1, keepdim=True)
    torch.testing.assert_close(dlogits[bad_rows], (-p - p * (p.log() + h))[bad_rows])


# linear_token_logprobs' Triton kernels: tests/test_linear_token_logprobs.py
# (test_triton_kernels_bound_the_target_column) checks them the same way, with their chunked API.


@pytest.mark.parametrize("bad", _BAD_TARGETS)
def test_triton_sample_bounds_forced_and_bias_ids(bad):
    kernels = _triton_kernels("sample")
    b, v = 3, 7
    generator = torch.Generator().manual_seed(5)
    logits_buf, logits = _padded((b, v), fill=torch.randn(b, v, generator=generator), poison=math.nan)
    f = torch.ones(b, device=DEVICE)
    i = torch.zeros(b, dtype=torch.int64, device=DEVICE)
    forced = torch.tensor([-1, bad, bad], device=DEVICE)
    ids = torch.tensor([[0, bad], [bad, 1], [2, bad]], device=DEVICE)
    tokens = torch.empty(b, dtype=torch.int64, device=DEVICE)
    logprobs, raw = torch.empty(b, device=DEVICE), torch.empty(b, device=DEVICE)
    status = torch.empty(b, dtype=torch.int32, device=DEVICE)
    flag_buf, flag = _padded((1,), dtype=torch.int32, fill=0, poison=-7)
    kernels.sample(logits, f, i, f, f * 0, forced, i, ids, torch.ones(b, 2, device=DEVICE), tokens, logprobs, raw,
                   status, flag)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    # NaN padding: a write there would replace it.
    for edge in (logits_buf[:_PAD], logits_buf[-_PAD:]):
        assert torch.isnan(edge).all(), "the sample kernel wrote outside the logits"
    _assert_padding_untouched(flag_buf, -7)
    assert int(flag[0]) & checks.ERR_FORCED_TOKEN, "the bad forced ids were not flagged"


# ---------------------------------------------------------------------------------------------
# Items 9 / issue 12: the kernels flag bad indices on the device; the wrappers never synchronise.
# On CPU tensors after_launch raises at once; a CUDA device is checked lazily, by
# check_device_errors. The lazy path is exercised here on CPU (Triton interpreter) by taking the
# CPU off the list of devices checked at once.


@pytest.fixture
def lazy_checks(monkeypatch):
    """after_launch behaves on CPU tensors as it does on CUDA ones: it only records the op."""
    monkeypatch.setattr(checks, "_IMMEDIATE_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(checks, "_sync_checks", False)
    checks.check_device_errors()  # start clean
    yield
    checks.error_flag(DEVICE).zero_()


def _need_triton():
    if "triton" not in _backend_names():
        pytest.skip("no Triton backend on this device")


def _grpo_custom_op(logp, num_items, backend):
    """torch.ops.gtalign_fast.grpo_loss, the registered op, without the public function's checks."""
    mask = torch.ones_like(logp, dtype=torch.bool)
    advantages = torch.ones(logp.shape[0], device=logp.device)
    from gtalign_fast.ops._grpo_objective import GrpoLossOptions

    options = GrpoLossOptions(0.0, 0.2, 0.2, None, None, "dapo", False, logp.shape[1], None)  # the rest: defaults
    return torch.ops.gtalign_fast.grpo_loss(logp, logp.detach() + 0.1, None, advantages, mask, num_items, None,
                                            *options, backend)


def test_token_logprobs_bad_target_is_flagged_lazily(lazy_checks):
    _need_triton()
    v = 7
    generator = torch.Generator().manual_seed(6)
    logits_buf, logits = _padded((4, v), fill=torch.randn(4, v, generator=generator), poison=math.nan)
    targets = torch.tensor([1, 10**9, -100, 6], device=DEVICE)
    logp = ops.token_logprobs(logits, targets, backend="triton")  # no raise, no sync
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2, 3]]).all()
    assert torch.isnan(logits_buf[:_PAD]).all() and torch.isnan(logits_buf[-_PAD:]).all()
    with pytest.raises(RuntimeError, match=r"ERR_TARGET_RANGE.*token_logprobs"):
        checks.check_device_errors()
    checks.check_device_errors()  # cleared
    ops.token_logprobs(logits, torch.tensor([1, 2, -100, 6], device=DEVICE), backend="triton")
    checks.check_device_errors()  # a good call sets nothing


@pytest.mark.parametrize(
    ("case", "code"),
    [("offsets_past_n", checks.ERR_GROUP_OFFSETS), ("offsets_decreasing", checks.ERR_GROUP_OFFSETS),
     ("negative_reward", checks.ERR_NONFINITE_REWARD), ("infinite_reward", checks.ERR_NONFINITE_REWARD)],
)
def test_welfare_bad_offsets_and_rewards_are_flagged_lazily(lazy_checks, case, code):
    _need_triton()
    generator = torch.Generator().manual_seed(7)
    user = (torch.rand(6, generator=generator) + 0.1).to(DEVICE)
    llm = (torch.rand(6, generator=generator) + 0.1).to(DEVICE)
    offsets = torch.tensor({"offsets_past_n": [0, 3, 10**6], "offsets_decreasing": [0, 4, 2, 6]}.get(case, [0, 3, 6]),
                           device=DEVICE)
    if case == "negative_reward":
        user[4] = -1.0
    if case == "infinite_reward":
        llm[2] = math.inf
    ops.welfare_advantages(user, llm, offsets, backend="triton")
    name = checks.ERROR_KINDS[code].name
    with pytest.raises(RuntimeError, match=rf"{name}.*welfare_advantages"):
        checks.check_device_errors()


def test_logits_grpo_loss_bad_target_is_flagged_lazily(lazy_checks, monkeypatch):
    """On CUDA the host target check is skipped (check_targets; turned off here as it is there): the
    kernels flag a counted id outside [0, V) (NaN loss), a masked-out one is never read."""
    _need_triton()
    from gtalign_fast.ops import _logits_grpo_loss

    monkeypatch.setattr(_logits_grpo_loss, "check_targets", lambda *args: None)
    generator = torch.Generator().manual_seed(13)
    logits = torch.randn(2, 3, 9, generator=generator).to(DEVICE).requires_grad_(True)
    targets = torch.tensor([[1, 10**9, 2], [-7, 3, 8]], device=DEVICE)
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]], device=DEVICE)
    advantages, old = torch.tensor([1.0, -1.0], device=DEVICE), torch.full((2, 3), -2.0, device=DEVICE)
    loss, _ = ops.logits_grpo_loss(logits, targets, advantages, mask, old_logp=old, backend="triton")
    loss.backward()
    assert torch.isnan(loss)  # the bad row's log-prob is NaN (off-policy: the ratio reads it)
    with pytest.raises(RuntimeError, match=r"ERR_TARGET_RANGE.*logits_grpo_loss"):
        checks.check_device_errors()
    targets[0, 1] = 4  # the -7 is masked out: nothing is flagged
    loss, _ = ops.logits_grpo_loss(logits, targets, advantages, mask, old_logp=old, backend="triton")
    loss.backward()
    assert torch.isfinite(loss)
    checks.check_device_errors()


@pytest.mark.parametrize("value", [0.0, -2.0, math.nan, math.inf])
def test_grpo_num_items_tensor_is_flagged_lazily(lazy_checks, value):
    _need_triton()
    logp = torch.randn(2, 5, device=DEVICE)
    loss, *_ = _grpo_custom_op(logp, torch.tensor(value, device=DEVICE), "triton")
    assert torch.isnan(loss)  # never a silent -inf / 0 / finite number
    with pytest.raises(RuntimeError, match=r"ERR_NUM_ITEMS.*grpo_loss"):
        checks.check_device_errors()
    loss, *_ = _grpo_custom_op(logp, torch.tensor(4.0, device=DEVICE), "triton")
    assert torch.isfinite(loss)
    checks.check_device_errors()


@pytest.mark.parametrize("backend", kernel_backends("grpo_loss"))
def test_grpo_num_items_tensor_refused_by_the_registered_op(backend):
    """The registered op (no public-function checks in front) refuses a zero normaliser on CPU
    tensors at once: the C++ kernel raises, the Triton kernel's flag raises through after_launch."""
    if DEVICE.type != "cpu":
        pytest.skip("CUDA tensors are checked lazily")
    logp = torch.randn(2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="num_items_in_batch must be finite and > 0"):
        _grpo_custom_op(logp, torch.tensor(0.0, device=DEVICE), backend)


@pytest.mark.parametrize("backend", kernel_backends("token_logprobs"))
def test_registered_token_logprobs_op_refuses_bad_targets(backend):
    if DEVICE.type != "cpu":
        pytest.skip("CUDA tensors are checked lazily")
    logits = torch.randn(3, 7, device=DEVICE)
    with pytest.raises(IndexError, match="outside \\[0, 7\\)"):
        torch.ops.gtalign_fast.token_logprobs(logits, torch.tensor([0, 10**9, 1], device=DEVICE), 1.0, False, -100,
                                              backend)


def test_launchers_refuse_inconsistent_layouts():
    """Launchers reachable without the public functions' validation check the shapes they index
    with (metadata only): a short targets / output / input never reaches the kernel."""
    _need_triton()
    from gtalign_fast.kernels import grpo_loss as grpo_kernels
    from gtalign_fast.kernels import token_logprobs as token_kernels
    from gtalign_fast.kernels import welfare_advantages as welfare_kernels

    logits = torch.randn(1, 4, 7, device=DEVICE)
    with pytest.raises(ValueError, match="targets"):
        token_kernels.token_logprobs_forward(logits, torch.zeros(3, dtype=torch.int64, device=DEVICE), 1.0, -100,
                                             torch.empty(4, device=DEVICE), torch.empty(0, device=DEVICE),
                                             torch.empty(4, 2, device=DEVICE))
    with pytest.raises(ValueError, match="per-row"):
        token_kernels.token_logprobs_forward(logits, torch.zeros(4, dtype=torch.int64, device=DEVICE), 1.0, -100,
                                             torch.empty(2, device=DEVICE), torch.empty(0, device=DEVICE),
                                             torch.empty(4, 2, device=DEVICE))
    from gtalign_fast.kernels import logits_grpo_loss as logits_grpo_kernels

    rows = (torch.zeros(4, dtype=torch.int64, device=DEVICE), torch.zeros(4, device=DEVICE),
            torch.zeros(4, 2, device=DEVICE))
    with pytest.raises(ValueError, match="targets"):  # the gradient kernel reads one id, g, stats per row
        logits_grpo_kernels.logits_grpo_grad(logits, rows[0][:3], rows[1], rows[2], 1.0, -100, logits.clone())
    with pytest.raises(ValueError, match="per-row"):
        logits_grpo_kernels.logits_grpo_grad(logits, rows[0], rows[1][:2], rows[2], 1.0, -100, logits.clone())
    with pytest.raises(ValueError, match="out3d"):
        logits_grpo_kernels.logits_grpo_grad(logits, *rows, 1.0, -100, logits[:, :2].clone())
    logp = torch.randn(2, 5, device=DEVICE)
    short = torch.randn(2, 3, device=DEVICE)
    mask = torch.ones(2, 5, dtype=torch.uint8, device=DEVICE)
    outputs = [torch.empty((), device=DEVICE), torch.empty(5, device=DEVICE), torch.empty(2, 8, device=DEVICE),
               torch.empty(2, device=DEVICE)]
    from gtalign_fast.ops._grpo_loss import kernel_params
    from gtalign_fast.ops._grpo_objective import GrpoLossOptions

    params = kernel_params(GrpoLossOptions(0.0, 0.2, 0.2, None, None, "grpo", False, 5, None))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        grpo_kernels.grpo_loss_forward(logp, short, None, torch.ones(2, 5, device=DEVICE), mask, None, None, params,
                                       False, 0, 0.1, *outputs)
    with pytest.raises(ValueError, match="params must hold 16 values"):
        grpo_kernels.grpo_loss_forward(logp, logp, None, torch.ones(2, 5, device=DEVICE), mask, None, None,
                                       params[:-1], False, 0, 0.1, *outputs)
    n = 6
    with pytest.raises(ValueError, match="output"):
        welfare_kernels.welfare_advantages(
            torch.rand(n, device=DEVICE), torch.rand(n, device=DEVICE), None, 3, 0.5, 0, 1e-6, True, None,
            torch.empty(n - 1, device=DEVICE), torch.empty(n, device=DEVICE), torch.empty(2, device=DEVICE),
            torch.empty(2, device=DEVICE), torch.empty(2, dtype=torch.bool, device=DEVICE),
            torch.empty(0, device=DEVICE),
        )


# ---------------------------------------------------------------------------------------------
# Issue 12: no host synchronisation on the CUDA path of the ops' forward and backward. Every
# Python-side way to read a tensor on the host raises while the op runs (with the lazy device
# checks a CUDA device gets); the kernels run under the Triton interpreter on CPU tensors. The old
# code read the targets' range, the offsets and the group means on the host, which this catches.

_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy")


@pytest.fixture
def no_host_reads(lazy_checks, monkeypatch):
    def refuse(name):
        def read(*_args, **_kwargs):
            raise AssertionError(f"host synchronisation on the hot path: Tensor.{name}")

        return read

    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    yield


def _grad_inputs():
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 11, generator=generator).to(DEVICE).requires_grad_(True)
    targets = torch.randint(0, 11, (2, 3), generator=generator).to(DEVICE)
    targets[0, 1] = -100
    return logits, targets


def test_token_logprobs_forward_and_backward_read_nothing_on_the_host(no_host_reads):
    _need_triton()
    logits, targets = _grad_inputs()
    logp, entropy = ops.token_logprobs(logits, targets, with_entropy=True, backend="triton")
    (logp.sum() + entropy.sum()).backward()
    assert logits.grad is not None


def test_grpo_loss_forward_and_backward_read_nothing_on_the_host(no_host_reads):
    _need_triton()
    generator = torch.Generator().manual_seed(9)
    logp = torch.randn(3, 6, generator=generator).to(DEVICE).requires_grad_(True)
    ref = torch.randn(3, 6, generator=generator).to(DEVICE)
    mask = (torch.rand(3, 6, generator=generator) > 0.3).to(DEVICE)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        loss, metrics = ops.grpo_loss(logp, logp.detach() + 0.05, torch.ones(3, device=DEVICE), mask, ref_logp=ref,
                                      beta=0.1, loss_type=loss_type, backend="triton")
        loss.backward()
    # A device tensor normaliser goes to the kernel unread (the registered op: the public function
    # reads a CPU tensor on the host, where that is free).
    loss, *_ = _grpo_custom_op(logp, torch.tensor(7.0, device=DEVICE), "triton")
    loss.backward()
    assert logp.grad is not None


def test_welfare_advantages_reads_nothing_on_the_host(no_host_reads, monkeypatch):
    _need_triton()
    generator = torch.Generator().manual_seed(10)
    user, llm = torch.rand(8, generator=generator).to(DEVICE), torch.rand(8, generator=generator).to(DEVICE)
    offsets = torch.tensor([0, 3, 3, 8], device=DEVICE)
    mask = torch.ones(8, 4, dtype=torch.bool, device=DEVICE)
    cases = [(group, scale) for group in (offsets, 4) for scale in ("group", "batch")]
    results = [ops.welfare_advantages(user, llm, group, scale=scale, mask=mask, backend="triton")
               for group, scale in cases]
    monkeypatch.undo()  # host reads allowed again: compare with the reference
    for (group, scale), result in zip(cases, results):
        expected = ops.welfare_advantages(user, llm, group, scale=scale, mask=mask, backend="reference")
        for got, want in zip(result, expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_logits_and_linear_grpo_loss_read_nothing_on_the_host(no_host_reads, monkeypatch):
    """The trainer's default loss path. Their only host read is the target check that runs on CPU
    tensors by design (free there; on CUDA the kernels flag bad ids): turned off here as on CUDA."""
    _need_triton()
    from gtalign_fast.ops import _linear_grpo_loss, _logits_grpo_loss

    for module in (_logits_grpo_loss, _linear_grpo_loss):
        monkeypatch.setattr(module, "check_targets", lambda *args: None)
    generator = torch.Generator().manual_seed(12)
    base = torch.randn(2, 4, 11, generator=generator).to(DEVICE).requires_grad_(True)
    hidden = torch.randn(2, 3, 8, generator=generator).to(DEVICE).requires_grad_(True)
    weight = torch.randn(11, 8, generator=generator).to(DEVICE).requires_grad_(True)
    targets = torch.randint(0, 11, (2, 3), generator=generator).to(DEVICE)
    mask = (torch.rand(2, 3, generator=generator) > 0.2).to(DEVICE)
    advantages, old = torch.randn(2, generator=generator).to(DEVICE), torch.zeros(2, 3, device=DEVICE)
    for level in ("token", "sequence"):
        kwargs = dict(old_logp=old, importance_sampling_level=level, backend="triton")
        loss, _ = ops.logits_grpo_loss((base * 1.0)[:, :-1], targets, advantages, mask, inplace_backward=True, **kwargs)
        loss.backward()
        loss, _ = ops.linear_grpo_loss(hidden, weight, targets, advantages, mask, chunk_size=4, **kwargs)
        loss.backward()
    assert base.grad is not None and hidden.grad is not None and weight.grad is not None


def test_the_host_read_guard_catches_a_sync():
    """The guard above must be able to fail: the old range check (bool(tensor.any())) trips it."""
    from gtalign_fast.ops._token_logprobs import check_target_range

    with pytest.MonkeyPatch.context() as patch:
        for name in _HOST_READS:
            patch.setattr(torch.Tensor, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("sync")))
        with pytest.raises(AssertionError, match="sync"):
            check_target_range(torch.tensor([1, 2]), 5, -100)


# ---------------------------------------------------------------------------------------------
# Issue 12, per-call overhead: grpo_loss's forward is one launch (the last program reduces the
# rows). It must give what the two-launch form gives, write nothing outside its outputs, and leave
# its counter at zero for the next launch.


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("seq_level", [False, True])
def test_triton_grpo_one_launch_forward_matches_two_launches(loss_type, seq_level):
    from gtalign_fast.ops import _grpo_loss

    kernels = _triton_kernels("grpo_loss")
    generator = torch.Generator().manual_seed(11)
    b, t = 5, 37
    logp = torch.randn(b, t, generator=generator).to(DEVICE)
    old = (logp.cpu() + 0.2 * torch.randn(b, t, generator=generator)).to(DEVICE)
    ref = (logp.cpu() + 0.1 * torch.randn(b, t, generator=generator)).to(DEVICE)
    advantages = torch.randn(b, generator=generator).to(DEVICE)
    mask = torch.rand(b, t, generator=generator).to(DEVICE) > 0.3
    options = _grpo_loss.GrpoLossOptions(0.05, 0.2, 0.28, None, None, loss_type, seq_level, t, None)
    num_items = torch.tensor(50.0, device=DEVICE) if loss_type == "dapo" else None
    args = _grpo_loss._forward_args(logp, old, ref, advantages, mask, num_items, None, options)
    shapes = [(1,), (5,), (b, 8), (b,)]

    def run(counter):
        buffers = [_padded(shape) for shape in shapes]
        kernels.grpo_loss_forward(*args, *[view for _, view in buffers], checks.error_flag(DEVICE), counter)
        for buffer, _ in buffers:
            _assert_padding_untouched(buffer)
        return [view.clone() for _, view in buffers]

    counter_buf, counter = _padded((1,), dtype=torch.int32, fill=0, poison=-7)
    one_launch = run(counter)
    _assert_padding_untouched(counter_buf, -7)
    assert int(counter[0]) == 0, "the last program must reset the counter"
    again = run(counter)  # the reset counter serves the next launch
    two_launches = run(None)
    for got, second, expected in zip(one_launch, again, two_launches):
        assert torch.equal(got, expected) and torch.equal(second, expected)
    assert torch.isfinite(one_launch[0]).all()
    # The counter is what triggers the reduction: one that does not start at zero makes a program
    # before the last one reduce (rows not written yet) -- so the one-launch path above did run.
    if DEVICE.type == "cpu":  # the interpreter runs the programs in order
        counter[0] = 1
        assert not torch.equal(run(counter)[0], two_launches[0])
