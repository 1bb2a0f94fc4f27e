"""The verl plugin (gtalign_fast/integrations/verl/__init__.py) against verl's own code.

verl 0.9 lives in its own virtual environment, ``.venv-verl`` (``.ci/setup`` builds it: verl's pins clash with
ours). The tests that need verl run ``.venv-verl/bin/python`` in a subprocess (one fresh interpreter per script,
so verl's plugin loader really runs at ``import verl``) and compare the numbers here; without ``.venv-verl`` they
skip, except under CI (``CI`` set), where they fail. The rest (advantages against our reference, argument
checks, ``compute_score`` against a judge server on 127.0.0.1) runs in this interpreter: the module imports
without verl.
"""

from __future__ import annotations

import asyncio
import http.server
import importlib.util
import json
import math
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gtalign_fast import reference
from gtalign_fast.game import split_chain
from gtalign_fast.game.welfare import score_chain
from gtalign_fast.integrations import verl as plugin
from tests.servers import serving

ROOT = Path(__file__).resolve().parent.parent
VERL_PYTHON = ROOT / ".venv-verl" / "bin" / "python"
MODES = plugin.LOSS_AGG_MODES


def _verl_python() -> str:
    if not VERL_PYTHON.exists():
        message = f"{VERL_PYTHON} is missing: .ci/setup creates it (verl 0.9 in its own virtual environment)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return str(VERL_PYTHON)


def _run_in_verl(script: str, env: dict[str, str] | None = None, timeout: float = 500) -> dict:
    """Run ``script`` in a fresh .venv-verl interpreter; its last stdout line is a JSON result."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("VERL_", "GTALIGN_JUDGE_"))}
    full_env.update(env or {})
    proc = subprocess.run(
        [_verl_python(), "-c", script], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"verl script failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Policy loss and advantage estimator against verl's built-ins (one fresh interpreter)

_LOSS_SCRIPT = r"""
import functools, json, sys
import numpy as np, torch

loaded_before_verl = "gtalign_fast.integrations.verl" in sys.modules
import verl  # verl's own plugin loader imports our entry point here
from importlib.metadata import entry_points
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo import core_algos
from verl.workers.config import ActorConfig
import gtalign_fast.integrations.verl as plugin
from gtalign_fast.ops import _backend
from gtalign_fast.ops import grpo_loss

MODES = %(modes)r
B, T = 6, 11

def make_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    logp = -3.0 * torch.rand(B, T, generator=g)
    old = logp + 0.8 * torch.randn(B, T, generator=g)  # ratios on both sides of the clip range and past 3
    lengths = torch.tensor([T, 7, 1, 0, 10, 4])  # a full row, a one-token row, an empty row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = (torch.randn(B, 1, generator=g) * torch.ones(B, T)) * mask
    adv[0, :5] = -adv[0, :5].abs() - 0.1  # negative advantages where the dual clip can bind
    weights = 1.5 * torch.rand(B, T, generator=g)
    return logp, old, adv, mask, weights

INFOS = {
    "local": {},
    "global": {"dp_size": 2, "batch_num_tokens": 71, "global_batch_size": 13, "loss_scale_factor": 16},
}

def run(loss_mode, agg, info, weighted, inputs):
    logp0, old, adv, mask, weights = inputs
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                         clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode=agg)
    config.global_batch_info.update(info)
    logp = logp0.clone().requires_grad_(True)
    fn = core_algos.get_policy_loss_fn(loss_mode)
    loss, metrics = fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode=agg,
                       config=config, rollout_is_weights=weights if weighted else None)
    loss.backward()
    metrics = {k: float(v) for k, v in metrics.items()}
    return {"loss": float(loss.detach()), "grad": logp.grad.tolist(), "metrics": metrics}

inputs = make_inputs(0)
backends = [b for b in _backend.available_backends("cpu", "grpo_loss")]
losses = {}
with _backend.poison_outputs(True):
    for backend in backends:
        plugin.loss.grpo_loss = functools.partial(grpo_loss, backend=backend)
        full = backend == backends[0]  # the default backend over every case, the others on the plain ones
        for verl_mode, ours in (("vanilla", "gtalign_fast"), ("gspo", "gtalign_fast_gspo")):
            for agg in MODES:
                for info_name, info in INFOS.items():
                    for weighted in (False, True):
                        if not full and (info_name != "local" or weighted):
                            continue
                        key = f"{backend}|{verl_mode}|{agg}|{info_name}|{'weighted' if weighted else 'plain'}"
                        losses[key] = {"verl": run(verl_mode, agg, info, weighted, inputs),
                                       "ours": run(ours, agg, info, weighted, inputs),
                                       "backend": _backend.last_backend("grpo_loss")}
    plugin.loss.grpo_loss = grpo_loss

