"""gtalign_fast.ops._device_checks: the per-device error flag kernels set instead of a host sync."""

from __future__ import annotations

import os

import pytest
import torch

from gtalign_fast.ops import _device_checks as checks

from .test_constants import mismatches, python_constants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _clean_flags():
    """Each test starts and ends with clear flags (a failing test must not leak into the next)."""
    for flag in list(checks._flags.values()):
        flag.zero_()
    for launched in checks._launched.values():
        launched.clear()
    yield
    for flag in list(checks._flags.values()):
        flag.zero_()


def test_header_matches_python():
    with open(os.path.join(ROOT, "csrc/device_checks_common.h"), encoding="utf-8") as handle:
        text = handle.read()
    assert mismatches(python_constants(checks), text, {"ERR_": ("ErrorCode", "kErr")}) == []


def test_codes_are_distinct_bits_and_described():
    codes = [value for name, value in python_constants(checks).items() if name.startswith("ERR_")]
    assert all(code > 0 and code & (code - 1) == 0 for code in codes)
    assert len(set(codes)) == len(codes)
    assert set(checks.ERROR_KINDS) == set(codes)


def test_error_flag_is_persistent_int32_zero():
    flag = checks.error_flag("cpu")
    assert flag.dtype == torch.int32 and flag.shape == (1,) and flag.device.type == "cpu"
    assert int(flag[0]) == 0
    assert checks.error_flag(torch.device("cpu")) is flag  # one per device, whatever the spelling


def test_after_launch_on_cpu_is_silent_without_error():
    checks.after_launch("token_logprobs", torch.device("cpu"))


@pytest.mark.parametrize(
    ("code", "exception", "words"),
    [
        (checks.ERR_TARGET_RANGE, IndexError, "ERR_TARGET_RANGE"),
        (checks.ERR_GROUP_OFFSETS, ValueError, "ERR_GROUP_OFFSETS"),
        (checks.ERR_NONFINITE_REWARD, ValueError, "ERR_NONFINITE_REWARD"),
        (checks.ERR_FORCED_TOKEN, IndexError, "ERR_FORCED_TOKEN"),
        (checks.ERR_NUM_ITEMS, ValueError, "ERR_NUM_ITEMS"),
    ],
)
def test_after_launch_on_cpu_raises_and_clears(code, exception, words):
    flag = checks.error_flag("cpu")
    flag[0] = code  # what a kernel's atomic_or does
    with pytest.raises(exception, match=f"gtalign_fast.some_op: .*{words}"):
        checks.after_launch("some_op", torch.device("cpu"))
    assert int(flag[0]) == 0
    checks.after_launch("some_op", torch.device("cpu"))  # cleared: the next call is clean


def test_several_codes_are_all_named():
    flag = checks.error_flag("cpu")
    flag[0] = checks.ERR_TARGET_RANGE | checks.ERR_NONFINITE_REWARD | (1 << 20)
    with pytest.raises(IndexError) as info:
        checks.after_launch("op", "cpu")
    message = str(info.value)
    assert "ERR_TARGET_RANGE" in message and "ERR_NONFINITE_REWARD" in message and "0x100000" in message
    # The kernels set this bit for a negative or infinite reward; NaN (a missing reward) is allowed.
    assert "negative or infinite" in message and "NaN or" not in message


def test_check_device_errors_names_kinds_and_ops():
    flag = checks.error_flag("cpu")
    checks.check_device_errors()  # nothing set: no error
    flag[0] = checks.ERR_GROUP_OFFSETS
    # On CPU after_launch raises at once; check_device_errors still reads a flag set without it
    # (e.g. a direct call of a torch.ops.gtalign_fast_C kernel).
    with pytest.raises(RuntimeError, match="ERR_GROUP_OFFSETS"):
        checks.check_device_errors("cpu")
    assert int(flag[0]) == 0
    checks.check_device_errors("cpu")
    checks.check_device_errors()


def test_check_device_errors_lists_ops_recorded_on_a_lazy_device(monkeypatch):
    """The CUDA path: after_launch only records the op; check_device_errors names it. Simulated on
    CPU by pretending the CPU is a lazily checked device."""
    monkeypatch.setattr(checks, "_sync_checks", False)
    device = torch.device("cpu")
    launched = checks._launched.setdefault(device, {})
    launched["token_logprobs"] = None
    launched["grpo_loss"] = None
    checks.error_flag(device)[0] = checks.ERR_TARGET_RANGE
    with pytest.raises(RuntimeError, match=r"ERR_TARGET_RANGE.*token_logprobs, grpo_loss"):
        checks.check_device_errors(device)
    assert not launched


def test_sync_checks_mode_is_a_switch():
    assert checks._sync_checks == (os.environ.get(checks.ENV_SYNC_CHECKS) == "1")
    with checks.sync_checks(True):
        assert checks._sync_checks
    assert checks._sync_checks == (os.environ.get(checks.ENV_SYNC_CHECKS) == "1")


