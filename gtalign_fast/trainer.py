"""GRPO training of causal LMs on the fused kernels: :class:`GRPOConfig` and :class:`GRPOTrainer`.

The API follows TRL's ``GRPOTrainer`` (same constructor, same config field names and defaults where the
concept exists) so a TRL user feels at home; the maths runs on this library's ops.

One optimizer step, the whole story (``GRPOTrainer._training_step``)::

    prompts   = this process's slice of the next generation batch   (a group never splits across processes)
    rollout   = num_generations completions per prompt                (sampler, KV cache, ops.sample_)
    rewards   = every reward function; GTAlignReward gives U and L   (failures -> NaN -> advantage 0)
    adv       = ops.welfare_advantages(U, L, group=num_generations)    (Cobb-Douglas W + group stats, one launch)
    old / ref = per-token log-probs, only when num_iterations > 1 / beta > 0
    for each micro-batch:                                             (gradient accumulation, DDP syncs on the last)
        logp  = ops.linear_token_logprobs(last hidden state, LM head) (no [tokens, vocab] logits)
        loss  = ops.grpo_loss(logp, old, adv, mask, ref, ...)          (clipped surrogate + k3 KL + aggregation)
        (loss * its share of the global batch).backward()
    clip gradients, optimizer, scheduler                             (a non-finite loss skips the step)

Scale out: ``torchrun --nproc_per_node N script.py`` (DDP; NCCL on GPUs, gloo on CPU). Rewards are gathered
so advantages, token counts (dapo) and metrics are global; checkpoints are written by rank 0 only.
``GRPOConfig(distributed_strategy="fsdp2")`` shards the model with FSDP2 instead (each decoder layer,
then the log-prob module as the root; see ``GRPOConfig``) for models whose training state does not
fit one device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections import namedtuple
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import _backend, ops
from ._trainer_utils import (
    SCHEDULERS, TRAINER_STATE, CompletionScorer, Dist, MetricSinks, MetricWindow, PromptOrder, RootForward,
    Rollout, Timer, call_reward_funcs, fsdp_gathered, fsdp_shard, full_value, fused_head_problem,
    is_welfare_reward, latest_checkpoint, load_model_weights, lr_lambda, pad_rows, peak_memory_gib,
    rebind_optimizer, reward_name, rotate_checkpoints, row_seeds,
)

logger = logging.getLogger("gtalign_fast.trainer")

__all__ = ["GRPOConfig", "GRPOTrainer", "TrainOutput", "LOSS_TYPES"]

# How each loss type normalises, which decides each micro-batch's share of the global loss:
#   "global_tokens": sum over tokens / tokens of the whole global batch (the op is told the count)
#   "sequences":     a mean over sequences, so a micro-batch weighs rows_micro / rows_global
#   "local_tokens":  a mean over the micro-batch's tokens, averaged over micro-batches (TRL's bnpo)
LOSS_TYPES = {
    "dapo": "global_tokens",
    "grpo": "sequences",
    "dr_grpo": "sequences",
    "bnpo": "local_tokens",
    "token-mean": "local_tokens",
    "seq-mean-token-mean": "sequences",
    "seq-mean-token-sum": "sequences",
    "seq-mean-token-sum-norm": "sequences",
}
SCALE_REWARDS = ("group", "batch", "none")
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp2")
STEERING_MODES = ("off", "rewrite", "reference")

TrainOutput = namedtuple("TrainOutput", ["global_step", "training_loss", "metrics"])
Generation = namedtuple(
    "Generation", ["prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "sampled", "finished", "events"]
)


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class GRPOConfig:
    """Configuration of :class:`GRPOTrainer`: TRL's ``GRPOConfig`` names and defaults, plus ours.

    TRL (``trl.GRPOConfig``, which extends ``transformers.TrainingArguments``) defaults kept here:
    ``num_generations=8``, ``max_completion_length=256``, ``temperature=1.0``, ``top_p=1.0``,
    ``top_k=0`` (off), ``beta=0.0``, ``epsilon=0.2``, ``epsilon_high=None`` (= epsilon),
    ``loss_type="dapo"``, ``scale_rewards="group"``, ``importance_sampling_level="token"``,
    ``num_iterations=1``, ``mask_truncated_completions=False``, ``learning_rate=1e-6``,
    ``logging_steps=10``, ``gradient_checkpointing=True``; and from ``TrainingArguments``
    ``per_device_train_batch_size=8``, ``gradient_accumulation_steps=1``, ``max_steps=-1``,
    ``num_train_epochs=3``, ``save_steps=500``, ``seed=42``, ``max_grad_norm=1.0``, AdamW betas
    (0.9, 0.999), eps 1e-8, a linear schedule without warmup.

    As in TRL, ``per_device_train_batch_size`` counts completions per micro-batch, and one optimizer
    step uses ``per_device_train_batch_size * gradient_accumulation_steps`` completions per process:
    that number must be a multiple of ``num_generations`` (so a prompt's group stays on one process).

    Differences from TRL: ``bf16=None`` means bf16 autocast on CUDA devices that support it and
    float32 elsewhere (TRL turns bf16 on by default; on a CPU that is slow and lossy); ``loss_type``
    also accepts verl's aggregation names; ``scale_rewards`` accepts True / False as TRL does.

    Ours
    ----
    alpha : float
        Cobb-Douglas exponent of U in ``W = U^alpha L^(1-alpha)`` (GTAlign: 0.5).
    advantage_eps : float
        ``A = (W - mean) / (std + eps)``; 1e-4 as TRL (GTAlign's verl runs used 1e-6).
    dual_clip : float or None
        verl's dual-clip constant c for negative advantages (3.0 in verl); None disables it.
    kernel_backend : str or None
        Backend of every op (``"triton"``, ``"cuda"``, ``"cpu"``, ``"reference"``); None: the device default.
    use_fused_lm_head : bool
        Compute log-probs from the last hidden state with ``linear_token_logprobs`` (no logits in
        memory). False: ``logits -> token_logprobs``. Models that transform their logits (soft-capping,
        logit scales) need False: the trainer refuses rather than compute different log-probs.
    pricing_policy : PricingPolicy or None
        Pricing policy applied to the payoff matrix during rollouts (steering).
    steering_mode : {"off", "rewrite", "reference"} or None
        How rollouts steer; None: "rewrite" when ``pricing_policy`` is set, else "off".
    max_consecutive_nan_steps : int
        A non-finite loss or gradient norm skips the step; this many in a row stop training.
    distributed_strategy : {"ddp", "fsdp2"}
        How several processes share the model (transformers' ``fsdp`` string option is not used).
        "ddp" (default): a full replica per process, gradients all-reduced; with one process the
        model is used as is. "fsdp2": ``torch.distributed.fsdp.fully_shard`` on each decoder layer
        (``model.base_model.layers``), then on the log-prob module as the root (embeddings, final
        norm and LM head are the root's, all-gathered in its forward, so the fused LM head reads
        the full weight); the reference model is sharded the same way. Needs ``torch.distributed``
        initialised (torchrun, or ``init_process_group`` before the trainer; one process is allowed).
        Gradients are reduce-scattered on every micro-batch (no unsharded gradient accumulation);
        generation all-gathers the whole model once per rollout (it must fit one device for
        that while optimizer state and gradients stay sharded); checkpoints hold full tensors
        written by rank 0, and resuming re-shards them.
    """

    # -- output, logging, checkpoints
    output_dir: str = "trainer_output"
    max_steps: int = -1
    num_train_epochs: float = 3.0
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = None
    report_to: str | list[str] = "none"
    disable_tqdm: bool = False
    seed: int = 42
    use_cpu: bool = False
    # -- optimisation
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    bf16: bool | None = None
    gradient_checkpointing: bool = True
    model_init_kwargs: dict | None = None
    # -- data
    shuffle_dataset: bool = True
    max_prompt_length: int | None = 512
    # -- generation
    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    # -- the GRPO objective
    beta: float = 0.0
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str | bool = "group"
    importance_sampling_level: str = "token"
    mask_truncated_completions: bool = False
    reward_weights: list[float] | None = None
    # -- ours
    alpha: float = 0.5
    advantage_eps: float = 1e-4
    dual_clip: float | None = None
    kernel_backend: str | None = None
    use_fused_lm_head: bool = True
    pricing_policy: Any = None
    steering_mode: str | None = None
    max_consecutive_nan_steps: int = 5
    distributed_strategy: str = "ddp"

    def __post_init__(self) -> None:
        if isinstance(self.scale_rewards, bool):  # TRL accepts True / False
            self.scale_rewards = "group" if self.scale_rewards else "none"
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        if self.steering_mode is None:
            self.steering_mode = "rewrite" if self.pricing_policy is not None else "off"
        for check in (self._check_batch, self._check_generation, self._check_objective, self._check_run):
            check()

    def _fail(self, message: str) -> None:
        raise ValueError(f"GRPOConfig: {message}")

    def _check_batch(self) -> None:
        if self.num_generations < 2:
            self._fail(
                f"num_generations must be >= 2 (group advantages need two completions), got {self.num_generations}"
            )
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            self._fail("per_device_train_batch_size and gradient_accumulation_steps must be >= 1")
        per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if per_step % self.num_generations:
            self._fail(
                f"per_device_train_batch_size * gradient_accumulation_steps = {per_step} completions per process "
                f"and step must be a multiple of num_generations = {self.num_generations}, so that every "
                "prompt's group of completions stays on one process"
            )

    def _check_generation(self) -> None:
        if self.max_completion_length < 1:
            self._fail(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            self._fail(f"max_prompt_length must be >= 1 or None, got {self.max_prompt_length}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            self._fail(f"temperature must be finite and > 0 (training log-probs divide by it), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            self._fail(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is None:
            self.top_k = 0
        if self.top_k < 0:
            self._fail(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            self._fail(f"min_p must be in [0, 1], got {self.min_p}")
        if self.steering_mode not in STEERING_MODES:
            self._fail(f"steering_mode must be one of {STEERING_MODES}, got {self.steering_mode!r}")
        if self.steering_mode != "off" and self.pricing_policy is None:
            self._fail(f"steering_mode={self.steering_mode!r} needs a pricing_policy")

    def _check_objective(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            self._fail(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            self._fail(f"scale_rewards must be one of {SCALE_REWARDS} (or True / False), got {self.scale_rewards!r}")
        if self.importance_sampling_level not in ("token", "sequence"):
            self._fail(
                f"importance_sampling_level must be 'token' or 'sequence', got {self.importance_sampling_level!r}"
            )
        if self.beta < 0:
            self._fail(f"beta must be >= 0, got {self.beta}")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            self._fail(f"epsilon must be > 0 and epsilon_high >= 0, got {self.epsilon}, {self.epsilon_high}")
        if self.delta is not None and self.delta <= 0:
            self._fail(f"delta (two-sided clip) must be > 0 (TRL recommends > 1 + epsilon), got {self.delta}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            self._fail(f"dual_clip must be > 1, got {self.dual_clip}")
        if self.num_iterations < 1:
            self._fail(f"num_iterations must be >= 1, got {self.num_iterations}")
        if not 0 <= self.alpha <= 1:
            self._fail(f"alpha must be in [0, 1], got {self.alpha}")
        if self.advantage_eps < 0:
            self._fail(f"advantage_eps must be >= 0, got {self.advantage_eps}")
        if self.kernel_backend not in (None, "auto", *_backend.BACKENDS):
            self._fail(f"kernel_backend must be one of {_backend.BACKENDS} or None, got {self.kernel_backend!r}")

    def _check_run(self) -> None:
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            self._fail("set max_steps > 0 or num_train_epochs > 0")
        if self.learning_rate < 0:
            self._fail(f"learning_rate must be >= 0, got {self.learning_rate}")
        if self.lr_scheduler_type not in SCHEDULERS:
            self._fail(f"lr_scheduler_type must be one of {SCHEDULERS}, got {self.lr_scheduler_type!r}")
        if self.logging_steps < 1 or self.save_steps < 0:
            self._fail("logging_steps must be >= 1 and save_steps >= 0 (0: no checkpoints)")
        if self.max_consecutive_nan_steps < 1:
            self._fail(f"max_consecutive_nan_steps must be >= 1, got {self.max_consecutive_nan_steps}")
        if self.distributed_strategy not in DISTRIBUTED_STRATEGIES:
            self._fail(
                f"distributed_strategy must be one of {DISTRIBUTED_STRATEGIES}, got {self.distributed_strategy!r}"
            )
        unknown = set(self.report_to) - {"none", "all", "tensorboard", "jsonl"}
        if unknown:
            self._fail(
                f"report_to supports 'tensorboard', 'all' and 'none' (JSONL is always written), got {sorted(unknown)}"
            )

    @property
    def completions_per_step(self) -> int:
        """Completions one process trains on per optimizer step."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def to_dict(self) -> dict:
        return {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else repr(v))
                for k, v in dataclasses.asdict(self).items()}


# ---------------------------------------------------------------------------------------------
# Trainer


class GRPOTrainer:
    """Group Relative Policy Optimization on the fused ops, TRL-shaped.

    Parameters
    ----------
    model : transformers causal LM or str
        A model instance, or a local path / hub id loaded with ``AutoModelForCausalLM`` (attention:
        flash-attn 2 when installed and on CUDA, PyTorch SDPA otherwise; logged).
    reward_funcs : callable or list of callables
        TRL's signature ``f(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]``.
        A :class:`~gtalign_fast.game.GTAlignReward` (Cobb-Douglas variant) contributes U and L, which
        go to the fused welfare op. Several functions combine as ``sum_i w_i r_i``
        (``args.reward_weights``); None scores are NaN, excluded from statistics, advantage 0.
    args : GRPOConfig
    train_dataset : datasets.Dataset or sequence of dict
        Rows with a ``prompt`` (text, or chat messages) and any extra columns; the extra columns
        reach the reward functions by name, one value per completion.
    processing_class : tokenizer
        Required unless ``model`` is a path (then loaded from it). Needs a pad or EOS token.
    ref_model : model, optional
        Reference policy for the KL term (``beta > 0``); default: a frozen copy of ``model`` as passed.
    callbacks : list, optional
        ``transformers.TrainerCallback`` objects (or anything with the same ``on_*`` methods);
        ``on_train_begin``, ``on_step_begin``, ``on_step_end``, ``on_log``, ``on_save`` and
        ``on_train_end`` are called; ``control.should_training_stop`` is honoured.
    optimizers : (optimizer, scheduler), optional
        Replace the default AdamW and learning-rate schedule.
    """

    def __init__(
        self,
        model: nn.Module | str,
        reward_funcs: Callable | Sequence[Callable],
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        processing_class: Any = None,
        ref_model: nn.Module | None = None,
        callbacks: Sequence[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
    ) -> None:
        self.args = args = args if args is not None else GRPOConfig()
        self.dist = Dist(use_cpu=args.use_cpu)
        self.device = self.dist.device
        self.fsdp = args.distributed_strategy == "fsdp2"
        if self.fsdp and not self.dist.enabled:
            raise ValueError(
                "GRPOTrainer: distributed_strategy='fsdp2' needs torch.distributed initialised (launch with "
                "torchrun, or call torch.distributed.init_process_group first; world size 1 is fine)"
            )
        torch.manual_seed(args.seed)
        self.model = self._load_model(model).to(self.device)
        self.processing_class = self._load_tokenizer(model, processing_class)
        self._setup_rewards(reward_funcs)
        self._setup_dataset(train_dataset)
        self.bf16 = self._resolve_bf16()
        self.ref_model = self._setup_ref_model(ref_model)
        self._setup_scorers()
        self.max_steps = self._total_steps()
        self.optimizer, self.lr_scheduler = self._setup_optimizer(*optimizers)
        self.step = 0  # optimizer steps done
        self.nan_streak = 0
        self.rollout: Rollout | None = None
        self.callbacks = _Callbacks(callbacks or [], self)
        self.sampler = self._setup_sampler()
        logger.info(
            "GRPOTrainer: %d process(es) on %s, attention %s, %s LM head, bf16 %s, %d steps",
            self.dist.world, self.device, getattr(self.model.config, "_attn_implementation", "?"),
            "fused" if args.use_fused_lm_head else "logits", self.bf16, self.max_steps,
        )

    # -- setup ----------------------------------------------------------------------------------

    def _load_model(self, model: nn.Module | str) -> nn.Module:
        if not isinstance(model, str):
            return model
        from transformers import AutoModelForCausalLM

        kwargs = dict(self.args.model_init_kwargs or {})
        kwargs.setdefault("attn_implementation", _attention_implementation(self.device))
        return AutoModelForCausalLM.from_pretrained(model, **kwargs)

    def _load_tokenizer(self, model: nn.Module | str, tokenizer: Any) -> Any:
        if tokenizer is None and isinstance(model, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model)
        if tokenizer is None:
            raise ValueError("GRPOTrainer: processing_class (the tokenizer) is required when model is an instance")
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("GRPOTrainer: the tokenizer needs a pad token or an EOS token")
        return tokenizer

    def _setup_rewards(self, reward_funcs: Callable | Sequence[Callable]) -> None:
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("GRPOTrainer: reward_funcs is empty")
        for func in funcs:
            if isinstance(func, str) or not callable(func):
                raise TypeError(
                    f"GRPOTrainer: reward function {func!r} is not callable (reward models given by name are "
                    "not supported; wrap the model in a function)"
                )
        weights = self.args.reward_weights
        if weights is None:
            weights = [1.0] * len(funcs)
        if len(weights) != len(funcs):
            raise ValueError(f"GRPOTrainer: {len(weights)} reward_weights for {len(funcs)} reward functions")
        self.reward_funcs, self.reward_weights = funcs, [float(w) for w in weights]
        self.reward_names = [reward_name(f) for f in funcs]
        self.welfare_flags = [is_welfare_reward(f) for f in funcs]
        for func, welfare in zip(funcs, self.welfare_flags):
            if welfare and getattr(func, "alpha", self.args.alpha) != self.args.alpha:
                raise ValueError(
                    f"GRPOTrainer: reward {reward_name(func)!r} has alpha={func.alpha} but GRPOConfig.alpha="
                    f"{self.args.alpha}; the welfare op uses the config's alpha, make them equal"
                )
        # the common GTAlign case: one Cobb-Douglas reward -> W and advantages in one fused launch
        self.single_welfare = len(funcs) == 1 and self.welfare_flags[0] and self.reward_weights[0] == 1.0

    def _setup_dataset(self, dataset: Any) -> None:
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError("GRPOTrainer: train_dataset must be a datasets.Dataset or a list of dicts")
        first = dataset[0] if len(dataset) else None
        if first is None or "prompt" not in first:
            raise ValueError("GRPOTrainer: every train_dataset row needs a 'prompt' (text or chat messages)")
        self.train_dataset = dataset
        self.prompts_per_process = self.args.completions_per_step // self.args.num_generations
        self.order = PromptOrder(
            len(dataset), self.prompts_per_process * self.dist.world, self.args.seed, self.args.shuffle_dataset
        )

    def _resolve_bf16(self) -> bool:
        if self.args.bf16 is None:
            return self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        return bool(self.args.bf16)

    def _setup_ref_model(self, ref_model: nn.Module | None) -> nn.Module | None:
        if self.args.beta == 0:
            return None  # TRL: no reference model without a KL term
        if ref_model is None:
            import copy

            ref_model = copy.deepcopy(self.model)  # the policy as passed in, before any update
        ref_model = ref_model.to(self.device).eval()
        ref_model.requires_grad_(False)
        return ref_model

    def _setup_scorers(self) -> None:
        args = self.args
        if args.use_fused_lm_head:
            for model in filter(None, (self.model, self.ref_model)):
                problem = fused_head_problem(model)
                if problem:
                    raise ValueError(f"GRPOTrainer: use_fused_lm_head=True but {problem}; set use_fused_lm_head=False")
        if args.gradient_checkpointing:
            # transformers 5.2x renamed gradient_checkpointing_enable (deprecated, removed in v6).
            if hasattr(self.model, "activation_checkpointing_enable"):
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            elif hasattr(self.model, "gradient_checkpointing_enable"):
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                raise ValueError(f"gradient_checkpointing=True, but {type(self.model).__name__} has no "
                                 "activation_checkpointing_enable / gradient_checkpointing_enable method")
        backend = args.kernel_backend if args.kernel_backend not in (None, "auto") else None
        scoring = dict(temperature=args.temperature, fused_head=args.use_fused_lm_head, backend=backend)
        self.scorer = CompletionScorer(self.model, **scoring)
        self.ref_scorer = None if self.ref_model is None else CompletionScorer(self.ref_model, **scoring)
        self.train_scorer: nn.Module = self.scorer
        # parameter names before sharding, to re-point an optimizer the caller built on them
        self._names_before_sharding = {id(p): name for name, p in self.model.named_parameters()}
        if self.fsdp:  # the scorers become FSDP2 roots; the training forward is the scorer itself
            for scorer in filter(None, (self.scorer, self.ref_scorer)):
                fsdp_shard(scorer, self.device, self.dist.world)
        elif self.dist.world > 1:  # DDP wraps the whole scoring forward, LM head included
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device] if self.device.type == "cuda" else None
            self.train_scorer = DistributedDataParallel(self.scorer, device_ids=device_ids)
        self.backend = backend

    def _setup_sampler(self):
        from .sampler import SteeringSampler

        if self.args.min_p:
            raise ValueError("GRPOTrainer: min_p is not supported by the SteeringSampler; leave it None")
        # under FSDP2 the sampler calls the model through the root, so its pre-forward hooks run
        return SteeringSampler(
            RootForward(self.scorer) if self.fsdp else self.model, self.processing_class, policy=self.args.pricing_policy, mode=self.args.steering_mode,
            backend=self.backend,
        )

    def _total_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        batches = math.ceil(self.args.num_train_epochs * len(self.train_dataset) / self.order.prompts_per_batch)
        return max(1, batches) * self.args.num_iterations

    def _setup_optimizer(self, optimizer: Any, scheduler: Any) -> tuple[Any, Any]:
        args = self.args
        if optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(
                params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                weight_decay=args.weight_decay,
            )
        elif self.fsdp:
            rebind_optimizer(optimizer, self._names_before_sharding, self.model)
        if scheduler is None:
            warmup = args.warmup_steps or math.ceil(args.warmup_ratio * self.max_steps)
            schedule = lr_lambda(args.lr_scheduler_type, warmup, self.max_steps)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return optimizer, scheduler

    # -- the loop -------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """Train for ``max_steps`` optimizer steps (or ``num_train_epochs``).

        Parameters
        ----------
        resume_from_checkpoint : str or bool, optional
            A ``checkpoint-<step>`` folder, or True for the latest one in ``output_dir``. The model,
            optimizer, scheduler, step, pending rollout and RNG state are restored; generation seeds
            and data order depend on the step only, so the next step equals an uninterrupted run.
        """
        if resume_from_checkpoint:
            path = resume_from_checkpoint
            if path is True:
                path = latest_checkpoint(self.args.output_dir)
                if path is None:
                    raise FileNotFoundError(f"GRPOTrainer: no checkpoint to resume from in {self.args.output_dir}")
            self._load_checkpoint(path)
        sinks = MetricSinks(self.args.output_dir, self.args.report_to, enabled=self.dist.is_main)
        window, losses = MetricWindow(), []
        progress = _progress_bar(self.max_steps, self.step, disable=self.args.disable_tqdm or not self.dist.is_main)
        self.callbacks("on_train_begin")
        try:
            while self.step < self.max_steps and not self.callbacks.control.should_training_stop:
                self.callbacks("on_step_begin")
                metrics = self._training_step()
                self.step += 1
                losses.append(metrics.get("loss", math.nan))
                window.add(metrics)
                progress.update(1)
                progress.set_postfix({k: f"{metrics[k]:.4g}" for k in ("reward", "loss") if k in metrics})
                self.callbacks("on_step_end")
                last = self.step == self.max_steps
                if self.step % self.args.logging_steps == 0 or last:
                    self._log(sinks, window.flush())
                if self.args.save_steps and (self.step % self.args.save_steps == 0 or last):
                    self._save_checkpoint()
        finally:
            progress.close()
            sinks.close()
        self.callbacks("on_train_end")
        finite = [x for x in losses if math.isfinite(x)]
        return TrainOutput(self.step, sum(finite) / len(finite) if finite else math.nan, {"global_step": self.step})

    def _training_step(self) -> dict[str, float]:
        """One optimizer step; a new rollout every ``num_iterations`` steps."""
        fresh = self.step % self.args.num_iterations == 0 or self.rollout is None
        if fresh:
            self.rollout = self._make_rollout(self.step // self.args.num_iterations)
        metrics = dict(self.rollout.metrics) if fresh else {}
        with Timer(self.device) as update_time:
            metrics.update(self._update(self.rollout))
        metrics["time/update"] = update_time.seconds
        trained_tokens = self.dist.sum(self.rollout.completion_mask.sum() + self.rollout.prompt_mask.sum())
        metrics["tokens_per_second/training"] = float(trained_tokens) / max(update_time.seconds, 1e-9)
        metrics["memory/peak_gib"] = float(self.dist.max(torch.tensor(peak_memory_gib(self.device))))
        return metrics

    # -- rollout: generate, score, advantages ---------------------------------------------------

    def _make_rollout(self, batch_index: int) -> Rollout:
        rows = self._process_rows(batch_index)
        prompts = [row["prompt"] for row in rows]
        with Timer(self.device) as generation_time:
            gen = self._generate(prompts, batch_index)
        completion_lists = [ids[mask.bool()].tolist() for ids, mask in zip(gen.completion_ids, gen.completion_mask)]
        with Timer(self.device) as scoring_time:
            scores = self._score(prompts, rows, completion_lists)
            advantages, metrics = self._advantages(scores)
        loss_mask = gen.sampled.float()
        if self.args.mask_truncated_completions:  # DAPO: a cut-off completion teaches nothing about its end
            loss_mask = loss_mask * gen.finished[:, None].float()
        rollout = Rollout(
            gen.prompt_ids, gen.prompt_mask, gen.completion_ids, gen.completion_mask, loss_mask, advantages
        )
        with Timer(self.device) as logp_time:
            rollout.old_logp = self._logps(self.scorer, rollout) if self.args.num_iterations > 1 else None
            rollout.ref_logp = self._logps(self.ref_scorer, rollout) if self.ref_scorer is not None else None
        metrics.update(self._completion_metrics(gen))
        generated = metrics.pop("_generated_tokens")
        metrics.update({
            "time/generation": generation_time.seconds,
            "time/scoring": scoring_time.seconds + logp_time.seconds,
            "tokens_per_second/generation": generated / max(generation_time.seconds, 1e-9),
            "epoch": self.order.epoch(batch_index),
        })
        rollout.metrics = metrics
        return rollout

    def _process_rows(self, batch_index: int) -> list[dict]:
        """This process's contiguous slice of the global generation batch."""
        indices = self.order.rows(batch_index)
        mine = indices[self.dist.rank * self.prompts_per_process : (self.dist.rank + 1) * self.prompts_per_process]
        return [self.train_dataset[i] for i in mine]

    def _prompt_text(self, prompt: Any) -> str:
        if isinstance(prompt, str):
            return prompt
        # chat messages: the tokenizer's template, opened for the assistant's turn
        return self.processing_class.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def _tokenize_prompts(self, prompts: list) -> list[list[int]]:
        """Prompt token ids, keeping the end of prompts longer than ``max_prompt_length``."""
        encoded = self.processing_class([self._prompt_text(p) for p in prompts], add_special_tokens=False)
        limit = self.args.max_prompt_length
        return [list(ids[-limit:]) if limit else list(ids) for ids in encoded["input_ids"]]

    def _generate(self, prompts: list, batch_index: int):
        """``num_generations`` completions per prompt through the SteeringSampler, prompt-major.

        Returns a :data:`Generation`:
        prompt_ids, prompt_mask : ``[N, P]`` left-padded prompts, repeated per completion
        completion_ids, completion_mask : ``[N, C]`` right-padded completions (as the model saw them
            at the end: an edited payoff appears re-serialised)
        sampled : ``[N, C]`` 1 where the policy sampled the token (0 for tokens re-fed by an edit)
        finished : ``[N]`` bool, whether the completion ended (EOS or a stop string) before the limit
        events : one SteeringEvent per completion
        """
        g, n_local = self.args.num_generations, len(prompts) * self.args.num_generations
        seeds = row_seeds(self.args.seed, batch_index, self.dist.rank * n_local, n_local)
        was_training = self.model.training
        self.model.eval()
        try:
            with self._gathered_for_generation(), self._autocast():
                out = self.sampler.generate(
                    self._tokenize_prompts(prompts), max_new_tokens=self.args.max_completion_length,
                    temperature=self.args.temperature, top_k=self.args.top_k, top_p=self.args.top_p,
                    num_return_sequences=g, seed=seeds,
                )
        finally:
            self.model.train(was_training)
        device, long = self.device, torch.long
        pad = self._pad_id()
        prompt_ids, prompt_mask = pad_rows(out.prompt_ids, pad, left=True, dtype=long, device=device)
        completion_ids, completion_mask = pad_rows(out.completion_ids, pad, left=False, dtype=long, device=device)
        # re-fed tokens carry a NaN log-prob: the policy did not choose them, so they stay out of the loss
        sampled_logprobs, _ = pad_rows(out.logprobs, math.nan, left=False, dtype=torch.float32, device=device)
        sampled = completion_mask * (~sampled_logprobs.isnan()).long()
        finished = torch.tensor([r in ("eos", "stop") for r in out.finish_reasons], device=device)
        return Generation(prompt_ids, prompt_mask, completion_ids, completion_mask, sampled, finished, out.events)

    def _pad_id(self) -> int:
        tokenizer = self.processing_class
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _score(self, prompts: list, rows: list[dict], completion_ids: list[list[int]]):
        """Call the reward functions on this process's completions (TRL's arguments)."""
        g = self.args.num_generations
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        conversational = not isinstance(prompts[0], str)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        repeated_prompts = [p for p in prompts for _ in range(g)]
        columns = {key: [row[key] for row in rows for _ in range(g)] for key in rows[0] if key != "prompt"}
        return call_reward_funcs(
            self.reward_funcs, self.welfare_flags, prompts=repeated_prompts, completions=completions,
            completion_ids=completion_ids, columns=columns, device=self.device,
        )

    def _advantages(self, scores) -> tuple[torch.Tensor, dict[str, float]]:
        """Group advantages over the GLOBAL batch (rewards are gathered: "batch" scaling and the
        metrics see every process), then this process's slice."""
        args, g = self.args, self.args.num_generations
        per_func = self.dist.gather_rows(scores.per_func)
        common = dict(scale=args.scale_rewards, eps=args.advantage_eps, backend=self.backend)
        if self.single_welfare:
            user, llm = self.dist.gather_rows(scores.user), self.dist.gather_rows(scores.llm)
            out = ops.welfare_advantages(user, llm, g, alpha=args.alpha, **common)
            reward = out.welfare
        else:
            reward = _weighted_reward(per_func, torch.tensor(self.reward_weights, device=per_func.device))
            # Group advantages do not change when every reward moves by the same constant, so the
            # (non-negative) Cobb-Douglas op computes them for any float reward as W = (r - min r)^1 * 1^0.
            shifted = reward - _nanmin(reward)
            out = ops.welfare_advantages(shifted, torch.ones_like(shifted), g, alpha=1.0, **common)
        metrics = self._reward_metrics(per_func, reward, out, scores)
        return self.dist.own_rows(out.advantages).float(), metrics

    def _reward_metrics(self, per_func, reward, out, scores) -> dict[str, float]:
        metrics = {"reward": _nanmean(reward), "reward_std": _nanstd(reward)}
        for j, name in enumerate(self.reward_names):
            metrics[f"rewards/{name}/mean"] = _nanmean(per_func[:, j])
            metrics[f"rewards/{name}/std"] = _nanstd(per_func[:, j])
        failures = self.dist.sum(torch.tensor([float(scores.failures[n]) for n in self.reward_names]))
        for name, count in zip(self.reward_names, failures.tolist()):
            metrics[f"rewards/{name}/failures"] = count
        if scores.user is not None:
            user, llm = self.dist.gather_rows(scores.user), self.dist.gather_rows(scores.llm)
            welfare = out.welfare if self.single_welfare else per_func[:, self.welfare_flags.index(True)]
            metrics.update({"welfare/U": _nanmean(user), "welfare/L": _nanmean(llm), "welfare/W": _nanmean(welfare)})
        metrics.update({k: v for k, v in scores.extra.items() if k not in metrics})  # main process's batch
        advantages = out.advantages.float()
        metrics.update({
            "advantages/mean": float(advantages.mean()),
            "advantages/std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
            "advantages/abs_mean": float(advantages.abs().mean()),
            "frac_reward_zero_std": float(out.group_all_equal.float().mean()),
        })
        return metrics

    def _completion_metrics(self, gen: Generation) -> dict[str, float]:
        lengths = gen.completion_mask.sum(1).float()
        edited = [getattr(event, "status", None) == "edited" for event in gen.events]
        totals = self.dist.sum(torch.tensor(
            [float(lengths.sum()), float(len(lengths)), float((~gen.finished).sum()), float(sum(edited))],
            device=self.device,
        ))
        tokens, rows, clipped, edited_rows = totals.tolist()
        return {
            "completions/mean_length": tokens / rows,
            "completions/max_length": float(self.dist.max(lengths.max())),
            "completions/min_length": -float(self.dist.max(-lengths.min())),
            "completions/clipped_ratio": clipped / rows,
            "steering/edited_fraction": edited_rows / rows,
            "_generated_tokens": tokens,
        }

    @torch.no_grad()
    def _logps(self, scorer: CompletionScorer, rollout: Rollout) -> torch.Tensor:
        """Per-token log-probs of the whole rollout under ``scorer``'s model, micro-batched."""
        out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=self.device)
        size = self.args.per_device_train_batch_size
        for start in range(0, len(rollout), size):
            part = rollout.micro_batch(start, start + size)
            with self._autocast():
                logp, _ = scorer(
                    part.prompt_ids, part.prompt_mask, part.completion_ids, part.completion_mask, with_entropy=False
                )
            out[start : start + size, : logp.shape[1]] = logp
        return out

    # -- update ---------------------------------------------------------------------------------

    def _update(self, rollout: Rollout) -> dict[str, float]:
        """Micro-batched forward / backward over the rollout, then one optimizer step."""
        self.model.train()
        size, rows = self.args.per_device_train_batch_size, len(rollout)
        starts = list(range(0, rows, size))
        global_tokens = self.dist.sum(rollout.loss_mask.sum())
        weighted_loss = torch.zeros((), device=self.device)
        entropy_sum = torch.zeros((), device=self.device)
        op_metrics: dict[str, float] = {}
        for k, start in enumerate(starts):
            part = rollout.micro_batch(start, start + size)
            last = k == len(starts) - 1
            with self._no_sync(not last), self._autocast():
                logp, entropy = self.train_scorer(
                    part.prompt_ids, part.prompt_mask, part.completion_ids, part.completion_mask
                )
                loss, metrics = self._loss(logp, part, global_tokens)
                weight = self._loss_weight(len(part), rows, len(starts))
                (loss * weight).backward()
            weighted_loss += loss.detach() * weight
            entropy_sum += (entropy.detach() * part.completion_mask).sum()
            for key, value in metrics.items():
                op_metrics[key] = op_metrics.get(key, 0.0) + float(value) / len(starts)
        # DDP averaged the gradients over processes: the loss it optimised is the mean of the weighted sums
        loss_value = self.dist.sum(weighted_loss) / self.dist.world
        out = {"loss": float(loss_value), **self._optimizer_step(loss_value)}
        tokens = self.dist.sum(rollout.completion_mask.sum().float())
        out["entropy"] = float(self.dist.sum(entropy_sum) / tokens.clamp(min=1))
        out.update({key: float(self.dist.mean(torch.tensor(v, device=self.device))) for key, v in op_metrics.items()})
        return out

    def _loss(self, logp: torch.Tensor, part: Rollout, global_tokens: torch.Tensor):
        """``ops.grpo_loss`` on one micro-batch; a micro-batch without a loss token contributes an
        exact zero that still runs backward (every DDP process must)."""
        if not bool(part.loss_mask.any()):
            return (logp * 0.0).sum(), {}
        args = self.args
        return ops.grpo_loss(
            logp, part.old_logp, part.advantages, part.loss_mask, ref_logp=part.ref_logp, beta=args.beta,
            epsilon_low=args.epsilon, epsilon_high=args.epsilon_high, delta=args.delta, dual_clip=args.dual_clip,
            loss_type=args.loss_type, importance_sampling_level=args.importance_sampling_level,
            max_completion_length=args.max_completion_length,
            num_items_in_batch=global_tokens if LOSS_TYPES[args.loss_type] == "global_tokens" else None,
            backend=self.backend,
        )

    def _loss_weight(self, micro_rows: int, rows: int, micro_batches: int) -> float:
        """This micro-batch's share of the global-batch loss, times the process count because DDP
        averages gradients over processes (so the sum over every micro-batch everywhere is the loss)."""
        kind = LOSS_TYPES[self.args.loss_type]
        if kind == "global_tokens":  # the op already divided by the global token count
            return float(self.dist.world)
        if kind == "sequences":  # world * micro_rows / (rows * world): rows per process are equal
            return micro_rows / rows
        return 1.0 / micro_batches  # local token means, averaged like TRL's bnpo

    def _optimizer_step(self, loss: torch.Tensor) -> dict[str, float]:
        """Clip, step, schedule; skip the step when the loss or the gradient norm is not finite."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else math.inf
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(params, max_norm))  # FSDP2: a DTensor
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        out = {"grad_norm": float(grad_norm), "learning_rate": self.lr_scheduler.get_last_lr()[0]}
        if finite:
            self.optimizer.step()
            self.lr_scheduler.step()
            self.nan_streak = 0
        else:
            self.nan_streak += 1
            out["nan_skipped"] = 1.0
            logger.warning(
                "step %d: non-finite loss or gradient norm, step skipped (%d in a row)", self.step, self.nan_streak
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.nan_streak >= self.args.max_consecutive_nan_steps:
            raise RuntimeError(
                f"GRPOTrainer: {self.nan_streak} consecutive steps with a non-finite loss or gradient norm "
                f"(max_consecutive_nan_steps={self.args.max_consecutive_nan_steps}); stopping"
            )
        out["nan_skipped"] = out.get("nan_skipped", 0.0)
        return out

    def _no_sync(self, skip_sync: bool):
        if skip_sync and hasattr(self.train_scorer, "no_sync"):
            return self.train_scorer.no_sync()  # gradient accumulation: all-reduce once, on the last micro-batch
        return contextlib.nullcontext()

    def _gathered_for_generation(self):
        # FSDP2: one all-gather per rollout, and decoding without collectives (processes may stop at
        # different steps); all-gathering each layer per decoded token would also need lock-step decoding
        return fsdp_gathered(self.scorer) if self.fsdp else contextlib.nullcontext()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # -- logging --------------------------------------------------------------------------------

    def _log(self, sinks: MetricSinks, metrics: dict[str, float]) -> None:
        metrics = {"step": self.step, **metrics}
        sinks.write(self.step, {k: v for k, v in metrics.items() if k != "step"})
        self.callbacks.state.log_history.append(metrics)
        self.callbacks("on_log", logs=metrics)

    # -- saving and resuming --------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None) -> None:
        """Write the model (``save_pretrained``) and the tokenizer to ``output_dir`` (rank 0 only)."""
        output_dir = output_dir or self.args.output_dir
        state = self._full_model_state() if self.fsdp else None
        if self.dist.is_main:
            os.makedirs(output_dir, exist_ok=True)
            self.model.save_pretrained(output_dir, state_dict=state)
            if hasattr(self.processing_class, "save_pretrained"):
                self.processing_class.save_pretrained(output_dir)
        self.dist.barrier()

    def _save_checkpoint(self) -> str:
        path = os.path.join(self.args.output_dir, f"checkpoint-{self.step}")
        self.save_model(path)
        # a rollout that later steps will reuse (num_iterations > 1) must survive the restart
        pending = self.rollout if self.args.num_iterations > 1 else None
        # DDP keeps the optimizer state identical on every process; FSDP2 gathers the shards (collective)
        optimizer_state = self._full_optimizer_state() if self.fsdp else self.optimizer.state_dict()
        if self.dist.is_main:  # one copy
            state = {
                "step": self.step,
                "nan_streak": self.nan_streak,
                "optimizer": optimizer_state,
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "rollout": None if pending is None else pending.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            }
            torch.save(state, os.path.join(path, TRAINER_STATE))
            with open(os.path.join(path, "trainer_state.json"), "w") as handle:
                summary = {"global_step": self.step, "max_steps": self.max_steps, "config": self.args.to_dict()}
                json.dump(summary, handle, indent=1)
            rotate_checkpoints(self.args.output_dir, self.args.save_total_limit)
        self.dist.barrier()
        self.callbacks("on_save", checkpoint=path)
        return path

    def _full_model_state(self) -> dict:
        """FSDP2: the full model state on rank 0's CPU (empty elsewhere); every process must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _full_optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def _load_full_optimizer_state(self, saved: dict) -> None:
        """FSDP2: every process reads the full optimizer state and keeps its shards."""
        if not saved["state"]:  # no tensors to shard (SGD without momentum): the hyper-parameters only
            for group, saved_group in zip(self.optimizer.param_groups, saved["param_groups"]):
                group.update({k: v for k, v in saved_group.items() if k != "params"})
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.model, self.optimizer, saved, options=options)

    def _load_checkpoint(self, path: str) -> None:
        state_file = os.path.join(path, TRAINER_STATE)
        if not os.path.isfile(state_file):
            raise FileNotFoundError(f"GRPOTrainer: {path} is not a checkpoint (no {TRAINER_STATE})")
        load_model_weights(self.model, path, fsdp=self.fsdp)
        state = torch.load(state_file, map_location=self.device, weights_only=True)
        if self.fsdp:
            self._load_full_optimizer_state(state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step, self.nan_streak = int(state["step"]), int(state["nan_streak"])
        self.rollout = Rollout.from_state_dict(state["rollout"], self.device) if state["rollout"] else None
        torch.set_rng_state(state["rng_cpu"].cpu())
        if state["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
        logger.info("GRPOTrainer: resumed from %s at step %d", path, self.step)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _attention_implementation(device: torch.device) -> str:
    import importlib.util

    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _weighted_reward(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i r_i`` over the functions that scored a completion; NaN when none did."""
    scored = ~per_func.isnan()
    total = (per_func.nan_to_num(0.0) * weights).sum(1)
    return torch.where(scored.any(1), total, torch.full_like(total, math.nan))


def _nanmin(values: torch.Tensor) -> torch.Tensor:
    valid = values[~values.isnan()]
    return valid.min() if valid.numel() else torch.zeros((), device=values.device)


def _nanmean(values: torch.Tensor) -> float:
    valid = values[~values.isnan()].float()
    return float(valid.mean()) if valid.numel() else math.nan


def _nanstd(values: torch.Tensor) -> float:
    valid = values[~values.isnan()].float()
    return float(valid.std()) if valid.numel() > 1 else 0.0


def _progress_bar(total: int, initial: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=disable, desc="GRPO", dynamic_ncols=True)


class _Callbacks:
    """Calls ``transformers.TrainerCallback``-style hooks with a TrainerState and TrainerControl."""

    def __init__(self, callbacks: Sequence[Any], trainer: GRPOTrainer) -> None:
        self.callbacks, self.trainer = list(callbacks), trainer
        try:
            from transformers import TrainerControl, TrainerState

            self.state = TrainerState(max_steps=trainer.max_steps, logging_steps=trainer.args.logging_steps,
                                      save_steps=trainer.args.save_steps, is_world_process_zero=trainer.dist.is_main)
            self.control = TrainerControl()
        except ImportError:  # plain objects: the same attributes, nothing else
            self.state = _Plain(global_step=0, max_steps=trainer.max_steps, log_history=[], epoch=0.0)
            self.control = _Plain(should_training_stop=False)

    def __call__(self, event: str, **kwargs: Any) -> None:
        self.state.global_step = self.trainer.step
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is None:
                continue
            result = method(
                self.trainer.args, self.state, self.control, model=self.trainer.model,
                processing_class=self.trainer.processing_class, optimizer=self.trainer.optimizer,
                lr_scheduler=self.trainer.lr_scheduler, **kwargs,
            )
            if result is not None:
                self.control = result


class _Plain:
    def __init__(self, **attributes: Any) -> None:
        self.__dict__.update(attributes)
