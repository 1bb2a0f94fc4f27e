"""linear_token_logprobs: every backend against the float64 reference, values and the gradients
of hidden, weight and bias, at several chunk sizes; the chunk-size rule and the grid bound; infinite
inputs; out-of-range targets (raised on CPU, flagged on the device); the memory bound; errors;
torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from gtalign_fast import ops, reference
from gtalign_fast.kernels import linear_token_logprobs_chunked as chunked
from gtalign_fast.ops import _backend
from gtalign_fast.ops import _device_checks as checks
from gtalign_fast.ops import _linear_token_logprobs as module

from .conftest import DEVICE

OP = "linear_token_logprobs"
# This op's "cpu" / "cuda" backends run without the compiled extension.
BACKENDS = [b for b in ("triton", DEVICE.type) if _backend.why_unavailable(b, DEVICE, OP) is None] + ["reference"]
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Forward against the float64 reference on the same (rounded) inputs: every backend forms the
# logits with float32 accumulation and never rounds them, so the input dtype does not matter.
FWD_TOL = (2e-5, 1e-5)


def _n_chunks(n: int, v: int, chunk_size: int | None) -> int:
    rows = chunked.chunk_rows(n, v, chunk_size or 0, DEVICE)
    return max(1, -(-n // rows))


def _grad_tol(dtype: torch.dtype, reference_grad: torch.Tensor, n_chunks: int = 1) -> dict:
    """fp32: float32 accumulation over H and V terms. Half inputs: dz is rounded to the input dtype
    for the backward GEMMs (half an ulp: 2^-9 bf16, 2^-12 fp16), and dz sums to 0 per row
    (cancellation), so the bound is relative to the largest gradient entry; the weight gradient is
    accumulated in its own dtype, one more rounding per chunk."""
    scale = float(reference_grad.abs().max()) if reference_grad.numel() else 0.0
    if dtype == torch.float32:
        return dict(atol=2e-5 * max(scale, 1.0), rtol=1e-4)
    half_ulp = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}[dtype]
    return dict(atol=(5 + n_chunks) * half_ulp * scale, rtol=4 * half_ulp)


def _inputs(n, h, v, dtype, seed, bias=True, ignore_frac=0.25):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=generator, dtype=torch.float64)
    # Logit scale ~3: a peaked but not one-hot distribution, so every gradient term matters.
    weight = torch.randn(v, h, generator=generator, dtype=torch.float64) * (3.0 / h**0.5)
    b = torch.randn(v, generator=generator, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (n,), generator=generator)
    targets[torch.rand(n, generator=generator) < ignore_frac] = -100
    cast = lambda x: None if x is None else x.to(dtype).to(DEVICE)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets.to(DEVICE)


def _check(hidden, weight, bias, targets, backend, temperature=1.0, with_entropy=False, chunk_size=None,
           requires=(True, True, True)):
    """Compare one backend with the float64 reference: logp (and entropy) and the gradients of
    every input that requires one, under random upstream gradients."""
    dtype = hidden.dtype
    inputs = zip((hidden, weight, bias), requires)
    leaves = [None if x is None else x.detach().clone().requires_grad_(r) for x, r in inputs]
    out = ops.linear_token_logprobs(
        leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature, with_entropy=with_entropy,
        chunk_size=chunk_size, backend=backend,
    )
    assert ops.last_backend(OP) == backend
    logp, entropy = out if with_entropy else (out, None)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape

    inputs = zip((hidden, weight, bias), requires)
    ref_leaves = [None if x is None else x.detach().double().requires_grad_(r) for x, r in inputs]
    ref_logp, ref_entropy = reference.linear_token_logprobs(
        ref_leaves[0], ref_leaves[1], targets, ref_leaves[2], temperature, with_entropy
    )
    torch.testing.assert_close(logp.double(), ref_logp, atol=FWD_TOL[0], rtol=FWD_TOL[1])
    if with_entropy:
        torch.testing.assert_close(entropy.double(), ref_entropy, atol=FWD_TOL[0], rtol=FWD_TOL[1])

    # Random upstream gradients, so both output gradients matter and cannot cancel.
    generator = torch.Generator().manual_seed(11)
    g_logp = torch.randn(targets.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    g_entropy = torch.randn(targets.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    loss = (logp.double() * g_logp).sum() + ((entropy.double() * g_entropy).sum() if with_entropy else 0)
    ref_loss = (ref_logp * g_logp).sum() + ((ref_entropy * g_entropy).sum() if with_entropy else 0)
    wanted = [(leaf, ref) for leaf, ref in zip(leaves, ref_leaves) if leaf is not None and leaf.requires_grad]
    if not wanted:
        return
    grads = torch.autograd.grad(loss, [leaf for leaf, _ in wanted])
    ref_grads = torch.autograd.grad(ref_loss, [ref for _, ref in wanted])
    n_chunks = _n_chunks(targets.numel(), weight.shape[0], chunk_size)
    for (leaf, _), grad, ref_grad in zip(wanted, grads, ref_grads):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        torch.testing.assert_close(grad.double(), ref_grad, **_grad_tol(dtype, ref_grad, n_chunks))


# ---------------------------------------------------------------------------------------------
# Values and gradients against the float64 reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference_float32(backend, temperature, with_entropy, with_bias):
    # V = 101 (not a power of two, 4 tiles of the interpreter's 32), chunks of 15 tokens do not
    # divide N = 37, 25% ignored rows.
    hidden, weight, bias, targets = _inputs(37, 48, 101, torch.float32, seed=1, bias=with_bias)
    _check(hidden, weight, bias, targets, backend, temperature, with_entropy, chunk_size=15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_matches_reference_half(backend, dtype, temperature):
    # Three chunks: the half-precision weight gradient is accumulated across them.
    hidden, weight, bias, targets = _inputs(29, 40, 77, dtype, seed=2)
    _check(hidden, weight, bias, targets, backend, temperature, with_entropy=True, chunk_size=12)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 44, 45, 1000, None])
def test_chunk_sizes(backend, chunk_size):
    """Chunks of one row, chunks that do not divide N (7, 16, 44), exactly N, more than N, the default."""
    hidden, weight, bias, targets = _inputs(45, 24, 70, torch.float32, seed=20)
    _check(hidden, weight, bias, targets, backend, 0.8, with_entropy=True, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n, h, v, chunk_size",
    [(1, 16, 50, None), (23, 16, 1, None), (5, 17, 33, 1), (40, 24, 64, 40), (3, 8, 300, 2), (9, 5, 32, 4)],
    ids=["one-row", "V=1", "chunk=1", "chunk=N", "tiny-H", "V=one-tile"],
)
def test_awkward_sizes(backend, n, h, v, chunk_size):
    hidden, weight, bias, targets = _inputs(n, h, v, torch.float32, seed=3, ignore_frac=0.0)
    _check(hidden, weight, bias, targets, backend, 0.9, with_entropy=True, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_all_ignored(backend):
    hidden, weight, bias, targets = _inputs(0, 16, 20, torch.float32, seed=4)
    _check(hidden, weight, bias, targets, backend, with_entropy=True)
    hidden, weight, bias, targets = _inputs(6, 16, 20, torch.float32, seed=4)
    targets.fill_(-100)
    _check(hidden, weight, bias, targets, backend, with_entropy=True)
    logp = ops.linear_token_logprobs(hidden, weight, targets, backend=backend)
    assert torch.equal(logp, torch.zeros_like(logp))


def test_pytorch_pass_of_the_cpu_backend(monkeypatch):
    """The row-blocked PyTorch pass (float64, the "cuda" backend, CPU without the extension), forced on
    float32 CPU tensors; blocks of 32 rows in a chunk of 40 (a partial block)."""
    if DEVICE.type != "cpu":
        pytest.skip("the CPU backend")
    monkeypatch.setattr(chunked, "cpu_extension_usable", lambda dtype: False)
    hidden, weight, bias, targets = _inputs(52, 24, 90, torch.float32, seed=21)
    _check(hidden, weight, bias, targets, "cpu", 0.9, with_entropy=True, chunk_size=40)
    _check(hidden, weight, None, targets, "cpu", 1.0, with_entropy=False, chunk_size=40)
    hidden, weight, bias, targets = _inputs(20, 24, 90, torch.bfloat16, seed=21)
    _check(hidden, weight, bias, targets, "cpu", 1.1, with_entropy=True, chunk_size=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_and_frozen_hidden(backend):
    """Only the gradients asked for are computed (a frozen LM head skips the weight product)."""
    hidden, weight, bias, targets = _inputs(19, 24, 45, torch.float32, seed=6)
    _check(hidden, weight, bias, targets, backend, with_entropy=True, chunk_size=8, requires=(True, False, False))
    _check(hidden, weight, bias, targets, backend, with_entropy=False, chunk_size=8, requires=(False, True, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_leading_dims(backend):
    """Hidden as a strided slice of [B, T+1, H], a transposed (tied-embedding) weight, [B, T] targets."""
    generator = torch.Generator().manual_seed(7)
    full_hidden = torch.randn(3, 9, 32, generator=generator).to(DEVICE)
    hidden = full_hidden[:, :-1]
    embedding_t = (torch.randn(32, 70, generator=generator) * 0.5).to(DEVICE)  # stored [H, V]
    weight = embedding_t.T
    assert not weight.is_contiguous()
    targets = torch.randint(0, 70, (3, 8), generator=generator).to(DEVICE)
    targets[0, :3] = -100
    logp, entropy = ops.linear_token_logprobs(hidden, weight, targets, with_entropy=True, backend=backend)
    assert logp.shape == targets.shape
    ref_logp, ref_entropy = reference.token_logprobs(hidden.double() @ weight.double().T, targets, 1.0, True)
    torch.testing.assert_close(logp.double(), ref_logp, atol=FWD_TOL[0], rtol=FWD_TOL[1])
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=FWD_TOL[0], rtol=FWD_TOL[1])
    _check(hidden.reshape(-1, 32), weight, None, targets.reshape(-1), backend, with_entropy=True, chunk_size=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_bias(backend):
    """A -inf bias (banned tokens) drops those tokens: no NaN in values or gradients."""
    hidden, weight, bias, targets = _inputs(11, 16, 40, torch.float32, seed=8, ignore_frac=0.0)
    bias[:33] = float("-inf")  # whole first tiles of -inf
    bias[36] = float("-inf")
    targets = targets.clamp(min=33)
    targets[targets == 36] = 37
    _check(hidden, weight, bias, targets, backend, with_entropy=True, chunk_size=4, requires=(True, True, False))


def _infinite_linear_inputs(where, seed):
    """Float32 LM-head inputs with one infinite value at ``where`` (as tests/test_op_safety.py)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(5, 8, generator=generator, dtype=torch.float64).abs() + 0.1
    weight = torch.randn(40, 8, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 40, (5,), generator=generator)
    targets[targets == 35] = 4  # never target the infinite token
    bias = None
    if where == "weight_neg_inf":
        weight[35, 0] = -math.inf  # logit 35 is -inf in every row (hidden > 0), in the last tile
    elif where == "weight_pos_inf":
        weight[35, 0] = math.inf
    elif where == "hidden_inf":
        hidden[1, 2] = math.inf
    else:
        bias = torch.zeros(40, dtype=torch.float64)
        bias[35] = -math.inf
    cast = lambda x: None if x is None else x.float().to(DEVICE)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), targets.to(DEVICE)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("where", ["weight_neg_inf", "weight_pos_inf", "hidden_inf", "bias_neg_inf"])