def test_exported_from_ops():
    from gtalign_fast import ops

    assert ops.check_device_errors is checks.check_device_errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_after_launch_does_not_sync():
    device = torch.device("cuda")
    flag = checks.error_flag(device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        checks.after_launch("token_logprobs", flag.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    flag.fill_(checks.ERR_TARGET_RANGE)
    with pytest.raises(RuntimeError, match="token_logprobs"):
        checks.check_device_errors()
    assert int(flag.item()) == 0


# ---------------------------------------------------------------------------------------------
# GPU: every op, forward and backward, without a host synchronisation (issue 12). A warm-up call
# first (Triton compiles, the caching allocator reserves memory); then the same call must run with
# torch.cuda.set_sync_debug_mode("error"), which raises on any synchronising CUDA call.


def _gpu_op_calls():
    """op -> a call of it, forward and backward. Every input is made here, before the checked call
    (a host -> device copy of a Python list would itself synchronise)."""
    from gtalign_fast import ops

    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    b, t, v, h = 4, 33, 1000, 64
    logits = torch.randn(b, t + 1, v, device=device, generator=generator, dtype=torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, v, (b, t), device=device, generator=generator)
    hidden = torch.randn(b * t, h, device=device, generator=generator, requires_grad=True)
    weight = torch.randn(v, h, device=device, generator=generator, requires_grad=True)
    logp = torch.randn(b, t, device=device, generator=generator, requires_grad=True)
    mask = torch.rand(b, t, device=device, generator=generator) > 0.2
    advantages = torch.randn(b, device=device, generator=generator)
    num_items = mask.sum()
    user = torch.rand(64, device=device, generator=generator)
    llm = torch.rand(64, device=device, generator=generator)
    offsets = torch.tensor([0, 8, 8, 40, 64], device=device)
    token_mask = torch.rand(64, 16, device=device, generator=generator) > 0.5
    sample_logits = torch.randn(8, v, device=device, generator=generator)

    def token_logprobs():
        lp, entropy = ops.token_logprobs(logits[:, :-1], targets, with_entropy=True, temperature=0.9)
        (lp.sum() + entropy.sum()).backward()

    def linear_token_logprobs():
        ops.linear_token_logprobs(hidden, weight, targets.reshape(-1)).sum().backward()

    def grpo_loss():
        for kwargs in (dict(), dict(loss_type="dapo", num_items_in_batch=num_items), dict(loss_type="dr_grpo")):
            loss, _ = ops.grpo_loss(logp, logp.detach() + 0.01, advantages, mask, **kwargs)
            loss.backward()

    def welfare_advantages():
        for group in (8, offsets):
            ops.welfare_advantages(user, llm, group, mask=token_mask)
            ops.welfare_advantages(user, llm, group, scale="batch")

    def sample_():
        ops.sample_(sample_logits.clone(), temperature=0.8, top_k=50, top_p=0.9, seed=1)

    def logits_grpo_loss():  # in place, into the storage of a non-leaf [:, :-1] view
        loss, _ = ops.logits_grpo_loss((logits * 1.0)[:, :-1], targets, advantages, mask, old_logp=logp.detach(),
                                       inplace_backward=True)
        loss.backward()

    def linear_grpo_loss():  # the trainer's default loss
        loss, _ = ops.linear_grpo_loss(hidden.view(b, t, h), weight, targets, advantages, mask,
                                       old_logp=logp.detach(), loss_type="dapo", num_items_in_batch=num_items)
        loss.backward()

    return {
        "token_logprobs": token_logprobs,
        "linear_token_logprobs": linear_token_logprobs,
        "grpo_loss": grpo_loss,
        "welfare_advantages": welfare_advantages,
        "sample_": sample_,
        "logits_grpo_loss": logits_grpo_loss,
        "linear_grpo_loss": linear_grpo_loss,
    }


def _runs_on_cuda(op: str, backend: str) -> bool:
    from gtalign_fast.ops import _backend

    return backend in _backend.available_backends("cuda", "sample" if op == "sample_" else op)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "op",
    ["token_logprobs", "linear_token_logprobs", "grpo_loss", "welfare_advantages", "sample_", "logits_grpo_loss",
     "linear_grpo_loss"],
)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_ops_do_not_synchronise_on_cuda(op, backend, monkeypatch):
    if not _runs_on_cuda(op, backend):
        pytest.skip(f"no {backend} backend for {op}")
    monkeypatch.setenv("GTALIGN_FAST_BACKEND", backend)
    monkeypatch.setattr(checks, "_sync_checks", False)
    call = _gpu_op_calls()[op]
    call()  # warm-up: compile, allocate
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    checks.check_device_errors()  # and nothing was flagged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_kernels_flag_bad_indices(backend, monkeypatch):
    """On CUDA the errors arrive at check_device_errors (one sync), not inside the op; with
    GTALIGN_FAST_SYNC_CHECKS=1 (here: sync_checks) they are raised by the op itself."""
    from gtalign_fast import ops

    monkeypatch.setattr(checks, "_sync_checks", False)
    device = torch.device("cuda")
    logits = torch.randn(3, 7, device=device)
    logp = ops.token_logprobs(logits, torch.tensor([0, 10**9, 1], device=device), backend=backend)
    user, llm = torch.rand(6, device=device), torch.rand(6, device=device)
    ops.welfare_advantages(user, llm, torch.tensor([0, 4, 2, 6], device=device), backend=backend)
    with pytest.raises(RuntimeError, match=r"ERR_TARGET_RANGE.*ERR_GROUP_OFFSETS.*token_logprobs, welfare_advantages"):
        checks.check_device_errors()
    assert torch.isnan(logp[1]).item() and torch.isfinite(logp[[0, 2]]).all().item()
    logp_ = torch.randn(2, 5, device=device)
    loss, _ = ops.grpo_loss(
        logp_,
        logp_ + 0.1,
        torch.ones(2, device=device),
        torch.ones(2, 5, device=device),
        loss_type="dapo",
        num_items_in_batch=torch.tensor(0.0, device=device),
        backend=backend,
    )
    assert torch.isnan(loss).item()
    with pytest.raises(RuntimeError, match="ERR_NUM_ITEMS"):
        checks.check_device_errors()
    with checks.sync_checks(True):
        with pytest.raises(IndexError, match="outside"):
            ops.token_logprobs(logits, torch.tensor([0, -3, 1], device=device), backend=backend)
    checks.check_device_errors()
