"""Per-token log-probs of completions under a causal LM: the module the policy update trains through.

:class:`CompletionLogprobs` turns (prompt, completion) token ids into the completion tokens'
log-probs and entropies, through the fused LM head (``ops.linear_token_logprobs``: no
``[tokens, vocabulary]`` logits) or the model's logits (``ops.token_logprobs``);
:func:`fused_head_problem` says why a model cannot use the fused head, :func:`loss_path` which path
the update takes; :func:`rollout_logprobs` scores a whole rollout without gradients (the old and
reference log-probs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .. import ops
from ..ops import _backend
from .distributed import is_dtensor
from .prompt_sharing import ForwardCost, pack, packing_pays, prompt_runs, sharing_problem, window_problem

if TYPE_CHECKING:
    from .rollout import Rollout

__all__ = ["CompletionLogprobs", "fused_head_problem", "loss_path", "rollout_logprobs", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def fused_head_problem(model: nn.Module) -> str | None:
    """Why the LM head of ``model`` cannot be fused into ``linear_token_logprobs`` (None if it can).

    The fused op computes ``hidden @ W.T + b``; models that transform the logits afterwards would
    get different log-probs, so they are refused rather than silently changed.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        return "the model has no linear output embedding (get_output_embeddings())"
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) is not None:
        return "the model soft-caps its logits (final_logit_softcapping)"
    for name in ("logit_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value is not None and float(value) != 1.0:
            return f"the model rescales its logits ({name}={value})"
    if getattr(model, "base_model", None) is None or model.base_model is model:
        return "the model has no separate base model to read the last hidden state from"
    return None


def loss_path(use_fused_lm_head: bool, backend: str | None, device: torch.device) -> tuple[bool, str]:
    """Whether the update runs ``ops.linear_grpo_loss`` (the fused LM head + GRPO loss: the default
    whenever the fused head is allowed and the op has the chosen backend, ``backend`` or the
    device's default), and the path's name for the log."""
    if not use_fused_lm_head:
        return False, "logits LM head (token_logprobs + grpo_loss)"
    fused_op = "linear_grpo_loss"
    problem = _backend.why_unavailable(backend or _backend.default_backend(fused_op, device), device, fused_op)
    if problem is None:
        return True, "fused LM head + GRPO loss (linear_grpo_loss)"
    return False, f"fused LM head (linear_token_logprobs + grpo_loss; not linear_grpo_loss: {problem})"


def _sharing_description(share_prompt_prefix: bool | None, problem: str | None, fused_head: bool) -> str:
    """Whether the shared prompt forward runs, and why not, in words."""
    if share_prompt_prefix is False:
        return "shared prompt forward off (share_prompt_prefix=False)"
    if problem:
        return f"shared prompt forward off ({problem})"
    if not fused_head:
        return "shared prompt forward off (it needs the fused LM head)"
    return "shared prompt forward on" + (" where it saves flops" if share_prompt_prefix is None else "")


class CompletionLogprobs(nn.Module):
    """Log-probs (and entropies) of the completion tokens under ``model`` at ``temperature``.

    One module so that :class:`~torch.nn.parallel.DistributedDataParallel` can wrap the whole
    forward, fused LM head included (calling the base model directly would bypass DDP's hooks).

    With ``fused_head`` the last hidden state goes through ``ops.linear_token_logprobs`` with the
    output embedding's weight and bias: the ``[tokens, vocabulary]`` logits never exist. Without it
    the model computes logits for the last ``C + 1`` positions only (``logits_to_keep``) and
    ``ops.token_logprobs`` reads their ``[:, :-1]`` slice in place.

    ``share_prompt_prefix`` (fused head only): rows that share a prompt run it through the model once
    (:mod:`~gtalign_fast.training.prompt_sharing`). None: where the model supports it and the packed
    forward costs fewer flops; True: whenever rows share a prompt (ValueError where the model cannot);
    False: never.
    """

    def __init__(
        self, model: nn.Module, *, temperature: float, fused_head: bool, backend: str | None,
        share_prompt_prefix: bool | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.fused_head = fused_head
        self.backend = backend
        problem = sharing_problem(model) if share_prompt_prefix is not False else None
        if share_prompt_prefix and (problem or not fused_head):
            raise ValueError(
                f"CompletionLogprobs: share_prompt_prefix=True, but {problem or 'it needs the fused LM head'}; "
                "set share_prompt_prefix to None or False"
            )
        self.share_prompt_prefix = share_prompt_prefix if problem is None and fused_head else False
        self._cost = ForwardCost.of(model) if self.share_prompt_prefix is not False else None
        self.sharing = _sharing_description(share_prompt_prefix, problem, fused_head)  # the trainer logs it

    def forward(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
        completion_mask: torch.Tensor, with_entropy: bool = True, loss_kwargs: dict | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Returns ``logp`` and ``entropy`` ``[N, C]`` float32 (0 where ``completion_mask`` is 0).

        With ``loss_kwargs`` (fused head only) it returns ``(loss, metrics)`` of
        ``ops.linear_grpo_loss(last hidden state, LM head, completion_ids, **loss_kwargs)`` instead:
        LM head and GRPO loss in one op, gradients computed in the forward (the metrics include the
        mean entropy over the loss tokens)."""
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        # explicit positions: left padding must not shift them (generation counts them the same way)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        targets = completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
        n_completion = completion_ids.shape[1]
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if loss_kwargs is not None:
            if not self.fused_head:
                raise ValueError("CompletionLogprobs: loss_kwargs needs the fused LM head (fused_head=True)")
            hidden, weight, bias = self._head_inputs(inputs, prompt_ids, completion_ids)
            return ops.linear_grpo_loss(hidden, weight, completion_ids, bias=bias, temperature=self.temperature,
                                        backend=self.backend, **loss_kwargs)
        if self.fused_head:
            return self._fused(inputs, prompt_ids, completion_ids, targets, with_entropy)
        logits = self.model(**inputs, logits_to_keep=n_completion + 1).logits  # [N, C + 1, V]
        result = ops.token_logprobs(
            logits[:, :-1], targets, temperature=self.temperature, with_entropy=with_entropy, backend=self.backend
        )
        return result if with_entropy else (result, None)

    def _fused(self, inputs: dict, prompt_ids: torch.Tensor, completion_ids: torch.Tensor, targets: torch.Tensor,
               with_entropy: bool):
        hidden, weight, bias = self._head_inputs(inputs, prompt_ids, completion_ids)
        result = ops.linear_token_logprobs(
            hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), bias=bias,
            temperature=self.temperature, with_entropy=with_entropy, backend=self.backend,
        )
        # copies, not views: FSDP2's pre-backward hook on a module output is lost by in-place ops on a view
        if with_entropy:
            logp, entropy = result
            return logp.reshape(targets.shape).clone(), entropy.reshape(targets.shape).clone()
        return result.reshape(targets.shape).clone(), None

    def _head_inputs(self, inputs: dict, prompt_ids: torch.Tensor, completion_ids: torch.Tensor):
        """The hidden states that predict the completion ``[N, C, H]`` and the LM head's weight and bias."""
        packed = self._packed(inputs, prompt_ids, completion_ids)
        if packed is not None:
            hidden = self.model.base_model(
                input_ids=packed.input_ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids,
                use_cache=False,
            ).last_hidden_state  # [R, L, H]
            hidden = packed.gather(hidden, completion_ids.shape)
        else:
            hidden = self.model.base_model(**inputs).last_hidden_state  # [N, P + C, H]
            # position t predicts token t + 1: the completion is predicted by the C positions before its end
            hidden = hidden[:, -(completion_ids.shape[1] + 1) : -1]
        head = self.model.get_output_embeddings()
        if is_dtensor(head.weight):  # the known ZeRO-3 / FSDP bug: a fused loss that reads a head shard
            raise RuntimeError(
                "CompletionLogprobs: the LM head weight is still sharded (a DTensor); under FSDP2 the log-prob "
                "module must be the fully_shard root and be called as a module, so that its pre-forward "
                "all-gathers the head"
            )
        # custom ops sit outside autocast: cast the head as autocast would cast a Linear
        weight = head.weight.to(hidden.dtype)
        bias = head.bias.to(hidden.dtype) if getattr(head, "bias", None) is not None else None
        return hidden, weight, bias

    def _packed(self, inputs: dict, prompt_ids: torch.Tensor, completion_ids: torch.Tensor):
        """The packed batch of the rows that share a prompt, or None for the plain forward."""
        if self.share_prompt_prefix is False:
            return None
        prompt_mask = inputs["attention_mask"][:, : prompt_ids.shape[1]]
        completion_mask = inputs["attention_mask"][:, prompt_ids.shape[1] :]
        runs = prompt_runs(prompt_ids, prompt_mask)
        p, c = prompt_ids.shape[1], completion_ids.shape[1]
        auto = self.share_prompt_prefix is None
        if not runs or max(runs) == 1 or (auto and not packing_pays(runs, p, c, self._cost)):
            return None
        problem = window_problem(self.model, p + c)
        if problem and not auto:
            raise ValueError(f"CompletionLogprobs: share_prompt_prefix=True, but {problem}; set it to None")
        if problem:
            return None
        return pack(prompt_ids, prompt_mask, completion_ids, completion_mask, runs,
                    attention=self.model.config._attn_implementation, mask_dtype=self.model.dtype)

    def lm_forward(self, **kwargs: Any) -> Any:
        """The wrapped model's own forward (generation). Registered as an FSDP forward method when
        this module is the FSDP2 root, so FSDP's pre-forward runs before the model reads its weights."""
        return self.model(**kwargs)


@torch.no_grad()
def rollout_logprobs(
    module: nn.Module, rollout: Rollout, micro_batch: int, autocast: Callable[[], Any]
) -> torch.Tensor:
    """Per-token log-probs ``[N, C]`` float32 of the whole rollout under ``module``, micro-batched.

    Used for the old policy's (``num_iterations > 1``) and the reference model's (``beta > 0``)
    log-probs; ``autocast`` opens the same autocast context as the training forward.
    """
    out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=rollout.completion_ids.device)
    for start in range(0, len(rollout), micro_batch):
        part = rollout.micro_batch(start, start + micro_batch)
        with autocast():
            logp, _ = module(
                part.prompt_ids, part.prompt_mask, part.completion_ids, part.completion_mask, with_entropy=False
            )
        out[start : start + micro_batch, : logp.shape[1]] = logp
    return out
