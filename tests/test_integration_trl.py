"""gtalign_fast.integrations.trl against TRL's own GRPOTrainer.

One optimizer step of TRL's GRPOTrainer, patched and unpatched, on the same tiny random Qwen2 model and the same
batch: same loss (1e-5), same gradients and parameters after the step (1e-5 relative), same logged metrics. The
rollout is fixed (generation replaced by a seeded draw of completions of uneven lengths), the old log-probs are
perturbed so the clip is active, and the reference model is perturbed so the KL and its gradient are not zero.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from gtalign_fast.game import AnswerScore, GTAlignReward  # noqa: E402
from gtalign_fast.integrations import trl as integration  # noqa: E402

VOCAB = 48
COMPLETION_LEN = 10
GENERATIONS = 4
BATCH = 8  # completions per step: 2 prompts x 4 generations


# ---------------------------------------------------------------------------------------------
# A tiny model, tokenizer and dataset


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, **{f"w{i}": i for i in range(1, VOCAB - 1)}, "<eos>": VOCAB - 1}
    core = Tokenizer(WordLevel(words, unk_token="<pad>"))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>")


def save_tiny_qwen2(path) -> str:
    """A seeded two-layer Qwen2 and its word-level tokenizer saved under ``path`` (no downloads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=VOCAB - 1)
    Qwen2ForCausalLM(config).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


def _dataset(rows: int = 8):
    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(1, VOCAB - 1)}" for _ in range(rng.randint(3, 7))) for _ in range(rows)]
    return datasets.Dataset.from_dict({"prompt": prompts})


def _distinct_tokens(completion_ids, **_):
    return [len(set(ids)) / max(1, len(ids)) for ids in completion_ids]


# ---------------------------------------------------------------------------------------------
# A fixed rollout


def _fixed_generation(trainer, seen: list):
    """Replace generation by a seeded draw: uneven lengths, some ending with EOS."""

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        seen.append([list(ids) for ids in prompt_ids])
        rng = random.Random(1234 + len(seen))
        completions = []
        for _ in prompt_ids:
            ids = [rng.randrange(1, VOCAB - 1) for _ in range(rng.randint(1, COMPLETION_LEN))]
            if len(ids) < COMPLETION_LEN and rng.random() < 0.5:
                ids.append(VOCAB - 1)
            completions.append(ids)
        return completions, None

    trainer._generate_single_turn = generate


def _perturbed_old_logps(trainer):
    """Shift the old log-probs by a fixed noise so that ratios leave [1 - eps, 1 + eps]."""
    original = trainer._generate_and_score_completions

    def wrapped(batch):
        out = original(batch)
        old = out.get("old_per_token_logps")
        assert old is not None, "num_iterations > 1 must make TRL compute old log-probs"
        generator = torch.Generator().manual_seed(7)
        # per token and per sequence, so that sequence-level (GSPO) ratios leave the clip range too
        noise = torch.randn(old.shape, generator=generator, dtype=old.dtype) * 0.3
        noise += torch.randn((old.shape[0], 1), generator=generator, dtype=old.dtype) * 0.3
        out["old_per_token_logps"] = old + noise
        return out

    trainer._generate_and_score_completions = wrapped


def _perturb_reference(trainer):
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in trainer.ref_model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.05)


def _trainer(model_dir, tmp_path, *, patch: bool, fused: bool = True, **config):
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=BATCH, num_generations=GENERATIONS,
        max_completion_length=COMPLETION_LEN, num_iterations=2, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
        lr_scheduler_type="constant", report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
        disable_tqdm=True, **{"epsilon_high": 0.28, "bf16": False, **config},
    )
    trainer = GRPOTrainer(model=model_dir, reward_funcs=_distinct_tokens, args=args, train_dataset=_dataset(),
                          processing_class=_tokenizer())
    trainer.remove_callback(PrinterCallback)
    if trainer.ref_model is not None:
        _perturb_reference(trainer)
    if patch:
        integration.patch_grpo_trainer(trainer, fused_lm_head=fused)
    return trainer


def _one_step(trainer):
    """Run trainer.train() for one step; return (losses, prompt ids seen, grads, params before/after, metrics)."""
    seen: list = []
    _fixed_generation(trainer, seen)
    _perturbed_old_logps(trainer)
    losses = []
    compute_loss = trainer.compute_loss

    def recording(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        losses.append(loss.detach().clone())
        return loss

    trainer.compute_loss = recording
    names = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    grads: dict = {}

    def capture(optimizer, args, kwargs):
        for name, p in trainer.model.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.detach().clone()

    handle = register_optimizer_step_pre_hook(capture)
    try:
        trainer.train()
    finally:
        handle.remove()
    after = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    metrics = {k: v for k, v in trainer.state.log_history[0].items()}
    return losses, seen, grads, names, before, after, metrics


def _assert_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str):
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rtol * scale + 1e-12, f"{what}: max error {error:.3e} > {rtol} x {scale:.3e}"