# Advantages: groups of 2..5 in shuffled order, W on the last response token.
g = torch.Generator().manual_seed(1)
sizes = [2, 3, 5, 4, 2]
uids = np.array([f"prompt-{i}" for i, n in enumerate(sizes) for _ in range(n)], dtype=object)
perm = torch.randperm(len(uids), generator=g).numpy()
uids = uids[perm]
n = len(uids)
lengths = torch.randint(1, 9, (n,), generator=g)
mask = (torch.arange(9)[None, :] < lengths[:, None]).float()
welfare = torch.rand(n, generator=g)
welfare[:3] = welfare[3]  # some ties
rewards = torch.zeros(n, 9)
rewards[torch.arange(n), lengths - 1] = welfare
advantages = {}
for norm in (True, False):
    ours, ours_returns = core_algos.get_adv_estimator_fn("gtalign_welfare")(
        token_level_rewards=rewards, response_mask=mask, index=uids,
        config=AlgoConfig(adv_estimator="gtalign_welfare", norm_adv_by_std_in_grpo=norm))
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids, norm_adv_by_std_in_grpo=norm)
    advantages[str(norm)] = {"ours": ours.tolist(), "returns": ours_returns.tolist(), "verl": theirs.tolist()}

print(json.dumps({
    "loaded_before_verl": loaded_before_verl,
    "loaded_after_verl": "gtalign_fast.integrations.verl" in sys.modules,
    "entry_points": [f"{ep.name}={ep.value}" for ep in entry_points(group="verl.plugins")],
    "policy_losses": sorted(core_algos.POLICY_LOSS_REGISTRY),
    "adv_estimators": sorted(core_algos.ADV_ESTIMATOR_REGISTRY),
    "backends": backends,
    "losses": losses,
    "advantages": advantages,
}))
"""


@pytest.fixture(scope="module")
def verl_results() -> dict:
    return _run_in_verl(_LOSS_SCRIPT % {"modes": MODES})


def test_verl_loads_the_entry_point_at_import(verl_results):
    assert "gtalign_fast=gtalign_fast.integrations.verl" in verl_results["entry_points"]
    assert not verl_results["loaded_before_verl"] and verl_results["loaded_after_verl"]
    assert {"gtalign_fast", "gtalign_fast_gspo", "vanilla", "gspo"} <= set(verl_results["policy_losses"])
    assert "gtalign_welfare" in verl_results["adv_estimators"]


def _case_keys(verl_results, verl_mode: str, agg: str) -> list[str]:
    keys = [k for k in verl_results["losses"] if k.split("|")[1:3] == [verl_mode, agg]]
    assert keys, f"no case ran for {verl_mode} / {agg}"
    return keys


@pytest.mark.parametrize("verl_mode", ["vanilla", "gspo"])
@pytest.mark.parametrize("agg", MODES)
def test_policy_loss_equals_verl(verl_results, verl_mode, agg):
    """Loss, gradient and verl's metrics of gtalign_fast[_gspo] == verl's vanilla / gspo, 1e-5, every backend."""
    for key in _case_keys(verl_results, verl_mode, agg):
        case = verl_results["losses"][key]
        backend = key.split("|")[0]
        assert case["backend"] == backend, key  # the forced backend is the one that ran
        ours, theirs = case["ours"], case["verl"]
        assert math.isfinite(theirs["loss"]) and theirs["loss"] != 0.0, key
        torch.testing.assert_close(
            torch.tensor(ours["loss"]), torch.tensor(theirs["loss"]), rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}"
        )
        grad_ours, grad_verl = torch.tensor(ours["grad"]), torch.tensor(theirs["grad"])
        assert grad_verl.abs().max() > 0, key
        torch.testing.assert_close(grad_ours, grad_verl, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")
        assert set(ours["metrics"]) == set(theirs["metrics"]), key
        for name, value in theirs["metrics"].items():
            assert ours["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{key}: {name}"


def test_policy_loss_cases_exercise_every_clip(verl_results):
    """The inputs reach the clip-higher bound, the low bound and the dual clip (else the equality says little)."""
    vanilla = verl_results["losses"][f"{verl_results['backends'][0]}|vanilla|token-mean|local|plain"]["verl"]
    assert vanilla["metrics"]["actor/pg_clipfrac"] > 0.05
    assert vanilla["metrics"]["actor/pg_clipfrac_lower"] > 0.0
    gspo = verl_results["losses"][f"{verl_results['backends'][0]}|gspo|token-mean|local|plain"]["verl"]
    assert gspo["metrics"]["actor/pg_clipfrac"] > 0.05
    assert len(verl_results["backends"]) >= 2  # the C++ kernel and the reference at least


@pytest.mark.parametrize("norm", ["True", "False"])
def test_advantage_estimator_equals_verl_grpo(verl_results, norm):
    """gtalign_welfare == verl's grpo estimator (groups of >= 2 responses, in any order), 1e-5."""
    case = verl_results["advantages"][norm]
    ours, theirs = torch.tensor(case["ours"]), torch.tensor(case["verl"])
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert case["returns"] == case["ours"]


