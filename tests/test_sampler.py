"""SteeringSampler on tiny randomly initialised Qwen2 / Llama models (built from a config, no
downloads) with a character-level tokenizer built in memory. The chain's tokens are forced through
sample_'s forced-token path, so the payoff path runs without a trained model."""

from __future__ import annotations

import math
import string

import pytest
import torch

from gtalign_fast.game.payoff import PAYOFF_KEYS, format_payoff, parse_payoff
from gtalign_fast.game.pricing import PricingPolicy
from gtalign_fast.sampling.sampler import SteeringSampler

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TAGS = [f"<{t}>" for t in ("thinking", "payoff", "analyze", "response")]
TAGS += [f"</{t}>" for t in ("thinking", "payoff", "analyze", "response")]
PAYOFF = (
    '{"DQ_AQ": {"LLM": 2.2, "user": 1.9}, "DQ_CQ": {"LLM": 3.1, "user": 3.5}, "DQ_DA": {"LLM": 4.2, "user": 4.3}, '
    '"VQ_AQ": {"LLM": 2.0, "user": 2.1}, "VQ_CQ": {"LLM": 1.3, "user": 1.2}, "VQ_DA": {"LLM": 2.0, "user": 1.8}}'
)
POLICY = PricingPolicy.reference(scale_llm=1.0)  # shifts every LLM payoff: always an edit


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    words = [f'"{k}"' for k in PAYOFF_KEYS] + ['"LLM"', '"user"', ": ", ", "]
    numbers = [f"{sign}{i / 10:.1f}" for i in range(100) for sign in ("", "-")]
    for token in TAGS + words + numbers + list(string.printable):
        vocab.setdefault(token, len(vocab))
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Tags, payoff keys, separators and one-decimal numbers are one token each (short chains, so
    # the tests run fast); everything else is one character.
    pattern = r'</?[a-z]+>|"(?:[DV]Q_[ACD][AQ]|LLM|user)"|: |, |-?\d\.\d|[\s\S]'
    model.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    model.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _model(kind: str, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  pad_token_id=0, eos_token_id=1, bos_token_id=None)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return model.float().eval()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model(request, tokenizer):
    return _model(request.param, len(tokenizer))


@pytest.fixture(scope="module")
def qwen(tokenizer):
    return _model("qwen2", len(tokenizer))


def _ids(tokenizer, text):
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chain_script(tokenizer, payoff=PAYOFF, thinking="ok"):
    return _ids(tokenizer, f"<thinking>{thinking}</thinking>\n<payoff>{payoff}</payoff>\n<analyze>")


def _same_row(a, b, row_a, row_b):
    assert a.completion_ids[row_a] == b.completion_ids[row_b]
    assert a.finish_reasons[row_a] == b.finish_reasons[row_b]
    assert a.events[row_a].status == b.events[row_b].status
    for x, y in zip(a.logprobs[row_a], b.logprobs[row_b]):
        assert (math.isnan(x) and math.isnan(y)) or abs(x - y) < 1e-4


def test_off_mode_rows_are_independent_of_the_batch(qwen, tokenizer):
    sampler = SteeringSampler(qwen, tokenizer, mode="off")
    prompts = ["Hello there, how are you?", "Hi", "What is 2+2? Think."]
    batch = sampler.generate(prompts, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=[5, 6, 7])
    assert len(batch.completion_ids) == 3 and all(e.status == "off" for e in batch.events)
    for r, prompt in enumerate(prompts):
        alone = sampler.generate([prompt], max_new_tokens=12, temperature=1.0, top_p=0.95, seed=[5 + r])
        _same_row(batch, alone, r, 0)
        assert all(math.isfinite(x) and x <= 0 for x in batch.logprobs[r])
        assert batch.finish_reasons[r] in ("eos", "length")
        assert len(batch.completion_ids[r]) <= 12


def test_num_return_sequences_and_greedy(qwen, tokenizer):
    sampler = SteeringSampler(qwen, tokenizer, mode="off")
    out = sampler.generate(["abc", "de"], max_new_tokens=5, temperature=0.0, num_return_sequences=2, seed=1)
    assert len(out.completion_ids) == 4
    assert out.completion_ids[0] == out.completion_ids[1]  # greedy: same for every sequence
    # Greedy equals the argmax of a fresh forward at every step.
    ids = out.prompt_ids[2] + out.completion_ids[2]
    logits = qwen(torch.tensor([ids])).logits[0]
    start = len(out.prompt_ids[2])
    for i, token in enumerate(out.completion_ids[2]):
        if token != tokenizer.eos_token_id:
            assert int(logits[start + i - 1].argmax()) == token


def test_rewrite_matches_a_fresh_forward_over_the_edited_text(model, tokenizer):
    sampler = SteeringSampler(model, tokenizer, policy=POLICY, mode="rewrite")
    script = _chain_script(tokenizer)
    out = sampler.generate(["Q: say hi"], max_new_tokens=len(script) + 6, seed=3, forced_tokens=[script],
                           keep_edit_logits=True)
    event = out.events[0]
    assert event.status == "edited", event.reason
    steered = POLICY.apply(parse_payoff(PAYOFF))
    assert event.steered == steered and event.original == parse_payoff(PAYOFF)
    assert event.action is not None and event.action.key in PAYOFF_KEYS
    assert format_payoff(steered) in out.texts[0] and PAYOFF not in out.texts[0]
    # Re-fed: the new block up to </payoff> (the newline after it is sampled later).
    assert event.tokens_refed == len(_ids(tokenizer, f"<payoff>{format_payoff(steered)}</payoff>"))
    # The row's next-token logits equal a fresh forward over prompt + edited completion.
    fresh = model(torch.tensor([out.prompt_ids[0] + event.edited_ids])).logits[0, -1]
    torch.testing.assert_close(event.next_logits, fresh.float(), atol=1e-4, rtol=1e-4)
    # Re-fed tokens are not sampled: NaN log-probs; the rest are real.
    n_kept = len(_ids(tokenizer, "<thinking>ok</thinking>\n"))
    assert all(math.isnan(x) for x in out.logprobs[0][n_kept: n_kept + event.tokens_refed])
    assert out.completion_ids[0][: len(event.edited_ids)] == event.edited_ids


def test_mixed_batch_rows_match_rows_alone(qwen, tokenizer):
    sampler = SteeringSampler(qwen, tokenizer, policy=POLICY, mode="rewrite")
    edited = _chain_script(tokenizer)
    unparseable = _chain_script(tokenizer, payoff='{"DQ_AQ": oops}')
    early = _ids(tokenizer, "<thinking>") + [tokenizer.eos_token_id]
    rows = [
        ("Q: short", edited),
        ("A longer prompt than the others", None),  # free sampling: no payoff
        ("Q: x", unparseable),
        ("Q: stop soon", early),
        ("Q: again, the edit", _chain_script(tokenizer, thinking="a longer thought")),
    ]
    max_new = max(len(s) for _, s in rows if s) + 8
    prompts, scripts = [p for p, _ in rows], [s for _, s in rows]
    seeds = [11, 12, 13, 14, 15]
    batch = sampler.generate(prompts, max_new_tokens=max_new, seed=seeds, forced_tokens=scripts)
    statuses = [e.status for e in batch.events]
    assert statuses[0] == "edited" and statuses[4] == "edited"
    assert statuses[1] in ("no_payoff",) and statuses[2] == "unparseable" and statuses[3] == "no_payoff"
    assert batch.finish_reasons[3] == "eos" and len(batch.completion_ids[3]) == 2
    assert batch.tokens_prefilled > sum(len(p) for p in batch.prompt_ids)  # the re-fed payloads
    for r in range(len(rows)):
        alone = sampler.generate([prompts[r]], max_new_tokens=max_new, seed=[seeds[r]], forced_tokens=[scripts[r]])
        _same_row(batch, alone, r, 0)


def test_unchanged_matrix_is_not_edited(qwen, tokenizer):
    sampler = SteeringSampler(qwen, tokenizer, policy=PricingPolicy.identity(), mode="rewrite")
    script = _chain_script(tokenizer)
    out = sampler.generate(["Q"], max_new_tokens=len(script) + 2, seed=1, forced_tokens=[script])
    assert out.events[0].status == "unchanged"
    assert PAYOFF in out.texts[0]
    assert out.tokens_prefilled == len(out.prompt_ids[0])


def test_reference_mode_makes_a_second_call(qwen, tokenizer):
    script = _chain_script(tokenizer)
    prompt = "Q: " + "please explain this in detail, " * 6  # a realistic prompt is longer than a payoff
    reference = SteeringSampler(qwen, tokenizer, policy=POLICY, mode="reference")
    out = reference.generate([prompt], max_new_tokens=len(script) + 4, seed=2, forced_tokens=[script])
    event = out.events[0]
    assert event.status == "reasked" and event.action is not None
    assert event.tokens_refed > len(out.prompt_ids[0])  # the whole prompt again, plus the instruction
    assert PAYOFF not in out.texts[0]  # the completion is the second call's
    rewrite = SteeringSampler(qwen, tokenizer, policy=POLICY, mode="rewrite")
    edited = rewrite.generate([prompt], max_new_tokens=len(script) + 4, seed=2, forced_tokens=[script])
    assert edited.events[0].tokens_refed < event.tokens_refed


def _analyze(text):
    return text[text.index("<analyze>") + len("<analyze>"):]


def test_steer_force_names_the_chosen_key_and_leaves_other_rows_alone(qwen, tokenizer):
    script = _chain_script(tokenizer)
    rows = [("Q: short", script), ("A free row", None), ("Q: x", _chain_script(tokenizer, payoff="{oops}"))]
    prompts, scripts, seeds = [p for p, _ in rows], [s for _, s in rows], [21, 22, 23]
    settings = dict(max_new_tokens=len(script) + 10, top_p=0.9, seed=seeds, forced_tokens=scripts)
    off = SteeringSampler(qwen, tokenizer, policy=POLICY, mode="rewrite").generate(prompts, **settings)
    forced = SteeringSampler(qwen, tokenizer, policy=POLICY, mode="rewrite", steer_analyze="force")
    out = forced.generate(prompts, **settings)
    event = out.events[0]
    assert event.status == "edited" and event.action is not None
    key_ids = _ids(tokenizer, event.action.key)
    assert event.steer_ids == key_ids and event.steer_status == "named" and event.steer_draws == len(key_ids)
    assert _analyze(out.texts[0]).startswith(event.action.key)
    # Up to <analyze> the row is what it is without steering; the key's draws are forced (not NaN).
    head = out.completion_ids[0].index(tokenizer.convert_tokens_to_ids("<analyze>")) + 1
    assert out.completion_ids[0][:head] == off.completion_ids[0][:head]
    assert all(math.isfinite(x) for x in out.logprobs[0][head: head + len(key_ids)])
    # Rows that were not edited are not steered: exactly the unsteered output.
    for r in (1, 2):
        assert out.events[r].steer_ids is None and out.events[r].steer_status == ""
        _same_row(out, off, r, r)
    # The steered row alone draws what it draws in the batch.
    alone = forced.generate([prompts[0]], **{**settings, "seed": [seeds[0]], "forced_tokens": [script]})
    _same_row(out, alone, 0, 0)


def test_steer_off_changes_nothing(qwen, tokenizer):
    script = _chain_script(tokenizer)
    settings = dict(max_new_tokens=len(script) + 6, top_p=0.9, seed=[31, 32], forced_tokens=[script, None])
    prompts = ["Q: short", "A free row"]
    default = SteeringSampler(qwen, tokenizer, policy=POLICY, mode="rewrite").generate(prompts, **settings)
    off = SteeringSampler(qwen, tokenizer, policy=POLICY, mode="rewrite", steer_analyze="off").generate(
        prompts, **settings)
    # Steering on, but the policy edits nothing: no row is steered, the output is the plain one.
    identity = PricingPolicy.identity()
    plain = SteeringSampler(qwen, tokenizer, policy=identity, mode="rewrite").generate(prompts, **settings)
    unedited = SteeringSampler(qwen, tokenizer, policy=identity, mode="rewrite", steer_analyze="bias").generate(
        prompts, **settings)
    for a, b in ((default, off), (plain, unedited)):
        assert a.completion_ids == b.completion_ids and a.finish_reasons == b.finish_reasons
        assert a.tokens_prefilled == b.tokens_prefilled
        for x, y in zip(a.logprobs, b.logprobs):
            assert [v if math.isfinite(v) else None for v in x] == [v if math.isfinite(v) else None for v in y]
    assert all(e.steer_ids is None for e in off.events + unedited.events)


def test_steer_bias_pushes_the_key_and_reports_raw_logprobs(qwen, tokenizer):
    script = _chain_script(tokenizer)
    sampler = SteeringSampler(qwen, tokenizer, policy=POLICY, mode="rewrite", steer_analyze="bias",
                              steer_strength=40.0, steer_template="{action}")
    settings = dict(max_new_tokens=len(script) + 4, temperature=0.8, seed=[41, 42], forced_tokens=[script, None])
    out = sampler.generate(["Q: bias", "A free row"], **settings)
    # The free row shares every draw with a biased row (its bias slot is unused): unchanged.
    rewrite = SteeringSampler(qwen, tokenizer, policy=POLICY, mode="rewrite")
    off = rewrite.generate(["Q: bias", "A free row"], **settings)
    _same_row(out, off, 1, 1)
    event = out.events[0]
    assert event.steer_ids == _ids(tokenizer, event.action.action) and event.steer_status == "named"
    assert event.steer_draws == len(event.steer_ids)
    assert _analyze(out.texts[0]).startswith(event.action.action)
    # The returned log-probs are under softmax(logits / T) of the model, without the bias.
    ids = out.prompt_ids[0] + out.completion_ids[0]
    start = len(out.prompt_ids[0])
    with torch.no_grad():
        fresh = torch.log_softmax(qwen(torch.tensor([ids])).logits[0].float() / 0.8, dim=-1)
    head = out.completion_ids[0].index(tokenizer.convert_tokens_to_ids("<analyze>")) + 1
    for i in range(head, len(out.completion_ids[0])):
        expected = float(fresh[start + i - 1, out.completion_ids[0][i]])
        assert abs(out.logprobs[0][i] - expected) < 1e-4


def test_bad_arguments(qwen, tokenizer):
    with pytest.raises(ValueError, match="mode"):
        SteeringSampler(qwen, tokenizer, mode="sometimes")
    with pytest.raises(TypeError, match="PricingPolicy"):
        SteeringSampler(qwen, tokenizer, policy="cheap")
    with pytest.raises(ValueError, match="steer_analyze"):
        SteeringSampler(qwen, tokenizer, policy=POLICY, steer_analyze="nudge")
    with pytest.raises(ValueError, match="rewrite"):
        SteeringSampler(qwen, tokenizer, policy=POLICY, mode="reference", steer_analyze="force")
    with pytest.raises(ValueError, match="steer_strength"):
        SteeringSampler(qwen, tokenizer, policy=POLICY, steer_analyze="bias", steer_strength=0.0)
    with pytest.raises(TypeError, match="steer_strength"):
        SteeringSampler(qwen, tokenizer, policy=POLICY, steer_analyze="bias", steer_strength="strong")
    with pytest.raises(ValueError, match="steer_template"):
        SteeringSampler(qwen, tokenizer, policy=POLICY, steer_analyze="force", steer_template="{choice}")
    sampler = SteeringSampler(qwen, tokenizer)
    with pytest.raises(ValueError, match="seeds"):
        sampler.generate(["a", "b"], max_new_tokens=2, seed=[1])
    with pytest.raises(ValueError, match="no prompts"):
        sampler.generate([], max_new_tokens=2)


def test_a_policy_that_overflows_a_payoff_leaves_the_row_unedited(qwen, tokenizer):
    huge = PAYOFF.replace('"LLM": 2.2', '"LLM": 1e308')
    script = _chain_script(tokenizer, payoff=huge)
    for mode in ("rewrite", "reference"):
        sampler = SteeringSampler(qwen, tokenizer, policy=PricingPolicy(llm_shift=1e308), mode=mode)
        out = sampler.generate(["Q"], max_new_tokens=len(script) + 2, seed=1, forced_tokens=[script])
        event = out.events[0]
        assert event.status == "unchanged" and event.action is None and event.steered is None
        assert "pricing policy failed" in event.reason and "continues unedited" in event.reason
        assert huge in out.texts[0]  # the row kept its own payoff block
