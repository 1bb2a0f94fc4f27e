"""Long runs on shared machines (issue 21): preemption saves and resumes exactly, a failed save says where
and why, one output folder has one run, and the reward-failure warning names the step.

Runs are subprocesses (tests/_preemption_run.py: the toy game, 8 steps, a checkpoint every 4, one log
line per step) that signal themselves when a given step begins, as SLURM or Kubernetes would; the
two-process runs go through ``torchrun`` with gloo on the CPU. "Bit-exact" compares the final
checkpoint's weights and optimizer state, and every logged number but the timings, with an
uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gtalign_fast import GRPOTrainer
from gtalign_fast.training import checkpoint
from gtalign_fast.training.checkpoint import CheckpointSaveError
from gtalign_fast.training.preemption import LOCK_FILE, PREEMPTED_EXIT_CODE, OutputDirLocked
from tests.test_trainer import install_missing_ops, read_metrics, sgd_trainer, toy

ROOT = Path(__file__).resolve().parents[1]
RUN = str(ROOT / "tests" / "_preemption_run.py")
STEPS = 8
TIMEOUT = 240  # seconds per subprocess on a loaded 2-core machine (a run takes ~30 s)
UNTIMED = ("time/", "tokens_per_second/", "memory/")


@pytest.fixture(autouse=True)
def _ops(monkeypatch):
    install_missing_ops(monkeypatch)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run(output_dir, *options, world: int = 1) -> subprocess.CompletedProcess:
    if world == 1:
        command = [sys.executable, RUN, str(output_dir), *options]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                   "--master_port", str(_free_port()), RUN, str(output_dir), *options]
    return subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(output_dir) -> list[dict]:
    with open(Path(output_dir) / "metrics.jsonl") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(UNTIMED)} for row in rows]


def assert_same_run(resumed_dir, uninterrupted_dir) -> None:
    """Every step logged once with the uninterrupted run's numbers; the final weights and optimizer
    state bit-exact."""
    resumed, uninterrupted = _metrics(resumed_dir), _metrics(uninterrupted_dir)
    assert [row["step"] for row in resumed] == list(range(1, STEPS + 1))
    assert _untimed(resumed) == _untimed(uninterrupted)
    last = f"checkpoint-{STEPS}"
    a, b = (load_file(str(Path(d) / last / "model.safetensors")) for d in (resumed_dir, uninterrupted_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(Path(d) / last / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
              for d in (resumed_dir, uninterrupted_dir))
    assert sa.keys() == sb.keys() and sa
    for key in sa:
        for name, value in sa[key].items():
            assert torch.equal(value, sb[key][name]), (key, name)


def _complete_steps(output_dir) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in Path(output_dir).glob("checkpoint-*")
                  if checkpoint.why_incomplete(str(p)) is None)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = run(output_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return output_dir


# ---------------------------------------------------------------------------------------------
# Item 1: a stop signal finishes the step, saves it, exits 75; resume loses nothing


@pytest.mark.timeout(3 * TIMEOUT)
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_saves_the_step_in_progress_and_resume_is_exact(tmp_path, uninterrupted, signal_name):
    output_dir = tmp_path / "run"
    stopped = run(output_dir, "--signal-at", "6", "--signal", signal_name)
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]
    assert f"stopped by {signal_name} after step 6" in stopped.stderr
    assert _complete_steps(output_dir) == [4, 6], "the step in progress (6) is finished and saved"
    assert [row["step"] for row in _metrics(output_dir)] == [1, 2, 3, 4, 5, 6]
    assert (output_dir / LOCK_FILE).read_text() == "", "a clean exit releases the output folder"

    resumed = run(output_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "checkpoint-6 at step 6" in resumed.stderr
    assert_same_run(output_dir, uninterrupted)


@pytest.mark.timeout(3 * TIMEOUT)
def test_past_the_grace_period_the_step_is_abandoned_and_the_step_before_saved(tmp_path, uninterrupted):
    output_dir = tmp_path / "run"
    stopped = run(output_dir, "--signal-at", "6", "--grace", "0")  # over at the first safe point of step 6
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]
    assert "grace period over mid-step" in stopped.stderr and "after step 5" in stopped.stderr
    assert _complete_steps(output_dir) == [4, 5]
    assert [row["step"] for row in _metrics(output_dir)] == [1, 2, 3, 4, 5]
    resumed = run(output_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(output_dir, uninterrupted)


@pytest.mark.timeout(TIMEOUT)
def test_a_second_signal_exits_at_once(tmp_path):
    output_dir = tmp_path / "run"
    killed = run(output_dir, "--signal-at", "6", "--second-after", "1.5")
    assert killed.returncode == -signal.SIGTERM, killed.stderr[-3000:]
    assert "second stop signal (SIGTERM): exiting at once" in killed.stderr
    assert _complete_steps(output_dir) == [4], "no checkpoint of the step the second signal cut short"
    # the lock of the killed run is stale: the next run takes it over, saying whose it was
    resumed = run(output_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "taking over the lock" in resumed.stderr and "which no longer runs" in resumed.stderr


@pytest.mark.timeout(TIMEOUT)
def test_copies_of_one_signal_count_once(tmp_path):
    # SLURM signals every process of a step and torchrun forwards what it gets: two copies, ms apart
    output_dir = tmp_path / "run"
    stopped = run(output_dir, "--signal-at", "6", "--signal", "SIGINT", "--second-after", "0.05")
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]
    assert "stopped by SIGINT after step 6" in stopped.stderr and "second stop signal" not in stopped.stderr
    assert _complete_steps(output_dir) == [4, 6]


@pytest.mark.timeout(4 * TIMEOUT)
def test_two_torchrun_processes_stop_after_the_same_step_and_resume_exactly(tmp_path):
    reference = tmp_path / "uninterrupted"
    done = run(reference, world=2)
    assert done.returncode == 0, done.stderr[-4000:]
    output_dir = tmp_path / "run"
    # only rank 1 gets the signal: rank 0 learns it through the per-step agreement
    stopped = run(output_dir, "--signal-at", "6", "--signal-rank", "1", world=2)
    assert stopped.returncode != 0
    assert stopped.stderr.count("stopped by SIGTERM after step 6") == 2, stopped.stderr[-4000:]
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in stopped.stderr  # torchrun's report of the workers
    assert _complete_steps(output_dir) == [4, 6]
    resumed = run(output_dir, "--resume", world=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_run(output_dir, reference)


# ---------------------------------------------------------------------------------------------
# Item 2: a failed save names the checkpoint, the file and the cause; earlier checkpoints stay


def _check_failed_save(error: CheckpointSaveError, output_dir: Path, step: int, file: str, cause: str) -> None:
    message = str(error)
    assert f"checkpoint-{step}" in message and file in message and cause in message, message
    assert error.file.endswith(file) and error.cause.startswith(cause)
    assert not (output_dir / f"checkpoint-{step}").exists()
    assert not (output_dir / f"tmp-checkpoint-{step}").exists(), "the partial folder is removed"
    assert _complete_steps(output_dir) == list(range(1, step)), "earlier checkpoints stay intact"


@pytest.mark.timeout(2 * TIMEOUT)
@pytest.mark.parametrize("target", ["model.safetensors", "trainer_state.pt"])
def test_a_file_size_limit_names_the_checkpoint_file_and_efbig(tmp_path, target):
    output_dir = tmp_path / "run"
    failed = run(output_dir, "--save-steps", "1", "--fsize-target", target)
    assert failed.returncode == 1, failed.stderr[-3000:]
    (line,) = [
        x for x in failed.stderr.splitlines() if x.startswith("gtalign_fast.training.checkpoint.CheckpointSaveError")
    ]
    assert "checkpoint-2 failed writing" in line and f"tmp-checkpoint-2/{target}: EFBIG" in line, line
    assert "the partial folder" in line and "was removed" in line
    assert _complete_steps(output_dir) == [1]
    assert not (output_dir / "tmp-checkpoint-2").exists()


def _fail_writing(monkeypatch, name: str, code: int) -> None:
    """Make the next write of checkpoint file ``name`` fail with ``code`` (as the OS would)."""
    import builtins

    import safetensors
    import transformers.modeling_utils

    if name == "model.safetensors":  # written by safetensors' Rust code, which reports "(os error N)"
        def save_file(tensors, filename, *args, **kwargs):
            with open(filename, "wb") as handle:  # as the real writer: the file exists, cut short
                handle.write(b"\x00" * 8)
            raise safetensors.SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} "
                                              f"(os error {code})")

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
        return
    if name == "tokenizer.json":  # written by the tokenizers library's Rust code, the same way
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        def save_tokenizer(self, save_directory, *args, **kwargs):
            with open(os.path.join(save_directory, name), "w") as handle:
                handle.write('{"version": "1.0", "trunc')
            raise Exception(f"{os.strerror(code)} (os error {code})")

        monkeypatch.setattr(TokenizersBackend, "_save_pretrained", save_tokenizer)
        return
    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        if str(file).endswith(os.sep + name) and "tmp-checkpoint" in str(file) and any(c in mode for c in "wa"):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                                  "tokenizer_config.json", "trainer_state.pt", "trainer_state.json"])
def test_a_full_disk_names_the_checkpoint_file_and_enospc(tmp_path, monkeypatch, name):
    trainer = sgd_trainer(tmp_path, steps=2, save_steps=1)
    real_save = trainer._save_checkpoint

    def second_save_fails(*args, **kwargs):
        if trainer.step == 2:
            _fail_writing(monkeypatch, name, errno.ENOSPC)
        return real_save(*args, **kwargs)

    trainer._save_checkpoint = second_save_fails
    with pytest.raises(CheckpointSaveError) as caught:
        trainer.train()
    _check_failed_save(caught.value, tmp_path / "run", 2, name, "ENOSPC")
    assert "no space left on the device" in str(caught.value)


@pytest.mark.timeout(TIMEOUT)
def test_a_read_only_output_folder_names_the_checkpoint_and_the_permission(tmp_path, monkeypatch):
    trainer = sgd_trainer(tmp_path, steps=2, save_steps=1)
    output_dir = tmp_path / "run"
    real_save = trainer._save_checkpoint

    def second_save_fails(*args, **kwargs):
        if trainer.step == 2:
            os.chmod(output_dir, 0o555)
            if os.geteuid() == 0:  # root writes anyway: refuse as the kernel refuses others
                real_makedirs = os.makedirs

                def makedirs(path, *a, **k):
                    if str(path).startswith(str(output_dir)) and "tmp-checkpoint" in str(path):
                        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
                    return real_makedirs(path, *a, **k)

                monkeypatch.setattr(os, "makedirs", makedirs)
        return real_save(*args, **kwargs)

    trainer._save_checkpoint = second_save_fails
    try:
        with pytest.raises(CheckpointSaveError) as caught:
            trainer.train()
    finally:
        os.chmod(output_dir, 0o755)
    _check_failed_save(caught.value, output_dir, 2, "tmp-checkpoint-2", "EACCES")
    assert "permission denied" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Item 3: one run per output folder


def _toy_trainer(output_dir, **overrides) -> GRPOTrainer:
    tokenizer = toy.build_tokenizer()
    args = toy.toy_config(str(output_dir), 1, per_device_train_batch_size=16, **overrides)
    return GRPOTrainer(toy.build_model(tokenizer, 0), [toy.ToyWelfareReward(tokenizer)], args=args,
                       train_dataset=toy.build_dataset(16, 0), processing_class=tokenizer)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def trainer_log():
    handler, logger = _Records(), logging.getLogger("gtalign_fast.trainer")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


@pytest.mark.timeout(TIMEOUT)
def test_a_held_output_folder_is_refused_and_a_dead_holders_lock_taken_over(tmp_path, trainer_log):
    output_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, RUN, str(output_dir), "--hold"], env=_env(), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = holder.stdout.readline()
        assert line.startswith("HOLDING"), line
        with pytest.raises(OutputDirLocked, match=rf"held by another run \(pid {holder.pid} on host "
                                                  rf"{socket.gethostname()}"):
            _toy_trainer(output_dir)
        # an explicit intent uses it anyway, and says so
        _toy_trainer(output_dir, overwrite_output_dir=True)
        assert any("overwrite_output_dir=True" in m and f"pid {holder.pid}" in m for m in trainer_log)
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file still names it
        holder.wait(timeout=60)
    import gc

    gc.collect()  # the overwriting trainer above lets go of the folder
    assert str(holder.pid) in (output_dir / LOCK_FILE).read_text()
    trainer_log.clear()
    trainer = _toy_trainer(output_dir)
    assert any("taking over the lock" in m and f"pid {holder.pid}" in m and "no longer runs" in m
               for m in trainer_log), trainer_log
    assert json.loads((output_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    trainer.train()  # the folder is usable
    assert read_metrics(trainer)[0]["step"] == 1


def test_overwrite_output_dir_defaults_to_false_and_grace_is_checked(tmp_path):
    assert toy.toy_config(str(tmp_path), 1).overwrite_output_dir is False
    with pytest.raises(ValueError, match="preemption_grace_s must be >= 0"):
        toy.toy_config(str(tmp_path), 1, preemption_grace_s=-1)


# ---------------------------------------------------------------------------------------------
# Item 4: the reward-failure warning names the step


def test_the_reward_failure_warning_names_the_step(tmp_path, trainer_log):
    from gtalign_fast.training.scoring import RewardSpec

    calls = []

    def flaky(completions, **_):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("judge unreachable")
        return [0.5] * len(completions)

    trainer = sgd_trainer(tmp_path, steps=3)
    trainer.rewards += [RewardSpec(flaky, 1.0, "flaky_judge", False)]
    trainer.train()
    failures = [m for m in trainer_log if "flaky_judge" in m]
    assert len(failures) == 1 and failures[0].startswith("step 2: reward function 'flaky_judge' failed"), failures
    assert [row["rewards/flaky_judge/failures"] for row in read_metrics(trainer)] == [0, 16, 0]
