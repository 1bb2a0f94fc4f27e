"""Helpers of :mod:`gtalign_fast.trainer`, kept out of the training loop so that it reads in one sitting.

What lives here: the process group (:class:`Dist`), the prompt order (:class:`PromptOrder`), the
rollout of one step (:class:`Rollout`), the module that turns (prompt, completion) ids into
per-token log-probs (:class:`CompletionScorer`), plain KV-cache decoding through ``ops.sample_``
(:func:`generate_plain`), reward-function calls (:func:`call_reward_funcs`), the learning-rate
schedule, the metric sinks (JSONL, TensorBoard, tqdm) and checkpoint file helpers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import ops

logger = logging.getLogger("gtalign_fast.trainer")

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Processes


class Dist:
    """The process group as the trainer sees it: rank, world size, device and the few collectives
    it needs. With one process every collective is the identity, so the loop has no branches."""

    def __init__(self, use_cpu: bool = False) -> None:
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # torchrun sets WORLD_SIZE / RANK / MASTER_ADDR: join the group it describes
            backend = "nccl" if torch.cuda.is_available() and not use_cpu else "gloo"
            dist.init_process_group(backend=backend)
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1
        if torch.cuda.is_available() and not use_cpu:
            local_rank = int(os.environ.get("LOCAL_RANK", self.rank % max(torch.cuda.device_count(), 1)))
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.enabled and dist.get_backend() == "nccl" and self.device.type != "cuda":
            raise ValueError("GRPOTrainer: the NCCL process group needs CUDA tensors; use gloo with use_cpu=True")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes (a new tensor on this process's device: NCCL reduces CUDA tensors only)."""
        return self._reduce(tensor, dist.ReduceOp.SUM if self.enabled else None)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.MAX if self.enabled else None)

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        tensor = tensor.detach().to(self.device, copy=True)
        if op is not None:
            dist.all_reduce(tensor, op=op)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.sum(tensor) / self.world

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's ``[n, ...]`` rows in rank order (n is the same everywhere)."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def own_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's slice of rows gathered with :meth:`gather_rows`."""
        n = tensor.shape[0] // self.world
        return tensor[self.rank * n : (self.rank + 1) * n]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


# ---------------------------------------------------------------------------------------------
# Data order


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
        Tokens that enter the loss: ``completion_mask``, zeroed for truncated completions when
        ``mask_truncated_completions`` is on.
    advantages : Tensor ``[N]`` float32
    old_logp, ref_logp : Tensor ``[N, C]`` float32 or None
        Log-probs under the policy that generated (only when ``num_iterations > 1``) and under the
        reference model (only when ``beta > 0``).
    metrics : dict
        What generation and scoring measured (logged with the step that uses the rollout first).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

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
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        return cls(**moved)


# ---------------------------------------------------------------------------------------------
# Per-token log-probs of completions


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


class CompletionScorer(nn.Module):
    """Log-probs (and entropies) of the completion tokens under ``model`` at ``temperature``.

    One module so that :class:`~torch.nn.parallel.DistributedDataParallel` can wrap the whole
    forward, fused LM head included (calling the base model directly would bypass DDP's hooks).

    With ``fused_head`` the last hidden state goes through ``ops.linear_token_logprobs`` with the
    output embedding's weight and bias: the ``[tokens, vocabulary]`` logits never exist. Without it
    the model computes logits for the last ``C + 1`` positions only (``logits_to_keep``) and
    ``ops.token_logprobs`` reads their ``[:, :-1]`` slice in place.
    """

    def __init__(self, model: nn.Module, *, temperature: float, fused_head: bool, backend: str | None) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.fused_head = fused_head
        self.backend = backend

    def forward(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
        completion_mask: torch.Tensor, with_entropy: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``logp`` and ``entropy`` ``[N, C]`` float32 (0 where ``completion_mask`` is 0)."""
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        # explicit positions: left padding must not shift them (generation counts them the same way)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        targets = completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
        n_completion = completion_ids.shape[1]
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if self.fused_head:
            return self._fused(inputs, targets, n_completion, with_entropy)
        logits = self.model(**inputs, logits_to_keep=n_completion + 1).logits  # [N, C + 1, V]
        result = ops.token_logprobs(
            logits[:, :-1], targets, temperature=self.temperature, with_entropy=with_entropy, backend=self.backend
        )
        return result if with_entropy else (result, None)

    def _fused(self, inputs: dict, targets: torch.Tensor, n_completion: int, with_entropy: bool):
        hidden = self.model.base_model(**inputs).last_hidden_state  # [N, P + C, H]
        # position t predicts token t + 1: the completion is predicted by the C positions before its end
        hidden = hidden[:, -(n_completion + 1) : -1].reshape(-1, hidden.shape[-1])
        head = self.model.get_output_embeddings()
        if is_dtensor(head.weight):  # the known ZeRO-3 / FSDP bug: a fused loss that reads a head shard
            raise RuntimeError(
                "CompletionScorer: the LM head weight is still sharded (a DTensor); under FSDP2 the scorer must "
                "be the fully_shard root and be called as a module, so that its pre-forward all-gathers the head"
            )
        # custom ops sit outside autocast: cast the head as autocast would cast a Linear
        weight = head.weight.to(hidden.dtype)
        bias = head.bias.to(hidden.dtype) if getattr(head, "bias", None) is not None else None
        result = ops.linear_token_logprobs(
            hidden, weight, targets.reshape(-1), bias=bias, temperature=self.temperature,
            with_entropy=with_entropy, backend=self.backend,
        )
        # copies, not views: FSDP2's pre-backward hook on a module output is lost by in-place ops on a view
        if with_entropy:
            logp, entropy = result
            return logp.reshape(targets.shape).clone(), entropy.reshape(targets.shape).clone()
        return result.reshape(targets.shape).clone(), None


    def lm_forward(self, **kwargs: Any) -> Any:
        """The wrapped model's own forward (generation). Registered as an FSDP forward method when
        the scorer is the FSDP2 root, so FSDP's pre-forward runs before the model reads its weights."""
        return self.model(**kwargs)


# ---------------------------------------------------------------------------------------------
# FSDP2


def is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. the gradient norm over FSDP2 shards); other tensors unchanged."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def fsdp_shard(scorer: CompletionScorer, device: torch.device, world: int) -> None:
    """Shard ``scorer`` with FSDP2: each decoder layer is its own unit, the scorer is the root.

    The root owns what no layer owns: embeddings, final norm and the LM head. Making the SCORER the
    root (not the causal LM) puts the fused log-prob computation inside the root's forward, so the
    LM head has been all-gathered when ``linear_token_logprobs`` reads it; generation reaches the
    model through :meth:`CompletionScorer.lm_forward`, registered as a forward method of the root.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    layers = getattr(scorer.model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            "GRPOTrainer: distributed_strategy='fsdp2' shards each decoder layer, found at "
            "model.base_model.layers (an nn.ModuleList); this model has none"
        )
    mesh = init_device_mesh(device.type, (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(scorer, mesh=mesh)
    register_fsdp_forward_method(scorer, "lm_forward")


class RootForward(nn.Module):
    """What the sampler calls as "the model" under FSDP2: the causal LM's forward, through the FSDP
    root (``scorer.lm_forward``). The scorer is held, not registered, so nothing is counted twice."""

    def __init__(self, scorer: CompletionScorer) -> None:
        super().__init__()
        object.__setattr__(self, "scorer", scorer)
        self.config = scorer.model.config

    def parameters(self, recurse: bool = True):
        return self.scorer.parameters(recurse)

    def forward(self, **kwargs: Any) -> Any:
        return self.scorer.lm_forward(**kwargs)


@contextmanager
def fsdp_gathered(root: nn.Module):
    """Every FSDP2 unit under ``root`` unsharded for the block (one all-gather of the whole model),
    and kept so through each forward: the block runs without collectives, so processes may run
    different numbers of forwards (generation stops when THIS process's rows are done). The full
    parameters must fit one device while the block runs (as TRL's ``ds3_gather_for_generation``)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    root.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        root.set_reshard_after_forward(True)  # layers: free after forward, all-gather again in backward
        root.set_reshard_after_forward(False, recurse=False)  # the root keeps its own (FSDP2's root default)


def rebind_optimizer(optimizer: torch.optim.Optimizer, names_before: dict[int, str], model: nn.Module) -> None:
    """Point an optimizer built on the unsharded model at the FSDP2 parameters (same names).

    ``fully_shard`` registers new (DTensor) parameters, so a user optimizer made beforehand would
    update tensors the model no longer uses."""
    if optimizer.state:
        raise ValueError("GRPOTrainer: distributed_strategy='fsdp2' needs an optimizer without state yet")
    after = dict(model.named_parameters())
    for group in optimizer.param_groups:
        try:
            group["params"] = [after[names_before[id(p)]] for p in group["params"]]
        except KeyError as error:
            raise ValueError(
                "GRPOTrainer: the optimizer holds a tensor that is not a parameter of the model; "
                "distributed_strategy='fsdp2' can only re-point optimizers built on model.parameters()"
            ) from error


# ---------------------------------------------------------------------------------------------
# Generation


def row_seeds(seed: int, batch_index: int, first_row: int, n_rows: int) -> list[int]:
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


# ---------------------------------------------------------------------------------------------
# Rewards


def reward_name(func: Any) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


def is_welfare_reward(func: Any) -> bool:
    """Whether the reward's U and L feed the Cobb-Douglas welfare op directly.

    True for :class:`~gtalign_fast.game.GTAlignReward` with a Cobb-Douglas variant and no per-source
    normalisation (its scalar is then exactly ``U^alpha L^(1-alpha)``), and for any callable that
    declares ``welfare_reward = True`` and returns an object with ``.user`` and ``.llm`` lists.
    Other variants are used through their scalar.
    """
    if getattr(func, "welfare_reward", False):
        return True
    try:
        from .game.reward import GTAlignReward
    except ImportError:  # the game module is optional for plain float rewards
        return False
    return (
        isinstance(func, GTAlignReward)
        and getattr(func, "variant", "cobb") in ("cobb", "pareto")
        and getattr(func, "normalize", "none") == "none"
    )


def _as_floats(values: Any, n: int) -> list[float]:
    values = list(values)
    if len(values) != n:
        raise ValueError(f"returned {len(values)} values for {n} completions")
    return [math.nan if v is None else float(v) for v in values]


@dataclass
class RewardScores:
    """Rewards of one batch on this process.

    per_func : ``[N, F]`` float32, NaN where a function returned None or failed.
    user, llm : ``[N]`` float32 or None, U and L of the first welfare reward function.
    failures : completions each function could not score (None or an exception), by name.
    extra : batch means of the welfare reward's logged fields (``RewardBatch.metrics()``).
    """

    per_func: torch.Tensor
    user: torch.Tensor | None
    llm: torch.Tensor | None
    failures: dict[str, int]
    extra: dict[str, float]


def call_reward_funcs(
    funcs: Sequence[Callable], welfare_flags: Sequence[bool], *, prompts: list, completions: list,
    completion_ids: list[list[int]], columns: dict[str, list], device: torch.device,
) -> RewardScores:
    """Call every reward function with TRL's keyword arguments; never raises for a reward failure.

    A function that raises, or returns the wrong number of values, scores NaN for the whole batch
    (logged with its traceback once per function name); None means "cannot score this one" and
    also becomes NaN, which the advantage op excludes (advantage 0).
    """
    n = len(completions)
    per_func = torch.full((n, len(funcs)), math.nan, dtype=torch.float32)
    user = llm = None
    failures: dict[str, int] = {}
    extra: dict[str, float] = {}
    for j, (func, welfare) in enumerate(zip(funcs, welfare_flags)):
        name = reward_name(func)
        try:
            out = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            per_func[:, j] = torch.tensor(_as_floats(out, n))
            if welfare and user is None:
                user = torch.tensor(_as_floats(out.user, n))
                llm = torch.tensor(_as_floats(out.llm, n))
                if hasattr(out, "metrics"):
                    extra = {f"welfare/{k}": float(v) for k, v in out.metrics().items()}
        except Exception as error:  # a reward failure must never stop training
            _warn_once(f"reward:{name}", f"reward function {name!r} failed on a batch of {n} ({error!r}); "
                       f"scored as missing (NaN -> advantage 0)\n{traceback.format_exc()}")
            per_func[:, j] = math.nan
            if welfare and user is None:
                user = torch.full((n,), math.nan)
                llm = torch.full((n,), math.nan)
        failures[name] = int(per_func[:, j].isnan().sum())
    def to_device(t):
        return None if t is None else t.to(device)

    return RewardScores(to_device(per_func), to_device(user), to_device(llm), failures, extra)


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        logger.warning(message.splitlines()[0])
    else:
        _warned.add(key)
        logger.warning(message)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule


SCHEDULERS = ("linear", "constant", "constant_with_warmup", "cosine")


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the learning rate at optimizer step ``s`` (transformers' schedules)."""

    def schedule(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if kind == "constant_with_warmup":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine

    return schedule


# ---------------------------------------------------------------------------------------------
# Metrics


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricSinks:
    """Where logged metrics go: ``metrics.jsonl`` in ``output_dir``, TensorBoard when asked for and
    installed, the progress bar's postfix. Only the main process writes."""

    def __init__(self, output_dir: str, report_to: Sequence[str], enabled: bool) -> None:
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
                self.tensorboard = SummaryWriter(os.path.join(output_dir, "runs"))

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


class Timer:
    """Wall time of a block, synchronised with the device so GPU work is counted where it runs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------------------------------------
# Checkpoint files


CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.pt"


def latest_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-<step>`` folder with the largest step in ``output_dir``, or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = [
        int(m.group(1)) for name in os.listdir(output_dir)
        if (m := re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name))
        and os.path.isfile(os.path.join(output_dir, name, TRAINER_STATE))
    ]
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{max(steps)}") if steps else None


def rotate_checkpoints(output_dir: str, keep: int | None) -> None:
    """Delete the oldest checkpoints beyond ``keep`` (``save_total_limit``)."""
    if not keep:
        return
    found = sorted(
        (int(m.group(1)), name) for name in os.listdir(output_dir)
        if (m := re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name))
    )
    import shutil

    for _, name in found[:-keep]:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def load_model_weights(model: nn.Module, directory: str, fsdp: bool = False) -> None:
    """Load the weights ``save_pretrained`` wrote into ``model`` in place (exactly, no dtype change).

    Keys missing from the files must be tied to a loaded tensor (``save_pretrained`` writes a tied
    LM head once); anything else missing or unexpected is an error. With ``fsdp`` every process
    reads the full tensors and keeps its shards (``set_model_state_dict``).
    """
    state = read_model_weights(directory)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        result = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"GRPOTrainer: checkpoint {directory} has unexpected weights {result.unexpected_keys[:5]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[name]) for name in state if name in params}
    untied = [k for k in result.missing_keys if k not in params or id(params[k]) not in loaded]
    if untied:
        raise RuntimeError(f"GRPOTrainer: checkpoint {directory} lacks weights {untied[:5]}")


def read_model_weights(directory: str) -> dict[str, torch.Tensor]:
    """The full state ``save_pretrained`` wrote to ``directory`` (single or sharded safetensors)."""
    from safetensors.torch import load_file

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        state = load_file(single)
    elif os.path.isfile(index):
        with open(index) as handle:
            shard_names = sorted(set(json.load(handle)["weight_map"].values()))
        state = {}
        for name in shard_names:
            state.update(load_file(os.path.join(directory, name)))
    else:
        raise FileNotFoundError(f"GRPOTrainer: no model.safetensors(.index.json) in {directory}")
    return state
