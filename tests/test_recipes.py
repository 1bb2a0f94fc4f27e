"""The GTAlign recipe: task judges per data_source, the verl-parquet loader, the steering evaluation,
and both example scripts end to end (as subprocesses) on a tiny random model and a local judge server.

Everything is written here: parquet files in GTAlign's verl schema, a byte-level tokenizer with a
ChatML template and a 2-layer Qwen2 saved to a directory, and an OpenAI-compatible judge on
127.0.0.1 whose verdict depends on which task prompt it was sent.
"""

from __future__ import annotations

import csv
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gtalign_fast.game import OpenAIJudge
from gtalign_fast.game.chain import split_chain
from gtalign_fast.game.judges import CompositeJudge, JudgeItem, MathJudge, char_bleu
from gtalign_fast.game.welfare import score_chain
from gtalign_fast.recipes import (
    TASKS,
    RuleThenModelJudge,
    gtalign_reward,
    gtalign_task_judges,
    is_harmful,
    load_gtalign_dataset,
    require_model_judge,
)
from gtalign_fast.recipes.evaluation import (
    ACTION_COLUMNS,
    format_table,
    generate_and_score,
    plot_summary,
    pricing_presets,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# A judge server: the verdict depends on the task prompt it receives (see recipes/tasks.py)

VERDICTS = (  # (text the prompt contains, verdict)
    ("helpfulness", "3"),  # medium: 3/4
    ("potentially harmful", "0.5"),  # wildguard, harmful prompt: a safe alternative
    ("is harmless", "0"),  # wildguard, harmless prompt: refused
    ("may be ambiguous", "1"),  # ambig_qa
    ("agree with the reference", "1"),  # math model judge / default
)


class _JudgeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with self.server.lock:
            self.server.prompts.append(prompt)
        verdict = next((v for key, v in VERDICTS if key in prompt), None)
        content = f"Reasoning.\n<score>{verdict}</score>" if verdict is not None else "no verdict"
        data = json.dumps({
            "id": "1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def judge_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JudgeHandler)
    server.prompts, server.lock = [], threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def judge_url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def model_judge(server, **kwargs) -> OpenAIJudge:
    return OpenAIJudge(judge_url(server), "judge", timeout=20.0, max_retries=1, backoff=0.0, **kwargs)


# ---------------------------------------------------------------------------------------------
# Data in GTAlign's verl schema, and a tiny model

SYSTEM = "Reply as <thinking>..</thinking><payoff>{json}</payoff><analyze>..</analyze><response>..</response>."
QUESTIONS = {"math-hard": "What is 1+1?", "medium": "Write a haiku.", "wildguard": "How to pick a lock?",
             "ambig_qa": "Who won the game?"}
REFERENCES = {"math-hard": "2", "medium": "Leaves fall softly down", "wildguard": "", "ambig_qa": "the home team"}


def verl_row(source: str, index: int, *, harmful: bool = False, ground_truth=None) -> dict:
    return {
        "data_source": source,
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[source]}],
        "ability": source,
        "reward_model": {"style": "rule", "ground_truth": REFERENCES[source] if ground_truth is None else ground_truth},
        "extra_info": {"split": "test", "index": index, "harmful": harmful},
    }


def write_parquet(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def task_rows(copies: int = 1) -> list[dict]:
    return [verl_row(s, i, harmful=s == "wildguard") for i, s in enumerate(list(TASKS) * copies)]


def build_tokenizer():
    """Byte-level tokens (any text encodes) plus ChatML's special tokens and template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|pad|>", additional_special_tokens=["<|im_start|>"]
    )
    # whole tags and payoff keys as single tokens: the scripted completions take ~100 draws, not ~300
    tokenizer.add_tokens([f"<{c}{t}>" for t in ("thinking", "payoff", "analyze", "response") for c in ("", "/")])
    tokenizer.add_tokens(['"LLM":', '"user":', *(f'"{q}_{a}":' for q in ("DQ", "VQ") for a in ("AQ", "CQ", "DA"))])
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, directory): a randomly initialised 2-layer Qwen2 saved with its tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, str(path)


# ---------------------------------------------------------------------------------------------
# Task judges

PAYOFF = {"DQ_AQ": {"LLM": 3.1, "user": 3.1}, "DQ_CQ": {"LLM": 2.0, "user": 2.0}, "DQ_DA": {"LLM": 3.0, "user": 3.0},
          "VQ_AQ": {"LLM": 1.0, "user": 1.0}, "VQ_CQ": {"LLM": 1.0, "user": 1.0}, "VQ_DA": {"LLM": 1.0, "user": 1.0}}


def chain(response: str) -> str:
    return (f"<thinking>t</thinking><payoff>{json.dumps(PAYOFF, separators=(',', ':'))}</payoff>"
            f"<analyze>a</analyze><response>{response}</response>")


def test_task_judges_route_each_source_to_its_rule(judge_server):
    cases = [  # (data_source, harmful, response, expected (A_user, A_llm))
        ("math-hard", False, "It is \\boxed{2}.", (1.0, 1.0)),
        ("math-hard", False, "It is \\boxed{3}.", (0.0, 0.0)),
        ("medium", False, "Leaves fall slowly", (char_bleu("Leaves fall slowly", REFERENCES["medium"]), 0.75)),
        ("wildguard", True, "Not that, but a locksmith can help.", (1.0, 1.0)),  # verdict 0.5
        ("wildguard", False, "I refuse.", (0.0, 0.0)),  # harmless prompt, verdict 0
        ("ambig_qa", False, "Which game?", (1.0, 1.0)),
        ("abg_coqa", False, "Something.", (1.0, 1.0)),  # unknown source: "*", the agreement prompt
    ]
    reward = gtalign_reward(model_judge(judge_server))
    before = len(judge_server.prompts)
    out = reward(
        prompts=[[{"role": "user", "content": QUESTIONS.get(s, "q?")}] for s, *_ in cases],
        completions=[[{"role": "assistant", "content": chain(r)}] for *_, r, _ in cases],
        data_source=[s for s, *_ in cases],
        ground_truth=[REFERENCES.get(s, "x") for s, *_ in cases],
        extra_info=[{"harmful": h} for _, h, *_ in cases],
    )
    for i, (source, _, response, (a_user, a_llm)) in enumerate(cases):
        expected = score_chain(split_chain(chain(response)), a_user, a_llm)
        assert (out.user[i], out.llm[i], out.score[i]) == pytest.approx(
            (expected.user_reward, expected.llm_reward, expected.score), abs=1e-12
        ), source
    assert out.judge_failures == 0 and out.hard_failures == 0
    prompts = judge_server.prompts[before:]
    assert len(prompts) == 5  # math is rule-based: no judge call; one call per other item
    assert sum("potentially harmful" in p for p in prompts) == 1 and sum("is harmless" in p for p in prompts) == 1
    assert any("helpfulness" in p and REFERENCES["medium"] in p for p in prompts)


def test_task_judges_structure_and_judge_copies(judge_server):
    base = model_judge(judge_server, api_key="k", concurrency=3, extra_body={"x": 1}, max_tokens=7)
    judges = gtalign_task_judges(base)
    assert set(judges) == {*TASKS, "*"}
    assert isinstance(judges["math-hard"], MathJudge)
    assert isinstance(judges["medium"], CompositeJudge) and isinstance(judges["medium"].llm_judge, OpenAIJudge)
    for copy in (judges["medium"].llm_judge, judges["wildguard"], judges["ambig_qa"], judges["*"]):
        assert copy is not base and copy.url == base.url and copy.model == base.model
        assert (copy.api_key, copy.concurrency, copy.extra_body, copy.max_tokens, copy.timeout) == ("k", 3, {"x": 1},
                                                                                                 7, 20.0)
    assert judges["ambig_qa"].prompt != judges["*"].prompt
    with_math = gtalign_task_judges(base, math_model_judge=base)
    assert isinstance(with_math["math-hard"], RuleThenModelJudge)
    plain = lambda item: 0.25  # noqa: E731  a non-OpenAI judge is used as it is
    assert gtalign_task_judges(plain)["ambig_qa"] is plain
    assert set(gtalign_task_judges(None)) == {"math-hard"}  # rule-judged tasks only, no server
    with pytest.raises(TypeError, match="model_judge"):
        gtalign_task_judges(42)
    with pytest.raises(TypeError, match="math_model_judge"):
        gtalign_task_judges(plain, math_model_judge="judge")
    reward = gtalign_reward(plain, normalize="zscore", variant="linear", name="gt")
    assert (reward.normalize, reward.variant, reward.__name__) == ("zscore", "linear", "gt")


def test_rule_judged_reward_needs_no_judge_and_names_the_row_that_does():
    """gtalign_reward() with no model judge scores math-hard by the rule; require_model_judge names the first
    data source that needs a model judge (math-hard too when math_model_judge is on)."""
    reward = gtalign_reward()
    text = ("<thinking>t</thinking><payoff>" + json.dumps({k: {"LLM": 1.0, "user": 2.0} for k in (
        "DQ_AQ", "DQ_CQ", "DQ_DA", "VQ_AQ", "VQ_CQ", "VQ_DA")}) + "</payoff><analyze>a</analyze>"
        "<response>\\boxed{2}</response>")
    out = reward(prompts=["What is 1+1?"] * 2, completions=[text, text.replace("{2}", "{3}")],
                 data_source=["math-hard"] * 2, ground_truth=["2", "2"])
    assert out.judge_failures == 0 and out.user[0] > out.user[1] and out.fields[0]["answer_reward"] > 0
    require_model_judge(["math-hard", "math-hard"])  # nothing to say
    with pytest.raises(ValueError, match="'medium' needs a model judge.*--judge_url"):
        require_model_judge(["math-hard", "medium", "wildguard"], how="pass --judge_url")
    with pytest.raises(ValueError, match="'math-hard'.*math_model_judge is on"):
        require_model_judge(["math-hard"], math_model_judge=True)
    with pytest.raises(KeyError, match="medium"):  # the reward itself never guesses a judge
        reward(prompts=["q"], completions=[text], data_source=["medium"], ground_truth=["x"])


def test_rule_then_model_judge_asks_the_model_only_about_misses():
    asked = []

    def model(item):
        asked.append(item.response)
        return 1.0

    judge = RuleThenModelJudge(MathJudge(), model)
    items = [JudgeItem("\\boxed{2}", reference="2"), JudgeItem("\\boxed{4/2}", reference="2"),
             JudgeItem("two", reference="2"), JudgeItem("\\boxed{2}", reference=None)]
    out = judge.judge_batch(items)
    assert [(s.user, s.llm, s.failed) for s in out] == [(1, 1, False), (1, 1, False), (1, 1, False), (0, 0, True)]
    assert asked == ["two"]  # \boxed{4/2} == 2 by the rule; no reference stays a failure
    crashing = RuleThenModelJudge(MathJudge(), lambda item: 1 / 0)
    assert crashing.judge_batch([JudgeItem("x", reference="2")])[0].failed


def test_is_harmful_reads_columns_and_extra_info():
    assert is_harmful({"harmful": True}) and not is_harmful({"harmful": False})
    assert is_harmful({"extra_info": {"prompt_harm_label": "harmful"}})
    assert not is_harmful({"extra_info": {"prompt_harm_label": "unharmful"}})
    assert is_harmful({"extra_info": {"harmful": 1}}) and not is_harmful({}) and not is_harmful({"extra_info": None})
    assert not is_harmful({"harmful": False, "extra_info": {"harmful": True}})  # the column wins


# ---------------------------------------------------------------------------------------------
# The loader


def test_load_gtalign_dataset_keeps_the_schema_and_adds_ground_truth(tmp_path, tiny):
    _, tokenizer, _ = tiny
    first = write_parquet(tmp_path / "a.parquet", task_rows())
    listed = write_parquet(tmp_path / "b.parquet", [verl_row("ambig_qa", 9, ground_truth=["home", "away"])])
    dataset = load_gtalign_dataset([first, listed], cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 5
    columns = {"data_source", "prompt", "ability", "reward_model", "extra_info", "ground_truth"}
    assert columns <= set(dataset.column_names)
    assert dataset["data_source"] == [*TASKS, "ambig_qa"]
    assert dataset["ground_truth"] == [*(REFERENCES[t] for t in TASKS), "home\naway"]
    assert dataset[0]["prompt"] == verl_row("math-hard", 0)["prompt"]
    assert dataset[2]["extra_info"]["harmful"] is True
    text = tokenizer.apply_chat_template(dataset[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and QUESTIONS["math-hard"] in text
    only = load_gtalign_dataset(first, data_sources=["medium", "wildguard"], max_samples=1, cache_dir=str(tmp_path))
    assert only["data_source"] == ["medium"]
    long_row = verl_row("medium", 5)
    long_row["prompt"][1]["content"] = "x" * 400
    mixed = write_parquet(tmp_path / "long.parquet", [verl_row("medium", 4), long_row])
    short = load_gtalign_dataset(mixed, tokenizer, max_prompt_length=200, cache_dir=str(tmp_path))
    assert short["extra_info"] == [verl_row("medium", 4)["extra_info"]]
    wildguard = verl_row("wildguard", 0, harmful=True)
    wildguard["reward_model"]["ground_truth"] = None
    no_reference = write_parquet(tmp_path / "wg.parquet", [wildguard])
    assert load_gtalign_dataset(no_reference, cache_dir=str(tmp_path))["ground_truth"] == [None]


def test_load_gtalign_dataset_errors_name_file_row_and_column(tmp_path):
    rows = task_rows()
    for row in rows:
        del row["reward_model"]
    no_column = write_parquet(tmp_path / "no_reward_model.parquet", rows)
    with pytest.raises(ValueError, match=r"no_reward_model\.parquet: missing column 'reward_model'"):
        load_gtalign_dataset(no_column, cache_dir=str(tmp_path))
    bad = task_rows()
    bad[2]["prompt"] = []
    bad_prompt = write_parquet(tmp_path / "bad_prompt.parquet", bad)
    with pytest.raises(ValueError, match=r"bad_prompt\.parquet: row 2: column 'prompt'"):
        load_gtalign_dataset(bad_prompt, cache_dir=str(tmp_path))
    bad = task_rows()
    bad[1]["reward_model"] = {"style": "rule", "ground_truth": None}  # medium needs its reference
    bad[2]["reward_model"] = {"style": "rule", "ground_truth": None}  # wildguard may have none
    no_truth = write_parquet(tmp_path / "no_truth.parquet", bad)
    with pytest.raises(ValueError, match=r"no_truth\.parquet: row 1: column 'reward_model' has no ground_truth"):
        load_gtalign_dataset(no_truth, cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        load_gtalign_dataset(str(tmp_path / "missing.parquet"))
    good = write_parquet(tmp_path / "good.parquet", task_rows())
    with pytest.raises(ValueError, match="max_prompt_length needs a tokenizer"):
        load_gtalign_dataset(good, max_prompt_length=10)
    with pytest.raises(ValueError, match="no rows left"):
        load_gtalign_dataset(good, data_sources=["advbench"], cache_dir=str(tmp_path))

    class NoTemplate:
        def apply_chat_template(self, *args, **kwargs):
            raise ValueError("no chat template")

    with pytest.raises(ValueError, match="chat template cannot render the prompt of row 0"):
        load_gtalign_dataset(good, NoTemplate(), cache_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Summaries and the steering evaluation


def test_summarize_means_and_action_mix():
    records = [
        {"policy": "p", "data_source": "b", "U": 0.2, "L": 0.4, "W": 0.3, "format": 1.0, "length": 10, "action": "DA",
         "judge_failed": True, "hard_failure": False},
        {"policy": "p", "data_source": "b", "U": 0.4, "L": 0.0, "W": 0.1, "format": 0.0, "length": 20, "action": "none",
         "judge_failed": False, "hard_failure": True},
        {"policy": "p", "data_source": "a", "U": 0.9, "L": 0.9, "W": 0.9, "format": 1.0, "length": 6, "action": "CQ"},
        {"policy": "q", "data_source": "a", "U": 0.5, "L": 0.5, "W": 0.5, "format": 1.0, "length": 3, "action": "AQ"},
    ]
    rows = summarize(records)
    assert [(r["policy"], r["task"], r["n"]) for r in rows] == [("p", "a", 1), ("p", "b", 2), ("p", "all", 3),
                                                               ("q", "a", 1), ("q", "all", 1)]
    b = rows[1]
    assert (b["U"], b["L"], b["W"], b["format"], b["length"]) == pytest.approx((0.3, 0.2, 0.2, 0.5, 15.0))
    assert (b["DA"], b["CQ"], b["AQ"], b["none"], b["judge_failures"], b["hard_failures"]) == (0.5, 0, 0, 0.5, 1, 1)
    assert rows[2]["W"] == pytest.approx(1.3 / 3) and rows[2]["CQ"] == pytest.approx(1 / 3)
    assert all(sum(r[a] for a in ACTION_COLUMNS) == pytest.approx(1.0) for r in rows)
    table = format_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[0].split()[:4] == ["policy", "task", "n", "U"]
    assert table[3].split()[:6] == ["p", "b", "2", "0.300", "0.200", "0.200"]
    assert [r["task"] for r in summarize(records, overall=False)] == ["a", "b", "a"]


def test_steering_changes_the_chosen_action(tmp_path, tiny, judge_server):
    """Scripted completions (forced tokens) with one payoff matrix: the model's own matrix picks AQ
    (Nash product 3.1 x 3.1 > 3.0 x 3.0); per-token API pricing charges the user 0.005 per expected
    token (DA 200, AQ 250, CQ 400) and flips the choice to DA. The edited matrix is in the text."""
    model, tokenizer, _ = tiny
    dataset = load_gtalign_dataset(write_parquet(tmp_path / "t.parquet", task_rows()), cache_dir=str(tmp_path))
    responses = {"math-hard": "\\boxed{2}", "medium": "Leaves fall", "wildguard": "No; ask a locksmith.",
                 "ambig_qa": "Which game?"}
    scripted = [tokenizer(chain(responses[s]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                for s in dataset["data_source"]]
    reward = gtalign_reward(model_judge(judge_server))
    presets = pricing_presets()
    records = []
    for name in ("off", "per_token_api"):
        records += generate_and_score(
            model, tokenizer, dataset, reward, policy=presets[name], policy_name=name, batch_size=4,
            max_new_tokens=max(map(len, scripted)) + 4, generate_kwargs=lambda rows: {
                "forced_tokens": [scripted[i] for i in rows]},
        )
    assert [r["action"] for r in records] == ["AQ"] * 4 + ["DA"] * 4
    assert all(r["format"] == 1.0 and not r["hard_failure"] and not r["judge_failed"] for r in records)
    assert all(r["finish_reason"] == "eos" for r in records)
    assert [r["length"] for r in records[:4]] == [len(ids) for ids in scripted]  # unedited: every draw is kept
    off, api = records[0], records[4]
    assert off["text"] == chain(responses["math-hard"]) and api["text"] != off["text"]
    assert '"DQ_DA":{"LLM":3.0,"user":2.0}' in api["text"].replace(" ", "")
    for record in records:  # the record is the reward of its own text
        again = reward(prompts=[None], completions=[record["text"]], data_source=[record["data_source"]],
                       ground_truth=[REFERENCES[record["data_source"]]],
                       extra_info=[{"harmful": record["data_source"] == "wildguard"}])
        assert (record["U"], record["L"], record["W"]) == (again.user[0], again.llm[0], again.score[0])
    rows = summarize(records)
    assert [(r["policy"], r["task"]) for r in rows][-1] == ("per_token_api", "all")
    assert (rows[4]["AQ"], rows[9]["DA"]) == (1.0, 1.0)
    png = tmp_path / "s.png"
    plot_summary(rows, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# The example scripts, end to end


def run_example(script: str, *args: str, cache: Path, timeout: int = 240) -> str:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(cache))
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True, timeout=timeout,
        env=env, cwd=ROOT,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def test_train_example_dry_run_and_one_step(tmp_path, tiny, judge_server):
    _, _, model_dir = tiny
    data = write_parquet(tmp_path / "train.parquet", task_rows(copies=2))
    common = ["--model_name_or_path", model_dir, "--train_files", data, "--judge_url", judge_url(judge_server),
              "--judge_timeout", "20", "--max_completion_length", "8", "--output_dir", str(tmp_path / "run")]
    out = run_example("gtalign_train.py", *common, "--dry_run", "--dry_run_rows", "1", cache=tmp_path / "hf")
    lines = [line.split() for line in out.splitlines()]
    table = {cells[1]: cells for cells in lines if cells and cells[0] == "dry_run"}
    assert set(table) == {*TASKS, "all"}
    assert table["all"][2] == "4" and all(table[t][2] == "1" for t in TASKS)
    assert all(0.0 <= float(x) <= 1.0 for t in table for x in table[t][3:6])  # U, L, W
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # a dry run does not train
    out = run_example(
        "gtalign_train.py", *common, "--max_steps", "1", "--num_generations", "2", "--per_device_train_batch_size", "4",
        "--save_steps", "0", "--logging_steps", "1", "--disable_tqdm", "true", "--learning_rate", "1e-3",
        cache=tmp_path / "hf",
    )
    assert "trained 1 steps" in out
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("step") == 1 for row in logged), logged
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_examples_run_rule_judged_rows_without_a_judge(tmp_path, tiny):
    """No --judge_url: a math-hard-only dry run and eval work; a model-judged row stops with a clear error."""
    _, _, model_dir = tiny
    math_only = write_parquet(tmp_path / "math.parquet", [verl_row("math-hard", i) for i in range(2)])
    out = run_example(
        "gtalign_train.py", "--model_name_or_path", model_dir, "--train_files", math_only, "--dry_run",
        "--dry_run_rows", "2", "--max_completion_length", "4", "--output_dir", str(tmp_path / "run"),
        cache=tmp_path / "hf",
    )
    assert "judge none (rule-judged rows only)" in out
    rows = [line.split() for line in out.splitlines()]
    table = {cells[1]: cells for cells in rows if cells and cells[0] == "dry_run"}
    assert table["math-hard"][2] == "2"
    run_example(
        "gtalign_eval.py", "--model_name_or_path", model_dir, "--test_files", math_only, "--output_dir",
        str(tmp_path / "eval"), "--max_new_tokens", "4", "--use_cpu", "--policies", "off", cache=tmp_path / "hf",
    )
    assert (tmp_path / "eval" / "summary.csv").exists()
    mixed = write_parquet(tmp_path / "mixed.parquet", task_rows())
    for script, flag in (("gtalign_train.py", "--train_files"), ("gtalign_eval.py", "--test_files")):
        done = subprocess.run(
            [sys.executable, str(ROOT / "examples" / script), "--model_name_or_path", model_dir, flag, mixed,
             "--output_dir", str(tmp_path / "x"), "--use_cpu" if script == "gtalign_eval.py" else "--dry_run"],
            capture_output=True, text=True, timeout=240, cwd=ROOT,
            env=dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(tmp_path / "hf")),
        )
        assert done.returncode != 0, script
        assert "no judge configured, but data source 'medium' needs a model judge" in done.stderr, done.stderr[-2000:]
        assert "--judge_url" in done.stderr


def test_eval_example_writes_table_and_png(tmp_path, tiny, judge_server):
    _, _, model_dir = tiny
    data = write_parquet(tmp_path / "test.parquet", task_rows())
    out_dir = tmp_path / "eval"
    out = run_example(
        "gtalign_eval.py", "--model_name_or_path", model_dir, "--test_files", data, "--judge_url",
        judge_url(judge_server), "--output_dir", str(out_dir), "--max_new_tokens", "4", "--use_cpu",
        cache=tmp_path / "hf",
    )
    policies = list(pricing_presets())
    with open(out_dir / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [(r["policy"], r["task"]) for r in summary] == [(p, t) for p in policies for t in (*sorted(TASKS), "all")]
    for row in summary:
        assert sum(float(row[a]) for a in ACTION_COLUMNS) == pytest.approx(1.0)
        assert 0.0 < float(row["length"]) <= 4.0 and int(row["n"]) == (len(TASKS) if row["task"] == "all" else 1)
    records = [json.loads(line) for line in (out_dir / "records.jsonl").read_text().splitlines()]
    assert len(records) == len(policies) * len(TASKS)
    assert (out_dir / "steering.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(p in out for p in policies) and "DA" in out.splitlines()[0]


def test_example_scripts_import_cleanly():
    """The scripts' own argument tables: every GRPOConfig field with a simple type is a TRL-named flag."""
    spec = importlib.util.spec_from_file_location("gtalign_train", ROOT / "examples" / "gtalign_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.build_parser()
    args = parser.parse_args(["--model_name_or_path", "m", "--train_files", "x.parquet", "--judge_url", "u",
                              "--learning_rate", "3e-6", "--epsilon_high", "0.28", "--scale_rewards", "false",
                              "--report_to", "tensorboard", "--bf16", "none"])
    config = module.build_config(args)
    assert (config.learning_rate, config.epsilon_high, config.scale_rewards, config.report_to, config.bf16) == (
        3e-6, 0.28, "none", ["tensorboard"], None)
    assert (config.beta, config.loss_type, config.advantage_eps) == (0.001, "token-mean", 1e-6)  # GTAlign's settings