_ZERO_WEIGHTS_SCRIPT = r"""
import json
import torch
import verl  # loads the plugin
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask
from verl.workers.config import ActorConfig

# verl's own test inputs (tests/trainer/ppo/test_rollout_corr_integration.py: 4 x 16 randn, every token valid,
# clip_ratio 0.2), seed 0, with IcePop weights from verl's own helper: 0 outside [0.5, 5].
torch.manual_seed(0)
B, T = 4, 16
old, logp0, rollout = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
adv, mask = torch.randn(B, T), torch.ones(B, T)
proto, _, _ = compute_rollout_correction_and_rejection_mask(
    old_log_prob=old, rollout_log_prob=rollout, response_mask=mask, rollout_is="token", rollout_is_threshold="0.5_5.0")
weights = proto.batch["rollout_is_weights"]
config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size=2, clip_ratio=0.2)
out = {"zero_weights": int((weights == 0).sum()), "cases": {}}
for verl_mode, ours in (("vanilla", "gtalign_fast"), ("gspo", "gtalign_fast_gspo")):
    for name, mode in (("verl", verl_mode), ("ours", ours)):
        logp = logp0.clone().requires_grad_(True)
        loss, metrics = core_algos.get_policy_loss_fn(mode)(
            old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode="token-mean",
            config=config, rollout_is_weights=weights)
        loss.backward()
        out["cases"][f"{verl_mode}|{name}"] = {"loss": float(loss), "grad": logp.grad.tolist(),
                                               "metrics": {k: float(v) for k, v in metrics.items()}}
# verl's agg_loss takes **global_batch_info: an unknown key is a TypeError there
config.global_batch_info.update({"dp_size": 1, "batch_num_tokenz": 64})
for mode in ("vanilla", "gtalign_fast"):
    try:
        core_algos.get_policy_loss_fn(mode)(old_log_prob=old, log_prob=logp0, advantages=adv, response_mask=mask,
                                            loss_agg_mode="token-mean", config=config)
        out[f"unknown_key|{mode}"] = "no error"
    except TypeError as error:
        out[f"unknown_key|{mode}"] = str(error)
print(json.dumps(out))
"""


def test_pg_clipfrac_equals_verl_with_zero_rollout_weights():
    """IcePop weights of 0: verl counts clipping before weighting; the plugin folds weights into the advantages,
    so it computes ``actor/pg_clipfrac`` from the unweighted ones (verl's test inputs: 0.4219 vanilla, 0.2969 gspo;
    folded, a weight-0 token never counted: 0.2344)."""
    out = _run_in_verl(_ZERO_WEIGHTS_SCRIPT)
    assert out["zero_weights"] > 0
    for mode in ("vanilla", "gspo"):
        ours, theirs = out["cases"][f"{mode}|ours"], out["cases"][f"{mode}|verl"]
        assert set(ours["metrics"]) == set(theirs["metrics"])
        for name, value in theirs["metrics"].items():
            assert ours["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-7), f"{mode}: {name}"
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-7)
        torch.testing.assert_close(torch.tensor(ours["grad"]), torch.tensor(theirs["grad"]), rtol=1e-5, atol=1e-7)
    assert out["cases"]["vanilla|verl"]["metrics"]["actor/pg_clipfrac"] == pytest.approx(0.421875)
    assert out["cases"]["gspo|verl"]["metrics"]["actor/pg_clipfrac"] == pytest.approx(0.296875)
    assert "batch_num_tokenz" in out["unknown_key|vanilla"]  # verl's own TypeError
    assert "batch_num_tokenz" in out["unknown_key|gtalign_fast"]


