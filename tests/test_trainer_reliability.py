"""GRPOTrainer reliability (issue 15): extreme rewards, crashed checkpoint saves, prompt limits, data checks.

Each test reproduces one failure the issue reports and checks the promised behaviour instead
(README, "Reliability"). Models and data are the toy game's (tests/test_trainer.py), on a CPU.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil

import pytest
import torch

from gtalign_fast import GRPOTrainer
from gtalign_fast.training import checkpoint
from gtalign_fast.training.preemption import LOCK_FILE
from gtalign_fast.training.scoring import RewardSpec, call_reward_funcs
from tests.test_trainer import install_missing_ops, read_metrics, sgd_trainer, toy


@pytest.fixture(autouse=True)
def _ops(monkeypatch):
    install_missing_ops(monkeypatch)


class _Records(logging.Handler):
    """The trainer logger's records (the suite runs with ``-p no:logging``, so no caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def trainer_log():
    handler = _Records()
    logger = logging.getLogger("gtalign_fast.trainer")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def toy_trainer(tmp_path, dataset, name="run", model=None, tokenizer=None, **overrides) -> GRPOTrainer:
    tokenizer = tokenizer or toy.build_tokenizer()
    model = model or toy.build_model(tokenizer, 0)
    settings = dict(per_device_train_batch_size=16, shuffle_dataset=False)
    settings.update(overrides)
    return GRPOTrainer(model, [toy.ToyWelfareReward(tokenizer)], args=toy.toy_config(str(tmp_path / name), 1,
                       **settings), train_dataset=dataset, processing_class=tokenizer)


# ---------------------------------------------------------------------------------------------
# Item 3: a non-finite reward is a counted failure, advantage 0, and leaves other groups alone


def _plain_scores(trainer, values):
    def plain(completions, **_):
        return list(values)

    spec = RewardSpec(plain, 1.0, "plain", False)
    trainer.rewards = [spec]
    n = len(values)
    return call_reward_funcs([spec], prompts=["p"] * n, completions=["c"] * n, completion_ids=[[1]] * n,
                             columns={}, device=trainer.device)


def test_nonfinite_rewards_are_counted_failures_with_advantage_zero(tmp_path):
    trainer = sgd_trainer(tmp_path, scale_rewards="group", advantage_eps=1e-4)
    g = trainer.args.num_generations
    torch.manual_seed(3)
    base = (torch.rand(2 * g, dtype=torch.float64) * 1e-3).tolist()  # float32 would lose these next to 3.4e38
    extreme = list(base)
    extreme[1], extreme[2], extreme[3], extreme[4] = -math.inf, math.inf, 1e39, -1e39
    missing = list(base)
    missing[1:5] = [None] * 4

    scores = _plain_scores(trainer, extreme)
    assert scores.failures == {"plain": 4}
    assert bool(scores.per_func[1:5, 0].isnan().all()), "+-inf / past float32 must be stored as missing"
    assert bool(torch.isfinite(scores.per_func[[0, *range(5, 2 * g)], 0]).all())
    advantages, metrics = trainer._advantages(scores)
    expected, _ = trainer._advantages(_plain_scores(trainer, missing))

    assert metrics["rewards/plain/failures"] == 4
    assert torch.equal(advantages[1:5], torch.zeros(4))
    assert torch.equal(advantages, expected)  # exactly as if those four had not been scored
    assert float(advantages[g:].abs().max()) > 0.5  # the other group keeps its learning signal
    assert math.isfinite(metrics["reward"]) and abs(metrics["reward"]) < 1


def test_an_infinite_reward_does_not_stop_a_training_step(tmp_path):
    trainer = sgd_trainer(tmp_path, steps=1)

    def minus_infinity_once(completions, **_):
        return [-math.inf] + [0.5] * (len(completions) - 1)

    trainer.rewards += [RewardSpec(minus_infinity_once, 1.0, "extreme", False)]
    trainer.train()
    (row,) = read_metrics(trainer)
    assert row["rewards/extreme/failures"] == 1 and math.isfinite(row["loss"])
    assert math.isfinite(row["reward"])


