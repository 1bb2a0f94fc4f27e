"""One forward per prompt in the policy update: the completions of a prompt share its forward.

GRPO's completions come in groups that answer one prompt, and the plain update runs that prompt
through the model once per completion (with 4 completions of 32 tokens after a 40-token prompt,
over half of the update's tokens are prompt tokens). Packed, the rows that share a prompt become
one row ``[prompt, c_1, ..., c_k]`` with

- a 4D attention mask under which the prompt attends causally to itself and each completion to the
  prompt and to its own earlier tokens only (padding keys nowhere);
- position ids that restart after the prompt for every completion.

Every completion token then sees the same keys at the same positions as in its own row, so its
hidden state is the plain forward's (only the attention's summation order differs), and the hidden
states that predict the completion tokens are gathered back into ``[N, C, H]``; their gradients
flow back through the gather, the prompt's summed over its completions, as in the plain update.

:func:`sharing_problem` says why a model cannot be packed; :func:`prompt_runs` finds the rows
that share a prompt; :func:`packing_pays` compares the two forwards' cost; :func:`pack` builds the
packed batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ForwardCost", "PackedBatch", "SUPPORTED_MODEL_TYPES", "pack", "packing_pays", "prompt_runs", "sharing_problem",
    "window_problem",
]

# Decoder-only models whose attention takes a custom 4D mask as it is and whose positions come from
# position_ids alone (rotary embeddings); each is tested against its plain forward.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# sdpa takes a boolean mask (True: attend), eager adds a float one (0 or the dtype's minimum).
SUPPORTED_ATTENTION = ("sdpa", "eager")


def sharing_problem(model: nn.Module) -> str | None:
    """Why the completions of a prompt cannot share its forward through ``model`` (None: they can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in SUPPORTED_ATTENTION:
        return f"attention implementation {attention!r} takes no custom 4D mask (supported: {SUPPORTED_ATTENTION})"
    return None


def window_problem(model: nn.Module, row_length: int) -> str | None:
    """Why rows of ``row_length`` tokens cannot be packed: a sliding window shorter than the row is
    not applied under a custom mask (None: no window, or the window holds the whole row)."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True) or row_length <= window:
        return None
    return f"the model's sliding window ({window} tokens) is shorter than prompt + completion ({row_length})"


def prompt_runs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of consecutive rows with the same prompt (ids and mask), in row order.

    One host synchronisation (the comparison's result); the rollout's rows are prompt-major, so a
    micro-batch holding whole groups gives runs of ``num_generations``.
    """
    if prompt_ids.shape[0] == 0:
        return []
    same = ((prompt_ids[1:] == prompt_ids[:-1]) & (prompt_mask[1:] == prompt_mask[:-1])).all(1).tolist()
    runs = [1]
    for shares_prompt in same:
        if shares_prompt:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs


@dataclass(frozen=True)
class ForwardCost:
    """The flops of a decoder forward: per token in the layers' linears, per (query, key) pair in attention."""

    per_token: float
    per_pair: float

    @classmethod
    def of(cls, model: nn.Module) -> "ForwardCost":
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads = config.num_attention_heads * head_dim
        embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                      for p in m.parameters()}
        layer_params = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
        # q.k and p.v: 2 multiply-adds per head dimension and pair, in every layer
        return cls(per_token=2.0 * layer_params, per_pair=4.0 * heads * config.num_hidden_layers)

    def forward(self, rows: int, length: int) -> float:
        # attention kernels that take a mask compute every (query, key) pair, masked or not
        return rows * (length * self.per_token + length * length * self.per_pair)


def packing_pays(runs: list[int], prompt_length: int, completion_length: int, cost: ForwardCost) -> bool:
    """Whether the packed forward costs fewer flops than one row per completion."""
    if not runs or max(runs) == 1:
        return False
    plain = cost.forward(sum(runs), prompt_length + completion_length)
    packed = cost.forward(len(runs), prompt_length + max(runs) * completion_length)
    return packed < plain