# ---------------------------------------------------------------------------------------------
# Parity: one optimizer step, patched vs TRL


def _check_parity(model_dir, tmp_path, *, fused: bool = True, tolerance: float = 1e-5, per_tensor: bool = True,
                  **config):
    base = _one_step(_trainer(model_dir, tmp_path / "trl", patch=False, **config))
    patched_trainer = _trainer(model_dir, tmp_path / "ours", patch=True, fused=fused, **config)
    assert patched_trainer.gtalign_logprob_path == ("linear_token_logprobs" if fused else "token_logprobs")
    ours = _one_step(patched_trainer)
    (trl_losses, trl_seen, trl_grads, names, trl_before, trl_after, trl_metrics) = base
    (our_losses, our_seen, our_grads, _, our_before, our_after, our_metrics) = ours

    assert our_seen == trl_seen and len(trl_losses) == len(our_losses) == 1  # the same batch, one micro-step
    assert abs(our_losses[0].item() - trl_losses[0].item()) <= tolerance, (our_losses, trl_losses)
    assert abs(trl_losses[0].item()) > 1e-3  # a loss that can differ
    assert sorted(our_grads) == sorted(trl_grads) == sorted(names)
    moves = []
    for name in names:
        torch.testing.assert_close(our_before[name], trl_before[name], rtol=0, atol=0)
        if per_tensor:
            _assert_relative(our_grads[name], trl_grads[name], tolerance, f"grad of {name}")
            _assert_relative(our_after[name], trl_after[name], tolerance, f"{name} after the step")
        moves.append(((trl_after[name] - trl_before[name]).abs().max() / trl_before[name].abs().max()).item())
    # the step moved the parameters by far more than the float32 tolerance: the comparison is not vacuous
    assert sorted(moves)[len(moves) // 2] > 1e-3, moves
    if not per_tensor:  # bf16: the whole gradient and update, as one vector
        flat = [torch.cat([d[name].flatten() for name in names]) for d in (our_grads, trl_grads)]
        assert (flat[0] - flat[1]).norm() <= tolerance * flat[1].norm()
        flat = [torch.cat([(d[name] - trl_before[name]).flatten() for name in names]) for d in (our_after, trl_after)]
        assert (flat[0] - flat[1]).norm() <= tolerance * flat[1].norm()

    # TRL logs no clip ratios for SAPO, CISPO and VESPO their own
    clipped = config.get("loss_type") not in ("sapo", "cispo", "vespo")
    keys = ["entropy"] + (["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                           "clip_ratio/low_min", "clip_ratio/high_max"] if clipped else [])
    keys += ["cispo_clip_ratio"] if config.get("loss_type") == "cispo" else []
    keys += ["vespo/phi_seq_mean"] if config.get("loss_type") == "vespo" else []
    keys += ["kl"] if config.get("beta") else []
    for key in keys:
        a, b = our_metrics[key], trl_metrics[key]
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tolerance, (key, a, b)
    assert not clipped or trl_metrics["clip_ratio/region_mean"] > 0  # the perturbed old log-probs make the clip bite
    assert config.get("loss_type") != "cispo" or 0 < trl_metrics["cispo_clip_ratio"] < 1  # the cap binds, not always
    if config.get("beta"):
        assert trl_metrics["kl"] > 1e-4


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_one_step_matches_trl(model_dir, tmp_path, loss_type, level, beta):
    _check_parity(model_dir, tmp_path, loss_type=loss_type, importance_sampling_level=level, beta=beta)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_without_bias_correction_kl_matches_trl(model_dir, tmp_path, loss_type, level):
    # The parity tests above run TRL's default use_bias_correction_kl=True (k3 times the ratio); here without it.
    _check_parity(model_dir, tmp_path, loss_type=loss_type, importance_sampling_level=level, beta=0.1,
                  use_bias_correction_kl=False)


def test_default_config_matches_trl(model_dir, tmp_path):
    # TRL's default GRPOConfig (dapo, beta 0, use_bias_correction_kl=True; the harness sets only batch sizes, steps,
    # the optimizer and epsilon_high) is accepted and equal; so is it with a KL term, where the bias correction acts.
    from trl import GRPOConfig

    defaults = GRPOConfig(output_dir=str(tmp_path / "defaults"), use_cpu=True, bf16=False)
    assert defaults.use_bias_correction_kl and defaults.loss_type == "dapo" and defaults.beta == 0.0
    _check_parity(model_dir, tmp_path / "plain")
    _check_parity(model_dir, tmp_path / "kl", beta=0.1)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sapo_matches_trl(model_dir, tmp_path, level):
    _check_parity(model_dir, tmp_path, loss_type="sapo", importance_sampling_level=level, beta=0.1,
                  sapo_temperature_pos=0.9, sapo_temperature_neg=1.3)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cispo_matches_trl(model_dir, tmp_path, level):
    # epsilon_high is CISPO's ratio cap itself: 1.02 lies inside the perturbed ratios, so some tokens are capped.
    _check_parity(model_dir, tmp_path, loss_type="cispo", importance_sampling_level=level, beta=0.1, epsilon_high=1.02)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_vespo_matches_trl(model_dir, tmp_path, level):
    # TRL's VESPO (its Gamma weight of the sequence's summed log-ratio); TRL warns at sequence level but runs it.
    _check_parity(model_dir, tmp_path, loss_type="vespo", importance_sampling_level=level, beta=0.1,
                  vespo_k_pos=1.5, vespo_lambda_neg=2.5)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo", "vespo"])
@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_vllm_importance_sampling_ratio_is_passed_through(loss_type, mode):
    # With use_vllm and vllm_importance_sampling_correction, the patch hands TRL's importance_sampling_ratio
    # ([B, T] in token modes, [B, 1] in sequence modes, 0 where a mask mode drops) to grpo_loss: the loss, the
    # gradient and the logged metrics equal TRL's own _compute_loss on the same stand-in trainer (vLLM itself
    # is not installed here: the ratio is what TRL's _generate_and_score_completions would pass).
    from trl.trainer.grpo_trainer import GRPOTrainer

    from gtalign_fast.testing import trl_trainer_stub

    g = torch.Generator().manual_seed(3)
    logp = -2.0 * torch.rand(4, 7, generator=g) - 0.05
    old = logp - 0.3 * torch.randn(4, 7, generator=g)
    ref = logp + 0.3 * torch.randn(4, 7, generator=g)
    mask = torch.rand(4, 7, generator=g) > 0.2
    advantages = torch.randn(4, generator=g)
    if mode == "token":
        ratio = torch.where(mask, torch.rand(4, 7, generator=g) * 3, 1.0)
    else:
        ratio = torch.rand(4, 1, generator=g) * 3
    ratio[ratio > 2.5] = 0.0  # a mask mode's dropped tokens / sequences
    results = []
    for compute_loss in (GRPOTrainer._compute_loss, integration._compute_loss):
        leaf = logp.clone().requires_grad_(True)
        trainer, inputs = trl_trainer_stub(leaf, old, advantages, mask, ref_logp=ref, beta=0.04, loss_type=loss_type,
                                           epsilon_high=1.1 if loss_type == "cispo" else 0.28,
                                           use_bias_correction_kl=True, importance_sampling_ratio=ratio)
        assert trainer.use_vllm and trainer.vllm_importance_sampling_correction
        loss = compute_loss(trainer, None, inputs)
        (grad,) = torch.autograd.grad(loss, leaf)
        results.append((loss.detach(), grad, dict(trainer._metrics["train"])))
    (trl_loss, trl_grad, trl_metrics), (loss, grad, metrics) = results
    torch.testing.assert_close(loss, trl_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, trl_grad, atol=1e-5, rtol=1e-5)
    assert abs(trl_loss.item()) > 1e-4 and set(trl_metrics) <= set(metrics)
    for key, values in trl_metrics.items():
        assert len(metrics[key]) == len(values) == 1, key
        a, b = metrics[key][0], values[0]
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5, (key, a, b)


def test_luspo_and_delta_match_trl(model_dir, tmp_path):
    _check_parity(model_dir, tmp_path, loss_type="luspo", importance_sampling_level="sequence", beta=0.1)
    _check_parity(model_dir, tmp_path / "delta", loss_type="grpo", importance_sampling_level="token", beta=0.0,
                  delta=1.25)


def test_unfused_head_matches_trl(model_dir, tmp_path):
    # fused_lm_head=False: LM head on the completion rows + token_logprobs (the path soft-capped models take)
    _check_parity(model_dir, tmp_path, fused=False, loss_type="bnpo", importance_sampling_level="token", beta=0.1)


def test_bf16_autocast_close_to_trl(model_dir, tmp_path):
    # Under autocast our head runs in bf16 like F.linear would (bf16 weight copy, bf16 gradients), TRL's chunked head
    # in bf16 tiles with float32 gradients: the two agree to bf16 precision, not to 1e-5.
    _check_parity(model_dir, tmp_path, tolerance=2e-2, per_tensor=False, loss_type="dapo",
                  importance_sampling_level="token", beta=0.1, bf16=True)


def test_cast_lm_head_to_fp32_under_bf16_matches_trl(model_dir, tmp_path):
    # cast_lm_head_to_fp32: the backbone in bf16 autocast, the head in float32 on both sides
    _check_parity(model_dir, tmp_path, loss_type="grpo", importance_sampling_level="token", beta=0.1, bf16=True,
                  cast_lm_head_to_fp32=True)


# ---------------------------------------------------------------------------------------------
# The head alone, in float64, against a direct log-softmax (logit scale, soft-cap, bias, temperature)


@pytest.mark.parametrize("fused,softcap", [(True, None), (False, None), (False, 3.0)])
def test_head_logprobs_float64(fused, softcap):
    generator = torch.Generator().manual_seed(3)
    B, T, H, V = 3, 7, 5, 29
    base = torch.randn(B, T + 1, H, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[:, :3] = -100
    labels[1, 5:] = -100
    scale, temperature = 0.6, 0.7
    hidden = base[:, :-1]  # strided, as the model's [:, :-1] slice
    logp, entropy = integration.head_logprobs(hidden, weight, bias, labels, temperature=temperature,
                                              with_entropy=True, logit_scale=scale, softcap=softcap, fused=fused)

    z = (hidden @ weight.T + bias) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z / temperature, dim=-1)
    valid = labels != -100
    expected_logp = torch.where(valid, log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    expected_entropy = torch.where(valid, -(log_p.exp() * log_p).sum(-1), 0.0)
    torch.testing.assert_close(logp.double(), expected_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=1e-6, atol=1e-6)
    g_logp, g_entropy = torch.randn(B, T, generator=generator), torch.randn(B, T, generator=generator)
    ours = torch.autograd.grad((logp * g_logp + entropy * g_entropy).sum(), (base, weight, bias))
    expected = torch.autograd.grad((expected_logp * g_logp + expected_entropy * g_entropy).sum(),
                                   (base, weight, bias))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.fixture(scope="module")
def plain_trainer(model_dir, tmp_path_factory):
    return _trainer(model_dir, tmp_path_factory.mktemp("plain"), patch=False, loss_type="grpo", beta=0.0)


REFUSALS = [
    ({"loss_type": "xpo"}, "loss_type='xpo'"),  # every TRL 1.16 loss type is computed: a later one is refused
    ({"top_entropy_quantile": 0.2}, "top_entropy_quantile=0.2"),
    ({"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold=0.5"),
    ({"_entropy_bonus_enabled": True, "entropy_coef": 0.01}, "entropy_coef=0.01"),
    ({"aux_loss_enabled": True, "router_aux_loss_coef": 0.001}, "router_aux_loss_coef"),
]


@pytest.mark.parametrize("settings,message", REFUSALS, ids=[m for _, m in REFUSALS])
def test_unsupported_options_are_refused(plain_trainer, monkeypatch, settings, message):
    compute_loss = plain_trainer._compute_loss
    for name, value in settings.items():
        target, attr = (plain_trainer.args, name[5:]) if name.startswith("args.") else (plain_trainer, name)
        monkeypatch.setattr(target, attr, value)
    with pytest.raises(ValueError, match="patch_grpo_trainer") as error:
        integration.patch_grpo_trainer(plain_trainer)
    assert message in str(error.value)
    assert getattr(plain_trainer, "gtalign_logprob_path", None) is None  # nothing was changed
    assert plain_trainer._compute_loss == compute_loss
    assert getattr(plain_trainer.model, "_gtalign_fused_head", None) is None


def test_not_a_trainer_and_patching_twice(model_dir, tmp_path):
    with pytest.raises(TypeError, match="trl.GRPOTrainer"):
        integration.patch_grpo_trainer(object())
    trainer = _trainer(model_dir, tmp_path, patch=True, loss_type="grpo", beta=0.0)
    forward, compute_loss = trainer.model.forward, trainer._compute_loss
    assert integration.patch_grpo_trainer(trainer) is trainer  # a no-op
    assert trainer.model.forward == forward and trainer._compute_loss == compute_loss


# ---------------------------------------------------------------------------------------------
# The reward function

MATRIX = (
    '{"DQ_AQ": {"LLM": 2.1, "user": 2.4}, "DQ_CQ": {"LLM": 1.2, "user": 0.8}, "DQ_DA": {"LLM": 3.8, "user": 4.1}, '
    '"VQ_AQ": {"LLM": 1.5, "user": 1.9}, "VQ_CQ": {"LLM": 1.0, "user": 1.3}, "VQ_DA": {"LLM": 2.0, "user": 2.0}}'
)


def _chain(response: str) -> str:
    return (f"<thinking>The question is clear.</thinking><payoff>{MATRIX}</payoff>"
            f"<analyze>Choose DQ_DA.</analyze><response>{response}</response>")


def _judge(item):
    if "crash" in item.response:
        raise TimeoutError("judge timed out")
    return AnswerScore(min(1.0, len(item.response) / 20), 0.5)


RESPONSES = ["a fine answer", "crash please", "short", "another fine answer, longer"]


def test_reward_on_strings_logs_metrics(monkeypatch):
    reward = integration.gtalign_reward_func(_judge, name="gta", log_extra=True)
    completions = [_chain(r) for r in RESPONSES] + ["no tags at all"]
    logged, extra = [], {}
    out = reward(prompts=["q"] * 5, completions=completions, completion_ids=[[1]] * 5,
                 log_metric=lambda name, value: logged.append((name, value)),
                 log_extra=lambda column, values: extra.setdefault(column, values),
                 trainer_state=object(), data_source=["x"] * 5)
    expected = GTAlignReward(_judge)(prompts=["q"] * 5, completions=completions)
    assert reward.__name__ == "gta" and type(out) is list and len(out) == 5
    assert out[1] is None  # the judge failed: None, which TRL turns into NaN
    assert [out[i] for i in (0, 2, 3, 4)] == [expected[i] for i in (0, 2, 3, 4)]
    assert out[4] == 0.0  # a chain-rule failure is a real 0, not a judge failure
    assert len(set(out[i] for i in (0, 2, 3))) == 3  # W differs with the answers
    metrics = dict(logged)
    assert metrics["gta/user_reward"] == pytest.approx(sum(expected.user) / 5)
    assert metrics["gta/llm_reward"] == pytest.approx(sum(expected.llm) / 5)
    assert metrics["gta/judge_failures"] == 1.0 and metrics["gta/hard_failures"] == 1.0
    assert metrics["gta/format_reward"] == pytest.approx(sum(f["format_reward"] for f in expected.fields) / 5)
    assert extra["gta/user_reward"] == expected.user and extra["gta/llm_reward"] == expected.llm
    assert reward.last_batch.judge_failures == 1


def test_reward_on_conversations_equals_strings():
    reward = integration.gtalign_reward_func(GTAlignReward(_judge))
    prompts = [[{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"}] for i in range(4)]
    chats = [[{"role": "assistant", "content": _chain(r)}] for r in RESPONSES]
    out = reward(prompts=prompts, completions=chats, completion_ids=None)  # no log_metric: older TRL
    strings = reward(prompts=[f"q{i}" for i in range(4)], completions=[_chain(r) for r in RESPONSES])
    assert out == strings and out[1] is None and all(isinstance(v, float) for i, v in enumerate(out) if i != 1)
    with pytest.raises(TypeError):
        integration.gtalign_reward_func(GTAlignReward(_judge), alpha=0.3)


def test_reward_through_trl_calculate_rewards(plain_trainer):
    # TRL's own reward call: None -> NaN in rewards_per_func, U / L / failures through its log_metric hook
    reward = integration.gtalign_reward_func(_judge)
    plain_trainer.reward_funcs = [reward]
    plain_trainer.reward_func_names = [reward.__name__]
    plain_trainer.reward_processing_classes = [None]
    plain_trainer._pending_metrics.clear()
    completions = [[{"role": "assistant", "content": _chain(r)}] for r in RESPONSES]
    prompts = [[{"role": "user", "content": "question"}]] * 4
    inputs = [{"prompt": p, "data_source": "x"} for p in prompts]
    rewards = plain_trainer._calculate_rewards(inputs, prompts, completions, [[1, 2]] * 4)
    assert rewards.shape == (4, 1)
    assert torch.isnan(rewards[1, 0]) and not torch.isnan(rewards[[0, 2, 3], 0]).any()
    expected = GTAlignReward(_judge)(prompts=prompts, completions=completions)
    torch.testing.assert_close(rewards[[0, 2, 3], 0], torch.tensor([expected[i] for i in (0, 2, 3)]))
    pending = dict(plain_trainer._pending_metrics)
    assert pending["gtalign/judge_failures"] == [1.0]
    assert pending["gtalign/user_reward"] == [pytest.approx(sum(expected.user) / 4)]
    assert pending["gtalign/llm_reward"] == [pytest.approx(sum(expected.llm) / 4)]