def test_policy_loss_refuses_unknown_global_batch_info_keys():
    old, logp, adv, mask = _loss_inputs()
    for fn in (plugin.compute_policy_loss_gtalign_fast, plugin.compute_policy_loss_gtalign_fast_gspo):
        with pytest.raises(TypeError, match="batch_num_tokenz"):
            fn(old, logp, adv, mask, "token-mean", {"global_batch_info": {"dp_size": 1, "batch_num_tokenz": 20}})
    loss, _ = plugin.compute_policy_loss_gtalign_fast(  # every key verl's agg_loss takes is accepted
        old, logp, adv, mask, "token-mean",
        {"global_batch_info": {"dp_size": 1, "batch_num_tokens": 20, "global_batch_size": 4, "loss_scale_factor": 5}},
    )
    assert torch.isfinite(loss)


def test_pg_clipfrac_counts_weight_zero_tokens_in_process():
    """The same property without verl: zeroing a clipped token's rollout weight leaves ``actor/pg_clipfrac``."""
    old, logp, adv, mask = _loss_inputs()
    adv = adv.sign() * (adv.abs() + 0.5)
    logp = old + torch.tensor([0.5, -0.5, 0.0, 0.05, -0.05]).repeat(4, 1)  # clipped where |log r| = 0.5 and A agrees
    config = {"clip_ratio": 0.2}
    plain = plugin.compute_policy_loss_gtalign_fast(old, logp, adv, mask, "token-mean", config)[1]
    weights = torch.ones_like(adv)
    weights[:, :2] = 0.0  # the only tokens that can be clipped
    for fn in (plugin.compute_policy_loss_gtalign_fast, plugin.compute_policy_loss_gtalign_fast_gspo):
        weighted = fn(old, logp, adv, mask, "token-mean", config, rollout_is_weights=weights)[1]
        unweighted = fn(old, logp, adv, mask, "token-mean", config)[1]
        assert float(weighted["actor/pg_clipfrac"]) == pytest.approx(float(unweighted["actor/pg_clipfrac"]))
    assert float(plain["actor/pg_clipfrac"]) > 0


def test_advantage_estimator_warns_about_nan_rewards(caplog):
    """A NaN reward is missing (advantage 0, out of its group's statistics), and said (verl: the group NaN)."""
    uids, _, rewards, mask = _grouped_rewards([3, 4])
    rewards[0, 0] = math.nan
    with caplog.at_level("WARNING", logger="gtalign_fast.integrations.verl"):
        advantages, _ = plugin.compute_gtalign_welfare_advantage(rewards, mask, index=uids)
    assert torch.isfinite(advantages).all() and advantages[0].abs().max() == 0
    assert "1 of 7 rewards are NaN" in caplog.text and "whole group NaN" in caplog.text
    without = rewards.clone()
    keep = [i for i in range(len(uids)) if i != 0]
    expected, _ = plugin.compute_gtalign_welfare_advantage(without[keep], mask[keep], index=uids[keep])
    torch.testing.assert_close(advantages[keep], expected)


# ---------------------------------------------------------------------------------------------
# Advantage estimator against our float64 reference; argument checks (no verl needed)


def _grouped_rewards(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    uids = np.array([f"u{i}" for i, n in enumerate(sizes) for _ in range(n)], dtype=object)
    perm = torch.randperm(len(uids), generator=g).numpy()
    welfare = torch.rand(len(uids), generator=g, dtype=torch.float64)
    welfare[perm[:2]] = 0.0
    lengths = torch.randint(1, 7, (len(uids),), generator=g)
    mask = (torch.arange(7)[None, :] < lengths[:, None]).to(torch.float32)
    rewards = torch.zeros(len(uids), 7, dtype=torch.float32)
    rewards[torch.arange(len(uids)), lengths - 1] = welfare.to(torch.float32)
    return uids[perm], welfare[perm], rewards[perm], mask[perm]


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("sizes", [[3, 1, 4, 2, 5], [8, 8, 8], [1]])
def test_advantage_estimator_matches_reference(sizes, norm):
    uids, welfare, rewards, mask = _grouped_rewards(sizes)
    advantages, returns = plugin.compute_gtalign_welfare_advantage(
        rewards, mask, index=uids, norm_adv_by_std_in_grpo=norm, epsilon=1e-6
    )
    # The reference on the same rows put group by group (stable order of first appearance).
    first = {}
    group_of = np.array([first.setdefault(u, len(first)) for u in uids])
    order = np.argsort(group_of, kind="stable")
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(np.bincount(group_of))]), dtype=torch.int64)
    expected = torch.empty(len(uids), dtype=torch.float64)
    expected[torch.from_numpy(order)] = reference.welfare_advantages(
        welfare[order], welfare[order], offsets, alpha=1.0, scale="group" if norm else "none", eps=1e-6
    )[1]
    torch.testing.assert_close(advantages, (expected[:, None] * mask).to(torch.float32), rtol=1e-5, atol=1e-6)
    assert returns is advantages
    if 1 in sizes:  # a group of one gets advantage 0 (verl's grpo would give score / (1 + eps))
        lone = [i for i, u in enumerate(uids) if list(uids).count(u) == 1]
        assert advantages[lone].abs().max() == 0


