"""TRL integration: the GTAlign reward as a TRL reward function, and our fused ops inside TRL's ``GRPOTrainer``.

Reward::

    from gtalign_fast.game import MathJudge
    from gtalign_fast.integrations.trl import gtalign_reward_func, patch_grpo_trainer

    reward = gtalign_reward_func({"math-hard": MathJudge(), "*": my_judge})   # W per completion, None on judge failure
    trainer = trl.GRPOTrainer(model, reward_funcs=[reward], args=trl.GRPOConfig(...), train_dataset=ds, ...)
    patch_grpo_trainer(trainer)    # log-probs through linear_token_logprobs, the loss through grpo_loss
    trainer.train()

What the patch replaces (TRL 1.16 hook points):

- the fused LM head TRL installs on the policy and the reference model (``add_fused_lm_head``: what
  ``_get_per_token_logps_and_entropies`` calls with ``fused_lm_head=True``). Ours runs the backbone as TRL does, then
  :func:`gtalign_fast.ops.linear_token_logprobs` (LM head + temperature + log-sum-exp + entropy in vocabulary
  chunks), or, when the model soft-caps its logits (Gemma 2) or ``fused_lm_head=False``, the LM head followed by
  :func:`gtalign_fast.ops.token_logprobs` on the completion rows only. The model's own ``forward`` is still what is
  called, so DDP / FSDP wrappers, gradient checkpointing, PEFT and ``accelerator.autocast()`` behave as in TRL.
- ``GRPOTrainer._compute_loss``: the clipped surrogate, k3 KL and aggregation in one
  :func:`gtalign_fast.ops.grpo_loss` call, with TRL's gradient-accumulation and ``dapo`` normalisers and TRL's metric
  names (``kl``, ``entropy``, ``clip_ratio/*``).

TRL options the patch does not compute are refused by :func:`patch_grpo_trainer` with a ``ValueError`` naming the
option (see :data:`UNSUPPORTED`); nothing falls back silently. TRL 1.16's default ``use_bias_correction_kl=True``
(the k3 KL times the importance ratio) is computed by ``grpo_loss`` too.

Equal to TRL (tested: one optimizer step of TRL's own trainer, loss 1e-5, gradients and parameters 1e-5 relative) in
float32 and with ``cast_lm_head_to_fp32``. Known differences: under bf16 / fp16 autocast our LM head runs in the
autocast dtype like ``F.linear`` (bf16 weight copy, gradients rounded to bf16), where TRL's chunked head keeps float32
gradients, so the two agree to bf16 precision only (about 1e-2 relative); the log-ratio is clamped to +-20 before
``exp`` (verl's clamp; TRL has none), which only matters far off-policy; the k3 KL is not clamped (as TRL; the
ops' ``kl_clamp`` option, verl's [-10, 10], stays off here).
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from gtalign_fast import ops
from gtalign_fast.game.reward import GTAlignReward, RewardBatch
from gtalign_fast.ops._grpo_objective import GrpoObjective, cached_objective

__all__ = [
    "TRLGTAlignReward", "gtalign_reward_func", "patch_grpo_trainer", "install_fused_head", "head_logprobs",
    "LOSS_TYPES", "UNSUPPORTED",
]

IGNORE_INDEX = -100  # TRL's label for prompt and padding positions

# TRL loss_type -> grpo_loss loss_type (luspo: the mean over sequences of the token sums of the clipped loss).
LOSS_TYPES: dict[str, str] = {
    "grpo": "grpo",
    "bnpo": "bnpo",
    "dr_grpo": "dr_grpo",
    "dapo": "dapo",
    "luspo": "luspo",
    "sapo": "sapo",
    "cispo": "cispo",
    "vespo": "vespo",
}

# TRL options we do not compute: (GRPOConfig field, why), checked by patch_grpo_trainer.
UNSUPPORTED: tuple[tuple[str, str], ...] = (
    ("loss_type", "only " + ", ".join(LOSS_TYPES) + " are computed by grpo_loss"),
    ("top_entropy_quantile", "must be 1.0: the high-entropy token mask is not applied by grpo_loss"),
    ("off_policy_mask_threshold", "must be None: the off-policy sequence mask is not applied by grpo_loss"),
    ("entropy_coef", "must be 0.0 (and use_adaptive_entropy False): the entropy bonus is not added"),
    ("router_aux_loss_coef", "must be 0 for MoE models: the load-balancing loss is not computed by the fused head"),
    ("deepspeed", "ZeRO-3 is not supported: the fused head reads lm_head.weight outside the module's gather hooks; "
     "ZeRO-1/2 are refused too: they have no parity test (DeepSpeed is not installed where the tests run)"),
)


# =============================================================================================
# Reward
# =============================================================================================


class TRLGTAlignReward:
    """The GTAlign mutual-welfare reward as a TRL reward function.

    Called by TRL as ``f(prompts=..., completions=..., completion_ids=..., **columns)``; returns W per completion
    (a ``list`` of ``float``), ``None`` where the judge failed (TRL turns it into NaN, which its advantages exclude).
    Completions may be strings or conversational (a list of messages; the last assistant message is scored).

    Where the installed TRL passes ``log_metric`` (TRL >= 1.x), it logs per batch, under ``<name>/``: the means of
    ``user_reward`` (U), ``llm_reward`` (L) and ``format_reward``, and the counts ``judge_failures`` and
    ``hard_failures``. With ``log_extra=True`` and TRL's ``log_extra`` hook, U and L per completion go to the
    completions table too.

    Parameters
    ----------
    reward : GTAlignReward or judge or mapping
        A :class:`~gtalign_fast.game.GTAlignReward`, or what its ``judge`` argument takes (a judge, or a mapping
        ``data_source -> judge``), in which case ``reward_kwargs`` build one.
    log_extra : bool, default False
        Also log U and L per completion to TRL's completions table.
    **reward_kwargs
        Passed to :class:`~gtalign_fast.game.GTAlignReward` when ``reward`` is not one (``alpha``, ``variant``,
        ``normalize``, ``name``...).

    Attributes
    ----------
    last_batch : RewardBatch or None
        The details of the last call (U, L, fields, failure counts).
    """

    def __init__(self, reward: Any, *, log_extra: bool = False, **reward_kwargs: Any) -> None:
        if isinstance(reward, GTAlignReward):
            if reward_kwargs:
                raise TypeError(f"reward is already a GTAlignReward; unexpected arguments {sorted(reward_kwargs)}")
            self.reward = reward
        else:
            self.reward = GTAlignReward(reward, **reward_kwargs)
        self.log_extra = bool(log_extra)
        self.__name__ = self.reward.__name__  # TRL logs rewards/<__name__>/mean
        self.last_batch: RewardBatch | None = None

    def __repr__(self) -> str:
        return f"TRLGTAlignReward({self.reward!r})"

    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        completion_ids: Any = None,
        *,
        log_metric: Callable[[str, float], None] | None = None,
        log_extra: Callable[[str, list], None] | None = None,
        trainer_state: Any = None,
        **columns: Any,
    ) -> list[float | None]:
        if completions is None:
            raise TypeError("the GTAlign reward needs completions=")
        batch = self.reward(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        self.last_batch = batch
        values = [None if row["judge_failed"] else float(value) for value, row in zip(batch, batch.fields)]
        if log_metric is not None:
            for name, value in _batch_metrics(batch).items():
                log_metric(f"{self.__name__}/{name}", value)
        if log_extra is not None and self.log_extra:
            log_extra(f"{self.__name__}/user_reward", list(batch.user))
            log_extra(f"{self.__name__}/llm_reward", list(batch.llm))
        return values


def _batch_metrics(batch: RewardBatch) -> dict[str, float]:
    """Means of U, L and the format reward, and the failure counts, of one batch."""
    n = max(len(batch.fields), 1)
    return {
        "user_reward": sum(batch.user) / n,
        "llm_reward": sum(batch.llm) / n,
        "format_reward": sum(row["format_reward"] for row in batch.fields) / n,
        "judge_failures": float(batch.judge_failures),
        "hard_failures": float(batch.hard_failures),
    }


def gtalign_reward_func(judge: Any, *, log_extra: bool = False, **reward_kwargs: Any) -> TRLGTAlignReward:
    """A TRL reward function scoring the GTAlign welfare W (see :class:`TRLGTAlignReward`).

    ``judge``: a judge, a mapping ``data_source -> judge`` (``"*"`` is the fallback) or a ready
    :class:`~gtalign_fast.game.GTAlignReward`; ``reward_kwargs`` go to :class:`~gtalign_fast.game.GTAlignReward`.
    """
    return TRLGTAlignReward(judge, log_extra=log_extra, **reward_kwargs)


# =============================================================================================
# Refusals
# =============================================================================================


def _refusals(trainer) -> list[str]:
    """One message per TRL option of ``trainer`` that the patch does not compute."""
    found: list[str] = []
    if trainer.loss_type not in LOSS_TYPES:
        found.append(f"loss_type={trainer.loss_type!r}")
    if getattr(trainer, "top_entropy_quantile", 1.0) < 1.0:
        found.append(f"top_entropy_quantile={trainer.top_entropy_quantile}")
    if getattr(trainer, "off_policy_mask_threshold", None) is not None:
        found.append(f"off_policy_mask_threshold={trainer.off_policy_mask_threshold}")
    if getattr(trainer, "_entropy_bonus_enabled", False):
        found.append(f"entropy_coef={getattr(trainer, 'entropy_coef', None)} / "
                     f"use_adaptive_entropy={getattr(trainer, 'use_adaptive_entropy', None)}")
    if getattr(trainer, "aux_loss_enabled", False):
        found.append(f"router_aux_loss_coef={getattr(trainer, 'router_aux_loss_coef', None)}")
    stage = _deepspeed_stage(trainer)
    if stage is not None:
        found.append(f"deepspeed ZeRO-{stage}")
    return found


def _deepspeed_stage(trainer) -> int | None:
    """The ZeRO stage when ``trainer`` runs under DeepSpeed, else None (read where transformers' Trainer reads it)."""
    if _zero3_enabled():
        return 3
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    return int(trainer.accelerator.state.deepspeed_plugin.zero_stage)


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # transformers without its deepspeed integration: no ZeRO-3 either
        return False
    return bool(is_deepspeed_zero3_enabled())


def _why(option: str) -> str:
    key = option.split("=")[0].split(" ")[0]
    for name, reason in UNSUPPORTED:
        if name == key:
            return reason
    return ""


# =============================================================================================
# The LM head: TRL's `fused_lm_head=True` forward, on our ops
# =============================================================================================


def _logit_scale(text_config) -> float:
    """The multiplier the model applies to its logits, read from the config as TRL's add_fused_lm_head does."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return 1.0 if scale is None else float(scale)


def _head_dtype(device_type: str, weight: torch.Tensor, cast_lm_head_to_fp32: bool) -> torch.dtype:
    """The dtype the LM head runs in: float32 when TRL's cast_lm_head_to_fp32, else autocast's, else the weight's."""
    if cast_lm_head_to_fp32:
        return torch.float32
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _full(tensor):
    """FSDP2 shards parameters as DTensors: the head needs the whole matrix (as TRL does, differentiably)."""
    return tensor.full_tensor() if tensor is not None and hasattr(tensor, "full_tensor") else tensor


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float,
    with_entropy: bool,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    fused: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropy) of ``labels`` under the LM head, zero where the label is -100.

    Parameters
    ----------
    hidden : Tensor, shape ``[B, T, H]``
        Final hidden states, already aligned with ``labels`` (position t predicts ``labels[:, t]``); any strides.
    weight : Tensor, shape ``[V, H]``; bias : Tensor ``[V]`` or None
    labels : Tensor, shape ``[B, T]``, int64; -100 = not scored
    temperature : float
        The sampling temperature (logits are divided by it).
    with_entropy : bool
    logit_scale : float
        Multiplier of the logits (Cohere, Granite...), applied before the soft-cap and the temperature.
    softcap : float, optional
        ``z = softcap * tanh(z / softcap)`` (Gemma 2): needs the logits, so the unfused path runs.
    fused : bool
        ``linear_token_logprobs`` (no ``[N, V]`` logits) when True and the model allows it, else the LM head on the
        scored rows followed by ``token_logprobs``.
    dtype : torch.dtype, optional
        The head's compute dtype (hidden, weight and bias are cast to it); default the weight's.

    Returns
    -------
    logp, entropy : Tensor, shape ``[B, T]``, float32 (entropy None unless ``with_entropy``)
    """
    dtype = weight.dtype if dtype is None else dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    # The op is called with explicit dtypes; autocast must not re-cast the matmuls inside its chunked path.
    with torch.autocast(hidden.device.type, enabled=False):
        if fused and softcap is None and logit_scale > 0:
            # z * s / T = z / (T / s): the scale folds into the temperature.
            out = ops.linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature / logit_scale,
                                            with_entropy=with_entropy, ignore_index=IGNORE_INDEX)
            return out if with_entropy else (out, None)
        # Only the scored rows get logits (prompt and padding rows are most of the sequence).
        mask = labels != IGNORE_INDEX
        logits = F.linear(hidden[mask], weight, bias)
        if logit_scale != 1.0:
            logits = logits * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        out = ops.token_logprobs(logits, labels[mask], temperature=temperature, with_entropy=with_entropy)
        per_row = out if with_entropy else (out, None)
    # masked_scatter keeps the output connected to the graph even when no row is scored (as TRL does).
    return tuple(None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_row)


def _backbone_attr(model) -> str:
    """Where TRL's fused head finds the backbone (VLMs before transformers 5 expose it as ``model``)."""
    import transformers
    from packaging.version import Version

    text_config = model.config.get_text_config()
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        return "model"
    return "base_model"


