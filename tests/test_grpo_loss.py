"""grpo_loss: every backend against the float64 reference, loss, metrics and gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gtalign_fast import ops, reference

from .conftest import DEVICE, kernel_backends

BACKENDS = kernel_backends() + ["reference"]
LOSS_TYPES = reference.GRPO_LOSS_TYPES
LEVELS = ("token", "sequence")
# Clip settings: plain PPO clip; clip-higher with TRL's two-sided delta; verl's dual clip.
CLIPS = {
    "clip": dict(epsilon_low=0.2),
    "clip_higher_delta": dict(epsilon_low=0.2, epsilon_high=0.28, delta=1.25),
    "dual_clip": dict(epsilon_low=0.2, epsilon_high=0.3, dual_clip=3.0),
}
BETAS = (0.0, 0.04)

# float32 kernels against the float64 reference (Liger's fp32 bar is atol 2e-5, rtol 1e-3; ours is tighter).
LOSS_TOL = dict(atol=1e-6, rtol=1e-5)
GRAD_TOL = dict(atol=1e-7, rtol=1e-5)
METRIC_TOL = dict(atol=1e-6, rtol=1e-5)


def _interpreted_triton(backend: str) -> bool:
    return backend == "triton" and DEVICE.type == "cpu"


def _inputs(batch, length, seed, *, adv_2d=False, dtype=torch.float32, spread=0.35, empty_row=True):
    """Random [B, T] log-probs whose ratios straddle both clip bounds, ragged masks with an
    empty row, mixed-sign advantages (a few exactly 0)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    logp = -2.0 * torch.rand(batch, length, generator=generator, dtype=torch.float64) - 0.05
    old = logp - spread * randn(batch, length)
    ref = logp + 0.5 * randn(batch, length)
    advantages = randn(batch, length) if adv_2d else randn(batch)
    advantages.view(-1)[-1] = 0.0  # A = 0: the two surrogates tie
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    mask &= torch.rand(batch, length, generator=generator) > 0.1  # holes (tool tokens, padding)
    if empty_row and batch > 1:
        mask[1] = False
    to = dict(device=DEVICE)
    return (logp.to(dtype).to(**to), old.to(dtype).to(**to), ref.to(dtype).to(**to),
            advantages.to(**to).float(), mask.to(**to))


def _reference(logp, old, advantages, mask, ref, want_ref_grad, **kwargs):
    """float64 reference loss, metrics and gradients (w.r.t. logp and, if asked, ref_logp)."""
    leaf = logp.detach().double().requires_grad_(True)
    ref_leaf = None if ref is None else ref.detach().double().requires_grad_(want_ref_grad)
    old64 = None if old is None else old.double()
    loss, metrics = reference.grpo_loss(leaf, old64, advantages.double(), mask, ref_leaf, **kwargs)
    inputs = [leaf] + ([ref_leaf] if want_ref_grad else [])
    grads = torch.autograd.grad(loss, inputs)
    return loss, metrics, grads[0], (grads[1] if want_ref_grad else None)


def _check(backend, logp, old, advantages, mask, ref=None, *, ref_grad=False, grad_tol=GRAD_TOL, **kwargs):
    leaf = logp.detach().clone().requires_grad_(True)
    ref_leaf = None if ref is None else ref.detach().clone().requires_grad_(ref_grad)
    loss, metrics = ops.grpo_loss(leaf, old, advantages, mask, ref_logp=ref_leaf, backend=backend, **kwargs)
    assert ops.last_backend("grpo_loss") == backend
    assert loss.dtype == torch.float32 and loss.shape == ()
    inputs = [leaf] + ([ref_leaf] if ref_grad else [])
    grads = torch.autograd.grad(loss, inputs)

    ref_loss, ref_metrics, ref_dlogp, ref_dref = _reference(logp, old, advantages, mask, ref, ref_grad, **kwargs)
    torch.testing.assert_close(loss.double(), ref_loss, **LOSS_TOL)
    assert set(metrics) == set(ref_metrics)
    for name, value in metrics.items():
        assert value.dtype == torch.float32 and value.shape == () and not value.requires_grad
        torch.testing.assert_close(value.double(), ref_metrics[name], **METRIC_TOL, msg=name)
    assert grads[0].dtype == logp.dtype and grads[0].shape == logp.shape
    torch.testing.assert_close(grads[0].double(), ref_dlogp, **grad_tol)
    assert (grads[0][mask == 0] == 0).all(), "masked tokens must get exactly zero gradient"
    if ref_grad:
        torch.testing.assert_close(grads[1].double(), ref_dref, **grad_tol)
    return loss, metrics, grads