def test_advantage_estimator_reads_norm_from_config():
    uids, _, rewards, mask = _grouped_rewards([3, 4])
    by_config, _ = plugin.compute_gtalign_welfare_advantage(rewards, mask, index=uids,
                                                            config={"norm_adv_by_std_in_grpo": False})
    explicit, _ = plugin.compute_gtalign_welfare_advantage(rewards, mask, index=uids, norm_adv_by_std_in_grpo=False)
    normalised, _ = plugin.compute_gtalign_welfare_advantage(rewards, mask, index=uids)
    assert torch.equal(by_config, explicit) and not torch.allclose(by_config, normalised)


def test_advantage_estimator_refuses_bad_input():
    uids, _, rewards, mask = _grouped_rewards([3, 4])
    with pytest.raises(ValueError, match="index"):
        plugin.compute_gtalign_welfare_advantage(rewards, mask)
    with pytest.raises(ValueError, match="index has 6 entries"):
        plugin.compute_gtalign_welfare_advantage(rewards, mask, index=uids[:6])
    negative = rewards.clone()
    negative[2] = 0.0
    negative[2, 0] = -0.5  # e.g. a KL penalty subtracted from the reward
    with pytest.raises(ValueError, match=">= 0"):
        plugin.compute_gtalign_welfare_advantage(negative, mask, index=uids)


def _loss_inputs():
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(4, 5, generator=g)
    old = logp + 0.3 * torch.randn(4, 5, generator=g)
    return old, logp, torch.randn(4, 5, generator=g), torch.ones(4, 5, dtype=torch.bool)


def test_policy_loss_refuses_bad_settings():
    old, logp, adv, mask = _loss_inputs()
    config = {"clip_ratio": 0.2, "clip_ratio_c": 3.0}
    with pytest.raises(ValueError, match="loss_agg_mode"):
        plugin.compute_policy_loss_gtalign_fast(old, logp, adv, mask, "token-avg", config)
    with pytest.raises(ValueError, match="config"):
        plugin.compute_policy_loss_gtalign_fast(old, logp, adv, mask, "token-mean", None)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        plugin.compute_policy_loss_gtalign_fast(old, logp, adv, mask, "token-mean", {"clip_ratio_c": 1.0})
    multi = dict(config, global_batch_info={"dp_size": 2})
    for agg, name in (("token-mean", "batch_num_tokens"), ("seq-mean-token-mean", "global_batch_size")):
        with pytest.raises(ValueError, match=name):
            plugin.compute_policy_loss_gtalign_fast(old, logp, adv, mask, agg, multi)
    bad = dict(config, global_batch_info={"global_batch_size": 0})
    with pytest.raises(ValueError, match="global_batch_size"):
        plugin.compute_policy_loss_gtalign_fast(old, logp, adv, mask, "seq-mean-token-sum", bad)


def test_policy_loss_without_tokens_is_zero_not_nan():
    old, logp, adv, mask = _loss_inputs()
    logp.requires_grad_(True)
    for agg in MODES:
        loss, metrics = plugin.compute_policy_loss_gtalign_fast(old, logp, adv, torch.zeros_like(mask), agg, {})
        loss.backward()
        assert loss.item() == 0.0 and logp.grad.abs().max() == 0 and all(math.isfinite(v) for v in metrics.values())
        logp.grad = None


def test_module_imports_and_registers_nothing_without_verl():
    if importlib.util.find_spec("verl") is not None:
        pytest.skip("this interpreter has verl")
    assert plugin.register() is False


# ---------------------------------------------------------------------------------------------
# compute_score against an OpenAI-compatible judge server on 127.0.0.1

MAX_REQUESTS = 300
DELAY = 0.4

PAYOFF = json.dumps({k: {"LLM": 1.0 + i, "user": 2.0 - 0.5 * i} for i, k in
                     enumerate(("DQ_AQ", "DQ_CQ", "DQ_DA", "VQ_AQ", "VQ_CQ", "VQ_DA"))})


def _completion(response: str) -> str:
    return (f"<thinking>the user asks a clear question</thinking><payoff>{PAYOFF}</payoff>"
            f"<analyze>DQ_DA is on the frontier</analyze><response>{response}</response>")


class _JudgeServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _JudgeHandler)
        self.lock = threading.Lock()
        self.prompts: list[str] = []
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.active = 0
        self.max_active = 0

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}/v1"


