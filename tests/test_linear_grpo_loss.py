"""linear_grpo_loss: every backend against the float64 reference chain (LM head, log-probs, GRPO
loss) for loss, metrics, dhidden, dweight and dbias; gradients computed in the forward behave like
autograd's (grad_output scaling, accumulation, DDP all-reduce)."""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gtalign_fast import ops, reference
from gtalign_fast.ops._backend import why_unavailable
from gtalign_fast.ops._linear_grpo_loss import default_chunk_tokens

from .conftest import DEVICE
from .test_logits_grpo_loss import BACKENDS, CLIPS, _configurations


def _dtype(backend):
    # The C++ kernels run float64 (tight comparisons); Triton takes float32.
    return torch.float32 if backend == "triton" else torch.float64


def _tol(dtype):
    """(loss / metrics / logp, gradients). The loss, metrics and log-probs are float32 outputs, and the
    GRPO terms are float32 maths whatever the input dtype: float64 inputs are held to float32 rounding."""
    if dtype == torch.float64:
        return dict(atol=2e-7, rtol=2e-6), dict(atol=1e-7, rtol=2e-5)
    return dict(atol=2e-6, rtol=2e-5), dict(atol=2e-6, rtol=1e-4)


def _inputs(batch, length, size, vocab, seed, *, adv_2d=False, spread=0.3, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, size, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, size, generator=g, dtype=torch.float64) / size**0.25
    b = 0.5 * torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, vocab, (batch, length), generator=g)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    mask &= torch.rand(batch, length, generator=g) > 0.1
    if batch > 2:
        mask[1] = False
    targets = torch.where(mask, targets, -100)  # garbage where not counted
    logits = torch.nn.functional.linear(hidden, weight, b)
    true_logp, _ = reference.token_logprobs(logits, torch.where(mask, targets, 0))
    old = true_logp - spread * torch.randn(batch, length, generator=g, dtype=torch.float64)
    ref = true_logp + 0.5 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    advantages = torch.randn(batch, length, generator=g) if adv_2d else torch.randn(batch, generator=g)
    advantages.view(-1)[-1] = 0.0
    to = dict(device=DEVICE)
    return (hidden.to(**to), weight.to(**to), None if b is None else b.to(**to), targets.to(**to),
            advantages.to(**to), mask.to(**to), old.to(**to), ref.to(**to))


def reference_chain(hidden, weight, bias, targets, advantages, mask, old, ref, temperature=1.0, **kwargs):
    leaves = [hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)]
    if bias is not None:
        leaves.append(bias.detach().double().requires_grad_(True))
    logits = torch.nn.functional.linear(*leaves)
    logp, entropy = reference.token_logprobs(logits, torch.where(mask, targets, 0), temperature, True)
    logp = torch.where(mask, logp, 0.0)
    loss, metrics = reference.grpo_loss(logp, None if old is None else old.double(), advantages.double(), mask,
                                        None if ref is None else ref.double(), **kwargs)
    grads = torch.autograd.grad(loss, leaves)
    metrics["entropy"] = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
    return loss.detach(), metrics, grads, logp.detach()


