"""The rollout stage of a GRPO step: which prompts, their completions, and the tensors the update reads.

:class:`PromptOrder` decides which dataset rows each generation batch uses;
:func:`generation_seeds` gives every completion its own sampling seed; :func:`tokenize_prompts`
and :func:`generation_from_sampler` turn prompts into token ids and the sampler's lists into
padded tensors (a :class:`Generation`); :class:`Rollout` holds one step's completions with their
advantages and log-probs, and cuts them into micro-batches; :func:`completion_metrics` measures
the completions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, Sequence

import torch

__all__ = [
    "PromptOrder", "generation_seeds", "tokenize_prompts", "required_columns", "validate_dataset", "pad_rows",
    "Generation", "generation_from_sampler",
    "completion_token_lists", "Rollout", "completion_metrics",
]


# ---------------------------------------------------------------------------------------------
# Prompts


class PromptOrder:
    """Which dataset rows each generation batch uses.

    The order of epoch ``e`` is a permutation seeded by ``seed + e`` (or the identity), and
    generation batch ``g`` takes the next ``prompts_per_batch`` rows of the endless concatenation
    of epochs. Everything follows from ``g``, so a resumed run needs no sampler state, and every
    process computes the same global batch and keeps its own contiguous slice: the
    ``num_generations`` completions of a prompt never land on two processes.
    """

    def __init__(self, n_rows: int, prompts_per_batch: int, seed: int, shuffle: bool) -> None:
        if n_rows == 0:
            raise ValueError("GRPOTrainer: train_dataset is empty")
        self.n_rows, self.prompts_per_batch, self.seed, self.shuffle = n_rows, prompts_per_batch, seed, shuffle
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                self._orders[epoch] = torch.randperm(self.n_rows, generator=generator)
            else:
                self._orders[epoch] = torch.arange(self.n_rows)
            self._orders.pop(epoch - 2, None)  # a batch spans at most two epochs
        return self._orders[epoch]

    def rows(self, batch_index: int) -> list[int]:
        """Dataset row indices of generation batch ``batch_index`` (all processes together)."""
        start = batch_index * self.prompts_per_batch
        out = []
        for k in range(start, start + self.prompts_per_batch):
            epoch, position = divmod(k, self.n_rows)
            out.append(int(self._order(epoch)[position]))
        return out

    def epoch(self, batch_index: int) -> float:
        return batch_index * self.prompts_per_batch / self.n_rows


def tokenize_prompts(
    tokenizer: Any, prompts: Sequence[Any], max_prompt_length: int | None, rows: Sequence[int] | None = None
) -> list[list[int]]:
    """Prompt token ids (chat messages through the tokenizer's template, opened for the assistant's
    turn), keeping the END of prompts longer than ``max_prompt_length`` (TRL's left truncation).

    Raises ValueError for a prompt without a token, naming its dataset row (``rows[i]``, else its
    position in ``prompts``): the model cannot start generating from nothing.
    """
    texts = [
        p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    encoded = tokenizer(texts, add_special_tokens=False)
    out = [list(ids[-max_prompt_length:]) if max_prompt_length else list(ids) for ids in encoded["input_ids"]]
    for i, ids in enumerate(out):
        if not ids:
            where = f"train_dataset row {rows[i]}" if rows is not None else f"prompt {i}"
            raise ValueError(f"GRPOTrainer: the prompt of {where} is empty (no tokens: {prompts[i]!r})")
    return out


# TRL's reward-function arguments: not dataset columns
_TRL_ARGUMENTS = ("prompts", "completions", "completion_ids")


def required_columns(func: Any) -> list[str]:
    """Dataset columns a reward function cannot run without: its named parameters other than TRL's
    (``prompts``, ``completions``, ``completion_ids``) that have no default. ``**kwargs`` needs none."""
    import inspect

    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in kinds and p.default is p.empty and p.name not in _TRL_ARGUMENTS]


def validate_dataset(dataset: Any, rewards: Sequence[Any]) -> None:
    """Check every row of ``train_dataset`` once, before training: a non-empty ``prompt``, the
    columns the reward functions require (:func:`required_columns`) and the same columns in every
    row (a column missing from some rows would otherwise reach the reward functions for some
    batches only). Raises ValueError naming the first bad row and column.

    ``rewards``: the trainer's :class:`~gtalign_fast.training.scoring.RewardSpec` list (``.func``, ``.name``).
    """
    needed: dict[str, str] = {}
    for spec in rewards:
        for column in required_columns(spec.func):
            needed.setdefault(column, spec.name)
    column_names = getattr(dataset, "column_names", None)
    if isinstance(column_names, list):  # datasets.Dataset: one schema for every row
        for column, name in needed.items():
            if column not in column_names:
                raise ValueError(
                    f"GRPOTrainer: train_dataset has no column {column!r}, which reward function {name!r} needs "
                    f"(columns: {column_names})"
                )
        rows = ({"prompt": prompt} for prompt in dataset["prompt"])
        first_keys = None
    else:
        rows = (dataset[i] for i in range(len(dataset)))
        first_keys = set(dataset[0])
    for index, row in enumerate(rows):
        if "prompt" not in row:
            raise ValueError(f"GRPOTrainer: train_dataset row {index} has no column 'prompt'")
        prompt = row["prompt"]
        if prompt is None or (isinstance(prompt, (str, list, tuple)) and len(prompt) == 0):
            raise ValueError(f"GRPOTrainer: train_dataset row {index} has an empty prompt ({prompt!r})")
        if first_keys is None:
            continue
        for column, name in needed.items():
            if column not in row:
                raise ValueError(
                    f"GRPOTrainer: train_dataset row {index} has no column {column!r}, which reward function "
                    f"{name!r} needs"
                )
        keys = set(row)
        if keys != first_keys:
            column = sorted(keys ^ first_keys)[0]
            where = (index, 0) if column in first_keys else (0, index)
            raise ValueError(
                f"GRPOTrainer: train_dataset row {where[0]} has no column {column!r} but row {where[1]} has it; every "
                "row needs the same columns (the extra columns reach the reward functions by name)"
            )


# ---------------------------------------------------------------------------------------------
# Generation


def generation_seeds(seed: int, batch_index: int, first_row: int, n_rows: int) -> list[int]:
    """Sampling seeds of rows ``first_row ..`` of generation batch ``batch_index``.

    The sampler draws a row's tokens from its own seed, whatever the batch around it, so seeding
    by the row's index in the GLOBAL batch makes the completions independent of how many
    processes share the batch, and a resumed run samples exactly what the uninterrupted one did.
    """
    base = ((seed % 2**20) * 2**21 + batch_index % 2**21) * 2**20
    return [base + first_row + r for r in range(n_rows)]


def pad_rows(rows: Sequence[Sequence[float]], value: float, *, left: bool, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad variable-length rows into ``[B, max_len]``; returns the tensor and a 0/1 int64 mask."""
    width = max(1, max((len(r) for r in rows), default=0))
    out = torch.full((len(rows), width), value, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            cols = slice(width - len(row), width) if left else slice(0, len(row))
            out[i, cols] = torch.tensor(row, dtype=dtype)
            mask[i, cols] = 1
    return out.to(device), mask.to(device)


class Generation(NamedTuple):
    """``num_generations`` completions per prompt, prompt-major, as padded tensors (N completions)."""

    prompt_ids: torch.Tensor  # [N, P] left-padded prompts, repeated per completion
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C] right-padded; an edited payoff appears re-serialised
    completion_mask: torch.Tensor  # [N, C]
    sampled: torch.Tensor  # [N, C] 1 where the policy sampled the token (0 for tokens re-fed by an edit)
    finished: torch.Tensor  # [N] bool: the completion ended (EOS or a stop string) before the limit
    events: list  # one SteeringEvent per completion


def generation_from_sampler(out: Any, pad_id: int, device: torch.device) -> Generation:
    """Pad the sampler's per-row lists (``SteeringSampler.generate``'s result) into a :class:`Generation`."""
    long = torch.long
    prompt_ids, prompt_mask = pad_rows(out.prompt_ids, pad_id, left=True, dtype=long, device=device)
    completion_ids, completion_mask = pad_rows(out.completion_ids, pad_id, left=False, dtype=long, device=device)
    # re-fed tokens carry a NaN log-prob: the policy did not choose them, so they stay out of the loss
    sampled_logprobs, _ = pad_rows(out.logprobs, math.nan, left=False, dtype=torch.float32, device=device)
    sampled = completion_mask * (~sampled_logprobs.isnan()).long()
    finished = torch.tensor([r in ("eos", "stop") for r in out.finish_reasons], device=device)
    return Generation(prompt_ids, prompt_mask, completion_ids, completion_mask, sampled, finished, out.events)


def completion_token_lists(gen: Generation) -> list[list[int]]:
    """Each completion's real tokens (what the reward functions receive as ``completion_ids``)."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(gen.completion_ids, gen.completion_mask)]


def completion_metrics(gen: Generation, dist: Any) -> tuple[dict[str, float], float]:
    """Length, truncation and steering statistics over every process's completions, and the number
    of generated tokens (for the generation throughput). ``dist`` is the trainer's process group."""
    lengths = gen.completion_mask.sum(1).float()
    edited = [getattr(event, "status", None) == "edited" for event in gen.events]
    totals = dist.sum(torch.tensor(
        [float(lengths.sum()), float(len(lengths)), float((~gen.finished).sum()), float(sum(edited))],
        device=gen.completion_mask.device,
    ))
    tokens, rows, clipped, edited_rows = totals.tolist()
    metrics = {
        "completions/mean_length": tokens / rows,
        "completions/max_length": float(dist.max(lengths.max())),
        "completions/min_length": -float(dist.max(-lengths.min())),
        "completions/clipped_ratio": clipped / rows,
        "steering/edited_fraction": edited_rows / rows,
    }
    return metrics, tokens


# ---------------------------------------------------------------------------------------------
# One step's data


@dataclass
class Rollout:
    """The completions of one generation batch on this process, ready for the policy update.

    Rows are completions, prompt-major: row ``i`` answers prompt ``i // num_generations``.

    Attributes
    ----------
    prompt_ids, prompt_mask : Tensor ``[N, P]`` int64
        Left-padded prompt tokens (repeated per completion) and their attention mask.
    completion_ids : Tensor ``[N, C]`` int64
        Right-padded completion tokens (EOS included when the model wrote it).
    completion_mask : Tensor ``[N, C]`` int64
        1 on the completion's real tokens (attention and log-probs).
    loss_mask : Tensor ``[N, C]`` float32
        Tokens that enter the loss: the sampled tokens, zeroed for truncated completions when
        ``mask_truncated_completions`` is on.
    advantages : Tensor ``[N]`` float32
    old_logp, ref_logp : Tensor ``[N, C]`` float32 or None
        Log-probs under the policy that generated (only when ``num_iterations > 1``) and under the
        reference model (only when ``beta > 0``).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None

    @classmethod
    def from_generation(cls, gen: Generation, advantages: torch.Tensor, *, mask_truncated: bool) -> "Rollout":
        """The rollout of ``gen``; only sampled tokens enter the loss, and with ``mask_truncated``
        (DAPO) none of a completion cut off by the length limit: it teaches nothing about its end."""
        loss_mask = gen.sampled.float()
        if mask_truncated:
            loss_mask = loss_mask * gen.finished[:, None].float()
        return cls(gen.prompt_ids, gen.prompt_mask, gen.completion_ids, gen.completion_mask, loss_mask, advantages)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def micro_batches(self, size: int) -> list["Rollout"]:
        """Consecutive slices of ``size`` rows (the last may be shorter)."""
        return [self.micro_batch(start, start + size) for start in range(0, len(self), size)]

    def micro_batch(self, start: int, stop: int) -> "Rollout":
        """Rows ``start:stop``, with the padding columns no row of the slice uses cut away."""
        rows = slice(start, stop)
        prompt_mask = self.prompt_mask[rows]
        completion_mask = self.completion_mask[rows]
        used_prompt = prompt_mask.any(0).nonzero()
        first = int(used_prompt[0]) if used_prompt.numel() else prompt_mask.shape[1] - 1
        used_completion = completion_mask.any(0).nonzero()
        last = int(used_completion[-1]) + 1 if used_completion.numel() else 1
        cols = slice(0, last)

        def cut(t):
            return None if t is None else t[rows, cols]

        return Rollout(
            prompt_ids=self.prompt_ids[rows, first:], prompt_mask=prompt_mask[:, first:],
            completion_ids=cut(self.completion_ids), completion_mask=cut(self.completion_mask),
            loss_mask=cut(self.loss_mask), advantages=self.advantages[rows],
            old_logp=cut(self.old_logp), ref_logp=cut(self.ref_logp),
        )

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device) -> "Rollout":
        # checkpoints written before the step's metrics left the rollout also hold a "metrics" entry
        names = {f.name for f in fields(cls)}
        return cls(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items() if k in names})
