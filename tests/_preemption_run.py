"""A toy-game training run for tests/test_preemption.py, as a cluster job runs it (a subprocess, or a
``torchrun`` worker): it can signal itself during a given step, limit its file sizes after the first
checkpoint, or just hold an output folder.

    python tests/_preemption_run.py OUTPUT_DIR [--steps N] [--signal-at STEP] [--resume] ...
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from tests.test_trainer import install_missing_ops, toy  # noqa: E402


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--signal-at", type=int, default=0, help="send the signal when this step begins")
    parser.add_argument("--signal", default="SIGTERM")
    parser.add_argument("--signal-rank", type=int, default=0)
    parser.add_argument("--second-after", type=float, default=0.0, help="a second signal this many s later")
    parser.add_argument("--grace", type=float, default=20.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--fsize-target", default="", help="after checkpoint 1, limit file sizes so this file fails")
    parser.add_argument("--hold", action="store_true", help="construct the trainer, say so, and wait")
    return parser.parse_args()


class SignalDuringStep:
    """Send ``signal`` to this process when step ``at`` begins (what the cluster does, at a known time)."""

    def __init__(self, at: int, signum: int, second_after: float) -> None:
        self.at, self.signum, self.second_after = at, signum, second_after

    def on_step_begin(self, args, state, control, **_):
        if state.global_step + 1 == self.at:
            os.kill(os.getpid(), self.signum)
            if self.second_after:
                time.sleep(self.second_after)  # inside the step: the first signal is still being honoured
                os.kill(os.getpid(), self.signum)


class LimitFileSize:
    """After the first checkpoint, set RLIMIT_FSIZE so that writing ``target`` in the next one fails (EFBIG)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def on_save(self, args, state, control, checkpoint=None, **_):
        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            return
        sizes = {name: os.path.getsize(os.path.join(checkpoint, name)) for name in os.listdir(checkpoint)}
        smaller = [size for size in sizes.values() if size < sizes[self.target]]
        # above every file smaller than the target (they are written whole), below the target
        limit = (max(smaller, default=0) + sizes[self.target]) // 2
        print(f"SIZES {sizes} LIMIT {limit}", flush=True)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def main() -> None:
    options = parse()
    logging.basicConfig(level=logging.INFO)  # the trainer's reasons, on stderr
    install_missing_ops()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    callbacks = []
    if options.signal_at and rank == options.signal_rank:
        callbacks.append(SignalDuringStep(options.signal_at, signal.Signals[options.signal], options.second_after))
    if options.fsize_target:
        callbacks.append(LimitFileSize(options.fsize_target))
    tokenizer = toy.build_tokenizer()
    args = toy.toy_config(
        options.output_dir, options.steps, seed=0, per_device_train_batch_size=32 // world,
        save_steps=options.save_steps,
        logging_steps=1, learning_rate=1e-2, preemption_grace_s=None if options.grace < 0 else options.grace,
    )
    trainer = toy.GRPOTrainer(
        toy.build_model(tokenizer, 0), [toy.ToyWelfareReward(tokenizer)], args=args,
        train_dataset=toy.build_dataset(64, 0), processing_class=tokenizer, callbacks=callbacks,
    )
    if options.hold:
        print(f"HOLDING {os.getpid()}", flush=True)
        time.sleep(600)
        return
    trainer.train(resume_from_checkpoint=True if options.resume else None)
    print(f"DONE {trainer.step}", flush=True)


if __name__ == "__main__":
    main()