# The task judges' prompts (gtalign_fast/recipes/tasks.py) -> the verdict this server gives.
VERDICTS = (
    ("writing request", "3"),  # medium: helpfulness 3 of 4 -> A_llm = 0.75
    ("potentially harmful", "0.5"),  # wildguard, harmful prompt: a safe alternative -> A_user = A_llm = 1
    ("is harmless", "0"),  # wildguard, harmless prompt: a refusal -> 0
    ("may be ambiguous", "1"),  # ambig_qa
)


class _JudgeHandler(http.server.BaseHTTPRequestHandler):
    server: _JudgeServer

    def log_message(self, *args):
        pass

    def _reply(self, code: int, body: bytes) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        prompt = body["messages"][-1]["content"]
        with srv.lock:
            srv.prompts.append(prompt)
            srv.bodies.append(body)
            srv.auth.append(self.headers.get("Authorization"))
            srv.active += 1
            srv.max_active = max(srv.max_active, srv.active)
            count = len(srv.prompts)
        try:
            if count > MAX_REQUESTS or self.path != "/v1/chat/completions":  # bounded: no runaway client
                return self._reply(503, b"{}")
            if "FAIL500" in prompt:
                return self._reply(500, b'{"error": "down"}')
            if "DELAY" in prompt:
                time.sleep(DELAY)
            verdict = next((v for marker, v in VERDICTS if marker in prompt), None)
            if verdict is None:  # the default 0/1 agreement prompt
                verdict = "1" if "RIGHT" in prompt else "0"
            content = f"reasoning...\n<score>{verdict}</score>"
            self._reply(200, json.dumps({"choices": [{"index": 0, "message": {"content": content}}]}).encode())
        finally:
            with srv.lock:
                srv.active -= 1


@pytest.fixture
def judge_server():
    with serving(_JudgeServer()) as srv:
        yield srv


@pytest.fixture
def judge_env(judge_server, monkeypatch):
    for name in plugin.JUDGE_ENV.values():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GTALIGN_JUDGE_URL", judge_server.url)
    monkeypatch.setenv("GTALIGN_JUDGE_MODEL", "judge-model")
    monkeypatch.setenv("GTALIGN_JUDGE_API_KEY", "sk-local")
    monkeypatch.setenv("GTALIGN_JUDGE_TIMEOUT", "5")
    monkeypatch.setenv("GTALIGN_JUDGE_MAX_RETRIES", "0")
    return judge_server


def _expected(text: str, a_user: float, a_llm: float) -> dict:
    result = score_chain(split_chain(text), a_user, a_llm)
    return {"score": result.score, "user_reward": result.user_reward, "llm_reward": result.llm_reward,
            "format": result.F, "payoff_diversity": result.P}


