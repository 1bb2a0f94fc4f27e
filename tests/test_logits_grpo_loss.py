"""logits_grpo_loss: every backend against the float64 reference chain
``reference.grpo_loss(reference.token_logprobs(...))`` (loss, metrics, dlogits), and against
``ops.grpo_loss(ops.token_logprobs(...))``."""

from __future__ import annotations

import itertools

import pytest
import torch

from gtalign_fast import ops, reference
from gtalign_fast.ops import _backend, _device_checks

from .conftest import DEVICE

OP = "logits_grpo_loss"
BACKENDS = [b for b in ("cpu", "triton", "reference") if _backend.why_unavailable(b, DEVICE, OP) is None]
LOSS_TYPES = reference.GRPO_LOSS_TYPES
CLIPS = {
    "clip": dict(epsilon_low=0.2),
    "clip_higher_delta": dict(epsilon_low=0.2, epsilon_high=0.28, delta=1.25),
    "dual_clip": dict(epsilon_low=0.2, epsilon_high=0.3, dual_clip=3.0),
}
# float32 logits against float64 maths on the same values.
LOSS_TOL = dict(atol=2e-6, rtol=2e-5)
GRAD_TOL = dict(atol=2e-7, rtol=2e-5)


def _interpreted(backend: str) -> bool:
    return backend == "triton" and DEVICE.type == "cpu"


def _inputs(batch, length, vocab, seed, *, adv_2d=False, spread=0.3):
    """[B, T+1, V] float64 logits (the op reads the [:, :-1] slice), targets with garbage (-100 and
    out-of-range ids) where the mask is 0, old / ref log-probs near the true ones, so ratios
    straddle both clip bounds, ragged masks with an empty row, mixed-sign advantages."""
    g = torch.Generator().manual_seed(seed)
    full = 3.0 * torch.randn(batch, length + 1, vocab, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (batch, length), generator=g)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    mask &= torch.rand(batch, length, generator=g) > 0.1
    if batch > 1:
        mask[1] = False
    targets = torch.where(mask, targets, torch.where(torch.rand(batch, length, generator=g) > 0.5, -100, vocab + 7))
    true_logp, _ = reference.token_logprobs(full[:, :-1], torch.where(mask, targets, 0))
    old = true_logp - spread * torch.randn(batch, length, generator=g, dtype=torch.float64)
    ref = true_logp + 0.5 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    advantages = torch.randn(batch, length, generator=g) if adv_2d else torch.randn(batch, generator=g)
    advantages.view(-1)[-1] = 0.0
    to = dict(device=DEVICE)
    return full.to(**to), targets.to(**to), advantages.to(**to), mask.to(**to), old.to(**to), ref.to(**to)


def reference_chain(logits, targets, advantages, mask, old, ref, temperature=1.0, **kwargs):
    """float64 loss, metrics (with the mean entropy) and dlogits through the reference."""
    leaf = logits.detach().double().requires_grad_(True)
    safe = torch.where(mask, targets, 0)
    logp, entropy = reference.token_logprobs(leaf, safe, temperature, True)
    logp = torch.where(mask, logp, 0.0)
    loss, metrics = reference.grpo_loss(logp, None if old is None else old.double(), advantages.double(), mask,
                                        None if ref is None else ref.double(), **kwargs)
    (grad,) = torch.autograd.grad(loss, [leaf])
    metrics["entropy"] = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
    return loss.detach(), metrics, grad


