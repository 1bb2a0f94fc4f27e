"""The TRL patch past one process: TRL's own GRPOTrainer under ``accelerate launch`` with two CPU processes.

``tests/trl_distributed_run.py`` trains TRL 1.16's GRPOTrainer for two optimizer steps, unpatched ("trl") and
patched ("ours"), once as one plain process and once under ``accelerate launch --multi_gpu --num_processes 2``
(with CUDA hidden that is two CPU processes on gloo, the model wrapped in DDP by accelerate as TRL sets it up, with
TRL's default gradient checkpointing; ``accelerate launch --cpu --num_processes 2`` starts only one process unless
mpirun is configured). Both layouts train on the same global batch (8 completions per step; each of the two
processes gets one whole prompt group) and on the same completions (a function of the prompt and the occurrence,
not of a random stream).

What must hold: the two ranks end with identical parameters (so every gradient, the fused LM head's included, went
through DDP's reducer: a gradient that was never all-reduced would leave the ranks apart); the patched two-process
step equals TRL's two-process step (gradients at each step, parameters, metrics; 1e-5, float32); and for the loss
types whose normaliser spans the global batch (dapo's global token count, grpo's per-sequence mean) the
two-process step equals the one-process step (a gradient reduced twice, or summed, would scale it). TRL's bnpo
divides by each process's own token count, so there the two layouts differ, in TRL and in the patch alike.

DeepSpeed: ZeRO-3 is refused with its reason; DeepSpeed is not installed here, so ZeRO-1/2 have no parity test
and are refused too (checked with a stand-in for the DeepSpeed plugin).
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("accelerate")
pytest.importorskip("datasets")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

from gtalign_fast.integrations import trl as integration  # noqa: E402
from tests import trl_distributed_run as runner  # noqa: E402
from tests.test_integration_trl import _trainer, save_tiny_qwen2  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "trl_distributed_run.py")
TIMEOUT_S = 900  # each launch; about 15 s (one process) and 30 s (two) on an idle 2-core machine
TOLERANCE = 1e-5
GLOBAL_NORMALISER = ["dapo-token-kl-accum2", "grpo-sequence"]  # the 2-process step is the 1-process step


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2_ddp"))


def _launch(command: list[str]) -> None:
    # CPU only, also on a machine with GPUs: the comparison is of gloo + DDP on CPU processes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n" \
                                 f"{done.stderr[-8000:]}"


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """{"one": rank 0 of the plain run, "two": [rank 0, rank 1] of the 2-process run}, as the runner saves them."""
    one, two = str(tmp_path_factory.mktemp("one_process")), str(tmp_path_factory.mktemp("two_processes"))
    _launch([sys.executable, SCRIPT, model_dir, one])
    # The README's command. Port 0: a free port, so that concurrent runs on one machine do not collide.
    _launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
             SCRIPT, model_dir, two])

    def load(directory, rank):
        return torch.load(os.path.join(directory, f"rank{rank}.pt"), weights_only=False)

    return {"one": load(one, 0), "two": [load(two, 0), load(two, 1)]}


def _assert_relative(actual: dict, expected: dict, what: str, tolerance: float = TOLERANCE) -> None:
    """Each tensor within ``tolerance`` x its largest entry (float32 sums in another order)."""
    assert sorted(actual) == sorted(expected), what
    for name, value in expected.items():
        error = (actual[name] - value).abs().max().item()
        scale = value.abs().max().item()
        assert error <= tolerance * scale + 1e-12, f"{what}, {name}: max error {error:.3e} > {tolerance} x {scale:.3e}"


def _relative_distance(a: dict, b: dict) -> float:
    """|a - b| / |b| over all tensors together."""
    flat = [torch.cat([d[name].flatten() for name in sorted(b)]) for d in (a, b)]
    return ((flat[0] - flat[1]).norm() / flat[1].norm()).item()


def _update(result: dict) -> dict:
    return {name: result["after"][name] - result["before"][name] for name in result["before"]}


def _assert_same_step(actual: dict, expected: dict, what: str) -> None:
    assert len(actual["grads"]) == len(expected["grads"]) == runner.STEPS, what
    for step, (a, b) in enumerate(zip(actual["grads"], expected["grads"])):
        _assert_relative(a, b, f"{what}: gradients at step {step + 1}")
    _assert_relative(actual["before"], expected["before"], f"{what}: parameters before", tolerance=0.0)
    _assert_relative(actual["after"], expected["after"], f"{what}: parameters after {runner.STEPS} steps")
    # the update as one vector (per tensor, after - before carries the parameters' float32 rounding)
    assert _relative_distance(_update(actual), _update(expected)) <= TOLERANCE, f"{what}: the update"


# ---------------------------------------------------------------------------------------------
# The layout: two processes, DDP, one global batch


def test_two_processes_train_under_ddp_on_one_global_batch(runs):
    one, (rank0, rank1) = runs["one"], runs["two"]
    assert set(one) == set(rank0) == set(rank1) == set(runner.CONFIGS)
    for name in runner.CONFIGS:
        for side in ("trl", "ours"):
            single, a, b = one[name][side], rank0[name][side], rank1[name][side]
            assert single["world"] == 1 and a["world"] == b["world"] == 2, (name, side)
            assert a["wrapper"] == b["wrapper"] == "DistributedDataParallel", (name, side, a["wrapper"])
            # each process generated for one whole prompt group; together they saw the one-process batch
            assert len(set(a["seen"])) == len(set(b["seen"])) == 1 and a["seen"] != b["seen"], (name, side)
            assert sorted(a["seen"] + b["seen"]) == sorted(single["seen"]), (name, side)
            assert sorted(a["lengths"] + b["lengths"]) == sorted(single["lengths"]), (name, side)
            # the groups differ in token count, so a per-process token normaliser is visible (bnpo below)
            assert sum(a["lengths"]) != sum(b["lengths"]), (name, side)


def test_ranks_end_with_identical_parameters(runs):
    # Data differ between the ranks: equal gradients and parameters mean every gradient was all-reduced, the LM
    # head's (computed by our op and handed to autograd in its backward) included. Checked by hand: a head that
    # wrote lm_head.weight.grad directly makes DDP raise "Expected to have finished reduction in the prior
    # iteration", and with ddp_find_unused_parameters=True leaves lm_head.weight 0.07-0.11 apart between the ranks.
    rank0, rank1 = runs["two"]
    for name in runner.CONFIGS:
        for side in ("trl", "ours"):
            for step in range(runner.STEPS):
                _assert_relative(rank0[name][side]["grads"][step], rank1[name][side]["grads"][step],
                                 f"{name}/{side}: rank 0 vs rank 1 gradients, step {step + 1}", tolerance=0.0)
            _assert_relative(rank0[name][side]["after"], rank1[name][side]["after"],
                             f"{name}/{side}: rank 0 vs rank 1 parameters", tolerance=0.0)


# ---------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("name", list(runner.CONFIGS))
def test_patched_equals_trl_under_two_processes(runs, name):
    for rank, result in enumerate(runs["two"]):
        ours, trl = result[name]["ours"], result[name]["trl"]
        # the patch ran inside DDP: the fused head (policy and reference) and grpo_loss, every micro-batch
        assert ours["path"] == "linear_token_logprobs" and trl["path"] is None
        assert ours["counts"]["grpo_loss"] > 0 and ours["counts"]["linear_token_logprobs"] > 0, ours["counts"]
        assert trl["counts"] == {}, trl["counts"]
        assert ours["seen"] == trl["seen"] and ours["lengths"] == trl["lengths"]
        _assert_same_step(ours, trl, f"{name} rank {rank}: patched vs TRL")
        assert _relative_distance(ours["after"], ours["before"]) > 1e-3  # the steps moved the parameters
        assert len(ours["logs"]) == len(trl["logs"]) == runner.STEPS
        for ours_log, trl_log in zip(ours["logs"], trl["logs"]):
            for key in ("loss", "entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean",
                        "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max", "grad_norm"):
                if key == "kl" and runner.CONFIGS[name][0]["beta"] == 0.0:
                    assert key not in ours_log and key not in trl_log
                    continue
                assert ours_log[key] == pytest.approx(trl_log[key], rel=TOLERANCE, abs=TOLERANCE), (key, name)
        assert max(log["clip_ratio/region_mean"] for log in trl["logs"]) > 0  # the clip bites


@pytest.mark.parametrize("name", GLOBAL_NORMALISER)
def test_two_processes_equal_one_process(runs, name):
    one = runs["one"][name]
    for side in ("ours", "trl"):
        _assert_same_step(runs["two"][0][name][side], one[side], f"{name}/{side}: two processes vs one")
    assert _relative_distance(one["ours"]["after"], one["ours"]["before"]) > 1e-3


def test_bnpo_normalises_per_process_in_trl_and_in_the_patch(runs):
    # TRL's bnpo divides each process's token sum by that process's own token count and DDP averages: with groups
    # of unequal length the 2-process step is not the 1-process step. The patch keeps TRL's semantics (the
    # previous test shows it equal to TRL), and this shows the layout comparison is sensitive to a normaliser.
    name = "bnpo-token-kl"
    one, two = runs["one"][name], runs["two"][0][name]
    for side in ("ours", "trl"):
        assert _relative_distance(_update(two[side]), _update(one[side])) > 100 * TOLERANCE, side
    _assert_same_step(one["ours"], one["trl"], f"{name}: one process, patched vs TRL")


# ---------------------------------------------------------------------------------------------
# DeepSpeed


@pytest.fixture()
def plain_trainer(model_dir, tmp_path):
    return _trainer(model_dir, tmp_path, patch=False, loss_type="grpo", beta=0.0)


def _assert_refused(trainer, message: str, reason: str) -> None:
    with pytest.raises(ValueError, match="patch_grpo_trainer") as error:
        integration.patch_grpo_trainer(trainer)
    assert message in str(error.value) and reason in str(error.value), str(error.value)
    assert getattr(trainer, "gtalign_logprob_path", None) is None
    assert getattr(trainer.model, "_gtalign_fused_head", None) is None


def test_deepspeed_zero3_is_refused_with_its_reason(plain_trainer, monkeypatch):
    import transformers.integrations.deepspeed as hf_deepspeed

    monkeypatch.setattr(hf_deepspeed, "is_deepspeed_zero3_enabled", lambda: True)
    _assert_refused(plain_trainer, "deepspeed ZeRO-3", "outside the module's gather hooks")


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_1_2_are_refused_without_a_parity_test(plain_trainer, monkeypatch, stage):
    # A stand-in for accelerate's DeepSpeedPlugin, where transformers' Trainer reads it (is_deepspeed_enabled,
    # accelerator.state.deepspeed_plugin); DeepSpeed itself is not installed here.
    state = types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(zero_stage=stage))
    monkeypatch.setattr(plain_trainer, "is_deepspeed_enabled", True)
    monkeypatch.setattr(plain_trainer, "accelerator", types.SimpleNamespace(state=state))
    _assert_refused(plain_trainer, f"deepspeed ZeRO-{stage}", "no parity test")


def test_no_deepspeed_is_not_refused(plain_trainer):
    assert not plain_trainer.is_deepspeed_enabled
    assert integration.patch_grpo_trainer(plain_trainer).gtalign_logprob_path == "linear_token_logprobs"
