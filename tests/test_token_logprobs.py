"""token_logprobs: every backend against the float64 reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

from gtalign_fast import ops, reference
from gtalign_fast.ops import _device_checks
from gtalign_fast.ops._token_logprobs import rows_view

from .conftest import DEVICE, kernel_backends

BACKENDS = kernel_backends() + ["reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Forward tolerances against the float64 reference. The kernels accumulate in float32, so only
# the input rounding differs between dtypes: the reference sees the same rounded inputs.
FWD_TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (2e-5, 1e-5), torch.float16: (2e-5, 1e-5)}
# Gradients are rounded to the logits' dtype on the way out: one rounding of a value <= 1/T.
GRAD_TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (8e-3, 8e-3), torch.float16: (1e-3, 1e-3)}


def _triton_size_ok(backend: str, numel: int) -> bool:
    # The Triton interpreter is slow on CPU: keep its inputs small there.
    return not (backend == "triton" and DEVICE.type == "cpu" and numel > 200_000)


def _inputs(shape, vocab, dtype, seed, ignore_frac=0.2, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=generator, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=generator)
    ignored = torch.rand(shape, generator=generator) < ignore_frac
    targets[ignored] = -100
    return logits.to(DEVICE), targets.to(DEVICE)


def _check(logits, targets, backend, temperature, with_entropy, slice_last=False):
    """Compare one backend with the float64 reference: values and the gradient w.r.t. logits."""
    dtype = logits.dtype
    leaf = logits.detach().clone().requires_grad_(True)
    view = leaf[:, :-1] if slice_last else leaf
    out = ops.token_logprobs(view, targets, temperature=temperature, with_entropy=with_entropy, backend=backend)
    assert ops.last_backend("token_logprobs") == backend
    logp, entropy = out if with_entropy else (out, None)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape

    ref_leaf = logits.detach().double().requires_grad_(True)
    ref_view = ref_leaf[:, :-1] if slice_last else ref_leaf
    ref_logp, ref_entropy = reference.token_logprobs(ref_view, targets, temperature, with_entropy)
    atol, rtol = FWD_TOL[dtype]
    torch.testing.assert_close(logp.double(), ref_logp, atol=atol, rtol=rtol)
    if with_entropy:
        torch.testing.assert_close(entropy.double(), ref_entropy, atol=atol, rtol=rtol)

    # Random upstream gradients, so both output gradients matter and cannot cancel.
    generator = torch.Generator().manual_seed(7)
    g_logp = torch.randn(targets.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    g_entropy = torch.randn(targets.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    loss = (logp.double() * g_logp).sum() + ((entropy.double() * g_entropy).sum() if with_entropy else 0)
    ref_loss = (ref_logp * g_logp).sum() + ((ref_entropy * g_entropy).sum() if with_entropy else 0)
    (grad,) = torch.autograd.grad(loss, leaf)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_leaf)
    assert grad.dtype == dtype
    # The reference gradient is exact; compare with it rounded to the output dtype plus tolerance.
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.double(), ref_grad, atol=atol, rtol=rtol)
    ignored = targets == -100
    if ignored.any():
        grad_rows = grad[:, :-1] if slice_last else grad
        assert (grad_rows[ignored] == 0).all(), "ignored positions must get zero gradient"
        assert (logp[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_matches_reference(backend, dtype, temperature, with_entropy):
    logits, targets = _inputs((3, 5), 1000, dtype, seed=DTYPES.index(dtype) * 10 + int(temperature * 10) + with_entropy)
    _check(logits, targets, backend, temperature, with_entropy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape,vocab",
    [((1,), 1), ((4,), 1), ((1,), 7), ((2, 3), 33), ((5,), 4097), ((2,), 50_257), ((1,), 262_144), ((0,), 11),
     ((2, 0), 5)],
    ids=lambda value: str(value),
)
def test_awkward_sizes(backend, shape, vocab):
    n = 1
    for size in shape:
        n *= size
    if not _triton_size_ok(backend, n * vocab):
        pytest.skip("large sizes are too slow for the Triton interpreter")
    logits, targets = _inputs(shape, vocab, torch.float32, seed=vocab, ignore_frac=0.0)
    _check(logits, targets, backend, 1.0, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_slice_is_read_in_place(backend, dtype):
    """The [:, :-1] slice of [B, T+1, V] logits is not contiguous: it must work (and not be copied)."""
    logits, _ = _inputs((3, 6), 301, dtype, seed=3)
    targets = torch.randint(0, 301, (3, 5)).to(DEVICE)
    targets[0, 1] = -100
    view = logits[:, :-1]
    assert not view.is_contiguous()
    merged = rows_view(view)
    assert merged.data_ptr() == view.data_ptr() and merged.shape == (3, 5, 301)
    _check(logits, targets, backend, 0.7, True, slice_last=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_strides(backend):
    """A transposed vocabulary axis and a batch-first slice of a [T, B, V] tensor."""
    base = torch.randn(7, 4, 64, dtype=torch.float64).float().to(DEVICE)
    targets = torch.randint(0, 64, (4, 7)).to(DEVICE)
    view = base.transpose(0, 1)  # [4, 7, 64] with strides (64, 256, 1)
    _check(view.contiguous(), targets, backend, 1.0, True)  # values of the contiguous copy
    out = ops.token_logprobs(view, targets, backend=backend)
    ref, _ = reference.token_logprobs(view.double(), targets)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    vocab_strided = torch.randn(40, 3, dtype=torch.float32).to(DEVICE).t()  # [3, 40], vocab stride 3
    t = torch.tensor([0, 39, 5]).to(DEVICE)
    lp, ent = ops.token_logprobs(vocab_strided, t, with_entropy=True, backend=backend)
    ref_lp, ref_ent = reference.token_logprobs(vocab_strided.double(), t, with_entropy=True)
    torch.testing.assert_close(lp.double(), ref_lp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_values(backend):
    """All-very-negative rows, -inf entries, huge logits: finite, exact results."""
    vocab = 300
    logits = torch.randn(6, vocab, dtype=torch.float64) * 2
    logits[0] -= 1e4  # every logit very negative
    logits[1, ::3] = float("-inf")  # -inf entries (p = 0)
    logits[2] += 1e4  # very large
    logits[3, 5] = 80.0  # one dominant logit: p ~ 1, entropy ~ 0
    logits[4, :-1] = float("-inf")  # a single finite entry: logp 0, entropy 0
    logits[5] *= 1e3  # spread out: many underflowing exp terms
    targets = torch.tensor([3, 4, 100, 5, vocab - 1, 17])
    logits, targets = logits.float().to(DEVICE), targets.to(DEVICE)
    logp, entropy = ops.token_logprobs(logits, targets, with_entropy=True, backend=backend)
    ref_logp, ref_entropy = reference.token_logprobs(logits.double(), targets, with_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    torch.testing.assert_close(logp.double(), ref_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=2e-5, rtol=1e-5)
    assert (logp <= 0).all(), "log-probabilities are never positive"
    # a target with a -inf logit has probability 0
    minus_inf_target = torch.tensor([3]).to(DEVICE)
    lp = ops.token_logprobs(logits[1:2], minus_inf_target, backend=backend)
    assert lp.item() == float("-inf")
    leaf = logits.clone().requires_grad_(True)
    lp, ent = ops.token_logprobs(leaf, targets, with_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_gradient(backend):
    """Gradient flows when only the entropy is used (logp unused)."""
    logits, targets = _inputs((4,), 50, torch.float32, seed=11, ignore_frac=0.0)
    leaf = logits.clone().requires_grad_(True)
    _, entropy = ops.token_logprobs(leaf, targets, with_entropy=True, backend=backend)
    entropy.sum().backward()
    ref_leaf = logits.double().requires_grad_(True)
    _, ref_entropy = reference.token_logprobs(ref_leaf, targets, with_entropy=True)
    ref_entropy.sum().backward()
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, atol=1e-6, rtol=1e-5)


def test_backends_agree_with_each_other():
    logits, targets = _inputs((4, 9), 513, torch.bfloat16, seed=5)
    results = [ops.token_logprobs(logits, targets, temperature=1.3, backend=b) for b in BACKENDS]
    for result in results[1:]:
        torch.testing.assert_close(result, results[0], atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_targets_raise(backend):
    logits = torch.randn(3, 10).to(DEVICE)
    # CUDA tensors are checked on the device, without a host sync: the synchronous mode raises at the call.
    with _device_checks.sync_checks(), pytest.raises(IndexError, match="outside \\[0, 10\\)"):
        ops.token_logprobs(logits, torch.tensor([0, 10, 1]).to(DEVICE), backend=backend)
    with _device_checks.sync_checks(), pytest.raises(IndexError, match="-5"):
        ops.token_logprobs(logits, torch.tensor([0, -5, 1]).to(DEVICE), backend=backend)


def test_bad_arguments_raise():
    logits = torch.randn(3, 10)
    targets = torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        ops.token_logprobs(logits.long(), targets)
    with pytest.raises(TypeError, match="int64"):
        ops.token_logprobs(logits, targets.float())
    with pytest.raises(ValueError, match="targets shape"):
        ops.token_logprobs(logits, targets[:2])
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            ops.token_logprobs(logits, targets, temperature=bad)
    with pytest.raises(TypeError, match="temperature"):
        ops.token_logprobs(logits, targets, temperature=torch.tensor(1.0))
    with pytest.raises(ValueError, match="V >= 1"):
        ops.token_logprobs(torch.randn(3, 0), targets)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.token_logprobs(logits, targets, backend="fastest")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device|cuda"):
            ops.token_logprobs(logits.cuda(), targets)


def test_unavailable_backend_raises_instead_of_falling_back(monkeypatch):
    if DEVICE.type != "cpu":
        pytest.skip("CPU-only check")
    with pytest.raises(RuntimeError, match="cuda"):
        ops.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), backend="cuda")
    monkeypatch.setenv("GTALIGN_FAST_BACKEND_TOKEN_LOGPROBS", "cuda")
    with pytest.raises(RuntimeError, match="from environment"):
        ops.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]))


def test_environment_override(monkeypatch):
    monkeypatch.setenv("GTALIGN_FAST_BACKEND", "reference")
    ops.token_logprobs(torch.randn(2, 5).to(DEVICE), torch.tensor([0, 1]).to(DEVICE))
    assert ops.last_backend("token_logprobs") == "reference"


def test_too_many_strided_dims_raise():
    base = torch.randn(3, 4, 5, 9)
    view = base[:, :-1, :-1]  # three leading dims that cannot merge
    with pytest.raises(ValueError, match="cannot be merged"):
        ops.token_logprobs(view, torch.zeros(view.shape[:-1], dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_torch_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()

    def loss_fn(logits, targets):
        logp, entropy = ops.token_logprobs(logits[:, :-1], targets, temperature=0.7, with_entropy=True)
        return -(logp.sum() + 0.01 * entropy.sum())

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    logits = torch.randn(2, 6, 40, requires_grad=True)
    targets = torch.randint(0, 40, (2, 5))
    loss = compiled(logits, targets)
    loss.backward()
    expected_grad = logits.grad.clone()
    logits.grad = None
    loss_fn(logits, targets).backward()
    torch.testing.assert_close(loss, loss_fn(logits, targets))
    torch.testing.assert_close(expected_grad, logits.grad)
    explanation = torch._dynamo.explain(loss_fn)(logits, targets)
    assert explanation.graph_break_count == 0