def _check(backend, full, targets, advantages, mask, old, ref, *, dtype=torch.float32, temperature=1.0,
           loss_tol=LOSS_TOL, grad_tol=GRAD_TOL, inplace=False, **kwargs):
    base = full.to(dtype).detach().requires_grad_(True)
    logits = (base * 1)[:, :-1] if inplace else base[:, :-1]  # in place: a non-leaf, strided view
    loss, metrics = ops.logits_grpo_loss(logits, targets, advantages, mask, old_logp=old, ref_logp=ref,
                                         temperature=temperature, inplace_backward=inplace, backend=backend, **kwargs)
    assert ops.last_backend("logits_grpo_loss") == backend
    assert loss.dtype == torch.float32 and loss.shape == ()
    (grad,) = torch.autograd.grad(loss, [base])
    ref_loss, ref_metrics, ref_grad = reference_chain(base[:, :-1].detach(), targets, advantages, mask, old, ref,
                                                      temperature, **kwargs)
    torch.testing.assert_close(loss.double(), ref_loss, **loss_tol)
    assert set(metrics) == set(ref_metrics)
    for name, value in metrics.items():
        assert value.dtype == torch.float32 and value.shape == () and not value.requires_grad
        torch.testing.assert_close(value.double(), ref_metrics[name].double(), **loss_tol, msg=name)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad[:, :-1].double(), ref_grad, **grad_tol)
    assert (grad[:, -1] == 0).all()
    assert (grad[:, :-1][mask == 0] == 0).all(), "masked positions must get exactly zero gradient"
    if inplace:
        torch.testing.assert_close(logits, grad[:, :-1], atol=0, rtol=0)  # the storage holds dlogits
    return loss, metrics