def test_infinite_inputs_match_the_logits_path(backend, where):
    """Issue 15 item 10: an infinite weight / hidden / bias value gives what token_logprobs gives on the
    materialised logits: a -inf logit has p = 0 (finite entropy, not NaN); a +inf logit gives -inf
    log-probs and NaN entropy in its row, as the reference."""
    for seed in range(2):
        hidden, weight, bias, targets = _infinite_linear_inputs(where, seed)
        logp, entropy = ops.linear_token_logprobs(hidden, weight, targets, bias=bias, with_entropy=True,
                                                  chunk_size=3, backend=backend)
        logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
        ref_logp, ref_entropy = ops.token_logprobs(logits, targets, with_entropy=True, backend="reference")
        torch.testing.assert_close(entropy, ref_entropy.float(), atol=1e-4, rtol=1e-4, equal_nan=True)
        torch.testing.assert_close(logp, ref_logp.float(), atol=1e-4, rtol=1e-4, equal_nan=True)
        if where in ("weight_neg_inf", "bias_neg_inf"):
            assert torch.isfinite(entropy).all() and torch.isfinite(logp).all()


def test_backends_agree_with_each_other():
    hidden, weight, bias, targets = _inputs(33, 40, 90, torch.float32, seed=9)
    results = {}
    for backend in BACKENDS:
        results[backend] = ops.linear_token_logprobs(
            hidden, weight, targets, bias=bias, with_entropy=True, temperature=0.8, backend=backend
        )
    first = results[BACKENDS[0]]
    for backend in BACKENDS[1:]:
        for a, b in zip(first, results[backend]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Chunk size and the grid


def test_chunk_rows_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # The budget: 64 MiB / (4 V) rows on CPU, 1 GiB on CUDA, in multiples of 128.
    assert chunked.chunk_rows(2048, 32000, 0, cpu) == 512
    assert chunked.chunk_rows(4096, 131072, 0, cuda) == 2048
    # Evened out: 2100 rows at most 2048 per chunk -> two chunks of 1152 and 948, not 2048 + 52.
    assert chunked.chunk_rows(2100, 131072, 0, cuda) == 1152
    # Fewer rows than the budget: one chunk of all of them.
    assert chunked.chunk_rows(300, 32000, 0, cpu) == 300
    # A huge vocabulary: at least MIN_CHUNK_ROWS rows (the GEMMs would lose efficiency below).
    assert chunked.chunk_rows(10**5, 10**7, 0, cpu) == chunked.MIN_CHUNK_ROWS["cpu"]
    # An explicit chunk_size is taken as given, bounded by N and MAX_CHUNK_ROWS.
    assert chunked.chunk_rows(45, 70, 7, cpu) == 7
    assert chunked.chunk_rows(45, 70, 1000, cpu) == 45
    assert chunked.chunk_rows(10**7, 70, 10**6, cuda) == chunked.MAX_CHUNK_ROWS
    # A tiny vocabulary does not make one chunk of every row either.
    assert chunked.chunk_rows(10**7, 2, 0, cuda) == chunked.MAX_CHUNK_ROWS


@pytest.mark.parametrize("n, v", [(65536, 151936), (10**7, 151936), (65536, 2), (1, 151936), (10**6, 10**7)])
def test_grid_never_passes_65535(n, v):
    """V = 151936 and N = 65536 (and far beyond) launch one program per row of a bounded chunk: the
    grid is computed, not run (the case would take minutes on the interpreter)."""
    pytest.importorskip("triton")
    from gtalign_fast.kernels import linear_token_logprobs as kernels

    for device in (torch.device("cpu"), torch.device("cuda")):
        for chunk_size in (0, 1, 70000, 10**9):
            rows = chunked.chunk_rows(n, v, chunk_size, device)
            grid = kernels.launch_grid(rows)
            assert len(grid) == 1 and 1 <= grid[0] <= 65535, (n, v, chunk_size, grid)
            if chunk_size == 0 and device.type == "cuda" and rows > chunked.MIN_CHUNK_ROWS["cuda"]:
                assert 4 * rows * v <= chunked.CHUNK_BYTES["cuda"]  # the buffer stays within its budget
    with pytest.raises(ValueError, match="a chunk has 1 to"):
        kernels.launch_grid(chunked.MAX_CHUNK_ROWS + 1)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the full-size case needs a GPU (about 1.2 GiB, well under a second)")
@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b in ("triton", "cuda")])
def test_qwen_vocabulary_and_65536_tokens_on_cuda(backend):
    """V = 151936 and N = 65536, bf16, through every chunk: sampled rows against the float64
    reference of those rows (a row's log-prob and hidden gradient depend on that row only)."""
    n, h, v = 65536, 128, 151936
    generator = torch.Generator(device=DEVICE).manual_seed(22)
    hidden = torch.randn(n, h, device=DEVICE, dtype=torch.bfloat16, generator=generator).requires_grad_(True)
    weight = (torch.randn(v, h, device=DEVICE, dtype=torch.bfloat16, generator=generator) * 0.2).requires_grad_(True)
    targets = torch.randint(0, v, (n,), device=DEVICE, generator=generator)
    logp, entropy = ops.linear_token_logprobs(hidden, weight, targets, with_entropy=True, backend=backend)
    dhidden, dweight = torch.autograd.grad(logp.sum() + entropy.sum(), [hidden, weight])
    assert torch.isfinite(dweight).all()
    rows = torch.cat([torch.arange(0, n, 4099, device=DEVICE), torch.tensor([n - 1], device=DEVICE)])
    ref_hidden = hidden.detach()[rows].double().requires_grad_(True)
    ref_logp, ref_entropy = reference.linear_token_logprobs(ref_hidden, weight.detach().double(), targets[rows],
                                                            with_entropy=True)
    (ref_dhidden,) = torch.autograd.grad(ref_logp.sum() + ref_entropy.sum(), [ref_hidden])
    torch.testing.assert_close(logp[rows].double(), ref_logp, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(entropy[rows].double(), ref_entropy, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(dhidden[rows].double(), ref_dhidden, **_grad_tol(torch.bfloat16, ref_dhidden))


# ---------------------------------------------------------------------------------------------
# Out-of-range targets in the Triton kernels: flagged on the device, never an index


@pytest.fixture
def lazy_checks(monkeypatch):
    """after_launch behaves on CPU tensors as on CUDA ones: it only records the op (no sync)."""
    monkeypatch.setattr(checks, "_IMMEDIATE_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(checks, "_sync_checks", False)
    checks.check_device_errors()  # start clean
    yield
    checks.error_flag(DEVICE).zero_()


_PAD = 64


def _padded(shape, dtype=torch.float32, fill=None, poison=-12345.0):
    """A contiguous view of ``shape`` inside a buffer with _PAD poisoned elements on each side."""
    n = math.prod(shape)
    buffer = torch.full((n + 2 * _PAD,), poison, dtype=dtype, device=DEVICE)
    view = buffer[_PAD:_PAD + n].view(shape)
    if fill is not None:
        view.copy_(fill)
    return buffer, view


@pytest.mark.parametrize("bad", [7, 10, -5, 10**9, -(10**9)])
@pytest.mark.parametrize("dz_dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_bound_the_target_column(bad, dz_dtype):
    if "triton" not in BACKENDS:
        pytest.skip("no Triton backend on this device")
    from gtalign_fast.kernels import linear_token_logprobs as kernels

    n, v = 5, 7
    generator = torch.Generator().manual_seed(4)
    values = torch.randn(n, v, generator=generator).to(DEVICE)
    targets = torch.tensor([2, bad, -100, 6, bad], device=DEVICE)
    z_buf, z = _padded((n, v), fill=values)
    outs = [_padded(shape) for shape in ((n,), (n,), (n, 2))]
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    kernels.chunk_stats(z, None, targets, 1.0, -100, outs[0][1], outs[1][1], outs[2][1], flag)
    assert int(flag) == checks.ERR_TARGET_RANGE
    logp, entropy, stats = (view for _, view in outs)
    for buffer, _ in [(z_buf, None), *outs]:
        assert torch.equal(buffer[:_PAD], torch.full_like(buffer[:_PAD], -12345.0)), "a write outside"
        assert torch.equal(buffer[-_PAD:], torch.full_like(buffer[-_PAD:], -12345.0)), "a write outside"
    lse = torch.logsumexp(values, dim=-1)
    torch.testing.assert_close(logp[[0, 3]], values[[0, 3], [2, 6]] - lse[[0, 3]])
    assert torch.isnan(logp[[1, 4]]).all() and logp[2] == 0  # flagged rows NaN, the ignored row 0
    assert torch.isfinite(entropy).all() and torch.isfinite(stats).all()

    grad = torch.ones(n, device=DEVICE)
    dz = kernels.chunk_dlogits(z, None, targets, stats, None, grad, None, 1.0, -100, dz_dtype)
    assert torch.equal(z_buf[:_PAD], torch.full_like(z_buf[:_PAD], -12345.0))
    assert torch.equal(z_buf[-_PAD:], torch.full_like(z_buf[-_PAD:], -12345.0))
    p = torch.softmax(values, dim=-1)
    tol = dict(atol=1e-6, rtol=1e-5) if dz_dtype == torch.float32 else dict(atol=4e-3, rtol=8e-3)
    torch.testing.assert_close(dz[[1, 4]].float(), -p[[1, 4]], **tol)  # no onehot term: it matches nothing
    assert torch.equal(dz[2].float(), torch.zeros(v, device=DEVICE))


def test_triton_bad_target_is_flagged_lazily(lazy_checks):
    """On CUDA (here: CPU with the lazy rule) the op does not synchronise: the row is NaN and
    check_device_errors() names the error and the op; a good call sets nothing."""
    if "triton" not in BACKENDS:
        pytest.skip("no Triton backend on this device")
    hidden, weight, _, targets = _inputs(4, 8, 10, torch.float32, seed=13, ignore_frac=0.0)
    targets[1] = 10**9
    logp = ops.linear_token_logprobs(hidden, weight, targets, backend="triton")
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2, 3]]).all()
    with pytest.raises(RuntimeError, match=r"ERR_TARGET_RANGE.*linear_token_logprobs"):
        checks.check_device_errors()
    targets[1] = 3
    ops.linear_token_logprobs(hidden, weight, targets, backend="triton")
    checks.check_device_errors()


# ---------------------------------------------------------------------------------------------
# Memory: the chunked path never allocates [N, V]


def _largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    largest, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            largest = max(largest, node.extra_fields.alloc_size)
    return largest


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU allocator profiling")
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_path_never_allocates_the_logits(with_entropy):
    n, h, v = 256, 32, 16384
    hidden, weight, bias, targets = _inputs(n, h, v, torch.float32, seed=10)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logits_bytes = n * v * 4

    def forward_backward():
        out = ops.linear_token_logprobs(
            hidden, weight, targets, bias=bias, with_entropy=with_entropy, chunk_size=32, backend="cpu"
        )
        loss = sum(o.sum() for o in out) if with_entropy else out.sum()
        loss.backward()

    largest = _largest_allocation(forward_backward)
    # The weight gradient (V x H x 4 = 2 MiB) and one 32 x V chunk (2 MiB) are the largest.
    assert largest <= max(v * h * 4, 32 * v * 4) < logits_bytes / 4, largest
    # The reference does allocate the logits: the check can see them.
    assert _largest_allocation(lambda: reference.linear_token_logprobs(hidden, weight, targets)) >= logits_bytes


# ---------------------------------------------------------------------------------------------
# Errors


def test_bad_arguments_raise():
    hidden, weight, bias, targets = _inputs(4, 8, 10, torch.float32, seed=12)
    f = ops.linear_token_logprobs
    with pytest.raises(ValueError, match="weight must be"):
        f(hidden, weight[:, :7], targets)
    with pytest.raises(ValueError, match="weight must be"):
        f(hidden, weight[0], targets)
    with pytest.raises(ValueError, match="targets shape"):
        f(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="bias must be"):
        f(hidden, weight, targets, bias=bias[:5])
    with pytest.raises(TypeError, match="weight dtype"):
        f(hidden, weight.double(), targets)
    with pytest.raises(TypeError, match="bias dtype"):
        f(hidden, weight, targets, bias=bias.half())
    with pytest.raises(TypeError, match="hidden must be"):
        f(hidden.long(), weight.long(), targets)
    with pytest.raises(TypeError, match="targets must be int64"):
        f(hidden, weight, targets.int())
    with pytest.raises(TypeError, match="weight must be a tensor"):
        f(hidden, weight.tolist(), targets)
    with pytest.raises(ValueError, match="temperature"):
        f(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        f(hidden, weight, targets, temperature=float("nan"))
    with pytest.raises(TypeError, match="temperature"):
        f(hidden, weight, targets, temperature=torch.tensor(1.0))
    with pytest.raises(ValueError, match="chunk_size"):
        f(hidden, weight, targets, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        f(hidden, weight, targets, chunk_size=2.5)
    with pytest.raises(ValueError, match="H >= 1"):
        f(hidden[:, :0], weight[:, :0], targets)
    with pytest.raises(ValueError, match="V >= 1"):
        f(hidden, weight[:0], targets)
    with pytest.raises(ValueError, match="is on meta"):
        f(hidden, weight.to("meta"), targets)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_target", [10, -1, 10**9])
def test_bad_targets_raise(backend, bad_target):
    hidden, weight, _, targets = _inputs(4, 8, 10, torch.float32, seed=13)
    targets[2] = bad_target
    # sync_checks: on CUDA the kernels' flag is otherwise read lazily (a no-op on CPU tensors).
    with checks.sync_checks(), pytest.raises(IndexError, match=f"target id {bad_target} at position 2"):
        ops.linear_token_logprobs(hidden, weight, targets, backend=backend)


def test_backend_resolution(monkeypatch):
    hidden, weight, _, targets = _inputs(4, 8, 10, torch.float32, seed=14)
    monkeypatch.delenv("GTALIGN_FAST_BACKEND", raising=False)
    monkeypatch.delenv("GTALIGN_FAST_BACKEND_LINEAR_TOKEN_LOGPROBS", raising=False)
    ops.linear_token_logprobs(hidden, weight, targets)
    assert ops.last_backend(OP) == ("cpu" if DEVICE.type == "cpu" else "triton")
    monkeypatch.setenv("GTALIGN_FAST_BACKEND", "reference")
    ops.linear_token_logprobs(hidden, weight, targets)
    assert ops.last_backend(OP) == "reference"
    monkeypatch.setenv("GTALIGN_FAST_BACKEND_LINEAR_TOKEN_LOGPROBS", DEVICE.type)
    ops.linear_token_logprobs(hidden, weight, targets)
    assert ops.last_backend(OP) == DEVICE.type  # the per-op variable wins
    ops.linear_token_logprobs(hidden, weight, targets, backend="reference")
    assert ops.last_backend(OP) == "reference"  # the argument wins
    with pytest.raises(ValueError, match="unknown backend"):
        ops.linear_token_logprobs(hidden, weight, targets, backend="chunked")
    other = "cuda" if DEVICE.type == "cpu" else "cpu"
    with pytest.raises(RuntimeError, match=f"backend '{other}'"):
        ops.linear_token_logprobs(hidden, weight, targets, backend=other)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton not available")
def test_triton_rejects_float64():
    hidden, weight, _, targets = _inputs(4, 8, 10, torch.float64, seed=15)
    with pytest.raises(TypeError, match="float64"):
        ops.linear_token_logprobs(hidden, weight, targets, backend="triton")


def test_float64_chunked_path_is_exact():
    hidden, weight, bias, targets = _inputs(9, 12, 31, torch.float64, seed=16)
    logp = ops.linear_token_logprobs(hidden, weight, targets, bias=bias, chunk_size=4, backend=DEVICE.type)
    ref_logp, _ = reference.linear_token_logprobs(hidden, weight, targets, bias)
    # Only the float32 output rounding remains.
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-6, rtol=1e-6)
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    logp, entropy = ops.linear_token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], with_entropy=True,
                                              chunk_size=4, backend=DEVICE.type)
    grads = torch.autograd.grad(logp.double().sum() + 0.5 * entropy.double().sum(), leaves)
    ref_leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    ref_logp, ref_entropy = reference.linear_token_logprobs(ref_leaves[0], ref_leaves[1], targets, ref_leaves[2],
                                                            with_entropy=True)
    ref_grads = torch.autograd.grad(ref_logp.sum() + 0.5 * ref_entropy.sum(), ref_leaves)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == torch.float64
        # float64 maths; the saved entropy is float32 (1e-7 relative)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_torch_compile_fullgraph_no_graph_break():
    hidden, weight, bias, targets = _inputs(13, 16, 37, torch.float32, seed=17)

    def loss_fn(h, w, b, t):
        logp, entropy = ops.linear_token_logprobs(h, w, t, bias=b, with_entropy=True, temperature=0.9, chunk_size=10)
        return (logp * 2.0).sum() + entropy.mean()

    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves, targets)
    grads = torch.autograd.grad(loss, leaves)
    eager_leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    eager_loss = loss_fn(*eager_leaves, targets)
    eager_grads = torch.autograd.grad(eager_loss, eager_leaves)
    torch.testing.assert_close(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)


def test_opcheck():
    """torch.library's own consistency checks (schema, fake tensor, autograd registration)."""
    hidden, weight, bias, targets = _inputs(6, 8, 12, torch.float32, seed=18)
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    torch.library.opcheck(
        module.FORWARD.custom_op, (leaves[0], leaves[1], leaves[2], targets, 1.0, True, -100, 5, DEVICE.type),
    )