@dataclass
class PackedBatch:
    """The rows that share a prompt, packed (see the module's docstring).

    Attributes
    ----------
    input_ids : Tensor ``[R, L]`` int64
        ``R`` packed rows of ``L = P + k_max * C`` tokens: the prompt, then ``k_max`` completion slots.
    attention_mask : Tensor ``[R, 1, L, L]``
        bool (True: attend) for sdpa, or the float mask eager attention adds.
    position_ids : Tensor ``[R, L]`` int64
    index : Tensor ``[N * C]`` int64
        Where, in the flattened ``[R * L]`` hidden states, the state that predicts each completion
        token lies (row-major over the ``[N, C]`` completions).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    index: torch.Tensor

    def gather(self, hidden: torch.Tensor, completion_shape: torch.Size) -> torch.Tensor:
        """``[R, L, H]`` packed hidden states -> the ``[N, C, H]`` that predict the completion tokens."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        return flat.index_select(0, self.index).view(*completion_shape, hidden.shape[-1])


def pack(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
    runs: list[int], *, attention: str = "sdpa", mask_dtype: torch.dtype = torch.float32,
) -> PackedBatch:
    """Pack ``N`` rows (left-padded prompts ``[N, P]``, right-padded completions ``[N, C]``) whose
    consecutive ``runs`` share a prompt into ``len(runs)`` rows (see :class:`PackedBatch`).

    ``attention``: "sdpa" gives a boolean mask, "eager" a float one of ``mask_dtype``.
    """
    n, p = prompt_ids.shape
    c = completion_ids.shape[1]
    if sum(runs) != n or min(runs, default=1) < 1:
        raise ValueError(f"pack: runs {runs} do not cover the {n} rows")
    device = prompt_ids.device
    rows, length = len(runs), p + max(runs) * c
    first = torch.tensor(list(itertools.accumulate(runs[:-1], initial=0)), device=device)  # each run's first row
    run = torch.tensor([r for r, k in enumerate(runs) for _ in range(k)], device=device)  # [N]
    slot = torch.tensor([j for k in runs for j in range(k)], device=device)  # [N]: the completion's place in its run
    cols = p + slot[:, None] * c + torch.arange(c, device=device)  # [N, C]

    run_prompt_mask = prompt_mask[first]
    input_ids = prompt_ids.new_zeros(rows, length)  # row padding: token 0, never attended
    valid = torch.zeros(rows, length, dtype=torch.bool, device=device)
    segment = torch.full((rows, length), -1, dtype=torch.long, device=device)  # 0: prompt, j + 1: completion j
    positions = torch.zeros(rows, length, dtype=torch.long, device=device)
    input_ids[:, :p] = prompt_ids[first]
    valid[:, :p] = run_prompt_mask.bool()
    segment[:, :p] = 0
    positions[:, :p] = (run_prompt_mask.cumsum(1) - 1).clamp(min=0)
    input_ids[run[:, None], cols] = completion_ids
    valid[run[:, None], cols] = completion_mask.bool()
    segment[run[:, None], cols] = slot[:, None] + 1
    # the plain forward's positions: (prompt tokens + completion tokens so far) - 1
    n_prompt = run_prompt_mask.sum(1)[run]
    positions[run[:, None], cols] = (n_prompt[:, None] + completion_mask.cumsum(1) - 1).clamp(min=0)

    order = torch.arange(length, device=device)
    causal = order[None, :] <= order[:, None]  # [query, key]
    key_segment, query_segment = segment[:, None, :], segment[:, :, None]
    allowed = causal & valid[:, None, :] & ((key_segment == 0) | (key_segment == query_segment))
    # every query attends at least to itself: a padding query with no key would give NaN (unused, but
    # its NaN would reach the gradients through 0 * NaN)
    allowed |= torch.eye(length, dtype=torch.bool, device=device)
    if attention == "eager":
        mask = torch.zeros(allowed.shape, dtype=mask_dtype, device=device)
        mask = mask.masked_fill(~allowed, torch.finfo(mask_dtype).min)
    elif attention == "sdpa":
        mask = allowed
    else:
        raise ValueError(f"pack: attention must be one of {SUPPORTED_ATTENTION}, got {attention!r}")

    # position t predicts token t + 1: completion token 0 by the prompt's last position, token t by the
    # completion's position t - 1
    predictors = torch.cat([torch.full((n, 1), p - 1, device=device), cols[:, :-1]], dim=1)  # [N, C]
    index = (run[:, None] * length + predictors).reshape(-1)
    return PackedBatch(input_ids, mask[:, None], positions, index)
