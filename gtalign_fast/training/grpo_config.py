"""The configuration of :class:`~gtalign_fast.GRPOTrainer`: :class:`GRPOConfig` and its option tables.

Kept beside the trainer as TRL keeps ``grpo_config.py`` beside ``grpo_trainer.py``: field names and
defaults follow TRL's ``GRPOConfig`` where the concept exists; the checks run once, at construction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..ops import _backend
from ..ops._grpo_constants import LOSS_NORMALISERS, MICRO_BATCH_SHARES
from ..ops._grpo_objective import OPTION_DEFAULTS
from ..ops._welfare_constants import SCALES

__all__ = ["GRPOConfig", "LOSS_TYPES", "DISTRIBUTED_STRATEGIES", "STEERING_MODES", "SCHEDULERS"]

# Each loss type's share of the global loss per micro-batch ("global_tokens", "sequences" or
# "local_tokens"; see _grpo_constants.MICRO_BATCH_SHARES), from the one normaliser table.
LOSS_TYPES = {loss_type: MICRO_BATCH_SHARES[norm] for loss_type, norm in LOSS_NORMALISERS.items()}
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp2")
STEERING_MODES = ("off", "rewrite", "reference")
CACHE_IMPLEMENTATIONS = (None, "static", "dynamic")

# the learning-rate schedules of transformers that the trainer implements (``optimization.lr_lambda``)
SCHEDULERS = ("linear", "constant", "constant_with_warmup", "cosine")


@dataclass
class GRPOConfig:
    """Configuration of :class:`~gtalign_fast.GRPOTrainer`: TRL's ``GRPOConfig`` names and defaults, plus ours.

    TRL (``trl.GRPOConfig``, which extends ``transformers.TrainingArguments``) defaults kept here:
    ``num_generations=8``, ``max_completion_length=256``, ``temperature=1.0``, ``top_p=1.0``,
    ``top_k=0`` (off), ``beta=0.0``, ``epsilon=0.2``, ``epsilon_high=None`` (= epsilon),
    ``loss_type="dapo"``, ``scale_rewards="group"``, ``importance_sampling_level="token"``,
    ``num_iterations=1``, ``mask_truncated_completions=False``, ``use_bias_correction_kl=True``
    (with ``beta > 0`` the k3 KL is multiplied by the importance ratio), ``sapo_temperature_pos=1.0``,
    ``sapo_temperature_neg=1.05`` (``loss_type="sapo"``), ``vespo_k_pos=2.0``, ``vespo_lambda_pos=3.0``,
    ``vespo_k_neg=3.0``, ``vespo_lambda_neg=2.0`` (``loss_type="vespo"``), ``learning_rate=1e-6``,
    ``logging_steps=10``, ``gradient_checkpointing=True``; and from ``TrainingArguments``
    ``per_device_train_batch_size=8``, ``gradient_accumulation_steps=1``, ``max_steps=-1``,
    ``num_train_epochs=3``, ``save_steps=500``, ``seed=42``, ``max_grad_norm=1.0``, AdamW betas
    (0.9, 0.999), eps 1e-8, a linear schedule without warmup.

    As in TRL, ``per_device_train_batch_size`` counts completions per micro-batch, and one optimizer
    step uses ``per_device_train_batch_size * gradient_accumulation_steps`` completions per process:
    that number must be a multiple of ``num_generations`` (so a prompt's group stays on one process).

    Generation: ``max_num_seqs`` (vLLM's name) caps the completions the sampler decodes at once
    (its slots); when one finishes, its slot takes the next waiting completion of the step. None:
    all completions of the step at once. It never changes how many completions a step trains on
    (TRL's ``generation_batch_size`` does, so that name is not used here). ``cache_implementation``
    (TRL's name): ``"static"`` (preallocated KV cache; on CUDA its decode step runs as a CUDA
    graph), ``"dynamic"`` (the model's ``DynamicCache``) or None (static where the model supports
    it: SDPA attention, full-attention layers); the same seeds sample the same tokens on either.

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
    share_prompt_prefix : bool or None
        With the fused LM head, the completions of a prompt share one forward of it in the update
        (and in the old / reference log-probs): packed as ``[prompt, c_1, ..., c_k]`` under a mask
        that lets each completion see the prompt and itself only, the same log-probs and gradients
        as one row per completion (:mod:`~gtalign_fast.training.prompt_sharing`). None: where the
        model supports it (Llama, Qwen2/3, Mistral with sdpa or eager attention) and it saves flops;
        True: always (ValueError where the model cannot); False: never.
    pricing_policy : PricingPolicy or None
        Pricing policy applied to the payoff matrix during rollouts (steering).
    steering_mode : {"off", "rewrite", "reference"} or None
        How rollouts steer; None: "rewrite" when ``pricing_policy`` is set, else "off".
    max_consecutive_nan_steps : int
        A non-finite loss or gradient norm skips the step; this many in a row stop training.
    max_judge_failure_rate : float, default 0.5
        The largest fraction of one step's completions whose judge may fail (GTAlignReward's
        ``judge_failed``: a missing score, advantage 0). More stops training with an error naming
        the judge and the rate: a dead judge server must not train the model on noise. In [0, 1];
        1 never stops.
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
    preemption_grace_s : float or None
        After SIGTERM, SIGINT or SIGUSR1 the step in progress finishes, is saved, and ``train`` exits
        with code 75 (:mod:`~gtalign_fast.training.preemption`). A step still running this many seconds after
        the signal is abandoned at its next safe point (between its stages: after the rollout, between
        micro-batches; generation itself is not interrupted) and the checkpoint is the step before.
        Default 20: SLURM's KillWait and Kubernetes' grace period are 30 s, torchrun's shutdown timeout
        too; set it to your budget minus the time a save takes. None: always finish the step (with
        several processes, also no per-micro-batch agreement).
    overwrite_output_dir : bool
        ``output_dir`` is held by one run (a lock file naming its pid and host; a second run is
        refused at construction, a dead run's lock is taken over). True: use the folder even while
        another live run holds it (logged). Never the default.
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
    max_num_seqs: int | None = None
    cache_implementation: str | None = None
    # -- the GRPO objective
    beta: float = 0.0
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    use_bias_correction_kl: bool = True
    loss_type: str = "dapo"
    # TRL's SAPO / VESPO defaults, as the loss objective declares them (one place for the numbers)
    sapo_temperature_pos: float = OPTION_DEFAULTS["sapo_temperature_pos"]
    sapo_temperature_neg: float = OPTION_DEFAULTS["sapo_temperature_neg"]
    vespo_k_pos: float = OPTION_DEFAULTS["vespo_k_pos"]
    vespo_lambda_pos: float = OPTION_DEFAULTS["vespo_lambda_pos"]
    vespo_k_neg: float = OPTION_DEFAULTS["vespo_k_neg"]
    vespo_lambda_neg: float = OPTION_DEFAULTS["vespo_lambda_neg"]
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
    share_prompt_prefix: bool | None = None
    pricing_policy: Any = None
    steering_mode: str | None = None
    max_consecutive_nan_steps: int = 5
    max_judge_failure_rate: float = 0.5
    distributed_strategy: str = "ddp"
    preemption_grace_s: float | None = 20.0
    overwrite_output_dir: bool = False

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
        slots = self.max_num_seqs
        if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
            self._fail(f"max_num_seqs must be a positive int or None (all completions at once), got {slots!r}")
        if self.cache_implementation not in CACHE_IMPLEMENTATIONS:
            self._fail(f"cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, "
                       f"got {self.cache_implementation!r}")
        if self.steering_mode not in STEERING_MODES:
            self._fail(f"steering_mode must be one of {STEERING_MODES}, got {self.steering_mode!r}")
        if self.steering_mode != "off" and self.pricing_policy is None:
            self._fail(f"steering_mode={self.steering_mode!r} needs a pricing_policy")

    def _check_objective(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            self._fail(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALES:  # the welfare_advantages op's names, defined once
            self._fail(f"scale_rewards must be one of {tuple(SCALES)} (or True / False), got {self.scale_rewards!r}")
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
        if not (self.sapo_temperature_pos > 0 and self.sapo_temperature_neg > 0):
            self._fail(f"sapo temperatures must be > 0, got {self.sapo_temperature_pos}, {self.sapo_temperature_neg}")
        if not (self.vespo_k_pos >= 0 and self.vespo_k_neg >= 0 and self.vespo_lambda_pos > 0
                and self.vespo_lambda_neg > 0):
            self._fail("vespo_k_pos / vespo_k_neg must be >= 0 and vespo_lambda_pos / vespo_lambda_neg > 0, got "
                       f"{self.vespo_k_pos}, {self.vespo_k_neg}, {self.vespo_lambda_pos}, {self.vespo_lambda_neg}")
        if self.loss_type in ("sapo", "cispo", "vespo") and (self.delta is not None or self.dual_clip is not None):
            self._fail(f"loss_type={self.loss_type!r} replaces the clip: delta and dual_clip must be None")
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
        if not 0 <= self.max_judge_failure_rate <= 1:  # NaN fails too
            self._fail(f"max_judge_failure_rate must be in [0, 1], got {self.max_judge_failure_rate}")
        if self.distributed_strategy not in DISTRIBUTED_STRATEGIES:
            self._fail(
                f"distributed_strategy must be one of {DISTRIBUTED_STRATEGIES}, got {self.distributed_strategy!r}"
            )
        if self.preemption_grace_s is not None and not self.preemption_grace_s >= 0:
            self._fail(f"preemption_grace_s must be >= 0 or None, got {self.preemption_grace_s}")
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
