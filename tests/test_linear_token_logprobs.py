"""linear_token_logprobs: every backend against the float64 reference, values and the gradients
of hidden, weight and bias; the chunked path's memory bound; errors; torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from gtalign_fast import _linear_token_logprobs as module
from gtalign_fast import ops, reference
from gtalign_fast.kernels import linear_token_logprobs_chunked as chunked

from .conftest import DEVICE

OP = "linear_token_logprobs"
# This op's "cpu" / "cuda" backends are pure PyTorch (no compiled extension needed).
BACKENDS = [b for b in ("triton", DEVICE.type) if module._why_unavailable(b, DEVICE) is None] + ["reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Forward against the float64 reference on the same (rounded) inputs: every backend forms the
# logits with float32 accumulation and never rounds them, so the input dtype does not matter.
FWD_TOL = (2e-5, 1e-5)


def _grad_tol(dtype: torch.dtype, reference_grad: torch.Tensor, half_products: bool = DEVICE.type == "cuda") -> dict:
    """Gradients are rounded once to the input dtype on the way out (half an ulp: 2^-9 bf16,
    2^-12 fp16). On CUDA the half-precision backward also rounds dz to the input dtype for the
    tensor-core products, and dz sums to 0 per row (cancellation), so the bound there is relative
    to the largest gradient entry. fp32: float32 accumulation over H and V terms."""
    scale = float(reference_grad.abs().max()) if reference_grad.numel() else 0.0
    if dtype == torch.float32:
        return dict(atol=2e-5 * max(scale, 1.0), rtol=1e-4)
    half_ulp = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}[dtype]
    if half_products:
        return dict(atol=6 * half_ulp * scale, rtol=4 * half_ulp)  # measured: <= 3 half-ulps of the max
    return dict(atol=1e-6 + half_ulp * 1e-2 * scale, rtol=2 * half_ulp)


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
           requires=(True, True, True), half_products=DEVICE.type == "cuda"):
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
    for (leaf, _), grad, ref_grad in zip(wanted, grads, ref_grads):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        torch.testing.assert_close(grad.double(), ref_grad, **_grad_tol(dtype, ref_grad, half_products))


# ---------------------------------------------------------------------------------------------
# Values and gradients against the float64 reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference_float32(backend, temperature, with_entropy, with_bias):
    # V = 101 (not a power of two), chunk_size 30 does not divide it, 25% ignored rows.
    hidden, weight, bias, targets = _inputs(37, 48, 101, torch.float32, seed=1, bias=with_bias)
    _check(hidden, weight, bias, targets, backend, temperature, with_entropy, chunk_size=30)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_matches_reference_half(backend, dtype, temperature):
    hidden, weight, bias, targets = _inputs(29, 40, 77, dtype, seed=2)
    _check(hidden, weight, bias, targets, backend, temperature, with_entropy=True, chunk_size=25)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n, h, v, chunk_size",
    [(1, 16, 50, None), (23, 16, 1, None), (5, 17, 33, 1), (40, 24, 64, 64), (3, 8, 300, 7)],
    ids=["one-row", "V=1", "chunk=1", "chunk=V", "tiny-H"],
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


def test_many_chunks_rows_and_columns(monkeypatch):
    """The chunked path with several row chunks and vocabulary chunks (a tiny element budget)."""
    monkeypatch.setitem(chunked.CHUNK_ELEMENTS, DEVICE.type, 600)
    hidden, weight, bias, targets = _inputs(70, 32, 1000, torch.float32, seed=5)
    assert chunked.chunk_shape(70, 1000, 0, DEVICE) == (1, 1000)
    assert chunked.chunk_shape(70, 1000, 100, DEVICE) == (6, 100)
    _check(hidden, weight, bias, targets, DEVICE.type, 1.1, with_entropy=True, chunk_size=100)
    hidden, weight, bias, targets = _inputs(70, 32, 1000, torch.bfloat16, seed=5)
    _check(hidden, weight, bias, targets, DEVICE.type, 1.1, with_entropy=True, chunk_size=100)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_products(monkeypatch, backend, dtype):
    """The GPU route for half inputs: dz rounded to the input dtype, products with float32
    results (``_mm_float``), float32 accumulators for dhidden and the dW chunk. Forced here on
    CPU so that the code path runs where there is no GPU."""
    def half_products(dtype, device):
        return dtype if dtype in chunked.HALF_DTYPES else reference.compute_dtype(dtype)

    monkeypatch.setattr(chunked, "_gemm_dtype", half_products)
    monkeypatch.setitem(chunked.CHUNK_ELEMENTS, DEVICE.type, 500)  # several row chunks: dW accumulates
    hidden, weight, bias, targets = _inputs(41, 32, 60, dtype, seed=19)
    _check(hidden, weight, bias, targets, backend, 1.2, with_entropy=True, chunk_size=25, half_products=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_and_frozen_hidden(backend):
    """Only the gradients asked for are computed (a frozen LM head skips the weight product)."""
    hidden, weight, bias, targets = _inputs(19, 24, 45, torch.float32, seed=6)
    _check(hidden, weight, bias, targets, backend, with_entropy=True, chunk_size=20, requires=(True, False, False))
    _check(hidden, weight, bias, targets, backend, with_entropy=False, chunk_size=20, requires=(False, True, True))


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
    _check(hidden.reshape(-1, 32), weight, None, targets.reshape(-1), backend, with_entropy=True, chunk_size=32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_bias(backend):
    """A -inf bias (banned tokens) drops those tokens: no NaN in values or gradients."""
    hidden, weight, bias, targets = _inputs(11, 16, 40, torch.float32, seed=8, ignore_frac=0.0)
    bias[:7] = float("-inf")  # a whole first chunk of -inf
    bias[20] = float("-inf")
    targets = targets.clamp(min=21)
    _check(hidden, weight, bias, targets, backend, with_entropy=True, chunk_size=7, requires=(True, True, False))


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
            hidden, weight, targets, bias=bias, with_entropy=with_entropy, chunk_size=2048, backend="cpu"
        )
        loss = sum(o.sum() for o in out) if with_entropy else out.sum()
        loss.backward()

    largest = _largest_allocation(forward_backward)
    # The weight gradient (V x H x 4 = 2 MiB) and one 256 x 2048 chunk (2 MiB) are the largest.
    assert largest <= max(v * h * 4, n * 2048 * 4) < logits_bytes / 4, largest
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
    with pytest.raises(IndexError, match=f"target id {bad_target} at position 2"):
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
    logp = ops.linear_token_logprobs(hidden, weight, targets, bias=bias, chunk_size=8, backend=DEVICE.type)
    ref_logp, _ = reference.linear_token_logprobs(hidden, weight, targets, bias)
    # Only the float32 output rounding remains.
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-6, rtol=1e-6)


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
