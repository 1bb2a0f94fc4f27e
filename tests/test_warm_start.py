"""The supervised warm start of ``gtalign_fast.recipes.warm_start`` and the SmolLM2 example's prompt cut."""

from __future__ import annotations

import importlib.util
import os
import random
import re

import pytest
import torch

from gtalign_fast.game import (
    choose_action,
    extract_boxed,
    format_reward,
    parse_payoff,
    payoff_diversity,
    score_chain,
)
from gtalign_fast.recipes.warm_start import _batch, completion_nll, supervised_warm_start, well_formed_chain
from tests.test_recipes import build_tokenizer

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "smollm2_math_hard.py")


def _tiny_model(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("reference", ["32", "\\frac{3}{4}", "x^2+1"])
def test_chain_is_well_formed_diverse_and_answers_the_reference(reference):
    for seed in range(20):
        text = well_formed_chain(reference, rng=random.Random(seed))
        assert format_reward(text) == 1.0
        matrix = parse_payoff(re.search(r"<payoff>(.*?)</payoff>", text, re.S).group(1))
        assert payoff_diversity(matrix) == 1.0
        chosen = choose_action(matrix, rule="pareto").key
        assert f"I choose {chosen}." in text
        assert extract_boxed(re.search(r"<response>(.*?)</response>", text, re.S).group(1)) == reference
    assert well_formed_chain("1", rng=random.Random(0)) != well_formed_chain("1", rng=random.Random(1))


def test_chain_scores_full_format_and_answer_terms():
    from gtalign_fast.game import split_chain

    text = well_formed_chain("32", rng=random.Random(3))
    result = score_chain(split_chain(text), a_user=1.0)
    assert result.format_reward == pytest.approx(0.1 + 0.15)  # F = 1 and P = 1 (logged 0.1 F + 0.15 P)
    assert result.user_reward > 0.5 and result.llm_reward > 0.5


def test_batch_targets_are_the_next_completion_tokens_only():
    tokenizer = build_tokenizer()
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    examples = [(prompt, "<response>4</response>"), (prompt, "<response>four, surely</response>")]
    input_ids, attention_mask, targets = _batch(tokenizer, examples)
    prompt_ids = tokenizer(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False).input_ids
    for row, (_, completion) in enumerate(examples):
        completion_ids = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        length = len(prompt_ids) + len(completion_ids)
        assert input_ids[row, :length].tolist() == prompt_ids + completion_ids
        assert attention_mask[row].sum() == length
        kept = targets[row][targets[row] != -100].tolist()
        assert kept == completion_ids  # each completion token (and the end of turn) once, in order
        assert (targets[row, : len(prompt_ids) - 1] == -100).all() and (targets[row, length - 1 :] == -100).all()


def test_completion_nll_equals_the_full_logits_cross_entropy():
    tokenizer = build_tokenizer()
    model = _tiny_model(tokenizer).double()
    prompt = [{"role": "user", "content": "Solve x + 1 = 3."}]
    examples = [(prompt, well_formed_chain("2", rng=random.Random(0))), (prompt, "<response>x = 2</response>")]
    input_ids, attention_mask, targets = _batch(tokenizer, examples)
    ours = completion_nll(model, input_ids, attention_mask, targets)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    # float64 model; the op returns float32 log-probs: one float32 rounding of the mean
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=0.0)


def test_warm_start_lowers_the_completion_loss_and_checks_its_arguments():
    tokenizer = build_tokenizer()
    model = _tiny_model(tokenizer)
    examples = [([{"role": "user", "content": f"Question {i}"}], well_formed_chain(str(i), rng=random.Random(i)))
                for i in range(3)]
    before = completion_nll(model, *_batch(tokenizer, examples)).item()
    losses = supervised_warm_start(model, tokenizer, examples, steps=8, learning_rate=1e-2, batch_size=3,
                                   progress=False)
    after = completion_nll(model, *_batch(tokenizer, examples)).item()
    assert len(losses) == 8 and losses[0] == pytest.approx(before, rel=1e-5)
    assert after < 0.8 * before
    assert not model.training
    with pytest.raises(ValueError, match="steps must be >= 0"):
        supervised_warm_start(model, tokenizer, examples, steps=-1)
    with pytest.raises(ValueError, match="no examples"):
        supervised_warm_start(model, tokenizer, [], steps=1)


def _example_module():
    spec = importlib.util.spec_from_file_location("smollm2_math_hard", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_compact_prompt_keeps_the_opening_instruction_and_the_question():
    example = _example_module()
    user = ("Now you need to answer the user's most recent question. Always produce output in EXACTLY four tagged "
            "blocks. Do not include anything outside these tags. Inside <payoff>: six keys... "
            "Question: Hi. Question: What is the volume of the pyramid?")
    compact = example.compact_prompt([{"role": "system", "content": "You are helpful."},
                                      {"role": "user", "content": user}])
    assert compact == [{"role": "user", "content": (
        "Now you need to answer the user's most recent question. Always produce output in EXACTLY four tagged "
        "blocks. Do not include anything outside these tags.\nQuestion: What is the volume of the pyramid?")}]
    with pytest.raises(ValueError, match="not a GTAlign math-hard prompt"):
        example.compact_prompt([{"role": "user", "content": "What is 2+2?"}])


def test_example_writes_the_curve_as_jsonl_and_png(tmp_path):
    import json

    example = _example_module()
    history = [{"step": s, "welfare/F": f, "welfare/W": w, "reward": w, "loss": 0.1}
               for s, f, w in ((1, 0.25, 0.1), (2, 0.5, 0.2), (3, 0.75, 0.3))]
    lines = example.write_curve(str(tmp_path / "curve.jsonl"), [1.5, 0.9], history)
    written = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert written == lines
    assert [line["stage"] for line in lines] == ["warm_start", "warm_start", "grpo", "grpo", "grpo"]
    assert [line["format rate F"] for line in lines[2:]] == [0.25, 0.5, 0.75]
    assert example.running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    example.plot_curve(str(tmp_path / "curve.png"), lines, "test")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_example_reads_only_its_own_runs_metrics(tmp_path):
    """The trainer appends to metrics.jsonl: records of an earlier run in the same folder are skipped."""
    example = _example_module()
    assert example.read_metrics(str(tmp_path)) == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "old": true}\n{"step": 1}\n\n{"step": 2}\n')
    assert example.read_metrics(str(tmp_path), start=1) == [{"step": 1}, {"step": 2}]