def test_a_column_of_the_wrong_length_is_an_error_not_judge_failures():
    def reward(completions, answer, **_):
        return [1.0 for _ in completions]

    with pytest.raises(ValueError, match="column 'answer' has 3 values for 4 completions"):
        call_reward_funcs([RewardSpec(reward, 1.0, "r", False)], prompts=["p"] * 4, completions=["c"] * 4,
                          completion_ids=[[1]] * 4, columns={"answer": [1, 2, 3]}, device=torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# Item 4: checkpoints are written to a temporary folder; resume and rotation trust complete ones only


def _crash_on_trainer_state(monkeypatch):
    """Make the next ``trainer_state.pt`` write leave a truncated file and raise (a full disk)."""

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 truncated")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)


def test_a_crash_mid_save_leaves_no_checkpoint_and_resume_takes_the_last_complete(tmp_path, monkeypatch):
    trainer = sgd_trainer(tmp_path, steps=2, save_steps=1)
    trainer.train()  # checkpoint-1 and checkpoint-2, both complete
    crashing = sgd_trainer(tmp_path, steps=3, save_steps=1)
    with monkeypatch.context() as patch:
        _crash_on_trainer_state(patch)
        with pytest.raises(OSError, match="No space"):
            crashing.train(resume_from_checkpoint=True)  # step 3, then the save of checkpoint-3 crashes
    run = tmp_path / "run"
    assert not (run / "checkpoint-3").exists(), "a half-written checkpoint must not carry a checkpoint name"
    assert checkpoint.latest_checkpoint(str(run)) == str(run / "checkpoint-2")

    resumed = sgd_trainer(tmp_path, steps=3, save_steps=1)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.step == 3
    assert checkpoint.why_incomplete(str(run / "checkpoint-3")) is None
    assert not [name for name in os.listdir(run) if name.startswith("tmp-")], "the crashed save's folder remains"


def test_resume_skips_an_incomplete_checkpoint_and_says_why(tmp_path, trainer_log):
    trainer = sgd_trainer(tmp_path, steps=2, save_steps=1)
    trainer.train()
    run = tmp_path / "run"
    # what a crash in a writer that saved in place leaves: weights, and a cut-off trainer_state.pt
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-3")
    (run / "checkpoint-3" / "trainer_state.pt").write_bytes(b"PK\x03\x04 truncated")
    os.remove(run / "checkpoint-3" / "trainer_state.json")

    again = sgd_trainer(tmp_path, steps=2, save_steps=1)
    again.train(resume_from_checkpoint=True)
    assert again.step == 2
    assert any("checkpoint-3" in m and "incomplete" in m and "trainer_state.json" in m for m in trainer_log)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        sgd_trainer(tmp_path, steps=4).train(resume_from_checkpoint=str(run / "checkpoint-3"))


def _visible(folder) -> list[str]:
    """The folder's entries but the output-dir lock file."""
    return sorted(name for name in os.listdir(folder) if name != LOCK_FILE)


def test_rotation_never_deletes_the_newest_complete_checkpoint(tmp_path):
    trainer = sgd_trainer(tmp_path, steps=2, save_steps=1)
    trainer.train()
    run = tmp_path / "run"
    for step in (3, 4):  # crashed saves of later steps: a folder without the trainer state
        (run / f"checkpoint-{step}").mkdir()
        shutil.copy(run / "checkpoint-2" / "model.safetensors", run / f"checkpoint-{step}")
    deleted = checkpoint.rotate_checkpoints(str(run), 1)
    assert _visible(run) == ["checkpoint-2", "metrics.jsonl"]
    assert str(run / "checkpoint-1") in deleted
    # the checkpoint just written survives even when an older run left higher steps
    (run / "checkpoint-1").mkdir()
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-1", dirs_exist_ok=True)
    (run / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
    checkpoint.rotate_checkpoints(str(run), 1, newest=str(run / "checkpoint-1"))
    assert _visible(run) == ["checkpoint-1", "metrics.jsonl"]


def test_save_total_limit_with_a_crash_keeps_a_readable_checkpoint(tmp_path, monkeypatch):
    trainer = sgd_trainer(tmp_path, steps=3, save_steps=1, save_total_limit=1)
    real_save = checkpoint.torch.save
    calls = []

    def save_twice_then_crash(obj, handle, *args, **kwargs):
        calls.append(handle)
        if len(calls) == 3:
            handle.write(b"PK truncated")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_twice_then_crash)
    with pytest.raises(OSError):
        trainer.train()
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    run = tmp_path / "run"
    assert checkpoint.latest_checkpoint(str(run)) == str(run / "checkpoint-2")
    resumed = sgd_trainer(tmp_path, steps=3, save_steps=1, save_total_limit=1)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.step == 3
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint")) == ["checkpoint-3"]


def test_metrics_steps_strictly_increase_after_resume(tmp_path):
    # metrics.jsonl keeps the lines up to the resumed step and drops the later ones (logged again)
    trainer = sgd_trainer(tmp_path, steps=3, save_steps=2)
    trainer.train()  # logs 1, 2, 3; checkpoints 2 and 3 (the last step)
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoint-3")  # the crash came after step 3 was logged, before it was saved
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "loss": 0.')  # and cut a line short
    resumed = sgd_trainer(tmp_path, steps=4, save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    steps = [row["step"] for row in read_metrics(resumed)]
    assert steps == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Item 5: prompts longer than the model's positions are left-truncated (TRL's max_prompt_length)


def _long_rows(n_rows: int, repeat: int) -> list[dict]:
    rows = toy.build_dataset(n_rows, 0)
    for row in rows:
        row["prompt"] = " ".join([row["prompt"]] * repeat)
    return rows


def test_prompts_are_cut_to_fit_the_rotary_models_positions(tmp_path, trainer_log):
    rows = _long_rows(16, 8)  # ~120 tokens, the toy Qwen2 has 64 positions
    trainer = toy_trainer(tmp_path, rows, max_prompt_length=None, max_completion_length=3)
    assert trainer.max_prompt_length == 64 - 3
    assert any("truncated to their last 61 tokens" in m for m in trainer_log)
    (ids,) = trainer._tokenize_prompts([rows[0]["prompt"]])
    full = trainer.processing_class(rows[0]["prompt"], add_special_tokens=False)["input_ids"]
    assert len(full) > 61 and ids == full[-61:]  # the END of the prompt is kept
    assert toy_trainer(tmp_path, rows, max_prompt_length=20).max_prompt_length == 20  # a smaller limit stays


def test_long_prompts_train_on_an_absolute_position_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = toy.build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(toy.VOCAB), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    trainer = toy_trainer(tmp_path, _long_rows(16, 4), model=model, tokenizer=tokenizer, max_completion_length=3,
                          use_fused_lm_head=False)  # ~60-token prompts: an IndexError in the embedding before
    trainer.train()
    assert trainer.step == 1 and math.isfinite(read_metrics(trainer)[0]["loss"])
    with pytest.raises(ValueError, match="no room for a prompt"):
        toy_trainer(tmp_path, _long_rows(16, 1), max_completion_length=64)


# ---------------------------------------------------------------------------------------------
# Items 6 and 7: empty prompts and missing columns are rejected with the row and the column


def test_empty_prompts_are_rejected_with_their_row(tmp_path):
    rows = toy.build_dataset(16, 0)
    rows[5]["prompt"] = ""
    with pytest.raises(ValueError, match="row 5 has an empty prompt"):
        toy_trainer(tmp_path, rows)
    rows[5]["prompt"] = []
    with pytest.raises(ValueError, match="row 5 has an empty prompt"):
        toy_trainer(tmp_path, rows)
    # whitespace tokenizes to nothing: caught at the first batch, before the model sees it
    rows[5]["prompt"] = "x"
    rows[1]["prompt"] = "   "  # in the first batch (rows 0 and 1, unshuffled)
    trainer = toy_trainer(tmp_path, rows)
    with pytest.raises(ValueError, match="train_dataset row 1 is empty"):
        trainer.train()


def test_columns_missing_from_some_rows_are_rejected_once(tmp_path):
    rows = toy.build_dataset(16, 0)
    del rows[3]["user_payoff"]  # the toy reward's required argument
    with pytest.raises(ValueError, match="row 3 has no column 'user_payoff', which reward function 'toy_welfare'"):
        toy_trainer(tmp_path, rows)

    rows = toy.build_dataset(16, 0)
    for row in rows[1:]:
        row["note"] = "x"  # missing from the FIRST row only: it used to vanish for the whole batch
    with pytest.raises(ValueError, match="row 0 has no column 'note' but row 1 has it"):
        toy_trainer(tmp_path, rows)

    rows = toy.build_dataset(16, 0)
    rows[9]["note"] = "x"  # only in a later row: a KeyError mid-run before
    with pytest.raises(ValueError, match="row 0 has no column 'note' but row 9 has it"):
        toy_trainer(tmp_path, rows)

    tokenizer = toy.build_tokenizer()

    def needs_difficulty(completions, difficulty, **_):
        return [1.0] * len(completions)

    with pytest.raises(ValueError, match="row 0 has no column 'difficulty', which reward function 'needs_difficulty'"):
        GRPOTrainer(toy.build_model(tokenizer, 0), [needs_difficulty], args=toy.toy_config(str(tmp_path / "d"), 1),
                    train_dataset=toy.build_dataset(16, 0), processing_class=tokenizer)


def test_a_hugging_face_dataset_is_checked_by_its_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = toy.build_dataset(16, 0)
    data = datasets.Dataset.from_list([{"prompt": r["prompt"], "user_payoff": r["user_payoff"]} for r in rows])
    with pytest.raises(ValueError, match="no column 'llm_payoff', which reward function 'toy_welfare'"):
        toy_trainer(tmp_path, data)
    rows[7]["prompt"] = ""
    with pytest.raises(ValueError, match="row 7 has an empty prompt"):
        toy_trainer(tmp_path, datasets.Dataset.from_list(rows))


# ---------------------------------------------------------------------------------------------
# Item 10: a kernel backend that cannot run here is refused at construction


def test_a_backend_that_cannot_run_here_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="kernel_backend='cuda' cannot run on cpu"):
        toy_trainer(tmp_path, toy.build_dataset(16, 0), kernel_backend="cuda")


def test_publish_replaces_an_older_checkpoint_of_the_same_step(tmp_path):
    old, new = tmp_path / "checkpoint-2", tmp_path / "tmp-checkpoint-2"
    old.mkdir()
    (old / "stale").write_text("old")
    new.mkdir()
    (new / "fresh").write_text("new")
    checkpoint.publish(str(new), str(old))
    assert os.listdir(old) == ["fresh"] and sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
