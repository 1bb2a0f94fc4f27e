"""A short supervised warm start on well-formed GTAlign chains, before GRPO.

A small model asked for GTAlign's four-block chain (GTALIGN.md section 1) seldom writes one: every
completion of a group is a hard failure (U = L = W = 0), all rewards of the group are equal and GRPO
learns nothing. A few supervised steps on chains built from the data itself give it the shape; GRPO
then has rewards that differ within a group to learn from.

:func:`well_formed_chain` writes one chain for a reference answer: a short ``<thinking>``, a payoff
matrix whose six cells differ for the two players (payoff diversity P = 1), an ``<analyze>`` that
names the Pareto frontier and the key the GTAlign tie-break picks, and a ``<response>`` that gives the
reference answer in ``\\boxed{}``. :func:`supervised_warm_start` trains on such completions (the
loss on the completion tokens only, through :func:`gtalign_fast.ops.linear_token_logprobs`, so the
``[tokens x vocab]`` logits are never formed).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from ..game import PAYOFF_KEYS, PayoffMatrix, choose_action, format_payoff, pareto_frontier

# A clear, well-posed question: answering directly (DQ_DA) is best for both players, as GTAlign's
# prompt expects for a math problem with all its data given.
_BASE_PAYOFF = {
    "DQ_AQ": (3.1, 2.6), "DQ_CQ": (2.2, 1.8), "DQ_DA": (4.1, 4.4),
    "VQ_AQ": (2.4, 2.0), "VQ_CQ": (1.6, 1.2), "VQ_DA": (2.0, 1.5),
}
_JITTER = 0.3  # per cell and player, so the model does not learn one fixed matrix


def _payoff(rng: random.Random) -> PayoffMatrix:
    """The base matrix with every value moved by up to ``_JITTER`` (one decimal); LLM != user in every cell."""
    cells = {}
    for key in PAYOFF_KEYS:
        llm, user = (round(v + rng.uniform(-_JITTER, _JITTER), 1) for v in _BASE_PAYOFF[key])
        if abs(user - llm) <= 0.1 * max(abs(user), abs(llm), 1e-8):  # keep P = 1: the players differ
            user = round(llm - 0.5, 1)
        cells[key] = {"LLM": llm, "user": user}
    return PayoffMatrix.from_mapping(cells)


def well_formed_chain(reference: str, *, rng: random.Random) -> str:
    """One well-formed GTAlign completion whose response gives ``reference`` in ``\\boxed{}``.

    Parameters
    ----------
    reference : str
        The reference answer (a row's ``ground_truth``).
    rng : random.Random
        Draws the payoff values.

    Returns
    -------
    str
        ``<thinking>...</thinking><payoff>...</payoff><analyze>...</analyze><response>...</response>``:
        format reward F = 1 and payoff diversity P = 1 under :func:`gtalign_fast.game.score_chain`.
    """
    matrix = _payoff(rng)
    frontier = pareto_frontier(matrix)
    chosen = choose_action(matrix, rule="pareto").key
    points = ", ".join(f"{key} ({matrix[key].llm}, {matrix[key].user})" for key in frontier)
    analyze = f"Pareto frontier (LLM, user): {points}. {chosen} has the highest LLM + user, so I choose {chosen}."
    response = f"The answer is $\\boxed{{{reference}}}$."
    thinking = "The question is clear and complete: a direct answer serves both of us."
    return (f"<thinking>{thinking}</thinking>\n<payoff>{format_payoff(matrix)}</payoff>\n"
            f"<analyze>{analyze}</analyze>\n<response>{response}</response>")


def _encode(tokenizer: Any, prompt: Sequence[dict], completion: str) -> tuple[list[int], int]:
    """Token ids of the chat-rendered prompt + completion + end of turn, and where the completion starts."""
    prompt_text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, len(prompt_ids)


def _batch(tokenizer: Any, examples: Sequence[tuple[Sequence[dict], str]]) -> tuple[torch.Tensor, ...]:
    """Right-padded ``input_ids``, ``attention_mask`` and next-token ``targets`` (-100 off the completion)."""
    encoded = [_encode(tokenizer, prompt, completion) for prompt, completion in examples]
    length = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), length), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    targets = torch.full_like(input_ids, -100)
    for row, (ids, start) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        # position p predicts token p + 1: the completion's tokens are predicted from start - 1 on
        targets[row, start - 1 : len(ids) - 1] = input_ids[row, start : len(ids)]
    return input_ids, attention_mask, targets


def completion_nll(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens (``targets != -100``), without full logits.

    Parameters
    ----------
    model : transformers ``*ForCausalLM``
        Its ``model.model`` gives the final hidden states, ``model.lm_head`` the LM head (no bias).
    input_ids, attention_mask, targets : Tensor, shape ``[B, L]``, int64

    Returns
    -------
    Tensor, shape ``[]``, float32
    """
    from .. import ops

    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    keep = targets != -100
    logp = ops.linear_token_logprobs(hidden[keep], model.lm_head.weight, targets[keep])
    return -logp.float().mean()


def supervised_warm_start(
    model: Any,
    tokenizer: Any,
    examples: Sequence[tuple[Sequence[dict], str]],
    *,
    steps: int,
    learning_rate: float = 5e-5,
    batch_size: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps on (prompt, completion) pairs.

    Batches cycle through ``examples`` in a seeded random order; the loss is the mean NLL of the
    completion tokens (and the end-of-turn token) given the chat-rendered prompt.

    Parameters
    ----------
    model : transformers ``*ForCausalLM``
    tokenizer : its tokenizer, with a chat template
    examples : sequence of (chat messages, completion text)
    steps : int
        Optimizer steps (>= 0; 0 leaves the model as it is).
    learning_rate : float, default 5e-5
    batch_size : int, default 2
    seed : int, default 0
    progress : bool, default True
        Show a tqdm bar.

    Returns
    -------
    list of float
        The loss of every step.
    """
    if steps < 0 or batch_size < 1:
        raise ValueError(f"supervised_warm_start: steps must be >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    if steps and not examples:
        raise ValueError("supervised_warm_start: no examples to train on")
    from tqdm.auto import tqdm

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="warm start", disable=not progress):
        rows = [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]
        loss = completion_nll(model, *_batch(tokenizer, [examples[r] for r in rows]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