def _check(backend, hidden, weight, bias, targets, advantages, mask, old, ref, *, temperature=1.0, chunk_size=None,
           dtype=None, **kwargs):
    dtype = dtype or _dtype(backend)
    loss_tol, grad_tol = _tol(dtype)
    leaves = [hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)]
    if bias is not None:
        leaves.append(bias.to(dtype).requires_grad_(True))
    loss, metrics, logp = ops.linear_grpo_loss(
        leaves[0], leaves[1], targets, advantages, mask, old_logp=old, ref_logp=ref,
        bias=leaves[2] if bias is not None else None, temperature=temperature, chunk_size=chunk_size,
        return_logp=True, backend=backend, **kwargs)
    assert ops.last_backend("linear_grpo_loss") == backend
    grads = torch.autograd.grad(loss, leaves)
    ref_loss, ref_metrics, ref_grads, ref_logp = reference_chain(
        *(leaf.detach() for leaf in leaves[:2]), leaves[2].detach() if bias is not None else None, targets,
        advantages, mask, old, ref, temperature, **kwargs)
    torch.testing.assert_close(loss.double(), ref_loss, **loss_tol)
    assert set(metrics) == set(ref_metrics)
    for name, value in metrics.items():
        torch.testing.assert_close(value.double(), ref_metrics[name].double(), **loss_tol, msg=name)
    torch.testing.assert_close(logp.double(), ref_logp, **loss_tol)
    for name, grad, ref_grad, leaf in zip(("hidden", "weight", "bias"), grads, ref_grads, leaves):
        assert grad.dtype == dtype and grad.shape == leaf.shape
        torch.testing.assert_close(grad.double(), ref_grad, **grad_tol, msg=name)
    return loss, grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_every_configuration(backend):
    for seed, (loss_type, level, clip, beta, adv_2d) in enumerate(_configurations(backend)):
        inputs = _inputs(3, 5, 6, 29, seed, adv_2d=adv_2d, bias=seed % 2 == 1)
        kwargs = dict(CLIPS[clip], beta=beta, loss_type=loss_type, importance_sampling_level=level)
        if loss_type == "dapo" and seed % 2:
            kwargs["num_items_in_batch"] = torch.tensor(7.0, device=DEVICE)
        old, ref = inputs[-2], inputs[-1]
        try:
            # chunk_size 4 cuts sequences of 5 at token level and holds one sequence at sequence level.
            _check(backend, *inputs[:-2], None if seed % 5 == 0 else old, ref if beta or seed % 3 == 0 else None,
                   temperature=0.7 if seed % 2 else 1.0, chunk_size=(4, 7, None)[seed % 3], **kwargs)
        except AssertionError as error:
            raise AssertionError(f"{backend} {loss_type} {level} {clip} beta={beta} adv_2d={adv_2d}: {error}") from None


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_half_and_float32_inputs(backend, dtype):
    inputs = _inputs(2, 6, 8, 40, seed=3, bias=True)
    leaves = [x.to(dtype).requires_grad_(True) for x in (inputs[0], inputs[1], inputs[2])]
    loss, metrics = ops.linear_grpo_loss(leaves[0], leaves[1], *inputs[3:6], old_logp=inputs[6], bias=leaves[2],
                                         chunk_size=5, backend=backend)
    grads = torch.autograd.grad(loss, leaves)
    ref_loss, _, ref_grads, _ = reference_chain(*(x.detach() for x in leaves), *inputs[3:])
    # bf16: the logits chunk is rounded to bf16 once, dZ too (as the eager bf16 chain does).
    tol = dict(atol=5e-3, rtol=5e-2) if dtype == torch.bfloat16 else dict(atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), ref_grad, atol=tol["atol"] * 4, rtol=tol["rtol"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scaling_accumulation_and_no_grad(backend):
    hidden, weight, bias, targets, advantages, mask, old, _ = _inputs(2, 5, 4, 23, seed=9)
    dtype = _dtype(backend)
    h, w = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
    kwargs = dict(old_logp=old, loss_type="bnpo", chunk_size=3, backend=backend)
    loss, _ = ops.linear_grpo_loss(h, w, targets, advantages, mask, **kwargs)
    (3.0 * loss).backward()
    first = h.grad.clone(), w.grad.clone()
    loss2, _ = ops.linear_grpo_loss(h, w, targets, advantages, mask, **kwargs)
    (-0.5 * loss2).backward()  # accumulates: 3 g - 0.5 g = 2.5 g
    tol = _tol(dtype)[1]
    torch.testing.assert_close(h.grad, first[0] * (2.5 / 3.0), **tol)
    torch.testing.assert_close(w.grad, first[1] * (2.5 / 3.0), **tol)
    with torch.no_grad():
        loss3, _ = ops.linear_grpo_loss(h, w, targets, advantages, mask, **kwargs)
    assert loss3.item() == pytest.approx(loss.item(), rel=1e-6)
    loss4, _ = ops.linear_grpo_loss(h, w, targets, advantages, mask, **kwargs)
    loss4.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss4.backward()


def test_default_chunk_size_follows_the_shapes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_chunk_tokens(2048, 32000, torch.float32, cpu) == 512
    assert default_chunk_tokens(4096, 131072, torch.bfloat16, cuda) == 2048
    assert default_chunk_tokens(100, 32000, torch.float32, cpu) == 100
    assert default_chunk_tokens(10**6, 10**7, torch.float32, cpu) == 128  # floor: GEMMs stay efficient


def test_bad_arguments():
    hidden, weight, bias, targets, advantages, mask, old, _ = _inputs(2, 4, 3, 11, seed=2)
    with pytest.raises(TypeError, match="weight dtype"):
        ops.linear_grpo_loss(hidden, weight.float(), targets, advantages, mask)
    with pytest.raises(ValueError, match="weight"):
        ops.linear_grpo_loss(hidden, weight[:, :2], targets, advantages, mask)
    with pytest.raises(ValueError, match="targets"):
        ops.linear_grpo_loss(hidden, weight, targets[:, :2], advantages, mask)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.linear_grpo_loss(hidden, weight, targets, advantages, mask, chunk_size=0)
    with pytest.raises(ValueError, match="linear_grpo_loss: advantages"):
        ops.linear_grpo_loss(hidden, weight, targets, advantages[:1], mask)
    mask[0, 0], targets[0, 0] = True, 11
    # Checked before any kernel or gather reads the id: on CPU tensors by every backend, on CUDA ones
    # by the reference (its gather has no device-side check; the Triton kernels flag it lazily).
    for backend in BACKENDS if DEVICE.type == "cpu" else ["reference"]:
        with pytest.raises(IndexError, match="target id 11"):
            ops.linear_grpo_loss(hidden, weight, targets, advantages, mask, backend=backend)


# ---------------------------------------------------------------------------------------------
# DDP: two gloo processes, each with half the batch, make the same update as one process


def _ddp_inputs():
    hidden, weight, _, targets, advantages, mask, old, _ = _inputs(4, 5, 6, 19, seed=21)
    return hidden.cpu(), weight.cpu(), targets.cpu(), advantages.cpu(), mask.cpu(), old.cpu()


class _Head(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())

    def forward(self, hidden, targets, advantages, mask, old):
        # seq-mean-token-sum: a per-sequence mean, so each process's half-batch loss, averaged by
        # DDP over the two processes, is the full-batch loss.
        loss, _ = ops.linear_grpo_loss(hidden, self.weight, targets, advantages, mask, old_logp=old,
                                       loss_type="seq-mean-token-sum", chunk_size=3, backend="cpu")
        return loss


def _ddp_worker(rank: int, world: int, directory: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    try:
        hidden, weight, targets, advantages, mask, old = _ddp_inputs()
        model = torch.nn.parallel.DistributedDataParallel(_Head(weight))
        rows = slice(2 * rank, 2 * rank + 2)
        model(hidden[rows], targets[rows], advantages[rows], mask[rows], old[rows]).backward()
        if rank == 0:
            torch.save(model.module.weight.grad, os.path.join(directory, "grad.pt"))
        # Free DDP while Python still runs: alive at finalisation, it can abort the process (see
        # gtalign_fast.training.distributed.release_ddp_at_exit).
        del model
        gc.collect()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_ddp_two_processes_match_one(tmp_path, monkeypatch):
    if why_unavailable("cpu", torch.device("cpu"), "linear_grpo_loss") is not None:
        pytest.skip("needs the C++ extension")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    two = torch.load(tmp_path / "grad.pt")
    hidden, weight, targets, advantages, mask, old = _ddp_inputs()
    one = _Head(weight)
    one(hidden, targets, advantages, mask, old).backward()
    assert one.weight.grad.abs().sum() > 0
    torch.testing.assert_close(two, one.weight.grad, atol=1e-12, rtol=1e-10)


def test_torch_compile_fullgraph():
    backend = BACKENDS[0]
    hidden, weight, bias, targets, advantages, mask, old, _ = _inputs(2, 5, 4, 23, seed=17, bias=True)
    dtype = _dtype(backend)

    def step(h, w, b):
        loss, metrics = ops.linear_grpo_loss(h, w, targets, advantages, mask, old_logp=old, bias=b, chunk_size=3,
                                             loss_type="dapo", backend=backend)
        return loss, metrics["entropy"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [x.to(dtype).clone().requires_grad_(True) for x in (hidden, weight, bias)]
        loss, entropy = fn(*leaves)
        (2.0 * loss).backward()
        results.append((loss, entropy, *(leaf.grad for leaf in leaves)))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_batch_size_one(backend, level, loss_type):
    # Issue 22: at B = 1 the per-token row weights were a stride-0 view, refused by the kernels
    # (Liger's B=1, T=4096 case). Chunks of 2 cut the one sequence at token level.
    for adv_2d in (False, True):
        inputs = list(_inputs(1, 5, 6, 29, seed=11, adv_2d=adv_2d))
        inputs[4] = torch.full_like(inputs[4], 0.7)  # the one advantage must not be 0
        _check(backend, *inputs[:-2], inputs[-2], inputs[-1], chunk_size=2, beta=0.04, loss_type=loss_type,
               importance_sampling_level=level, epsilon_high=0.28)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_clamp", [None, 10.0])
def test_kl_above_ten(backend, kl_clamp):
    # Issue 22.2: k3 above 10 counts in full by default (TRL); kl_clamp=10 is verl's low_var_kl.
    hidden, weight, bias, targets, advantages, mask, old, _ = _inputs(2, 6, 8, 31, seed=4)
    logits = torch.nn.functional.linear(hidden.cpu(), weight.cpu())
    true_logp, _ = reference.token_logprobs(logits, torch.where(mask, targets, 0).cpu())
    shift = 5.0 * torch.rand(true_logp.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) - 0.5
    ref = (true_logp + shift).to(DEVICE)
    d = (ref.cpu() - true_logp)[mask.cpu()]
    k3 = torch.exp(d) - d - 1
    assert (k3 > 10).sum() >= 2 and (k3 < 10).sum() >= 2
    expected = k3.mean() if kl_clamp is None else k3.clamp(-10, 10).mean()
    _check(backend, hidden, weight, bias, targets, advantages, mask, old, ref, chunk_size=4, beta=0.04,
           loss_type="dapo", kl_clamp=kl_clamp)
    _, metrics = ops.linear_grpo_loss(hidden.to(_dtype(backend)), weight.to(_dtype(backend)), targets, advantages,
                                      mask, old_logp=old, ref_logp=ref, beta=0.04, loss_type="dapo",
                                      kl_clamp=kl_clamp, backend=backend)
    torch.testing.assert_close(metrics["kl"].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bias_corrected_kl(backend, level):
    # TRL's use_bias_correction_kl: k3 * r with the gradient through r, across chunks of 4 tokens.
    inputs = _inputs(3, 5, 6, 29, seed=13)
    for loss_type, on_policy in (("dapo", False), ("luspo", True)):
        _check(backend, *inputs[:-2], None if on_policy else inputs[-2], inputs[-1], chunk_size=4, beta=0.05,
               loss_type=loss_type, importance_sampling_level=level, use_bias_correction_kl=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sapo(backend, level):
    inputs = _inputs(3, 5, 6, 29, seed=15)
    _check(backend, *inputs, chunk_size=4, beta=0.04, loss_type="sapo", importance_sampling_level=level,
           sapo_temperature_pos=0.9, sapo_temperature_neg=1.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cispo(backend, level):
    # TRL's CISPO (-sg(min(r, epsilon_high)) A logp); a cap of 1.05 some ratios exceed and some do not.
    inputs = _inputs(3, 5, 6, 29, seed=16)
    _check(backend, *inputs, chunk_size=4, beta=0.04, loss_type="cispo", importance_sampling_level=level,
           epsilon_high=1.05, use_bias_correction_kl=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_vespo(backend, level):
    # TRL's VESPO: its sequence weight sums over whole rows, so chunks of 4 tokens round to whole sequences.
    for adv_2d in (False, True):
        inputs = _inputs(3, 5, 6, 29, seed=17, adv_2d=adv_2d)
        _check(backend, *inputs, chunk_size=4, beta=0.04, loss_type="vespo", importance_sampling_level=level,
               vespo_k_pos=1.5, use_bias_correction_kl=adv_2d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_importance_sampling_ratio(backend, level):
    # TRL's vLLM IS ratio across chunks of 4 tokens: per token and per sequence (expanded per token when a
    # chunk cuts a sequence), some 0, with the clip, CISPO and VESPO (whole sequences per chunk).
    inputs = _inputs(3, 5, 6, 29, seed=18)
    mask = inputs[5]
    g = torch.Generator().manual_seed(18)
    per_token = (torch.rand(mask.shape, generator=g) * 2).masked_fill(torch.rand(mask.shape, generator=g) < 0.2, 0.0)
    for index, (loss_type, ratio) in enumerate((("dapo", per_token), ("cispo", torch.rand(3, generator=g) * 2),
                                                ("vespo", per_token), ("grpo", torch.rand(3, 1, generator=g)))):
        _check(backend, *inputs, chunk_size=4, beta=0.04, loss_type=loss_type, importance_sampling_level=level,
               epsilon_high=1.05 if loss_type == "cispo" else 0.28, importance_sampling_ratio=ratio.to(DEVICE),
               use_bias_correction_kl=index % 2 == 0)


def test_unknown_option_is_a_type_error_naming_the_op():
    hidden, weight, _, targets, advantages, mask, _, _ = _inputs(2, 3, 4, 11, seed=0)
    with pytest.raises(TypeError, match=r"linear_grpo_loss\(\) got an unexpected keyword argument 'epsilon'"):
        ops.linear_grpo_loss(hidden, weight, targets, advantages, mask, epsilon=0.2)
