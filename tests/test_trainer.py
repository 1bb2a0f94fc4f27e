"""GRPOTrainer / GRPOConfig: configuration, one step's maths, robustness, checkpoints, and learning.

The model is the toy GTAlign game of ``examples/toy_gtalign_game.py`` (a randomly initialised
2-layer Qwen2 with a 19-word vocabulary), so every test runs on a CPU in seconds. Updates are
compared through plain SGD with lr 1 and no clipping, so a parameter change IS the gradient
(Adam's first step, ~lr * sign(g), would hide small gradient differences).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from gtalign_fast import GRPOConfig, GRPOTrainer, ops, reference
from gtalign_fast.training.scoring import RewardScores, RewardSpec, is_welfare_reward

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "toy_gtalign_game.py"


def load_toy():
    spec = importlib.util.spec_from_file_location("toy_gtalign_game", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toy = load_toy()


# ---------------------------------------------------------------------------------------------
# Ops that other engineers are still merging: stand-ins built on reference.py, used ONLY when the
# public op is missing (the trainer always calls the public ops.<name>).

_WelfareAdvantages = namedtuple(
    "WelfareAdvantages", "welfare advantages group_mean group_std group_all_equal token_advantages"
)


def _fallback_welfare_advantages(user, llm, group, *, alpha=0.5, scale="group", eps=1e-6, unbiased=True,
                                 mask=None, backend=None):
    return _WelfareAdvantages(*reference.welfare_advantages(user, llm, group, alpha, scale, eps, unbiased, mask))


def _fallback_grpo_loss(logp, old_logp, advantages, mask, *, backend=None, **kwargs):
    return reference.grpo_loss(logp, old_logp, advantages, mask, **kwargs)


def _fallback_sample_(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, bias_ids=None, bias_values=None,
                      forced=None, seed=None, backend=None):
    rows = logits.shape[0]

    def full(value, dtype):
        return torch.full((rows,), value, dtype=dtype, device=logits.device)

    seeds = ((seed or 0) * 4099 + torch.arange(rows, device=logits.device)) % (2**31)
    tokens, logprobs, raw, processed = reference.sample(
        logits, full(temperature, torch.float32), full(top_k, torch.int64), full(top_p, torch.float32),
        full(min_p, torch.float32), None, None, full(-1, torch.int64), seeds,
    )
    logits.copy_(processed)
    return tokens, logprobs.float(), raw.float()


FALLBACKS = {
    "welfare_advantages": _fallback_welfare_advantages,
    "grpo_loss": _fallback_grpo_loss,
    "sample_": _fallback_sample_,
}


def install_missing_ops(monkeypatch=None) -> list[str]:
    """Put a stand-in on ``gtalign_fast.ops`` for each op not merged yet; returns their names."""
    missing = [name for name in FALLBACKS if not hasattr(ops, name)]
    for name in missing:
        if monkeypatch is not None:
            monkeypatch.setattr(ops, name, FALLBACKS[name], raising=False)
        else:
            setattr(ops, name, FALLBACKS[name])
    return missing


@pytest.fixture(autouse=True)
def _ops(monkeypatch):
    install_missing_ops(monkeypatch)


# ---------------------------------------------------------------------------------------------
# Helpers


def sgd_trainer(tmp_path, name="run", steps=1, seed=0, n_rows=64, **overrides) -> GRPOTrainer:
    """A toy trainer whose optimizer step is ``param -= grad`` (SGD, lr 1, no clipping)."""
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, seed)
    settings = dict(max_grad_norm=0.0, per_device_train_batch_size=16)
    settings.update(overrides)
    args = toy.toy_config(str(tmp_path / name), steps, seed, **settings)
    return GRPOTrainer(
        model, [toy.ToyWelfareReward(tokenizer)], args=args, train_dataset=toy.build_dataset(n_rows, seed),
        processing_class=tokenizer, optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None),
    )


def parameters(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def assert_same_update(a: dict, b: dict, before: dict, *, atol: float, rtol: float = 1e-4) -> None:
    moved = max(float((a[k] - before[k]).abs().max()) for k in a)
    assert moved > 1e-4, "the update did not move the parameters: nothing was compared"
    for key in a:
        torch.testing.assert_close(a[key] - before[key], b[key] - before[key], atol=atol, rtol=rtol, msg=key)


def read_metrics(trainer: GRPOTrainer) -> list[dict]:
    with open(os.path.join(trainer.args.output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ---------------------------------------------------------------------------------------------
# Configuration


def test_config_defaults_match_trl():
    # TRL's GRPOConfig (trl/trainer/grpo_config.py) and TrainingArguments defaults, where the concept exists
    args = GRPOConfig()
    expected = dict(
        num_generations=8, max_completion_length=256, temperature=1.0, top_p=1.0, top_k=0, min_p=None, beta=0.0,
        epsilon=0.2, epsilon_high=None, delta=None, loss_type="dapo", scale_rewards="group",
        importance_sampling_level="token", num_iterations=1, mask_truncated_completions=False, learning_rate=1e-6,
        per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=-1, logging_steps=10,
        save_steps=500, seed=42, gradient_checkpointing=True, max_grad_norm=1.0, lr_scheduler_type="linear",
        shuffle_dataset=True, reward_weights=None,
    )
    for name, value in expected.items():
        assert getattr(args, name) == value, name
    assert args.alpha == 0.5 and args.use_fused_lm_head and args.steering_mode == "off"


@pytest.mark.parametrize("scale, expected", [(True, "group"), (False, "none"), ("batch", "batch")])
def test_config_scale_rewards_accepts_trl_booleans(scale, expected):
    assert GRPOConfig(scale_rewards=scale).scale_rewards == expected


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(num_generations=1), "num_generations"),
        (dict(per_device_train_batch_size=6, num_generations=4), "multiple of num_generations"),
        (dict(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_generations=4),
         "multiple of num_generations"),
        (dict(loss_type="ppo"), "loss_type"),
        (dict(loss_type="cispo", delta=1.5), "cispo"),
        (dict(loss_type="vespo", dual_clip=3.0), "vespo"),
        (dict(vespo_lambda_pos=0.0), "vespo_lambda_pos"),
        (dict(scale_rewards="max"), "scale_rewards"),
        (dict(importance_sampling_level="seq"), "importance_sampling_level"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(beta=-0.1), "beta"),
        (dict(num_iterations=0), "num_iterations"),
        (dict(alpha=1.5), "alpha"),
        (dict(kernel_backend="tpu"), "kernel_backend"),
        (dict(lr_scheduler_type="polynomial"), "lr_scheduler_type"),
        (dict(steering_mode="rewrite"), "pricing_policy"),
        (dict(max_consecutive_nan_steps=0), "max_consecutive_nan_steps"),
        (dict(max_completion_length=0), "max_completion_length"),
        (dict(max_steps=-1, num_train_epochs=0), "max_steps"),
        (dict(report_to="wandb"), "report_to"),
    ],
)
def test_config_rejects_invalid_combinations(overrides, words):
    with pytest.raises(ValueError, match="GRPOConfig") as error:
        GRPOConfig(**overrides)
    assert words in str(error.value)


def test_trainer_rejects_bad_arguments(tmp_path):
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, 0)
    args = toy.toy_config(str(tmp_path), 1)
    data = toy.build_dataset(8, 0)
    reward = toy.ToyWelfareReward(tokenizer)
    with pytest.raises(ValueError, match="reward_weights"):
        GRPOTrainer(model, [reward], args=toy.toy_config(str(tmp_path), 1, reward_weights=[1.0, 2.0]),
                    train_dataset=data, processing_class=tokenizer)
    with pytest.raises(ValueError, match="'prompt'"):
        GRPOTrainer(model, [reward], args=args, train_dataset=[{"question": "x"}], processing_class=tokenizer)
    with pytest.raises(TypeError, match="not callable"):
        GRPOTrainer(model, ["my-reward-model"], args=args, train_dataset=data, processing_class=tokenizer)
    with pytest.raises(ValueError, match="processing_class"):
        GRPOTrainer(model, [reward], args=args, train_dataset=data)


def test_model_and_tokenizer_from_a_local_path(tmp_path):
    tokenizer = toy.build_tokenizer()
    toy.build_model(tokenizer, 0).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    args = toy.toy_config(str(tmp_path / "out"), 1, per_device_train_batch_size=16)
    trainer = GRPOTrainer(str(tmp_path / "model"), [toy.ToyWelfareReward(tokenizer)], args=args,
                          train_dataset=toy.build_dataset(8, 0))
    assert trainer.model.config._attn_implementation == "sdpa"  # no flash-attn on CPU
    trainer.train()
    assert trainer.step == 1


def test_fused_head_refuses_models_that_transform_logits(tmp_path):
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, 0)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="use_fused_lm_head"):
        GRPOTrainer(model, [toy.ToyWelfareReward(tokenizer)], args=toy.toy_config(str(tmp_path), 1),
                    train_dataset=toy.build_dataset(8, 0), processing_class=tokenizer)


# ---------------------------------------------------------------------------------------------
# Rewards -> advantages


def test_gtalign_reward_feeds_the_welfare_op():
    from gtalign_fast.game import judges
    from gtalign_fast.game.reward import GTAlignReward

    assert is_welfare_reward(GTAlignReward(judges.MathJudge()))
    assert not is_welfare_reward(GTAlignReward(judges.MathJudge(), variant="linear"))
    assert not is_welfare_reward(GTAlignReward(judges.MathJudge(), normalize="zscore"))
    assert not is_welfare_reward(lambda **_: [0.0])


def test_training_step_with_gtalign_reward(tmp_path):
    from gtalign_fast.game import judges
    from gtalign_fast.game.reward import GTAlignReward

    trainer = sgd_trainer(tmp_path)
    reward = GTAlignReward(judges.MathJudge())
    trainer.rewards = [RewardSpec(reward, 1.0, "gtalign", True)]
    trainer.train()  # toy completions are no GTAlign chain: every one is a hard failure, W = 0
    (row,) = read_metrics(trainer)
    assert row["welfare/W"] == 0.0 and row["welfare/hard_failures"] == 16 and row["frac_reward_zero_std"] == 1.0


def test_float_rewards_get_group_advantages_even_when_negative(tmp_path):
    trainer = sgd_trainer(tmp_path, scale_rewards="group", advantage_eps=1e-4)
    trainer.rewards = [RewardSpec(lambda **_: None, 1.0, "a", False), RewardSpec(lambda **_: None, 0.5, "b", False)]
    g = trainer.args.num_generations
    torch.manual_seed(1)
    per_func = torch.randn(2 * g, 2) * 3 - 2  # negative rewards: outside Cobb-Douglas' domain
    per_func[3, 0] = math.nan  # one function could not score completion 3: the other still counts
    per_func[5] = math.nan  # nobody could score completion 5: excluded, advantage 0
    scores = RewardScores(per_func, None, None, {"a": 1, "b": 1}, {})
    advantages, metrics = trainer._advantages(scores)

    total = torch.nansum(per_func.double() * torch.tensor([1.0, 0.5], dtype=torch.float64), 1)
    total[5] = math.nan
    expected = torch.zeros(2 * g, dtype=torch.float64)
    for start in (0, g):
        rows = total[start : start + g]
        valid = ~rows.isnan()
        centred = (rows[valid] - rows[valid].mean()) / (rows[valid].std() + 1e-4)
        expected[start : start + g][valid] = centred
    torch.testing.assert_close(advantages.double(), expected, atol=2e-5, rtol=1e-4)
    assert math.isclose(metrics["reward"], float(total[~total.isnan()].mean()), rel_tol=1e-5)


def test_one_extreme_plain_reward_leaves_other_groups_alone(tmp_path):
    # Plain rewards get a group advantage of their own: a huge value in group 0 must not shift or
    # round away the rewards of group 1 (a batch-wide shift into Cobb-Douglas' domain would).
    trainer = sgd_trainer(tmp_path, scale_rewards="group", advantage_eps=1e-4)
    trainer.rewards = [RewardSpec(lambda **_: None, 1.0, "plain", False)]
    assert not trainer.single_welfare
    g = trainer.args.num_generations
    torch.manual_seed(2)
    per_func = torch.rand(2 * g, 1) * 1e-3  # small differences: float32 would lose them next to 1e6
    calm, _ = trainer._advantages(RewardScores(per_func.clone(), None, None, {"plain": 0}, {}))
    per_func[1, 0] = -1e6
    extreme, _ = trainer._advantages(RewardScores(per_func, None, None, {"plain": 0}, {}))
    assert torch.equal(extreme[g:], calm[g:])
    assert float(extreme[g:].abs().max()) > 0.5  # the untouched group still has real advantages
    assert float(extreme[1]) < -2  # the extreme completion is its group's worst by far


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_advantages_match_the_welfare_op_statistics(scale, unbiased):
    # For non-negative rewards, W = r^1 * 1^0 in the welfare reference gives the same statistics
    from gtalign_fast.training.scoring import group_advantages

    g = 4
    rewards = torch.tensor([0.5, 1.5, 0.0, 2.0,  # a plain group
                            3.0, 3.0, math.nan, 3.0,  # all equal: advantage 0
                            math.nan, 7.0, math.nan, math.nan,  # one valid reward: advantage 0
                            1.0, math.nan, 4.0, 0.25], dtype=torch.float64)  # a missing reward: advantage 0
    ours = group_advantages(rewards, g, scale=scale, eps=1e-4, unbiased=unbiased)
    _, expected, mean, std, all_equal, _ = reference.welfare_advantages(
        rewards, torch.ones_like(rewards), g, alpha=1.0, scale=scale, eps=1e-4, unbiased=unbiased
    )
    torch.testing.assert_close(ours.advantages, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours.group_mean, mean, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours.group_std, std, atol=1e-12, rtol=1e-12)
    assert torch.equal(ours.group_all_equal, all_equal)
    # shift-invariant per group: any constant per group (negative too) leaves the advantages alone
    shift = torch.tensor([-1e3, 5.0, -7.0, 250.0], dtype=torch.float64).repeat_interleave(g)
    shifted = group_advantages(rewards + shift, g, scale=scale if scale != "batch" else "none", eps=1e-4,
                               unbiased=unbiased)
    unshifted = group_advantages(rewards, g, scale=scale if scale != "batch" else "none", eps=1e-4, unbiased=unbiased)
    torch.testing.assert_close(shifted.advantages, unshifted.advantages, atol=1e-9, rtol=1e-9)


def test_group_advantages_reject_infinite_rewards():
    from gtalign_fast.training.scoring import group_advantages

    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, math.inf, 0.0, 2.0]), 2)


def test_reward_specs_hold_every_reward_function(tmp_path):
    from gtalign_fast.training.scoring import reward_specs, single_welfare

    tokenizer = toy.build_tokenizer()
    welfare = toy.ToyWelfareReward(tokenizer)

    def length(completions, **_):
        return [float(len(c)) for c in completions]

    specs = reward_specs([welfare, length], [1.0, 0.5], alpha=0.5)
    assert [(s.name, s.weight, s.is_welfare) for s in specs] == [("toy_welfare", 1.0, True), ("length", 0.5, False)]
    assert not single_welfare(specs) and single_welfare(reward_specs(welfare, None, alpha=0.5))
    assert not single_welfare(reward_specs([welfare], [2.0], alpha=0.5))  # a weighted W is a plain reward
    welfare.alpha = 0.3
    with pytest.raises(ValueError, match="alpha"):
        reward_specs([welfare], None, alpha=0.5)
    trainer = sgd_trainer(tmp_path)
    assert trainer.single_welfare and trainer.reward_funcs == [spec.func for spec in trainer.rewards]


def test_reward_failures_never_stop_training(tmp_path):
    trainer = sgd_trainer(tmp_path, steps=2)

    def broken(**_):
        raise RuntimeError("judge server down")

    def partial(completions, **_):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    trainer.rewards += [RewardSpec(broken, 1.0, "broken", False), RewardSpec(partial, 1.0, "partial", False)]
    trainer.train()
    assert trainer.step == 2
    logged = read_metrics(trainer)
    assert logged[-1]["rewards/broken/failures"] == 16
    assert logged[-1]["rewards/partial/failures"] == 8
    assert all(math.isfinite(row["loss"]) for row in logged)


def test_nan_loss_skips_the_step_then_stops(tmp_path, monkeypatch):
    trainer = sgd_trainer(tmp_path, steps=5, max_consecutive_nan_steps=2)
    before = parameters(trainer)

    def nan_loss(real):
        def wrapper(*args, **kwargs):
            loss, *rest = real(*args, **kwargs)
            return (loss * math.nan, *rest)

        return wrapper

    for name in ("grpo_loss", "linear_grpo_loss"):  # the logits path and the fused LM-head path
        monkeypatch.setattr(ops, name, nan_loss(getattr(ops, name)))
    with pytest.raises(RuntimeError, match="2 consecutive steps"):
        trainer.train()
    after = parameters(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before), "a NaN step changed the weights"
    logged = read_metrics(trainer)
    assert logged[0]["nan_skipped"] == 1.0 and logged[0]["step"] == 1


# ---------------------------------------------------------------------------------------------
# One update: the loss's share per micro-batch, fused vs logits LM head


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_gradient_accumulation_gives_the_same_update(tmp_path, loss_type):
    one = sgd_trainer(tmp_path, "one", loss_type=loss_type, per_device_train_batch_size=32)
    two = sgd_trainer(tmp_path, "two", loss_type=loss_type, per_device_train_batch_size=16,
                      gradient_accumulation_steps=2)
    before = parameters(one)
    one.train()
    two.train()
    assert_same_update(parameters(one), parameters(two), before, atol=2e-6)


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_fused_lm_head_matches_logits_path(tmp_path, mask_truncated):
    settings = dict(beta=0.04, num_iterations=2, steps=2, mask_truncated_completions=mask_truncated)
    fused = sgd_trainer(tmp_path, "fused", use_fused_lm_head=True, **settings)
    plain = sgd_trainer(tmp_path, "plain", use_fused_lm_head=False, **settings)
    before = parameters(fused)
    fused.train()
    plain.train()
    assert_same_update(parameters(fused), parameters(plain), before, atol=2e-5, rtol=1e-3)
    logged, logged_plain = read_metrics(fused), read_metrics(plain)
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the starting policy
    assert logged[1]["kl"] > 0  # second iteration on the same rollout: the policy has moved
    # The same metrics from both paths: entropy over the loss tokens (truncated ones masked or not).
    for row, row_plain in zip(logged, logged_plain):
        for key in ("entropy", "kl", "clip_ratio/region_mean", "loss"):
            if key in row_plain:
                assert row[key] == pytest.approx(row_plain[key], rel=1e-4, abs=1e-6), key


def test_shared_prompt_forward_gives_the_same_update(tmp_path):
    """share_prompt_prefix packs each prompt's completions into one row (update, old and reference
    log-probs): the same parameters and logged metrics as one row per completion."""
    settings = dict(beta=0.04, num_iterations=2, steps=2, gradient_checkpointing=True)
    shared = sgd_trainer(tmp_path, "shared", share_prompt_prefix=True, **settings)
    plain = sgd_trainer(tmp_path, "plain", share_prompt_prefix=False, **settings)
    assert shared.logprobs._packed(  # the rollout's micro-batches really are packed
        {"attention_mask": torch.ones(2, 3, dtype=torch.long)}, torch.ones(2, 2, dtype=torch.long),
        torch.ones(2, 1, dtype=torch.long),
    ) is not None
    before = parameters(shared)
    shared.train()
    plain.train()
    assert_same_update(parameters(shared), parameters(plain), before, atol=2e-6)
    for row, row_plain in zip(read_metrics(shared), read_metrics(plain)):
        for key in ("entropy", "kl", "loss"):
            assert row[key] == pytest.approx(row_plain[key], rel=1e-5, abs=1e-7), key


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    plain = sgd_trainer(tmp_path, "plain", gradient_checkpointing=False)
    checkpointed = sgd_trainer(tmp_path, "checkpointed", gradient_checkpointing=True)
    before = parameters(plain)
    plain.train()
    checkpointed.train()
    assert_same_update(parameters(plain), parameters(checkpointed), before, atol=2e-6)


def test_logged_metrics(tmp_path):
    trainer = sgd_trainer(tmp_path, steps=1)
    trainer.train()
    (row,) = read_metrics(trainer)
    for key in (
        "loss", "grad_norm", "learning_rate", "reward", "reward_std", "rewards/toy_welfare/mean", "welfare/U",
        "welfare/L", "welfare/W", "advantages/std", "frac_reward_zero_std", "clip_ratio/low_mean",
        "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy", "completions/mean_length",
        "tokens_per_second/generation", "tokens_per_second/training", "memory/peak_gib", "time/generation",
        "time/scoring", "time/update",
    ):
        assert key in row and math.isfinite(row[key]), key
    assert 0 < row["welfare/W"] < 1 and row["entropy"] > 0


def test_callbacks_see_logs_and_can_stop_training(tmp_path):
    from transformers import TrainerCallback

    class StopAtTwo(TrainerCallback):
        def __init__(self):
            self.logs, self.events = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.events.append("begin")

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(logs)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= 2:
                control.should_training_stop = True

    trainer = sgd_trainer(tmp_path, steps=5)
    callback = StopAtTwo()
    trainer.callbacks.callbacks.append(callback)
    trainer.train()
    assert trainer.step == 2 and callback.events == ["begin"]
    assert [row["step"] for row in callback.logs] == [1, 2] and "loss" in callback.logs[0]


def test_pricing_policy_reaches_the_sampler(tmp_path):
    from gtalign_fast.game.pricing import PricingPolicy

    policy = PricingPolicy.per_token_api(0.5)
    trainer = sgd_trainer(tmp_path, pricing_policy=policy)
    assert trainer.sampler.mode == "rewrite" and trainer.sampler.policy is policy
    trainer.train()  # the toy vocabulary never closes a payoff block: nothing to edit, training goes on
    (row,) = read_metrics(trainer)
    assert row["steering/edited_fraction"] == 0.0


def test_chat_prompts(tmp_path):
    tokenizer = toy.build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    seen = {}

    def reward(prompts, completions, **_):
        seen["completion"], seen["prompt"] = completions[0], prompts[0]
        return [1.0] * len(completions)

    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in toy.build_dataset(8, 0)]
    args = toy.toy_config(str(tmp_path), 1, per_device_train_batch_size=16)
    trainer = GRPOTrainer(toy.build_model(tokenizer, 0), reward, args=args, train_dataset=rows,
                          processing_class=tokenizer)
    trainer.train()
    assert seen["completion"][0]["role"] == "assistant" and seen["prompt"][0]["role"] == "user"


# ---------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("num_iterations, beta", [(1, 0.0), (2, 0.04)])
def test_resume_equals_uninterrupted_run(tmp_path, num_iterations, beta):
    overrides = dict(num_iterations=num_iterations, beta=beta, lr_scheduler_type="linear", learning_rate=1e-2)
    # uninterrupted: 3 steps, checkpoints written on the way (save_steps=1 leaves a pending rollout
    # at step 1 when num_iterations=2)
    straight = toy.make_trainer(str(tmp_path / "a"), 3, 0, n_rows=64, per_device_train_batch_size=16,
                                save_steps=1, **overrides)
    straight.train()
    # a new process would build the same trainer and resume from step 1
    resumed = toy.make_trainer(str(tmp_path / "b"), 3, 0, n_rows=64, per_device_train_batch_size=16,
                               save_steps=1, **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    assert resumed.step == 3
    a, b = parameters(straight), parameters(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    assert os.path.isfile(tmp_path / "a" / "checkpoint-3" / "model.safetensors")


def test_resume_true_picks_the_latest_checkpoint(tmp_path):
    trainer = sgd_trainer(tmp_path, steps=2, save_steps=1)
    trainer.train()
    again = sgd_trainer(tmp_path, steps=2, save_steps=1)
    again.train(resume_from_checkpoint=True)
    assert again.step == 2
    with pytest.raises(FileNotFoundError):
        sgd_trainer(tmp_path, "empty", steps=1).train(resume_from_checkpoint=True)


# ---------------------------------------------------------------------------------------------
# Proof that it learns


# Pre-registered before the final run: over TOY_STEPS steps the mean welfare W of the last
# TOY_WINDOW steps must exceed that of the first TOY_WINDOW steps by at least TOY_MARGIN.
# A random model starts near W ~ 0.1 (most completions name no action: a hard failure, W = 0);
# naming any action and stopping gives W ~ 0.45 on average, the best action ~ 0.7.
TOY_STEPS = 60
TOY_WINDOW = 10
TOY_MARGIN = 0.15


def test_toy_gtalign_game_learns(tmp_path):
    trainer = toy.make_trainer(str(tmp_path), TOY_STEPS, seed=0)
    trainer.train()
    welfare = toy.read_welfare(str(tmp_path))
    assert len(welfare) == TOY_STEPS
    first = sum(welfare[:TOY_WINDOW]) / TOY_WINDOW
    last = sum(welfare[-TOY_WINDOW:]) / TOY_WINDOW
    assert last - first >= TOY_MARGIN, f"mean welfare went from {first:.3f} to {last:.3f}"


@pytest.mark.parametrize("fused", [True, False])
def test_log_says_which_loss_path_runs(tmp_path, caplog, monkeypatch, fused):
    """The start-up line names the update's path, and that path is the one called."""
    calls = []
    for name in ("grpo_loss", "linear_grpo_loss"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    with caplog.at_level("INFO", logger="gtalign_fast.trainer"):
        trainer = sgd_trainer(tmp_path, use_fused_lm_head=fused)
    expected = "linear_grpo_loss" if fused else "token_logprobs + grpo_loss"
    assert any(expected in record.getMessage() for record in caplog.records), [r.getMessage() for r in caplog.records]
    assert trainer.fused_loss is fused
    trainer.train()
    assert set(calls) == {"linear_grpo_loss" if fused else "grpo_loss"}
