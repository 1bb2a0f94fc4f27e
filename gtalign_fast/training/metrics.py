"""What a GRPO run measures and where it goes: stage timers, update totals, peak memory and the sinks.

:class:`StageTimer` times a step's stages (device-synchronised); :class:`UpdateTotals` adds up what
the micro-batches of an update measure; :class:`MetricWindow` averages steps between logs;
:class:`MetricSinks` writes ``metrics.jsonl`` and TensorBoard; :func:`progress_bar` is the tqdm bar.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from contextlib import contextmanager
from typing import Sequence

import torch

__all__ = [
    "StageTimer", "UpdateTotals", "peak_memory_gib", "MetricWindow", "MetricSinks", "truncate_metrics", "progress_bar",
]


class StageTimer:
    """Wall time of each stage of a step, synchronised with the device so GPU work is counted where
    it runs: ``with timer("generation"): ...``, then ``timer.seconds["generation"]`` (0 if not run)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class UpdateTotals:
    """What the micro-batches of one update add up to on this process: the weighted loss (the step's
    loss once summed over processes), the entropy summed over loss tokens and the loss op's metrics
    (averaged over the micro-batches). Everything stays on the device: nothing here synchronises."""

    def __init__(self, device: torch.device, micro_batches: int) -> None:
        self.micro_batches = micro_batches
        self.weighted_loss = torch.zeros((), device=device)
        self.entropy_sum = torch.zeros((), device=device)
        self.op_metrics: dict[str, torch.Tensor] = {}

    def add(self, weighted_loss: torch.Tensor, entropy: torch.Tensor, loss_mask: torch.Tensor,
            op_metrics: dict) -> None:
        """``entropy``: per token ``[B, T]``, or the mean over the loss tokens (the fused path)."""
        self.weighted_loss += weighted_loss.detach()
        self.entropy_sum += (entropy.detach() * loss_mask).sum()
        for key, value in op_metrics.items():
            share = value.detach().float() / self.micro_batches
            self.op_metrics[key] = self.op_metrics[key] + share if key in self.op_metrics else share


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricWindow:
    """Averages each metric over the steps since the last log (TRL's logging_steps behaviour)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
                self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out


class MetricSinks:
    """Where logged metrics go: ``metrics.jsonl`` in ``output_dir``, TensorBoard when asked for and
    installed, the progress bar's postfix. Only the main process writes."""

    def __init__(self, output_dir: str, report_to: Sequence[str], enabled: bool, purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tensorboard = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if "tensorboard" in report_to or "all" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                if "tensorboard" in report_to:
                    raise ImportError("GRPOConfig(report_to='tensorboard') needs the tensorboard package") from error
            else:
                # a resumed run: TensorBoard drops the events at and after purge_step (logged again)
                self.tensorboard = SummaryWriter(os.path.join(output_dir, "runs"), purge_step=purge_step)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def truncate_metrics(output_dir: str, step: int) -> int:
    """Drop the lines of ``output_dir/metrics.jsonl`` logged after ``step`` (and any line a crash cut
    short), so a run resumed at ``step`` logs each later step once; returns the lines dropped.

    The file is rewritten beside itself and renamed over the old one.
    """
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                logged_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                logged_step = None
            if isinstance(logged_step, int) and logged_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        temporary = f"{path}.tmp"
        with open(temporary, "w") as handle:
            handle.writelines(kept)
        os.replace(temporary, path)
    return dropped


def progress_bar(total: int, initial: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=disable, desc="GRPO", dynamic_ncols=True)