def install_fused_head(model, *, temperature: float, with_entropy: bool, cast_lm_head_to_fp32: bool = False,
                       fused: bool = True) -> str:
    """Make ``model(..., labels=labels, fused_lm_head=True)`` compute its log-probs with our ops.

    Wraps the ``forward`` that TRL's ``add_fused_lm_head`` installed (calls without ``fused_lm_head`` still go to it,
    so generation is unchanged) and returns TRL's ``FusedCausalLMOutput`` (``log_probs``, ``entropy``, ``loss``,
    ``label_mask``). Returns the path that will run: ``"linear_token_logprobs"`` or ``"token_logprobs"``.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    logit_scale = _logit_scale(text_config)
    path = "linear_token_logprobs" if fused and softcap is None and logit_scale > 0 else "token_logprobs"
    if getattr(model, "_gtalign_fused_head", None) is not None:
        return model._gtalign_fused_head
    previous = model.forward
    backbone_attr = _backbone_attr(model)

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            passed = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous(*args, **{k: v for k, v in passed.items() if v is not None}, **kwargs)
        if kwargs.get("output_router_logits"):
            raise ValueError("the gtalign_fast fused head does not compute the MoE load-balancing loss "
                             "(router_aux_loss_coef); see patch_grpo_trainer")
        kwargs["use_cache"] = False
        hidden = getattr(self, backbone_attr)(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        lm_head = self.get_output_embeddings()
        weight, bias = _full(lm_head.weight), _full(lm_head.bias)
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        logp, entropy = head_logprobs(
            hidden, weight, bias, labels, temperature=temperature, with_entropy=with_entropy,
            logit_scale=logit_scale, softcap=softcap, fused=fused,
            dtype=_head_dtype(hidden.device.type, weight, cast_lm_head_to_fp32),
        )
        mask = labels != IGNORE_INDEX
        loss = -logp.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=logp, entropy=entropy, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    model._gtalign_fused_head = path
    return path


# =============================================================================================
# The loss: GRPOTrainer._compute_loss on grpo_loss
# =============================================================================================

_MULTIMODAL_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                      "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _objective(self) -> GrpoObjective:
    """The GRPO objective of TRL's trainer ``self`` (its attributes and ``args``, TRL's names)."""
    sapo, vespo = self.loss_type == "sapo", self.loss_type == "vespo"
    # TRL's sapo, cispo and vespo ignore delta (they have no clip); grpo_loss refuses a delta with them rather
    # than ignore it
    unclipped = self.loss_type in ("sapo", "cispo", "vespo")
    return cached_objective(
        beta=float(self.beta), epsilon_low=float(self.epsilon_low), epsilon_high=float(self.epsilon_high),
        delta=None if self.args.delta is None or unclipped else float(self.args.delta),
        loss_type=LOSS_TYPES[self.loss_type], importance_sampling_level=self.importance_sampling_level,
        max_completion_length=int(self.max_completion_length),
        use_bias_correction_kl=bool(getattr(self.args, "use_bias_correction_kl", False)),
        **({"sapo_temperature_pos": float(self.args.sapo_temperature_pos),
            "sapo_temperature_neg": float(self.args.sapo_temperature_neg)} if sapo else {}),
        **({name: float(getattr(self.args, name)) for name in _VESPO_FIELDS} if vespo else {}),
    )


_VESPO_FIELDS = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")  # TRL's GRPOConfig names


def _compute_loss(self, model, inputs):
    """TRL's ``GRPOTrainer._compute_loss`` for the supported options, with the loss from one ``grpo_loss`` call."""
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    logp, entropies, _ = self._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True, compute_aux_loss=False,
        **{name: inputs.get(name) for name in _MULTIMODAL_INPUTS},
    )
    mode = "train" if self.model.training else "eval"
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    old = inputs.get("old_per_token_logps")
    ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
    num_items = None
    objective = _objective(self)
    global_tokens = objective.micro_batch_share == "global_tokens"  # dapo, cispo, vespo: num_items_in_batch
    if global_tokens:
        # TRL: num_items_in_batch spans the generation batch; rescale it to one accumulation window
        num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            num_items = num_items * accumulation / self.args.steps_per_generation
    # TRL's vLLM importance-sampling ratio ([B, T] token modes, [B, 1] sequence modes), passed through: the policy
    # term times it (VESPO: in its sequence weight), the clip metrics counted before it, as TRL
    is_ratio = None
    if getattr(self, "use_vllm", False) and getattr(self, "vllm_importance_sampling_correction", False):
        is_ratio = inputs["importance_sampling_ratio"]
    loss, metrics = ops.grpo_loss(
        logp, None if old is None else old.to(logp.dtype), inputs["advantages"], mask,
        ref_logp=None if ref is None else ref.to(logp.dtype), importance_sampling_ratio=is_ratio,
        **objective.op_kwargs(num_items),
    )
    if not global_tokens:  # num_items_in_batch already covers the accumulation window
        loss = loss / accumulation
    _log_metrics(self, mode, metrics, logp, old, inputs["advantages"], mask, entropies)
    return loss