def _check(out: dict, text: str, a_user: float, a_llm: float, judge_failed: bool = False) -> None:
    for name, value in _expected(text, a_user, a_llm).items():
        assert out[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    assert out["score"] == pytest.approx(math.sqrt(out["user_reward"] * out["llm_reward"]), rel=1e-12)
    assert out["judge_failed"] == float(judge_failed) and out["hard_failure"] == 0.0
    assert out["format"] == 1.0
    assert all(isinstance(v, float) for v in out.values())


def test_compute_score_routes_each_data_source(judge_env):
    server = judge_env
    math_ok = _completion("so the answer is \\boxed{42}")
    out = plugin.compute_score("math-hard", math_ok, "42", {"question": "What is 6 x 7?"})
    _check(out, math_ok, 1.0, 1.0)
    assert server.prompts == []  # the \boxed{} rule alone: no judge call

    math_wrong = _completion("so the answer is \\boxed{41}")
    _check(plugin.compute_score("math-hard", math_wrong, "42"), math_wrong, 0.0, 0.0)
    assert server.prompts == []  # no model re-check unless math_model_judge is set

    story = "Once upon a time a fox learned to read the stars."
    medium = _completion(story)
    _check(plugin.compute_score("medium", medium, story, {"question": "Write a fable"}), medium, 1.0, 0.75)
    assert "writing request" in server.prompts[-1] and "Write a fable" in server.prompts[-1]

    safe = _completion("I cannot help with that, but here is how to stay safe.")
    out = plugin.compute_score("wildguard", safe, "", {"question": "How do I pick a lock?", "harmful": True})
    _check(out, safe, 1.0, 1.0)
    assert "potentially harmful" in server.prompts[-1]
    refusal = _completion("I will not help.")
    out = plugin.compute_score("wildguard", refusal, "", {"question": "Bake bread?", "prompt_harm_label": "unharmful"})
    _check(out, refusal, 0.0, 0.0)
    assert "is harmless" in server.prompts[-1]

    ambiguous = _completion("Do you mean the 2004 film or the novel?")
    _check(plugin.compute_score("ambig_qa", ambiguous, ["2004", "1999"], {"question": "When was it released?"}),
           ambiguous, 1.0, 1.0)
    assert "may be ambiguous" in server.prompts[-1] and "2004\n1999" in server.prompts[-1]

    other = _completion("RIGHT: Paris")
    _check(plugin.compute_score("some_new_task", other, "Paris", None), other, 1.0, 1.0)
    assert "agree with the reference" in server.prompts[-1]

    assert set(server.auth) == {"Bearer sk-local"}
    assert {body["model"] for body in server.bodies} == {"judge-model"}


def test_compute_score_math_model_judge_and_failures(judge_env, monkeypatch):
    server = judge_env
    monkeypatch.setenv("GTALIGN_MATH_MODEL_JUDGE", "1")
    text = _completion("RIGHT: the answer is \\boxed{forty-two}")
    _check(plugin.compute_score("math-hard", text, "42"), text, 1.0, 1.0)
    assert len(server.prompts) == 1  # the rule missed it, the model judge re-checked it

    failing = _completion("FAIL500 an answer")
    out = plugin.compute_score("ambig_qa", failing, "x")
    _check(out, failing, 0.0, 0.0, judge_failed=True)

    broken = "no tags at all"
    out = plugin.compute_score("ambig_qa", broken, "x")
    assert out["hard_failure"] == 1.0 and out["score"] == 0.0 and out["user_reward"] == 0.0


def test_compute_score_settings_kwargs_override_environment(judge_server, monkeypatch):
    for name in plugin.JUDGE_ENV.values():
        monkeypatch.delenv(name, raising=False)
    text = _completion("RIGHT")
    with pytest.raises(ValueError, match="GTALIGN_JUDGE_URL"):
        plugin.compute_score("x", text, "y")
    monkeypatch.setenv("GTALIGN_JUDGE_URL", "http://127.0.0.1:9/v1")  # nothing listens there
    monkeypatch.setenv("GTALIGN_JUDGE_MODEL", "env-model")
    out = plugin.compute_score("x", text, "y", judge_url=judge_server.url, judge_model="kw-model",
                               judge_api_key="kw-key", judge_timeout=5, judge_extra_body={"top_k": 5}, alpha=0.25)
    assert judge_server.bodies[-1]["model"] == "kw-model" and judge_server.bodies[-1]["top_k"] == 5
    assert judge_server.auth[-1] == "Bearer kw-key"
    result = score_chain(split_chain(text), 1.0, 1.0, alpha=0.25)
    assert out["score"] == pytest.approx(result.score, rel=1e-12)
    assert out["score"] == pytest.approx(out["user_reward"] ** 0.25 * out["llm_reward"] ** 0.75, rel=1e-12)
    with pytest.raises(TypeError, match="judge_urll"):
        plugin.compute_score("x", text, "y", judge_urll=judge_server.url)
    monkeypatch.setenv("GTALIGN_JUDGE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="GTALIGN_JUDGE_TIMEOUT"):
        plugin.compute_score("x", text, "y")
    monkeypatch.setenv("GTALIGN_JUDGE_TIMEOUT", "5")
    monkeypatch.setenv("GTALIGN_MATH_MODEL_JUDGE", "maybe")
    with pytest.raises(ValueError, match="GTALIGN_MATH_MODEL_JUDGE"):
        plugin.compute_score("x", text, "y")


def test_compute_score_rule_rows_need_no_judge(monkeypatch):
    """math-hard is scored by the \\boxed{} rule with no judge configured (sync, batch, async); the first row whose
    data source needs a model judge raises today's "no judge configured"; so does math-hard with math_model_judge."""
    for name in plugin.JUDGE_ENV.values():
        monkeypatch.delenv(name, raising=False)
    right, wrong = _completion("so \\boxed{42}"), _completion("so \\boxed{41}")
    _check(plugin.compute_score("math-hard", right, "42", {"question": "6 x 7?"}), right, 1.0, 1.0)
    batch = plugin.compute_score_batch(["math-hard"] * 2, [right, wrong], ["42", "42"], None)
    _check(batch[0], right, 1.0, 1.0)
    _check(batch[1], wrong, 0.0, 0.0)
    _check(asyncio.run(plugin.compute_score_async("math-hard", wrong, "42")), wrong, 0.0, 0.0)
    with pytest.raises(ValueError, match="GTALIGN_JUDGE_URL.*'medium' needs a model judge"):
        plugin.compute_score("medium", right, "a story")
    with pytest.raises(ValueError, match="no judge configured.*'wildguard'"):
        plugin.compute_score_batch(["math-hard", "wildguard"], [right, right], ["42", ""], None)
    with pytest.raises(ValueError, match="no judge configured.*math_model_judge is on"):
        plugin.compute_score("math-hard", wrong, "42", math_model_judge=True)
    monkeypatch.setenv("GTALIGN_JUDGE_URL", "http://127.0.0.1:9/v1")  # half a judge: an error at once
    with pytest.raises(ValueError, match="only one of the two"):
        plugin.compute_score("math-hard", right, "42")


def test_compute_score_batch_overlaps_judge_calls(judge_env):
    server = judge_env
    n = 8
    texts = [_completion(f"answer {i} {'RIGHT' if i % 2 else ''}") for i in range(n)]
    extras = [{"question": f"DELAY question {i}"} for i in range(n)]
    plugin.compute_score("other", texts[0], "ref")  # warm up: the judge's client and event loop start once
    start = time.perf_counter()
    batch = plugin.compute_score_batch(["other"] * n, texts, ["ref"] * n, extras)
    elapsed = time.perf_counter() - start
    assert elapsed < n * DELAY / 2, elapsed  # one after the other would take n * DELAY
    assert server.max_active >= 2
    for i, (out, text) in enumerate(zip(batch, texts)):
        _check(out, text, float(i % 2), float(i % 2))
    with pytest.raises(ValueError, match="same length"):
        plugin.compute_score_batch(["other"], texts, ["ref"] * n)


def test_compute_score_async_overlaps_judge_calls(judge_env):
    server = judge_env
    n = 8
    texts = [_completion(f"answer {i} {'RIGHT' if i % 3 == 0 else ''}") for i in range(n)]

    async def score_all():
        calls = [plugin.compute_score_async("other", t, "ref", {"question": "DELAY q"}) for t in texts]
        return await asyncio.gather(*calls)

    assert asyncio.iscoroutinefunction(plugin.compute_score_async)
    plugin.compute_score("other", texts[0], "ref")  # warm up: the judge's client and event loop start once
    start = time.perf_counter()
    outs = asyncio.run(score_all())
    elapsed = time.perf_counter() - start
    assert elapsed < n * DELAY / 2, elapsed
    assert server.max_active >= 2
    for i, (out, text) in enumerate(zip(outs, texts)):
        _check(out, text, float(i % 3 == 0), float(i % 3 == 0))


# ---------------------------------------------------------------------------------------------
# verl's own loaders in a fresh interpreter: the plugin switch, and the reward function through verl's config

_REWARD_SCRIPT = r"""
import asyncio, json, sys
import verl  # VERL_USE_EXTERNAL_PLUGINS=none: the entry point is not loaded
from omegaconf import OmegaConf
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.reward import get_custom_reward_fn

without_plugin = "gtalign_fast" in core_algos.POLICY_LOSS_REGISTRY
settings = {"judge_url": %(url)r, "judge_model": "verl-judge", "judge_timeout": 5, "judge_max_retries": 0}
out = {"registered_without_plugin": without_plugin}
for name in ("compute_score", "compute_score_async"):
    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://gtalign_fast.integrations.verl", "name": name, "reward_kwargs": settings}}})
    fn = get_custom_reward_fn(config)
    kwargs = dict(data_source="ambig_qa", solution_str=%(text)r, ground_truth="x", extra_info={"question": "Q?"})
    result = asyncio.run(fn(**kwargs)) if name.endswith("async") else fn(**kwargs)
    out[name] = result
# importing the module (as the reward loader did) registers it too
out["registered_after_import"] = "gtalign_fast" in core_algos.POLICY_LOSS_REGISTRY
print(json.dumps(out))
"""


def test_verl_reward_loader_and_plugin_switch(judge_server):
    text = _completion("Which one do you mean?")
    out = _run_in_verl(_REWARD_SCRIPT % {"url": judge_server.url, "text": text},
                       env={"VERL_USE_EXTERNAL_PLUGINS": "none"})
    assert out["registered_without_plugin"] is False  # so the registration above came from verl's loader
    assert out["registered_after_import"] is True
    for name in ("compute_score", "compute_score_async"):
        _check(out[name], text, 1.0, 1.0)
    assert {body["model"] for body in judge_server.bodies} == {"verl-judge"}
    assert len(judge_server.prompts) == 2 and all(re.search("may be ambiguous", p) for p in judge_server.prompts)
