"""GRPO training of causal LMs on the fused kernels: :class:`GRPOTrainer` (configured by :class:`GRPOConfig`).

The API follows TRL's ``GRPOTrainer`` (same constructor, same config field names and defaults where the
concept exists) so a TRL user feels at home; the maths runs on this library's ops.

One optimizer step, the whole story (``GRPOTrainer._training_step``)::

    prompts   = this process's slice of the next generation batch   (a group never splits across processes)
    rollout   = num_generations completions per prompt                (sampler, KV cache, ops.sample_)
    rewards   = every reward function; GTAlignReward gives U and L   (failures -> NaN -> advantage 0)
    adv       = ops.welfare_advantages(U, L, group=num_generations)    (Cobb-Douglas W + group stats, one launch;
                                                                       plain rewards: a float64 group advantage)
    old / ref = per-token log-probs, only when num_iterations > 1 / beta > 0
    for each micro-batch:                                             (gradient accumulation, DDP syncs on the last)
        loss  = ops.linear_grpo_loss(last hidden state, LM head, ...)  (LM head + log-prob + clipped surrogate +
                                                                       k3 KL + aggregation, in token chunks: no
                                                                       [tokens, vocab] logits; without the fused
                                                                       head ops.token_logprobs + ops.grpo_loss,
                                                                       and ops.linear_token_logprobs + grpo_loss
                                                                       where linear_grpo_loss lacks the backend)
        (loss * its share of the global batch).backward()
    clip gradients, optimizer, scheduler                             (a non-finite loss skips the step)

Each stage lives in a module named after it: :mod:`~gtalign_fast.training.rollout` (prompts, generation,
the rollout), :mod:`~gtalign_fast.training.scoring` (reward functions, advantages),
:mod:`~gtalign_fast.training.logprobs` (per-token log-probs), :mod:`~gtalign_fast.training.optimization` (loss shares,
optimizer), :mod:`~gtalign_fast.training.distributed`, :mod:`~gtalign_fast.training.checkpoint`,
:mod:`~gtalign_fast.training.metrics`, :mod:`~gtalign_fast.training.preemption` (stop signals, the output-folder lock),
:mod:`~gtalign_fast.training.model_setup` (loading the model and tokenizer, the reference policy); this module wires
them into the loop.

Scale out: ``torchrun --nproc_per_node N script.py`` (DDP; NCCL on GPUs, gloo on CPU). Rewards are gathered
so advantages, token counts (dapo) and metrics are global; checkpoints are written by rank 0 only.
``GRPOConfig(distributed_strategy="fsdp2")`` shards the model with FSDP2 instead (each decoder layer,
then the log-prob module as the root; see ``GRPOConfig``) for models whose training state does not
fit one device.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import namedtuple
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..ops import _backend
from ..ops._device_checks import check_device_errors
from ..ops._grpo_objective import GrpoObjective
from . import checkpoint
from .callbacks import CallbackHandler
from .distributed import Dist, RootForward, distribute, fsdp_gathered, rebind_optimizer, release_ddp_at_exit
from .grpo_config import LOSS_TYPES, GRPOConfig
from .logprobs import CompletionLogprobs, fused_head_problem, loss_path, rollout_logprobs
from .metrics import (
    MetricSinks,
    MetricWindow,
    StageTimer,
    UpdateTotals,
    peak_memory_gib,
    progress_bar,
    truncate_metrics,
)
from .model_setup import (
    bf16_enabled,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
    prompt_length_limit,
    reference_model,
    refuse_unsaveable,
)
from .optimization import (
    clip_gradients,
    default_optimizer,
    default_scheduler,
    loss_weight,
    policy_loss,
)
from .preemption import Preemption, StepAbandoned, TrainingPreempted, hold_output_dir
from .rollout import (
    Generation,
    PromptOrder,
    Rollout,
    completion_metrics,
    completion_token_lists,
    generation_from_sampler,
    generation_seeds,
    tokenize_prompts,
    validate_dataset,
)
from .scoring import RewardScores, RewardSpec, batch_advantages, reward_specs, score_completions, single_welfare

logger = logging.getLogger("gtalign_fast.trainer")

__all__ = ["GRPOConfig", "GRPOTrainer", "TrainOutput", "LOSS_TYPES", "Generation", "RewardSpec"]

TrainOutput = namedtuple("TrainOutput", ["global_step", "training_loss", "metrics"])


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
        (``args.reward_weights``), which gets a plain group advantage; None scores are NaN, excluded
        from statistics, advantage 0. Held as :attr:`rewards`, one :class:`~gtalign_fast.training.scoring.RewardSpec`
        each.
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
        self.backend = args.kernel_backend if args.kernel_backend not in (None, "auto") else None
        if self.backend is not None and (reason := _backend.why_unavailable(self.backend, self.device)):
            raise ValueError(f"GRPOTrainer: kernel_backend={self.backend!r} cannot run on {self.device}: {reason}")
        torch.manual_seed(args.seed)
        self.model = load_model(model, args.model_init_kwargs, self.device).to(self.device)
        refuse_unsaveable(self.model)
        # one run per folder; taken once the model is known to be trainable and saveable, so that a refused
        # trainer leaves nothing in output_dir (nothing is written there before this)
        hold_output_dir(args.output_dir, self, self.dist, args.overwrite_output_dir)
        self.processing_class = load_tokenizer(model, processing_class)
        self.rewards: list[RewardSpec] = reward_specs(reward_funcs, args.reward_weights, args.alpha)
        self._setup_dataset(train_dataset)
        self.max_prompt_length = prompt_length_limit(self.model, args.max_prompt_length, args.max_completion_length)
        self.bf16 = bf16_enabled(args.bf16, self.device)
        self.ref_model = reference_model(self.model, ref_model, args.beta, self.device)
        self._setup_logprobs()
        self.max_steps = self._total_steps()
        self.optimizer, self.lr_scheduler = self._setup_optimizer(*optimizers)
        self.step = 0  # optimizer steps done
        self.nan_streak = 0
        self.rollout: Rollout | None = None
        self._prompt_rows: list[int] | None = None  # dataset rows of the prompts being generated from
        self.callbacks = CallbackHandler(callbacks or [], self)
        self.preemption, self._saved_step = Preemption(args.preemption_grace_s, self.dist), None
        self.sampler = self._setup_sampler()
        logger.info(
            "GRPOTrainer: %d process(es) on %s, attention %s, %s, %s, bf16 %s, %d steps",
            self.dist.world, self.device, getattr(self.model.config, "_attn_implementation", "?"),
            self.loss_path, self.logprobs.sharing, self.bf16, self.max_steps,
        )

    @property
    def reward_funcs(self) -> list[Callable]:
        """The reward functions (TRL's attribute name), in the order of :attr:`rewards`."""
        return [spec.func for spec in self.rewards]

    @property
    def single_welfare(self) -> bool:
        """One Cobb-Douglas reward of weight 1: advantages come from U and L in one fused launch."""
        return single_welfare(self.rewards)

    # -- setup ----------------------------------------------------------------------------------

    def _setup_dataset(self, dataset: Any) -> None:
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError("GRPOTrainer: train_dataset must be a datasets.Dataset or a list of dicts")
        first = dataset[0] if len(dataset) else None
        if first is None or "prompt" not in first:
            raise ValueError("GRPOTrainer: every train_dataset row needs a 'prompt' (text or chat messages)")
        validate_dataset(dataset, self.rewards)  # once: empty prompts, columns missing from some rows
        self.train_dataset = dataset
        self.prompts_per_process = self.args.completions_per_step // self.args.num_generations
        self.order = PromptOrder(
            len(dataset), self.prompts_per_process * self.dist.world, self.args.seed, self.args.shuffle_dataset
        )

    def _setup_logprobs(self) -> None:
        """The log-prob modules of the policy and the reference, and the one training goes through
        (the policy's, DDP-wrapped or FSDP2-sharded when several processes share the run)."""
        args = self.args
        if args.use_fused_lm_head:
            for model in filter(None, (self.model, self.ref_model)):
                problem = fused_head_problem(model)
                if problem:
                    raise ValueError(f"GRPOTrainer: use_fused_lm_head=True but {problem}; set use_fused_lm_head=False")
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        options = dict(temperature=args.temperature, fused_head=args.use_fused_lm_head, backend=self.backend)
        self.fused_loss, self.loss_path = loss_path(args.use_fused_lm_head, self.backend, self.device)
        self.objective = GrpoObjective.from_config(args)  # the loss options, once, whichever op runs
        options["share_prompt_prefix"] = args.share_prompt_prefix
        self.logprobs = CompletionLogprobs(self.model, **options)
        self.ref_logprobs = None if self.ref_model is None else CompletionLogprobs(self.ref_model, **options)
        # parameter names before sharding, to re-point an optimizer the caller built on them
        self._names_before_sharding = {id(p): name for name, p in self.model.named_parameters()}
        self.train_logprobs: nn.Module = distribute(self.logprobs, self.ref_logprobs, self.dist, fsdp=self.fsdp)
        self._release_ddp = None if self.train_logprobs is self.logprobs else release_ddp_at_exit(self)

    def _setup_sampler(self):
        from ..sampling.sampler import SteeringSampler

        if self.args.min_p:
            raise ValueError("GRPOTrainer: min_p is not supported by the SteeringSampler; leave it None")
        # under FSDP2 the sampler calls the model through the root, so its pre-forward hooks run
        model = RootForward(self.logprobs) if self.fsdp else self.model
        return SteeringSampler(
            model, self.processing_class, policy=self.args.pricing_policy, mode=self.args.steering_mode,
            backend=self.backend, cache=self.args.cache_implementation or "auto",
            cuda_graph=not self.fsdp,  # FSDP2's forward hooks stay out of a captured graph
        )

    def _total_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        batches = math.ceil(self.args.num_train_epochs * len(self.train_dataset) / self.order.prompts_per_batch)
        return max(1, batches) * self.args.num_iterations

    def _setup_optimizer(self, optimizer: Any, scheduler: Any) -> tuple[Any, Any]:
        if optimizer is None:
            optimizer = default_optimizer(self.model, self.args)
        elif self.fsdp:
            rebind_optimizer(optimizer, self._names_before_sharding, self.model)
        if scheduler is None:
            scheduler = default_scheduler(optimizer, self.args, self.max_steps)
        return optimizer, scheduler

    # -- the loop -------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """Train for ``max_steps`` optimizer steps (or ``num_train_epochs``).

        Parameters
        ----------
        resume_from_checkpoint : str or bool, optional
            A ``checkpoint-<step>`` folder, or True for the newest COMPLETE one in ``output_dir`` (newer
            incomplete folders are skipped with a warning saying why); ``metrics.jsonl`` loses the lines
            logged after its step, which are logged again. The model,
            optimizer, scheduler, step, pending rollout and RNG state are restored; generation seeds
            and data order depend on the step only, so the next step equals an uninterrupted run.

        Raises
        ------
        TrainingPreempted
            (a ``SystemExit`` with code 75) after SIGTERM, SIGINT or SIGUSR1, once the step in
            progress is done and saved (:mod:`~gtalign_fast.training.preemption`).
        """
        resumed = bool(resume_from_checkpoint)
        if resume_from_checkpoint:
            path = resume_from_checkpoint
            if path is True:
                skipped: list[tuple[str, str]] = []
                path = checkpoint.latest_checkpoint(self.args.output_dir, skipped)
                for bad, reason in skipped:
                    logger.warning("GRPOTrainer: skipping %s: incomplete checkpoint (%s)", bad, reason)
                if path is None:
                    raise FileNotFoundError(
                        f"GRPOTrainer: no complete checkpoint to resume from in {self.args.output_dir}"
                        + (f" (skipped: {skipped})" if skipped else "")
                    )
            self._load_checkpoint(path)
            if self.dist.is_main:  # the steps after the checkpoint are about to be logged again
                truncate_metrics(self.args.output_dir, self.step)
        sinks = MetricSinks(self.args.output_dir, self.args.report_to, enabled=self.dist.is_main,
                            purge_step=self.step + 1 if resumed else None)
        window, losses = MetricWindow(), []
        progress = progress_bar(self.max_steps, self.step, disable=self.args.disable_tqdm or not self.dist.is_main)
        self.callbacks("on_train_begin")
        self.preemption.install()  # stop signals: finish the step, save it, exit 75
        try:
            while self.step < self.max_steps and not self.callbacks.control.should_training_stop:
                self.callbacks("on_step_begin")
                self.preemption.step_begins()
                try:
                    metrics = self._training_step()
                except StepAbandoned as abandoned:  # grace period over: the checkpoint of the step before
                    self._preempted(str(abandoned), sinks, window, self.preemption.rng_at_step_start)
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
                if not last and (signal_name := self.preemption.agreed_signal()):  # one all-reduce
                    self._preempted(signal_name, sinks, window)
        finally:
            self.preemption.uninstall()
            progress.close()
            sinks.close()
        self.callbacks("on_train_end")
        finite = [x for x in losses if math.isfinite(x)]
        return TrainOutput(self.step, sum(finite) / len(finite) if finite else math.nan, {"global_step": self.step})

    def _training_step(self) -> dict[str, float]:
        """One optimizer step, top to bottom.

        Every ``num_iterations`` steps a new rollout: generate -> score -> advantages -> old / ref
        log-probs. Then for each micro-batch: log-probs + loss -> backward (DDP all-reduces on the
        last one); then clip, optimizer and scheduler. The logged numbers are gathered at the end.
        """
        args, dist, timer = self.args, self.dist, StageTimer(self.device)
        size, gen, reward_metrics = args.per_device_train_batch_size, None, None
        if self.rollout is None or self.step % args.num_iterations == 0:
            batch_index = self.step // args.num_iterations
            indices = self._process_indices(batch_index)
            rows = [self.train_dataset[i] for i in indices]
            prompts = [row["prompt"] for row in rows]
            self._prompt_rows = indices  # for error messages naming the dataset row
            with timer("generation"):
                gen = self._generate(prompts, batch_index)
            with timer("scoring"):
                scores = self._score(prompts, rows, completion_token_lists(gen))
                advantages, reward_metrics = self._advantages(scores)
            rollout = Rollout.from_generation(gen, advantages, mask_truncated=args.mask_truncated_completions)
            with timer("logp"):
                if args.num_iterations > 1:  # the generating policy: every iteration's ratio divides by it
                    rollout.old_logp = rollout_logprobs(self.logprobs, rollout, size, self._autocast)
                if self.ref_logprobs is not None:  # beta > 0: the KL term's reference
                    rollout.ref_logp = rollout_logprobs(self.ref_logprobs, rollout, size, self._autocast)
            self.rollout = rollout
        self.preemption.safe_point()  # past the grace period the step stops here or between micro-batches
        rollout = self.rollout
        parts = rollout.micro_batches(size)
        totals = UpdateTotals(self.device, len(parts))
        global_tokens = dist.sum(rollout.loss_mask.sum())  # "dapo" divides by the global batch's loss tokens
        self.model.train()
        with timer("update"):
            for k, part in enumerate(parts):
                if k:
                    self.preemption.safe_point()
                with self._no_sync(k < len(parts) - 1), self._autocast():
                    loss, loss_metrics, entropy = policy_loss(
                        self.train_logprobs, part, global_tokens, self.objective, fused=self.fused_loss,
                        backend=self.backend,
                    )
                    weight = loss_weight(args.loss_type, len(part), len(rollout), len(parts), dist.world)
                    (loss * weight).backward()
                totals.add(loss.detach() * weight, entropy, part.loss_mask, loss_metrics)
            # DDP averaged the gradients over processes: the loss it optimised is the mean of the weighted sums
            step_loss = dist.sum(totals.weighted_loss) / dist.world
            optimizer_metrics = self._optimizer_step(step_loss)
        return self._step_metrics(gen, reward_metrics, totals, step_loss, optimizer_metrics, timer)

    # -- the stages -----------------------------------------------------------------------------

    def _process_indices(self, batch_index: int) -> list[int]:
        """Dataset rows of this process's contiguous slice of the global generation batch."""
        indices = self.order.rows(batch_index)
        return indices[self.dist.rank * self.prompts_per_process : (self.dist.rank + 1) * self.prompts_per_process]

    def _process_rows(self, batch_index: int) -> list[dict]:
        """This process's contiguous slice of the global generation batch."""
        return [self.train_dataset[i] for i in self._process_indices(batch_index)]

    def _tokenize_prompts(self, prompts: list) -> list[list[int]]:
        rows = getattr(self, "_prompt_rows", None)
        rows = rows if rows is not None and len(rows) == len(prompts) else None
        return tokenize_prompts(self.processing_class, prompts, self.max_prompt_length, rows)

    def _generate(self, prompts: list, batch_index: int) -> Generation:
        """``num_generations`` completions per prompt through the SteeringSampler, prompt-major
        (each completion sampled from its own seed, see :func:`~gtalign_fast.training.rollout.generation_seeds`)."""
        g, n_local = self.args.num_generations, len(prompts) * self.args.num_generations
        seeds = generation_seeds(self.args.seed, batch_index, self.dist.rank * n_local, n_local)
        was_training = self.model.training
        self.model.eval()
        try:
            with self._gathered_for_generation(), self._autocast():
                out = self.sampler.generate(
                    self._tokenize_prompts(prompts), max_new_tokens=self.args.max_completion_length,
                    temperature=self.args.temperature, top_k=self.args.top_k, top_p=self.args.top_p,
                    num_return_sequences=g, seed=seeds, slots=self.args.max_num_seqs,
                )
        finally:
            self.model.train(was_training)
        return generation_from_sampler(out, self._pad_id(), self.device)

    def _pad_id(self) -> int:
        tokenizer = self.processing_class
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _score(self, prompts: list, rows: list[dict], completion_ids: list[list[int]]) -> RewardScores:
        """Call the reward functions on this process's completions (TRL's arguments)."""
        return score_completions(
            self.rewards, self.processing_class, prompts, rows, completion_ids, self.args.num_generations, self.device,
            step=self.step + 1,  # the step being made, as it will be logged
        )

    def _advantages(self, scores: RewardScores) -> tuple[torch.Tensor, dict[str, float]]:
        """This process's advantages (computed over the GLOBAL batch) and the reward metrics."""
        args = self.args
        return batch_advantages(
            scores, self.rewards, self.dist, group_size=args.num_generations, alpha=args.alpha,
            scale=args.scale_rewards, eps=args.advantage_eps, backend=self.backend,
            max_judge_failure_rate=args.max_judge_failure_rate,
        )

    def _optimizer_step(self, loss: torch.Tensor) -> dict[str, float]:
        """Clip, step, schedule; skip the step when the loss or the gradient norm is not finite."""
        grad_norm = clip_gradients((p for p in self.model.parameters() if p.requires_grad), self.args.max_grad_norm)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        out = {"grad_norm": float(grad_norm), "learning_rate": self.lr_scheduler.get_last_lr()[0]}
        if finite:
            self.optimizer.step()
            self.lr_scheduler.step()
            self.nan_streak = 0
        else:
            self.nan_streak += 1
            logger.warning(
                "step %d: non-finite loss or gradient norm, step skipped (%d in a row)", self.step, self.nan_streak
            )
        out["nan_skipped"] = 0.0 if finite else 1.0
        self.optimizer.zero_grad(set_to_none=True)
        if self.nan_streak >= self.args.max_consecutive_nan_steps:
            raise RuntimeError(
                f"GRPOTrainer: {self.nan_streak} consecutive steps with a non-finite loss or gradient norm "
                f"(max_consecutive_nan_steps={self.args.max_consecutive_nan_steps}); stopping"
            )
        return out

    def _no_sync(self, skip_sync: bool):
        if skip_sync and hasattr(self.train_logprobs, "no_sync"):
            return self.train_logprobs.no_sync()  # gradient accumulation: all-reduce once, on the last micro-batch
        return contextlib.nullcontext()

    def _gathered_for_generation(self):
        # FSDP2: one all-gather per rollout, and decoding without collectives (processes may stop at
        # different steps); all-gathering each layer per decoded token would also need lock-step decoding
        return fsdp_gathered(self.logprobs) if self.fsdp else contextlib.nullcontext()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # -- metrics and logging --------------------------------------------------------------------

    def _step_metrics(
        self, gen: Generation | None, reward_metrics: dict | None, totals: UpdateTotals, loss: torch.Tensor,
        optimizer_metrics: dict[str, float], timer: StageTimer,
    ) -> dict[str, float]:
        """Every number one step logs, reduced over processes here: the rollout's (generation and
        scoring, only on the step that made it), the update's, times, throughputs and peak memory."""
        dist, rollout, seconds = self.dist, self.rollout, timer.seconds
        metrics: dict[str, float] = {}
        if gen is not None:
            completions, generated_tokens = completion_metrics(gen, dist)
            metrics.update({
                **reward_metrics, **completions,
                "time/generation": seconds["generation"],
                "time/scoring": seconds["scoring"] + seconds["logp"],
                "tokens_per_second/generation": generated_tokens / max(seconds["generation"], 1e-9),
                "epoch": self.order.epoch(self.step // self.args.num_iterations),
            })
        # Bad indices / rewards the kernels flagged this step (no host sync inside the ops): read here,
        # once per step, where the loss below synchronises anyway.
        check_device_errors(self.device)
        loss_tokens = dist.sum(rollout.loss_mask.sum().float())
        trained_tokens = dist.sum(rollout.completion_mask.sum() + rollout.prompt_mask.sum())
        metrics.update({
            "loss": float(loss), **optimizer_metrics,
            "entropy": float(dist.sum(totals.entropy_sum) / loss_tokens.clamp(min=1)),  # over the tokens trained on
            **{k: float(dist.mean(v)) for k, v in totals.op_metrics.items()},
            "time/update": seconds["update"],
            "tokens_per_second/training": float(trained_tokens) / max(seconds["update"], 1e-9),
            "memory/peak_gib": float(dist.max(torch.tensor(peak_memory_gib(self.device)))),
        })
        return metrics

    def _log(self, sinks: MetricSinks, metrics: dict[str, float]) -> None:
        metrics = {"step": self.step, **metrics}
        sinks.write(self.step, {k: v for k, v in metrics.items() if k != "step"})
        self.callbacks.state.log_history.append(metrics)
        self.callbacks("on_log", logs=metrics)

    # -- saving and resuming --------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None) -> None:
        """Write the model (``save_pretrained``) and the tokenizer to ``output_dir`` (rank 0 only)."""
        output_dir = output_dir or self.args.output_dir
        state = checkpoint.full_model_state(self.model) if self.fsdp else None  # FSDP2: a collective, full tensors
        if self.dist.is_main:
            self._write_model(output_dir, state)
        self.dist.barrier()

    def _write_model(self, output_dir: str, state: dict | None) -> None:
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir, state_dict=state)
        if hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(output_dir)

    def _save_checkpoint(self, rng: dict | None = None) -> str:
        """Write ``checkpoint-<step>``: everything goes to ``tmp-checkpoint-<step>``, renamed once complete,
        so a crash mid-save leaves no ``checkpoint-<step>`` for resume or rotation to trust. A failed
        write raises :class:`~gtalign_fast.training.checkpoint.CheckpointSaveError` on every process.
        ``rng``: the RNG state to save instead of the current one (a step abandoned half-way)."""
        path = checkpoint.folder(self.args.output_dir, self.step)
        temporary = checkpoint.temporary_folder(self.args.output_dir, self.step)
        if self.dist.is_main:
            checkpoint.remove_temporary_folders(self.args.output_dir)  # what earlier crashed saves left
        self.dist.barrier()
        attempt = checkpoint.SaveAttempt(temporary, path)  # rank 0's writes; the collectives run regardless
        model_state = checkpoint.full_model_state(self.model) if self.fsdp else None  # FSDP2: a collective
        if self.dist.is_main:
            attempt.run(self._write_model, temporary, model_state)
        del model_state
        # a rollout that later steps will reuse (num_iterations > 1) must survive the restart
        pending = self.rollout if self.args.num_iterations > 1 else None
        optimizer = checkpoint.optimizer_state(self.model, self.optimizer, self.fsdp)  # FSDP2: a collective
        if self.dist.is_main:  # one copy
            state = {
                "step": self.step,
                "nan_streak": self.nan_streak,
                "optimizer": optimizer,
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "rollout": None if pending is None else pending.state_dict(),
                **(rng or checkpoint.rng_state()),
            }
            summary = {"global_step": self.step, "max_steps": self.max_steps, "config": self.args.to_dict()}
            attempt.run(checkpoint.write_trainer_state, temporary, state, summary)
            attempt.run(checkpoint.publish, temporary, path)
            attempt.run(checkpoint.rotate_checkpoints, self.args.output_dir, self.args.save_total_limit, path)
        attempt.raise_if_failed(self.dist)  # every process: one all-reduce, which is also the barrier
        self._saved_step = self.step
        self.callbacks("on_save", checkpoint=path)
        return path

    def _preempted(self, signal_name: str, sinks: MetricSinks, window: MetricWindow, rng: dict | None = None):
        """A stop signal: log the steps not logged yet, save the last completed step (unless just
        saved), say why, and raise :class:`~gtalign_fast.training.preemption.TrainingPreempted` (exit code 75)."""
        if window.sums:
            self._log(sinks, window.flush())
        path = checkpoint.folder(self.args.output_dir, self.step)
        if self._saved_step != self.step:
            path = self._save_checkpoint(rng=rng)
        stopped = TrainingPreempted(self.step, path, signal_name)
        logger.warning("GRPOTrainer: %s; resume with train(resume_from_checkpoint=True)", stopped)
        raise stopped

    def _load_checkpoint(self, path: str) -> None:
        reason = checkpoint.why_incomplete(path)
        if reason is not None:
            raise FileNotFoundError(f"GRPOTrainer: cannot resume from {path}: not a complete checkpoint ({reason})")
        state = checkpoint.read_trainer_state(path, self.device)
        checkpoint.load_model_weights(self.model, path, fsdp=self.fsdp)
        checkpoint.load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.fsdp)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step, self.nan_streak = int(state["step"]), int(state["nan_streak"])
        self.rollout = Rollout.from_state_dict(state["rollout"], self.device) if state["rollout"] else None
        checkpoint.restore_rng_state(state)
        logger.info("GRPOTrainer: resumed from %s at step %d", path, self.step)