def _log_metrics(self, mode: str, metrics: Mapping[str, torch.Tensor], logp, old, advantages, mask, entropies):
    """TRL's metrics: means over every process's masked tokens (or sequences, for GSPO clip ratios)."""
    sequence = self.importance_sampling_level == "sequence" and advantages.dim() == 1
    tokens = mask.sum().float()

    def global_mean(local_mean: torch.Tensor, count: torch.Tensor) -> float:
        totals = self.accelerator.reduce(torch.stack([local_mean.float() * count, count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    if self.beta != 0.0:
        self._metrics[mode]["kl"].append(global_mean(metrics["kl"], tokens))
    entropy_mean = (entropies.detach() * mask).sum() / tokens.clamp(min=1.0)
    self._metrics[mode]["entropy"].append(global_mean(entropy_mean, tokens))
    if self.loss_type == "sapo":  # TRL logs clip ratios only for its clipped objectives
        return
    if self.loss_type == "vespo":  # TRL's mean Gamma weight, over the sequences for [B] advantages
        count = torch.tensor(float(mask.shape[0]), device=tokens.device) if advantages.dim() == 1 else tokens
        self._metrics[mode]["vespo/phi_seq_mean"].append(global_mean(metrics["vespo/phi_seq_mean"], count))
        return
    clip_count = torch.tensor(float(mask.shape[0]), device=tokens.device) if sequence else tokens
    if self.loss_type == "cispo":  # grpo_loss' high clip for cispo is TRL's r > epsilon_high where A > 0
        self._metrics[mode]["cispo_clip_ratio"].append(global_mean(metrics["clip_ratio/high_mean"], clip_count))
        return
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        self._metrics[mode][name].append(global_mean(metrics[name], clip_count))
    low, high = _clip_fractions_per_row(self, logp.detach(), old, advantages, mask)
    self._metrics[mode]["clip_ratio/low_min"].append(_nan_reduce(self.accelerator.gather(low), torch.min))
    self._metrics[mode]["clip_ratio/high_max"].append(_nan_reduce(self.accelerator.gather(high), torch.max))


@torch.no_grad()
def _clip_fractions_per_row(self, logp, old, advantages, mask):
    """Per-sequence fractions of low- and high-clipped tokens ([B], NaN for an empty row, as TRL)."""
    log_ratio = torch.zeros_like(logp) if old is None else logp - old.to(logp.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    if self.importance_sampling_level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))  # grpo_loss's clamp
    if self.args.delta is not None:
        ratio = ratio.clamp(max=self.args.delta)
    low = ((ratio < 1 - self.epsilon_low) & (adv < 0)).float()
    high = ((ratio > 1 + self.epsilon_high) & (adv > 0)).float()
    if low.shape[1] == 1:
        return low.squeeze(1), high.squeeze(1)
    return (low * mask).sum(-1) / mask.sum(-1), (high * mask).sum(-1) / mask.sum(-1)


def _nan_reduce(values: torch.Tensor, reduce) -> float:
    """TRL's nanmin / nanmax: NaN when every value is NaN."""
    kept = values[~torch.isnan(values)]
    return float("nan") if kept.numel() == 0 else reduce(kept).item()


# =============================================================================================
# The patch
# =============================================================================================


def patch_grpo_trainer(trainer, *, fused_lm_head: bool = True):
    """Route a TRL ``GRPOTrainer``'s per-token log-probs and GRPO loss through gtalign_fast's fused ops.

    Call it after building the trainer and before ``trainer.train()``. The policy's and the reference model's
    ``fused_lm_head=True`` forward (TRL's chunked LM head) runs :func:`gtalign_fast.ops.linear_token_logprobs`
    (or the LM head + :func:`gtalign_fast.ops.token_logprobs` when the model soft-caps its logits, or
    ``fused_lm_head=False``), and ``_compute_loss`` runs :func:`gtalign_fast.ops.grpo_loss`. Calling it twice is a
    no-op.

    Supported: ``loss_type`` grpo, bnpo, dr_grpo, dapo, luspo, sapo (with ``sapo_temperature_pos`` /
    ``sapo_temperature_neg``), cispo (its ratio cap ``epsilon_high``), vespo (``vespo_k_pos`` / ``vespo_lambda_pos``
    / ``vespo_k_neg`` / ``vespo_lambda_neg``; logs ``vespo/phi_seq_mean``); ``importance_sampling_level`` token and
    sequence; ``use_vllm`` with ``vllm_importance_sampling_correction`` (TRL's ``importance_sampling_ratio`` of every
    ``vllm_importance_sampling_mode`` goes to ``grpo_loss`` as is);
    ``beta`` >= 0 (k3 KL against the reference model or the disabled PEFT adapter, with or without
    ``use_bias_correction_kl``, TRL's default True); ``epsilon`` /
    ``epsilon_high`` (clip-higher); ``delta`` (two-sided clip); ``temperature``; ``cast_lm_head_to_fp32``;
    gradient accumulation, ``num_iterations``, ``steps_per_generation``, tool masks, DDP / FSDP; bf16 / fp16
    autocast.

    Parameters
    ----------
    trainer : trl.GRPOTrainer
    fused_lm_head : bool, default True
        False: materialise the logits of the completion rows and use ``token_logprobs`` (for comparisons).

    Returns
    -------
    trainer
        The same object, patched; ``trainer.gtalign_logprob_path`` names the log-prob op that runs.

    Raises
    ------
    TypeError
        ``trainer`` is not a TRL ``GRPOTrainer``.
    ValueError
        A TRL option the patch does not compute is set (the message names each one and why).
    """
    from accelerate.utils import is_peft_model
    from trl import GRPOTrainer

    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"patch_grpo_trainer: trainer must be a trl.GRPOTrainer, got {type(trainer).__name__}")
    if getattr(trainer, "gtalign_logprob_path", None) is not None:
        return trainer
    refused = _refusals(trainer)
    if refused:
        details = "; ".join(f"{option} ({_why(option)})" if _why(option) else option for option in refused)
        raise ValueError(f"patch_grpo_trainer: TRL options not computed by gtalign_fast: {details}. "
                         "Change them, or train without the patch.")
    cast = bool(trainer.args.cast_lm_head_to_fp32)
    policy = trainer.model.get_base_model() if is_peft_model(trainer.model) else trainer.model
    path = install_fused_head(policy, temperature=trainer.temperature, with_entropy=True,
                              cast_lm_head_to_fp32=cast, fused=fused_lm_head)
    if trainer.ref_model is not None:
        install_fused_head(trainer.ref_model, temperature=trainer.temperature, with_entropy=False,
                           cast_lm_head_to_fp32=cast, fused=fused_lm_head)
    trainer._compute_loss = types.MethodType(_compute_loss, trainer)
    trainer.gtalign_logprob_path = path
    return trainer