def _configurations(backend):
    """Every loss type x level x clip setting x beta x advantage shape. The Triton interpreter is
    slow on CPU: there each (loss type, level, clip) gets one (beta, advantage shape) pair, rotated
    so that every pair still meets every loss type and clip setting."""
    for index, (loss_type, level, clip) in enumerate(itertools.product(LOSS_TYPES, LEVELS, CLIPS)):
        if loss_type in ("sapo", "cispo", "vespo") and clip != "clip":
            continue  # SAPO, CISPO and VESPO replace the clip: no delta, no dual clip
        pairs = list(itertools.product(BETAS, (False, True)))
        if _interpreted_triton(backend):
            pairs = [pairs[(index + index // len(CLIPS)) % len(pairs)]]
        for beta, adv_2d in pairs:
            yield loss_type, level, clip, beta, adv_2d


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_every_configuration(backend):
    for seed, (loss_type, level, clip, beta, adv_2d) in enumerate(_configurations(backend)):
        logp, old, ref, advantages, mask = _inputs(5, 23, seed, adv_2d=adv_2d)
        kwargs = dict(CLIPS[clip], beta=beta, loss_type=loss_type, importance_sampling_level=level)
        try:
            _check(backend, logp, old, advantages, mask, ref, ref_grad=beta > 0, **kwargs)
        except AssertionError as error:
            raise AssertionError(f"{backend} {loss_type} {level} {clip} beta={beta} adv_2d={adv_2d}: {error}") from None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (7, 3), (3, 1500)], ids=str)
def test_awkward_sizes(backend, shape):
    # (3, 1500) walks several blocks of tokens per row.
    for level in LEVELS:
        logp, old, ref, advantages, mask = _inputs(*shape, seed=sum(shape), empty_row=shape[0] > 2)
        _check(backend, logp, old, advantages, mask, ref, ref_grad=True, beta=0.04, loss_type="grpo",
               importance_sampling_level=level, epsilon_high=0.28)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_input_dtypes(backend, dtype):
    # Math in float32 whatever the input dtype; the gradient comes back in the input's dtype.
    logp, old, ref, advantages, mask = _inputs(4, 19, seed=3, dtype=dtype)
    tol = GRAD_TOL if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-2)  # one rounding of the output
    for level in LEVELS:
        _check(backend, logp, old, advantages, mask, ref, ref_grad=True, grad_tol=tol, beta=0.04,
               loss_type="bnpo", importance_sampling_level=level)


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_loss_is_kl_but_gradient_is_not_zero(backend):
    # On-policy GRPO with group-normalised advantages: the surrogate is -mean(A) = 0, so the loss
    # equals beta * KL, yet the policy gradient is -A / n per token and must not vanish.
    batch, length, group, beta = 8, 17, 4, 0.04
    logp, _, ref, _, mask = _inputs(batch, length, seed=11, empty_row=False)
    rewards = torch.randn(batch // group, group, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / rewards.std(1, keepdim=True)).reshape(-1)
    advantages = advantages.float().to(DEVICE)
    for level in LEVELS:
        loss, metrics, grads = _check(backend, logp, None, advantages, mask, ref, beta=beta, loss_type="grpo",
                                      importance_sampling_level=level)
        weight = mask.double()
        kl = metrics["kl"]  # masked token mean of k3; the loss uses the per-sequence mean
        d = ref.double() - logp.double()
        per_token_kl = torch.exp(d) - d - 1
        expected = beta * ((per_token_kl * weight).sum(1) / weight.sum(1)).mean()
        torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-5)
        assert kl > 0
        assert metrics["ratio_mean"] == 1.0 and metrics["clip_ratio/region_mean"] == 0.0
        assert grads[0].abs().max() > 1e-3, "on-policy gradient vanished"


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamps_extreme_log_ratios_and_kl(backend):
    # Log-ratios beyond +-20 are clamped before exp, k3 beyond kl_clamp is clamped: no inf, no nan,
    # zero gradient through the clamps, exactly as autograd through torch.clamp.
    logp, old, ref, advantages, mask = _inputs(3, 8, seed=21, empty_row=False)
    old[0, :4] = logp[0, :4] - torch.tensor([25.0, -30.0, 19.5, -19.5], device=DEVICE)
    ref[1, :4] = logp[1, :4] + torch.tensor([5.0, -25.0, 30.0, -5.0], device=DEVICE)
    for level, dual_clip, kl_clamp in itertools.product(LEVELS, (None, 3.0), (None, 10.0)):
        loss, _, grads = _check(backend, logp, old, advantages, mask, ref, ref_grad=True, beta=0.1,
                                loss_type="dr_grpo", importance_sampling_level=level, dual_clip=dual_clip,
                                kl_clamp=kl_clamp)
        assert torch.isfinite(loss) and torch.isfinite(grads[0]).all() and torch.isfinite(grads[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_mask_dtypes(backend):
    # Read in place: logp as the [:, :-1] slice, advantages as a transposed float64 view, masks
    # of several dtypes (nonzero = counted).
    logp, old, ref, _, mask = _inputs(4, 12, seed=8)
    wide = torch.cat([logp, torch.zeros(4, 1, device=DEVICE)], dim=1)
    strided_logp = wide[:, :-1]
    advantages = torch.randn(12, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE).t()
    for mask_dtype in (torch.bool, torch.uint8, torch.int64, torch.float32):
        typed_mask = mask.to(mask_dtype) * (3 if mask_dtype == torch.int64 else 1)
        _check(backend, strided_logp, old, advantages, typed_mask, ref, ref_grad=True, beta=0.04,
               loss_type="seq-mean-token-sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_gives_zero_loss_not_nan(backend):
    logp, old, ref, advantages, mask = _inputs(3, 6, seed=4)
    empty = torch.zeros_like(mask)
    for loss_type, level in itertools.product(LOSS_TYPES, LEVELS):
        leaf = logp.clone().requires_grad_(True)
        loss, metrics = ops.grpo_loss(leaf, old, advantages, empty, ref_logp=ref, beta=0.04, loss_type=loss_type,
                                      importance_sampling_level=level, backend=backend)
        (grad,) = torch.autograd.grad(loss, leaf)
        assert loss.item() == 0.0 and (grad == 0).all()
        assert all(math.isfinite(value.item()) for value in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalisers(backend):
    # dapo with a global token count (number, or a device tensor read without a host sync);
    # dr_grpo / seq-mean-token-sum-norm with max_completion_length.
    logp, old, ref, advantages, mask = _inputs(4, 10, seed=9)
    for num_items in (57, 57.0, torch.tensor(57, device=DEVICE), torch.tensor([57.0], device=DEVICE)):
        _check(backend, logp, old, advantages, mask, ref, loss_type="dapo", num_items_in_batch=num_items)
    for loss_type in ("dr_grpo", "seq-mean-token-sum-norm"):
        _check(backend, logp, old, advantages, mask, ref, loss_type=loss_type, max_completion_length=32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_only_where_asked(backend):
    logp, old, ref, advantages, mask = _inputs(3, 7, seed=12)
    leaf = logp.clone().requires_grad_(True)
    old_leaf, ref_leaf = old.clone().requires_grad_(True), ref.clone()
    adv_leaf = advantages.clone().requires_grad_(True)
    loss, _ = ops.grpo_loss(leaf, old_leaf, adv_leaf, mask, ref_logp=ref_leaf, beta=0.04, backend=backend)
    loss.backward()
    assert leaf.grad is not None and old_leaf.grad is None and adv_leaf.grad is None and ref_leaf.grad is None


def test_end_to_end_gradient_wrt_logits():
    # grpo_loss(token_logprobs(logits / T)) against the float64 reference chain, per backend.
    batch, length, vocab, temperature = 3, 9, 11, 0.7
    generator = torch.Generator().manual_seed(17)
    logits = (torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64) * 2).to(DEVICE)
    targets = torch.randint(0, vocab, (batch, length), generator=generator).to(DEVICE)
    _, _, _, advantages, mask = _inputs(batch, length, seed=17)
    with torch.no_grad():
        base = reference.token_logprobs(logits, targets, temperature)[0]
        old = (base - 0.3 * torch.randn(base.shape, generator=generator, dtype=torch.float64).to(DEVICE)).float()
        ref = (base + 0.3 * torch.randn(base.shape, generator=generator, dtype=torch.float64).to(DEVICE)).float()
    kwargs = dict(beta=0.04, epsilon_high=0.28, loss_type="grpo")

    ref_logits = logits.clone().requires_grad_(True)
    ref_logp = reference.token_logprobs(ref_logits, targets, temperature)[0]
    ref_loss, _ = reference.grpo_loss(ref_logp, old.double(), advantages.double(), mask, ref.double(), **kwargs)
    (expected,) = torch.autograd.grad(ref_loss, ref_logits)
    for backend in BACKENDS:
        leaf = logits.float().requires_grad_(True)
        logp = ops.token_logprobs(leaf, targets, temperature=temperature, backend=backend)
        loss, _ = ops.grpo_loss(logp, old, advantages, mask, ref_logp=ref, backend=backend, **kwargs)
        (grad,) = torch.autograd.grad(loss, leaf)
        torch.testing.assert_close(loss.double(), ref_loss, **LOSS_TOL, msg=backend)
        torch.testing.assert_close(grad.double(), expected, **GRAD_TOL, msg=backend)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    backend = kernel_backends()[0] if kernel_backends() else "reference"
    logp, old, ref, advantages, mask = _inputs(4, 9, seed=30)

    def step(x, ref_x):
        loss, metrics = ops.grpo_loss(x, old, advantages, mask, ref_logp=ref_x, beta=0.04, epsilon_high=0.28,
                                      importance_sampling_level="sequence", loss_type="dapo", backend=backend)
        return loss, metrics["clip_ratio/region_mean"], metrics["kl"]

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    results = []
    for fn in (step, compiled):
        x, ref_x = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
        loss, region, kl = fn(x, ref_x)
        loss.backward()
        results.append((loss, region, kl, x.grad, ref_x.grad))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


def test_custom_op_registration():
    # Schema, fake kernel and autograd registration agree with the real kernels.
    from gtalign_fast.ops import _grpo_loss

    logp, old, ref, advantages, mask = _inputs(3, 5, seed=31)
    backend = kernel_backends()[0] if kernel_backends() else "reference"
    for kl_clamp, bias_kl, loss_type in ((None, False, "grpo"), (10.0, True, "grpo"), (None, True, "vespo")):
        clips = (None, None) if loss_type == "vespo" else (1.5, 3.0)
        is_ratio = torch.rand(mask.shape, device=DEVICE) if loss_type == "vespo" else None
        args = (logp.detach().requires_grad_(True), old, ref, advantages, mask, None, is_ratio, 0.04, 0.2, 0.28,
                *clips, loss_type, False, 5, None, kl_clamp, bias_kl, 1.0, 1.05, 2.0, 3.0, 3.0, 2.0, backend)
        torch.library.opcheck(_grpo_loss.FORWARD.custom_op, args, test_utils=("test_schema", "test_faketensor",
                                                                         "test_autograd_registration"))


BAD_INPUTS = [
    (dict(logp=[[0.0]]), TypeError, "logp must be a tensor"),
    (dict(logp=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "logp must be float"),
    (dict(logp=torch.zeros(6)), ValueError, r"logp must be \[B, T\]"),
    (dict(logp=torch.zeros(0, 3)), ValueError, "B >= 1"),
    (dict(old_logp=torch.zeros(2, 4)), ValueError, "old_logp must have shape"),
    (dict(old_logp=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "old_logp must have logp's dtype"),
    (dict(advantages=torch.zeros(3)), ValueError, "advantages must have shape"),
    (dict(advantages=torch.zeros(2, dtype=torch.int64)), TypeError, "advantages must be one of"),
    (dict(mask=torch.ones(3, 2)), ValueError, "mask must have shape"),
    (dict(loss_type="ppo"), ValueError, "unknown loss_type"),
    (dict(importance_sampling_level="token-seq"), ValueError, "importance_sampling_level"),
    (dict(beta=0.04), ValueError, "needs ref_logp"),
    (dict(beta=-1.0, ref_logp=torch.zeros(2, 3)), ValueError, "beta must be"),
    (dict(epsilon_low=float("nan")), ValueError, "epsilon_low must be finite"),
    (dict(epsilon_high="0.2"), TypeError, "epsilon_high must be a Python float"),
    (dict(delta=0.0), ValueError, "delta must be"),
    (dict(dual_clip=1.0), ValueError, "dual_clip must be"),
    (dict(max_completion_length=0), ValueError, "max_completion_length must be"),
    (dict(max_completion_length=2.5), TypeError, "max_completion_length must be an int"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch must hold one number"),
    (dict(ref_logp=torch.zeros(2, 3, dtype=torch.float16)), TypeError, "ref_logp must have logp's dtype"),
    (dict(backend="tpu"), ValueError, "unknown backend"),
]


@pytest.mark.parametrize("override,error,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_raises(override, error, match):
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.zeros(2), mask=torch.ones(2, 3))
    kwargs = {}
    for key, value in override.items():
        if key in args:
            args[key] = value.to(DEVICE) if isinstance(value, torch.Tensor) else value
        else:
            kwargs[key] = value.to(DEVICE) if isinstance(value, torch.Tensor) else value
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(error, match=match):
        ops.grpo_loss(args["logp"], args["old_logp"], args["advantages"], args["mask"], **kwargs)


def test_matches_trl_when_installed():
    # TRL's own GRPOTrainer._compute_loss on the same tensors, for its loss types (1e-5, float32).
    pytest.importorskip("trl.trainer.grpo_trainer")
    from gtalign_fast.testing import trl_grpo_loss

    logp, old, ref, advantages, mask = _inputs(4, 11, seed=40, empty_row=False)
    ref = ref + 2.0 * (torch.arange(11, device=DEVICE) % 3 == 0)  # some k3 above 10: not clamped, as TRL
    for loss_type, level, bias_kl in itertools.product(
            ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo", "cispo", "vespo"), LEVELS, (False, True)):
        leaf = logp.clone().requires_grad_(True)
        trl_loss = trl_grpo_loss(leaf, old, advantages, mask, ref_logp=ref, beta=0.04, epsilon_high=0.28,
                                 loss_type=loss_type, importance_sampling_level=level, use_bias_correction_kl=bias_kl)
        (trl_grad,) = torch.autograd.grad(trl_loss, leaf)
        ours = logp.clone().requires_grad_(True)
        loss, _ = ops.grpo_loss(ours, old, advantages, mask, ref_logp=ref, beta=0.04, epsilon_high=0.28,
                                loss_type=loss_type, importance_sampling_level=level, num_items_in_batch=mask.sum(),
                                use_bias_correction_kl=bias_kl)
        (grad,) = torch.autograd.grad(loss, ours)
        torch.testing.assert_close(loss, trl_loss.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, trl_grad.float(), atol=1e-5, rtol=1e-5)
    # CISPO with a cap some ratios exceed and some do not (above, 0.28 caps every ratio).
    for level, bias_kl, on_policy in itertools.product(LEVELS, (False, True), (False, True)):
        sampled = None if on_policy else old
        leaf = logp.clone().requires_grad_(True)
        trl_loss = trl_grpo_loss(leaf, sampled, advantages, mask, ref_logp=ref, beta=0.04, epsilon_high=1.05,
                                 loss_type="cispo", importance_sampling_level=level, num_items_in_batch=mask.sum(),
                                 use_bias_correction_kl=bias_kl)
        (trl_grad,) = torch.autograd.grad(trl_loss, leaf)
        ours = logp.clone().requires_grad_(True)
        loss, _ = ops.grpo_loss(ours, sampled, advantages, mask, ref_logp=ref, beta=0.04, epsilon_high=1.05,
                                loss_type="cispo", importance_sampling_level=level, num_items_in_batch=mask.sum(),
                                use_bias_correction_kl=bias_kl)
        (grad,) = torch.autograd.grad(loss, ours)
        torch.testing.assert_close(loss, trl_loss.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, trl_grad.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends() + ["reference"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_eager_path_equals_custom_op(backend, level):
    """Plain eager calls skip the custom op (an autograd.Function over the same forward and
    backward); through the op (as torch.compile and export take it) the results are the same bits."""
    from gtalign_fast.ops import _op

    logp, old, ref, advantages, mask = _inputs(5, 37, seed=32)
    options = dict(ref_logp=None, beta=0.04, epsilon_high=0.28, importance_sampling_level=level, loss_type="dapo",
                   backend=backend)
    results = []
    for through_op in (False, True):
        original = _op.plain_eager
        if through_op:
            _op.plain_eager = lambda *tensors: False
        try:
            x, ref_x = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
            loss, metrics = ops.grpo_loss(x, old, advantages, mask, **{**options, "ref_logp": ref_x})
            loss.backward()
        finally:
            _op.plain_eager = original
        results.append((loss, *metrics.values(), x.grad, ref_x.grad))
    subclass = type("Subclass", (torch.Tensor,), {})
    assert _op.plain_eager(logp, None) and not _op.plain_eager(logp.as_subclass(subclass))
    for eager, through_op in zip(*results):
        assert torch.equal(eager, through_op)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="counts CUDA kernel launches")
@pytest.mark.parametrize("backend", [b for b in kernel_backends() if b in ("triton", "cuda")])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_one_launch_per_direction_on_cuda(backend, loss_type):
    """Forward and backward are one kernel launch each (the forward's last program reduces the
    rows), besides nothing: no cast, no reduction, no host read. A bool mask, float32 inputs."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    from gtalign_fast.ops import _backend

    generator = torch.Generator(device=DEVICE).manual_seed(3)
    logp = torch.randn(16, 1024, device=DEVICE, generator=generator).requires_grad_(True)
    old = logp.detach() + 0.05
    advantages = torch.randn(16, device=DEVICE, generator=generator)
    mask = torch.rand(16, 1024, device=DEVICE, generator=generator) > 0.2
    num_items = torch.tensor(9000.0, device=DEVICE) if loss_type == "dapo" else None
    for timed in (False, True):
        torch.cuda.synchronize()
        with _backend.poison_outputs(False), profile(activities=[ProfilerActivity.CUDA]) as trace:
            loss, _ = ops.grpo_loss(logp, old, advantages, mask, loss_type=loss_type, num_items_in_batch=num_items,
                                    backend=backend)
            (dlogp,) = torch.autograd.grad(loss, logp)
            torch.cuda.synchronize()
    kernels = [event.name for event in trace.events()
               if event.device_type == DeviceType.CUDA and not event.name.startswith(("Memcpy", "Memset"))]
    # autograd seeds the backward with a ones_like(loss) fill: not the op's
    ours = [name for name in kernels if "grpo" in name]
    assert len(ours) == 2, "\n".join(kernels)
    assert len(kernels) - len(ours) <= 1, "\n".join(kernels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
def test_batch_size_one(backend, level):
    for loss_type, adv_2d in (("grpo", False), ("dapo", True), ("bnpo", False)):
        logp, old, ref, advantages, mask = _inputs(1, 6, seed=17, adv_2d=adv_2d)
        advantages = torch.full_like(advantages, 0.8)
        _check(backend, logp, old, advantages, mask, ref, ref_grad=True, beta=0.04, loss_type=loss_type,
               importance_sampling_level=level)


def trl_k3(logp, ref):
    """TRL's per-token KL (GRPOTrainer._compute_loss): unclamped k3, float64."""
    d = ref.double() - logp.double()
    return torch.exp(d) - d - 1


def verl_low_var_kl(logp, ref):
    """verl's kl_penalty(..., "low_var_kl") (core_algos.py): log-ratio to [-20, 20], k3 to [-10, 10]."""
    d = torch.clamp(ref.double() - logp.double(), -20, 20)
    return torch.clamp(torch.exp(d) - d - 1, -10, 10)


def kl_inputs(batch, length, seed):
    """Inputs where many tokens' k3 exceeds 10 (ref - logp up to about 5: k3 up to about 140)."""
    logp, old, ref, advantages, mask = _inputs(batch, length, seed, empty_row=False)
    generator = torch.Generator().manual_seed(seed + 1)
    shift = 5.0 * torch.rand(batch, length, generator=generator, dtype=torch.float64) - 0.5
    ref = (logp.double().cpu() + shift).to(logp)
    return logp, old, ref, advantages, mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_above_ten_is_trl_by_default_and_verl_with_kl_clamp(backend):
    # Issue 22.2: the k3 term was clamped at 10 (verl's low_var_kl) while TRL's is not. Default:
    # TRL's value and gradient; kl_clamp=10: verl's, with no KL gradient where the clamp binds.
    logp, old, ref, advantages, mask = kl_inputs(4, 9, seed=31)
    weight = mask.double()
    assert (trl_k3(logp, ref)[mask] > 10).sum() >= 5
    for kl_clamp, formula in ((None, trl_k3), (10.0, verl_low_var_kl)):
        for level in LEVELS:
            loss, metrics, grads = _check(backend, logp, old, advantages, mask, ref, ref_grad=True, beta=0.04,
                                          loss_type="dapo", importance_sampling_level=level, kl_clamp=kl_clamp)
            expected_kl = (formula(logp, ref) * weight).sum() / weight.sum()
            torch.testing.assert_close(metrics["kl"].double(), expected_kl, atol=1e-6, rtol=1e-5)
            # Only the KL term depends on ref_logp: its gradient is beta * d formula / d ref / N.
            leaf = ref.detach().double().requires_grad_(True)
            (expected_dref,) = torch.autograd.grad((0.04 * formula(logp, leaf) * weight).sum() / weight.sum(), [leaf])
            torch.testing.assert_close(grads[1].double(), expected_dref, atol=1e-7, rtol=1e-5)
        if kl_clamp is not None:
            assert (grads[1][(trl_k3(logp, ref) > 10) & mask] == 0).all()


def test_kl_clamp_is_validated():
    logp, old, ref, advantages, mask = _inputs(2, 4, seed=0)
    for bad, error in ((0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError), ("10", TypeError)):
        with pytest.raises(error, match="kl_clamp"):
            ops.grpo_loss(logp, old, advantages, mask, ref_logp=ref, beta=0.1, kl_clamp=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_corrected_kl(backend):
    # TRL's use_bias_correction_kl (its default): k3 * r, with the gradient through r, on- and off-policy,
    # token and sequence level, with and without delta / the KL clamp, dref included.
    logp, old, ref, advantages, mask = kl_inputs(4, 9, seed=41)
    for index, (level, on_policy, clip, kl_clamp) in enumerate(
            itertools.product(LEVELS, (False, True), ("clip_higher_delta", "dual_clip"), (None, 10.0))):
        if _interpreted_triton(backend) and index % 2:
            continue
        _check(backend, logp, None if on_policy else old, advantages, mask, ref, ref_grad=True, beta=0.05,
               **CLIPS[clip], loss_type=("grpo", "dapo", "luspo")[index % 3], importance_sampling_level=level,
               kl_clamp=kl_clamp, use_bias_correction_kl=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sapo(backend):
    # TRL's SAPO objective: -sigmoid(tau (r - 1)) * 4 / tau * A, tau by the sign of A, aggregated as grpo.
    logp, old, ref, advantages, mask = _inputs(4, 9, seed=43)
    for index, (level, adv_2d, beta) in enumerate(itertools.product(LEVELS, (False, True), BETAS)):
        if _interpreted_triton(backend) and index % 2:
            continue
        adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(index)).to(DEVICE) if adv_2d \
            else advantages
        _check(backend, logp, old, adv, mask, ref if beta else None, loss_type="sapo", importance_sampling_level=level,
               beta=beta, sapo_temperature_pos=0.9, sapo_temperature_neg=1.3, use_bias_correction_kl=index % 3 == 0)


def _check_grid(backend, logp, old, ref, advantages, mask, **objective):
    """``objective`` at both levels, with [B] and [B, T] advantages, beta 0 and > 0, on- and off-policy,
    the normaliser as a number or not, with and without the KL's bias correction (half the grid under the
    Triton interpreter)."""
    for index, (level, adv_2d, beta, on_policy) in enumerate(
            itertools.product(LEVELS, (False, True), BETAS, (False, True))):
        if _interpreted_triton(backend) and index % 2:
            continue
        adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(index)).to(DEVICE) if adv_2d \
            else advantages
        _check(backend, logp, None if on_policy else old, adv, mask, ref if beta else None, ref_grad=beta > 0,
               importance_sampling_level=level, beta=beta, num_items_in_batch=30.0 if index % 3 == 0 else None,
               use_bias_correction_kl=index % 3 == 1, **objective)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cispo(backend):
    # TRL's CISPO objective: -sg(min(r, epsilon_high)) * A * logp, aggregated as dapo; a cap of 1.1 that
    # some ratios exceed (the gradient is then -1.1 A) and some do not (-r A), on- and off-policy.
    logp, old, ref, advantages, mask = _inputs(4, 9, seed=44)
    assert ((old - logp).exp() > 1.1).any() and ((logp - old).exp() < 1.1).any()
    _check_grid(backend, logp, old, ref, advantages, mask, loss_type="cispo", epsilon_high=1.1)


def test_cispo_reports_trls_clip_ratio():
    # clip_ratio/high_mean is TRL's cispo_clip_ratio: r > epsilon_high (not 1 + epsilon_high) where A > 0.
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]], device=DEVICE))
    old = logp - torch.log(torch.tensor([[1.5, 2.5, 3.0, 0.5]], device=DEVICE))  # r = 1.5, 2.5, 3.0, 0.5
    mask = torch.ones(1, 4, dtype=torch.bool, device=DEVICE)
    _, metrics = ops.grpo_loss(logp, old, torch.ones(1, device=DEVICE), mask, loss_type="cispo", epsilon_high=2.0)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vespo(backend):
    # TRL's VESPO objective: -sg(phi) * A * logp, phi = exp(lambda + k log w - lambda w) of the sequence weight
    # w (the masked sum of clamped log-ratios, its log clamped to [ln 1e-8, 20]), aggregated as dapo; with
    # per-sequence and per-token advantages (phi per token then), on- and off-policy, one row past each clamp.
    logp, old, ref, advantages, mask = _inputs(4, 9, seed=45)
    old = old.clone()
    old[0] = logp[0] - 15.0  # log-ratios 15: their sum past 20 from 2 tokens (log w clamped to 20, phi = 0)
    old[2] = logp[2] + 25.0  # each log-ratio clamped to -20, their sum to ln 1e-8
    assert mask[0].sum() >= 2 and mask[2].any()
    _check_grid(backend, logp, old, ref, advantages, mask, loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5)


def test_vespo_metric_is_trls_phi_seq_mean():
    # vespo/phi_seq_mean: with [B] advantages the mean of phi over the B sequences (empty rows included:
    # w = 1, phi = 1), as TRL's global_masked_mean of a [B, 1] tensor; no clip ratio is reported.
    logp = torch.zeros(3, 2, device=DEVICE)
    old = torch.tensor([[-0.5, 0.0], [0.0, 0.0], [0.0, 0.0]], device=DEVICE)  # w = e^0.5, 1, 1 (row 2 empty)
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]], dtype=torch.bool, device=DEVICE)
    adv = torch.tensor([1.0, -1.0, 1.0], device=DEVICE)
    _, metrics = ops.grpo_loss(logp, old, adv, mask, loss_type="vespo")
    w = math.exp(0.5)
    expected = (math.exp(3.0 + 2.0 * 0.5 - 3.0 * w) + 1.0 + 1.0) / 3
    assert set(metrics) == {"vespo/phi_seq_mean"}
    assert metrics["vespo/phi_seq_mean"].item() == pytest.approx(expected, rel=1e-6)


def test_vespo_refuses_the_clip_options_and_bad_parameters():
    logp, old, ref, advantages, mask = _inputs(2, 4, seed=0)
    for extra in (dict(delta=1.5), dict(dual_clip=3.0)):
        with pytest.raises(ValueError, match="vespo"):
            ops.grpo_loss(logp, old, advantages, mask, loss_type="vespo", **extra)
    for extra, match in ((dict(vespo_lambda_pos=0.0), "vespo_lambda_pos"), (dict(vespo_k_neg=-1.0), "vespo_k_neg")):
        with pytest.raises(ValueError, match=match):
            ops.grpo_loss(logp, old, advantages, mask, loss_type="vespo", **extra)


def _is_ratios(mask, seed):
    """TRL-like IS ratios: per token (1 where masked out, as TRL's, some 0 as its mask modes give, some capped
    at 3), per sequence as [B] and as TRL's [B, 1]."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.rand(mask.shape, generator=generator, dtype=torch.float64) * 3.5
    tokens[tokens < 0.3] = 0.0
    tokens = torch.where(mask.cpu(), tokens.clamp(max=3.0), 1.0).float().to(DEVICE)
    rows = (torch.rand(mask.shape[0], generator=generator) * 2.0).to(DEVICE)
    return {"token": tokens, "sequence": rows, "sequence_b1": rows.unsqueeze(1)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_importance_sampling_ratio(backend):
    # TRL's vLLM IS correction / verl's rollout IS weights: the policy term times the ratio (VESPO: its logs in
    # the sequence weight), per token or per sequence, against the reference with gradients.
    logp, old, ref, advantages, mask = _inputs(4, 9, seed=46)
    ratios = _is_ratios(mask, 46)
    cases = itertools.product(("grpo", "dapo", "sapo", "cispo", "vespo", "luspo"), LEVELS, tuple(ratios))
    for index, (loss_type, level, kind) in enumerate(cases):
        if _interpreted_triton(backend) and index % 3:
            continue
        clip = dict(dual_clip=3.0) if loss_type in ("grpo", "luspo") else {}
        _check(backend, logp, old, advantages, mask, ref, ref_grad=True, loss_type=loss_type,
               importance_sampling_level=level, beta=0.04, use_bias_correction_kl=index % 2 == 0,
               epsilon_high=1.1 if loss_type == "cispo" else 0.28, importance_sampling_ratio=ratios[kind], **clip)


def test_importance_sampling_ratio_leaves_the_clip_metrics():
    # TRL counts the clipped tokens before weighting: a ratio of 0 does not hide a clipped token (issue 22.3's
    # point about folding weights into the advantages).
    logp, old, ref, advantages, mask = _inputs(4, 9, seed=47)
    zeros = torch.zeros(mask.shape, device=DEVICE)
    _, plain = ops.grpo_loss(logp, old, advantages, mask, epsilon_high=0.28)
    loss, weighted = ops.grpo_loss(logp, old, advantages, mask, epsilon_high=0.28, importance_sampling_ratio=zeros)
    assert loss.item() == 0.0 and plain["clip_ratio/region_mean"] > 0
    for name in plain:
        torch.testing.assert_close(weighted[name], plain[name], rtol=0, atol=0)


def test_importance_sampling_ratio_matches_trl():
    # TRL's own _compute_loss with use_vllm and vllm_importance_sampling_correction (token and sequence modes).
    pytest.importorskip("trl.trainer.grpo_trainer")
    from gtalign_fast.testing import trl_grpo_loss

    logp, old, ref, advantages, mask = _inputs(4, 11, seed=48, empty_row=False)
    ratios = _is_ratios(mask, 48)
    for loss_type, level, kind in itertools.product(("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo", "cispo",
                                                     "vespo"), LEVELS, ("token", "sequence_b1")):
        kwargs = dict(ref_logp=ref, beta=0.04, epsilon_high=1.1 if loss_type == "cispo" else 0.28,
                      loss_type=loss_type, importance_sampling_level=level, use_bias_correction_kl=True,
                      importance_sampling_ratio=ratios[kind])
        leaf = logp.clone().requires_grad_(True)
        trl_loss = trl_grpo_loss(leaf, old, advantages, mask, **kwargs)
        (trl_grad,) = torch.autograd.grad(trl_loss, leaf)
        ours = logp.clone().requires_grad_(True)
        loss, _ = ops.grpo_loss(ours, old, advantages, mask, num_items_in_batch=mask.sum(), **kwargs)
        (grad,) = torch.autograd.grad(loss, ours)
        torch.testing.assert_close(loss, trl_loss.float(), atol=1e-5, rtol=1e-5, msg=f"{loss_type} {level} {kind}")
        torch.testing.assert_close(grad, trl_grad.float(), atol=1e-5, rtol=1e-5, msg=f"{loss_type} {level} {kind}")


def test_importance_sampling_ratio_refuses_bad_shapes():
    logp, old, ref, advantages, mask = _inputs(2, 4, seed=0)
    for bad in (torch.ones(3, device=DEVICE), torch.ones(2, 2, device=DEVICE), torch.ones(2, 4, dtype=torch.int64)):
        with pytest.raises((ValueError, TypeError), match="importance_sampling_ratio"):
            ops.grpo_loss(logp, old, advantages, mask, importance_sampling_ratio=bad.to(DEVICE))


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "vespo"])
def test_sequence_level_unclipped_objectives_follow_trl_not_liger(loss_type):
    # Liger-Kernel refuses importance_sampling_level="sequence" with cispo / sapo / vespo (ValueError, its
    # test_sequence_level_rejects_unsupported_loss_types); TRL 1.16 computes them (VESPO with a warning). The three
    # ops follow TRL: accepted, and equal to TRL's own _compute_loss on the same log-probs (a deliberate difference
    # from Liger, listed in the README).
    pytest.importorskip("trl.trainer.grpo_trainer")
    from gtalign_fast.testing import trl_grpo_loss

    generator = torch.Generator().manual_seed(49)
    batch, length, size, vocab = 3, 5, 8, 11
    hidden = torch.randn(batch, length, size, generator=generator).to(DEVICE)
    weight = torch.randn(vocab, size, generator=generator).to(DEVICE) / 3
    targets = torch.randint(0, vocab, (batch, length), generator=generator).to(DEVICE)
    mask = (torch.rand(batch, length, generator=generator) > 0.2).to(DEVICE)
    advantages = torch.randn(batch, generator=generator).to(DEVICE)
    logits = hidden @ weight.t()
    logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old = logp - 0.3 * torch.randn(batch, length, generator=generator).to(DEVICE)
    kwargs = dict(loss_type=loss_type, importance_sampling_level="sequence", epsilon_high=1.05)
    expected = trl_grpo_loss(torch.where(mask, logp, 0.0), old, advantages, mask, **kwargs)
    losses = {
        "grpo_loss": ops.grpo_loss(logp, old, advantages, mask, **kwargs)[0],
        "logits_grpo_loss": ops.logits_grpo_loss(logits, targets, advantages, mask, old_logp=old, **kwargs)[0],
        "linear_grpo_loss": ops.linear_grpo_loss(hidden, weight, targets, advantages, mask, old_logp=old,
                                                 chunk_size=4, **kwargs)[0],
    }
    for op, loss in losses.items():
        torch.testing.assert_close(loss, expected.float(), atol=1e-5, rtol=1e-5, msg=op)


def test_unknown_option_is_a_type_error_naming_the_op():
    logp, old, ref, advantages, mask = _inputs(2, 4, seed=0)
    with pytest.raises(TypeError, match=r"grpo_loss\(\) got an unexpected keyword argument 'epsilon'"):
        ops.grpo_loss(logp, old, advantages, mask, epsilon=0.2)


def test_cispo_refuses_the_clip_options():
    logp, old, ref, advantages, mask = _inputs(2, 4, seed=0)
    for extra in (dict(delta=1.5), dict(dual_clip=3.0)):
        with pytest.raises(ValueError, match="cispo"):
            ops.grpo_loss(logp, old, advantages, mask, loss_type="cispo", **extra)


def test_sapo_refuses_the_clip_options():
    logp, old, ref, advantages, mask = _inputs(2, 4, seed=0)
    for extra in (dict(delta=1.5), dict(dual_clip=3.0)):
        with pytest.raises(ValueError, match="sapo"):
            ops.grpo_loss(logp, old, advantages, mask, loss_type="sapo", **extra)
    with pytest.raises(ValueError, match="sapo_temperature_neg"):
        ops.grpo_loss(logp, old, advantages, mask, loss_type="sapo", sapo_temperature_neg=0.0)


def test_cached_scalar_options_keep_every_check():
    """The scalar options are checked once per distinct set of values: equal values of another type
    (True == 1 == 1.0) are a different set, a set that failed raises again, T stays in the key."""
    from gtalign_fast.ops import _grpo_objective

    logp, old, ref, advantages, mask = _inputs(2, 4, seed=0)
    ops.grpo_loss(logp, old, advantages, mask, use_bias_correction_kl=True, beta=1.0, ref_logp=ref)
    for _ in range(2):
        with pytest.raises(TypeError, match="use_bias_correction_kl must be a bool, got int"):
            ops.grpo_loss(logp, old, advantages, mask, use_bias_correction_kl=1, beta=1.0, ref_logp=ref)
        with pytest.raises(TypeError, match="beta must be a Python float, got bool"):
            ops.grpo_loss(logp, old, advantages, mask, use_bias_correction_kl=True, beta=True, ref_logp=ref)
        with pytest.raises(ValueError, match="beta > 0 needs ref_logp"):  # has_ref is part of the key
            ops.grpo_loss(logp, old, advantages, mask, use_bias_correction_kl=True, beta=1.0)
        with pytest.raises(TypeError, match="epsilon_low must be a Python float, got list"):  # unhashable
            ops.grpo_loss(logp, old, advantages, mask, epsilon_low=[0.2])
    # dr_grpo's default L is T: a longer call of the same options normalises by its own T.
    for length in (4, 6):
        logp, old, ref, advantages, mask = _inputs(2, length, seed=1)
        loss, _ = ops.grpo_loss(logp, old, advantages, mask, loss_type="dr_grpo", backend="reference")
        expected, _ = reference.grpo_loss(logp.double(), old.double(), advantages.double(), mask, loss_type="dr_grpo")
        torch.testing.assert_close(loss, expected.float(), **LOSS_TOL)
    resolved = _grpo_objective.scalar_options("grpo_loss", 6, False, {"loss_type": "dr_grpo"})
    assert resolved is _grpo_objective.scalar_options("grpo_loss", 6, False, {"loss_type": "dr_grpo"})
    assert resolved.max_completion_length == 6


def test_kernel_params_follow_the_param_order():
    """kernel_params puts each option where _grpo_constants.PARAM_* (C++ grpo::Param, which
    tests/test_constants.py checks against it) says the kernels read it."""
    from gtalign_fast.ops import _grpo_constants as c
    from gtalign_fast.ops._grpo_loss import kernel_params
    from gtalign_fast.ops._grpo_objective import GrpoLossOptions

    options = GrpoLossOptions(0.1, 0.2, 0.3, 1.5, 3.0, "sapo", True, 7, None, 4.0, True, 1.1, 1.2, 2.1, 3.1, 3.2, 2.2)
    expected = {
        c.PARAM_BETA: 0.1, c.PARAM_EPSILON_LOW: 0.2, c.PARAM_EPSILON_HIGH: 0.3, c.PARAM_DELTA: 1.5,
        c.PARAM_DUAL_CLIP: 3.0, c.PARAM_KL_CLAMP: 4.0, c.PARAM_BIAS_KL: 1.0, c.PARAM_SAPO_TAU_POS: 1.1,
        c.PARAM_SAPO_TAU_NEG: 1.2, c.PARAM_CISPO: 0.0, c.PARAM_VESPO_K_POS: 2.1, c.PARAM_VESPO_LAMBDA_POS: 3.1,
        c.PARAM_VESPO_K_NEG: 3.2, c.PARAM_VESPO_LAMBDA_NEG: 2.2, c.PARAM_VESPO: 0.0, c.PARAM_SEQ_LEVEL: 1.0,
    }
    params = kernel_params(options)
    assert len(params) == c.NUM_PARAMS and dict(enumerate(params)) == expected
    plain = kernel_params(GrpoLossOptions(0.0, 0.2, 0.2, None, None, "cispo", False, 7, None))
    assert (plain[c.PARAM_DELTA], plain[c.PARAM_DUAL_CLIP], plain[c.PARAM_KL_CLAMP]) == (math.inf, 0.0, math.inf)
    assert (plain[c.PARAM_SAPO_TAU_POS], plain[c.PARAM_CISPO], plain[c.PARAM_VESPO]) == (0.0, 1.0, 0.0)
    assert kernel_params(options._replace(loss_type="vespo"))[c.PARAM_VESPO] == 1.0


def test_compiled_kernels_refuse_a_params_list_of_another_length():
    from gtalign_fast.ops import _backend
    from gtalign_fast.ops._grpo_loss import kernel_params
    from gtalign_fast.ops._grpo_objective import GrpoLossOptions

    if _backend.why_unavailable("cpu", torch.device("cpu"), "grpo_loss") is not None:
        pytest.skip("no C++ CPU kernel here")
    logp, old, ref, advantages, mask = _inputs(2, 4, seed=0, dtype=torch.float32)
    logp, old, advantages, mask = logp.cpu(), old.cpu(), advantages.cpu(), mask.cpu()
    params = kernel_params(GrpoLossOptions(0.0, 0.2, 0.2, None, None, "grpo", False, 4, None))
    outputs = (torch.empty(()), torch.empty(5), torch.empty(2, 8), torch.empty(2))
    kernel = torch.ops.gtalign_fast_C.grpo_loss_fwd
    kernel(logp, old, None, advantages.unsqueeze(1).expand(2, 4), mask.view(torch.uint8), None, None, params,
           False, 0, 0.0, *outputs)
    assert torch.isfinite(outputs[0])
    with pytest.raises(RuntimeError, match="params must hold 16 values"):
        kernel(logp, old, None, advantages.unsqueeze(1).expand(2, 4), mask.view(torch.uint8), None, None,
               params[:-1], False, 0, 0.0, *outputs)