def _configurations(backend):
    """Every loss type x level x clip (x beta x advantage shape on the C++ / reference backends;
    under the slow Triton interpreter each combination gets one rotated (beta, adv shape) pair,
    and only half the loss types, alternating)."""
    for index, (loss_type, level, clip) in enumerate(itertools.product(LOSS_TYPES, ("token", "sequence"), CLIPS)):
        if loss_type in ("sapo", "cispo", "vespo") and clip != "clip":
            continue  # SAPO, CISPO and VESPO replace the clip: no delta, no dual clip
        pairs = list(itertools.product((0.0, 0.04), (False, True)))
        if _interpreted(backend):
            if index % 2:
                continue
            pairs = [pairs[(index // 2) % len(pairs)]]
        for beta, adv_2d in pairs:
            yield loss_type, level, clip, beta, adv_2d


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_every_configuration(backend):
    for seed, (loss_type, level, clip, beta, adv_2d) in enumerate(_configurations(backend)):
        full, targets, advantages, mask, old, ref = _inputs(4, 7, 53, seed, adv_2d=adv_2d)
        kwargs = dict(CLIPS[clip], beta=beta, loss_type=loss_type, importance_sampling_level=level)
        if loss_type == "dapo" and seed % 2:
            kwargs["num_items_in_batch"] = torch.tensor(11.0, device=DEVICE)
        try:
            _check(backend, full, targets, advantages, mask, old, ref if beta or seed % 3 == 0 else None,
                   temperature=0.7 if seed % 2 else 1.0, **kwargs)
        except AssertionError as error:
            raise AssertionError(f"{backend} {loss_type} {level} {clip} beta={beta} adv_2d={adv_2d}: {error}") from None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_on_policy_and_inplace_backward(backend, level):
    # old_logp=None: ratio 1 in value, the true policy gradient (not zero). In place: the gradient
    # lands in the storage of the [:, :-1] view of the logits (a non-leaf), strides kept.
    full, targets, advantages, mask, _, ref = _inputs(3, 6, 41, seed=5)
    for inplace in (False, True):
        _, metrics = _check(backend, full, targets, advantages, mask, None, ref, beta=0.04, inplace=inplace,
                            importance_sampling_level=level, epsilon_high=0.28)
        assert metrics["ratio_mean"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_matches_grpo_loss_of_token_logprobs(backend):
    full, targets, advantages, mask, old, ref = _inputs(3, 9, 70, seed=11)
    logits = full.float()[:, :-1]
    kwargs = dict(beta=0.04, epsilon_high=0.28, loss_type="dapo", temperature=0.8)
    leaf = logits.detach().requires_grad_(True)
    loss, metrics = ops.logits_grpo_loss(leaf, targets, advantages, mask, old_logp=old.float(), ref_logp=ref.float(),
                                         backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(loss, [leaf])
    chain_leaf = logits.detach().requires_grad_(True)
    temperature = kwargs.pop("temperature")
    logp = ops.token_logprobs(chain_leaf, torch.where(mask, targets, -100), temperature=temperature)
    chain_loss, chain_metrics = ops.grpo_loss(logp, old.float(), advantages, mask, ref_logp=ref.float(), **kwargs)
    (chain_grad,) = torch.autograd.grad(chain_loss, [chain_leaf])
    torch.testing.assert_close(loss, chain_loss, atol=1e-6, rtol=1e-5)
    for name, value in chain_metrics.items():
        torch.testing.assert_close(metrics[name], value, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, chain_grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_logit_dtypes(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take half and float32 logits")
    full, targets, advantages, mask, old, ref = _inputs(3, 5, 33, seed=7)
    # Half logits: compared with float64 maths on the same (rounded) values; dlogits round once.
    tol = (LOSS_TOL, GRAD_TOL) if dtype == torch.float64 else (dict(atol=1e-5, rtol=1e-4), dict(atol=2e-3, rtol=1e-2))
    _check(backend, full, targets, advantages, mask, old, ref, dtype=dtype, loss_tol=tol[0], grad_tol=tol[1],
           beta=0.04)


@pytest.mark.parametrize("backend", BACKENDS)
def test_counted_target_out_of_range_raises(backend):
    # On CUDA tensors the Triton kernels flag the id without a host sync: the synchronous check mode
    # (GTALIGN_FAST_SYNC_CHECKS=1) raises at the call, as CPU tensors always do.
    full, targets, advantages, mask, _, _ = _inputs(2, 4, 17, seed=1)
    mask[0, 0] = True
    for bad in (-1, 17, -100):
        targets[0, 0] = bad
        with _device_checks.sync_checks(True), pytest.raises(IndexError, match=f"target id {bad} "):
            ops.logits_grpo_loss(full.float()[:, :-1], targets, advantages, mask, backend=backend)


def test_host_target_check_covers_the_reference_backend_on_any_device():
    """The reference backend gathers with the targets unchecked (on CUDA a bad id would be a
    device-side assert), so its ids are checked on the host whatever the device; the Triton kernels
    check them on the device (nothing read on the host for CUDA logits). Only counted ids matter."""
    from gtalign_fast.ops._grpo_chunks import check_targets

    targets = torch.tensor([[0, 9, 2]])
    mask = torch.tensor([[1, 1, 0]])
    cuda = torch.device("cuda")  # a device object only: nothing is allocated there
    with pytest.raises(IndexError, match="target id 9 at position 1"):
        check_targets("logits_grpo_loss", cuda, targets, mask, 5, "reference")
    check_targets("logits_grpo_loss", cuda, targets, mask, 5, "triton")
    mask[0, 1] = 0
    check_targets("logits_grpo_loss", cuda, targets, mask, 5, "reference")


@pytest.mark.parametrize("op", ["logits_grpo_loss", "linear_grpo_loss"])
def test_default_backend_warns_when_it_falls_back_to_the_reference(monkeypatch, op):
    """Without the C++ extension the default is the reference (materialised logits, autograd): said
    with a RuntimeWarning, as for every op, never silently."""
    monkeypatch.setattr(_backend, "_EXTENSION", None)  # what why_unavailable reads: no extension here
    monkeypatch.setattr(_backend, "_DEFAULTS", {})  # defaults are cached per (op, device type)
    monkeypatch.setattr(_backend, "_warned_fallback", set())
    with pytest.warns(RuntimeWarning, match="reference backend"):
        assert _backend.default_backend(op, torch.device("cpu")) == "reference"
    if _backend.why_unavailable("triton", torch.device("cuda")) is None:  # Triton installed
        assert _backend.default_backend(op, torch.device("cuda")) == "triton"


def test_bad_arguments():
    full, targets, advantages, mask, old, _ = _inputs(2, 4, 17, seed=2)
    logits = full.float()[:, :-1]
    with pytest.raises(TypeError, match="targets"):
        ops.logits_grpo_loss(logits, targets.int(), advantages, mask)
    with pytest.raises(ValueError, match="logits"):
        ops.logits_grpo_loss(logits[0], targets, advantages, mask)
    with pytest.raises(ValueError, match="targets"):
        ops.logits_grpo_loss(logits, targets[:, :3], advantages, mask)
    with pytest.raises(ValueError, match="logits_grpo_loss: mask"):
        ops.logits_grpo_loss(logits, targets, advantages, mask[:, :3])
    with pytest.raises(ValueError, match="logits_grpo_loss: old_logp"):
        ops.logits_grpo_loss(logits, targets, advantages, mask, old_logp=old[:, :3])
    with pytest.raises(ValueError, match="beta"):
        ops.logits_grpo_loss(logits, targets, advantages, mask, beta=0.1)
    with pytest.raises(ValueError, match="temperature"):
        ops.logits_grpo_loss(logits, targets, advantages, mask, temperature=0.0)
    with pytest.raises(ValueError, match="leaf"):
        ops.logits_grpo_loss(logits.detach().requires_grad_(True), targets, advantages, mask, inplace_backward=True)


def test_torch_compile_fullgraph():
    # The custom ops (fake kernels, autograd, the in-place backward's mutation) trace without graph breaks.
    backend = BACKENDS[0]
    full, targets, advantages, mask, old, ref = _inputs(2, 5, 29, seed=13)

    def step(base, inplace):
        logits = (base * 1.0)[:, :-1]
        loss, metrics = ops.logits_grpo_loss(logits, targets, advantages, mask, old_logp=old, ref_logp=ref, beta=0.04,
                                             importance_sampling_level="sequence", inplace_backward=inplace,
                                             backend=backend)
        return loss, metrics["entropy"]

    for inplace in (False, True):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        results = []
        for fn in (step, compiled):
            base = full.float().clone().requires_grad_(True)
            loss, entropy = fn(base, inplace)
            loss.backward()
            results.append((loss, entropy, base.grad))
        for eager, traced in zip(*results):
            torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("op", ["logits_grpo_loss", "linear_grpo_loss"])
def test_cuda_backend_is_refused_with_the_reason(op):
    """There is no CUDA C++ kernel: asking for one names the backend that runs instead, and
    available_backends never lists it."""
    assert "cuda" not in _backend.available_backends("cuda", op)
    logits, targets = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    advantages, mask = torch.randn(2), torch.ones(2, 3, dtype=torch.bool)
    inputs = (logits, targets) if op == "logits_grpo_loss" else (torch.randn(2, 3, 5), torch.randn(11, 5), targets)
    with pytest.raises(RuntimeError, match="no CUDA C\\+\\+ kernel; on CUDA tensors it runs 'triton'"):
        getattr(ops, op)(*inputs, advantages, mask, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_batch_size_one(backend, level):
    for loss_type, adv_2d in (("grpo", False), ("dapo", True)):
        full, targets, advantages, mask, old, ref = _inputs(1, 5, 31, seed=5, adv_2d=adv_2d)
        advantages = torch.full_like(advantages, -0.6)
        _check(backend, full, targets, advantages, mask, old, ref, beta=0.04, loss_type=loss_type,
               importance_sampling_level=level)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_clamp", [None, 10.0])
def test_kl_above_ten(backend, kl_clamp):
    # Issue 22.2 (Liger's test_triton_grpo_loss_matches_reference: dapo, beta=0.04): k3 values above
    # 10 count in full by default (TRL, Liger); kl_clamp=10 is verl's low_var_kl.
    full, targets, advantages, mask, old, _ = _inputs(4, 8, 37, seed=8)
    true_logp, _ = reference.token_logprobs(full[:, :-1].cpu(), torch.where(mask, targets, 0).cpu())
    shift = 5.0 * torch.rand(true_logp.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64) - 0.5
    ref = (true_logp + shift).to(DEVICE)
    d = (ref.cpu() - true_logp)[mask.cpu()]
    k3 = torch.exp(d) - d - 1
    assert (k3 > 10).sum() >= 2 and (k3 < 10).sum() >= 2
    expected = k3.mean() if kl_clamp is None else k3.clamp(-10, 10).mean()
    _, metrics = _check(backend, full, targets, advantages, mask, old, ref, beta=0.04, loss_type="dapo",
                        kl_clamp=kl_clamp)
    torch.testing.assert_close(metrics["kl"].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bias_corrected_kl(backend, level):
    # TRL's use_bias_correction_kl: k3 * r with the gradient through r (and on-policy, r = 1 with dr = 1).
    full, targets, advantages, mask, old, ref = _inputs(3, 6, 37, seed=12)
    for loss_type, on_policy in (("dapo", False), ("luspo", True)):
        _check(backend, full, targets, advantages, mask, None if on_policy else old, ref, beta=0.05,
               loss_type=loss_type, importance_sampling_level=level, use_bias_correction_kl=True, epsilon_high=0.28)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sapo(backend, level):
    full, targets, advantages, mask, old, ref = _inputs(3, 6, 37, seed=14)
    _check(backend, full, targets, advantages, mask, old, ref, beta=0.04, loss_type="sapo",
           importance_sampling_level=level, sapo_temperature_pos=0.9, sapo_temperature_neg=1.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cispo(backend, level):
    # TRL's CISPO (-sg(min(r, epsilon_high)) A logp); a cap of 1.05 some ratios exceed and some do not.
    full, targets, advantages, mask, old, ref = _inputs(3, 6, 37, seed=16)
    _check(backend, full, targets, advantages, mask, old, ref, beta=0.04, loss_type="cispo",
           importance_sampling_level=level, epsilon_high=1.05, use_bias_correction_kl=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_vespo(backend, level):
    # TRL's VESPO (-sg(phi) A logp, phi from the sequence weight), per-sequence and per-token advantages.
    for adv_2d in (False, True):
        full, targets, advantages, mask, old, ref = _inputs(3, 6, 37, seed=17, adv_2d=adv_2d)
        _check(backend, full, targets, advantages, mask, old, ref, beta=0.04, loss_type="vespo",
               importance_sampling_level=level, vespo_k_pos=1.5, use_bias_correction_kl=adv_2d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_importance_sampling_ratio(backend, level):
    # TRL's vLLM IS ratio, per token and per sequence (some 0), with the clip, CISPO and VESPO.
    full, targets, advantages, mask, old, ref = _inputs(3, 6, 37, seed=18)
    g = torch.Generator().manual_seed(18)
    per_token = (torch.rand(mask.shape, generator=g) * 2).masked_fill(torch.rand(mask.shape, generator=g) < 0.2, 0.0)
    for index, (loss_type, ratio) in enumerate((("dapo", per_token), ("cispo", torch.rand(3, generator=g) * 2),
                                                ("vespo", per_token), ("grpo", torch.rand(3, 1, generator=g)))):
        _check(backend, full, targets, advantages, mask, old, ref, beta=0.04, loss_type=loss_type,
               importance_sampling_level=level, epsilon_high=1.05 if loss_type == "cispo" else 0.28,
               importance_sampling_ratio=ratio.to(DEVICE), use_bias_correction_kl=index % 2 == 0)


def test_unknown_option_is_a_type_error_naming_the_op():
    full, targets, advantages, mask, old, ref = _inputs(2, 3, 11, seed=0)
    with pytest.raises(TypeError, match=r"logits_grpo_loss\(\) got an unexpected keyword argument 'epsilon'"):
        ops.logits_grpo_loss(full[:, :-1], targets, advantages, mask, epsilon=0.2)
