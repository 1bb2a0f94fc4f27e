"""How several processes share a GRPO run: the process group, DDP wrapping and FSDP2 sharding.

:class:`Dist` is the process group as the trainer sees it (rank, world size, device and the few
collectives it needs; the identity with one process). :func:`distribute` wraps the log-prob
module for training (DDP) or shards it (FSDP2, :func:`fsdp_shard`); :func:`fsdp_gathered` holds the
whole model unsharded while generating; :func:`rebind_optimizer` re-points a user optimizer at the
sharded parameters; :class:`RootForward` is the model the sampler calls under FSDP2.
"""

from __future__ import annotations

import atexit
import gc
import os
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from .logprobs import CompletionLogprobs

__all__ = [
    "Dist", "distribute", "release_ddp_at_exit", "fsdp_shard", "fsdp_gathered", "rebind_optimizer", "RootForward",
    "is_dtensor", "full_value",
]


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


def distribute(
    policy: CompletionLogprobs, reference: CompletionLogprobs | None, group: Dist, *, fsdp: bool
) -> nn.Module:
    """Prepare the log-prob modules for several processes; returns the module to train through.

    FSDP2: both modules are sharded (each becomes an FSDP2 root) and the policy is trained as is.
    DDP with more than one process: the policy is wrapped whole, fused LM head included, so its
    gradients are all-reduced. One process: the policy itself.
    """
    if fsdp:
        for module in filter(None, (policy, reference)):
            fsdp_shard(module, group.device, group.world)
        return policy
    if group.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [group.device] if group.device.type == "cuda" else None
        return DistributedDataParallel(policy, device_ids=device_ids)
    return policy


def release_ddp_at_exit(trainer: Any) -> Callable[[], None]:
    """Free ``trainer.train_logprobs``, a DDP wrapper, before the interpreter finalises; returns the hook.

    Why: a DDP wrapper that has run a backward holds its last gloo all-reduce. Alive when Python
    finalises, it is freed there; the process group's worker thread then destroys that work, whose
    saved thread-local state holds a Python object, and asks for the GIL to release it. Python ends
    a thread that asks for the GIL while finalising (``pthread_exit``), the unwind meets a
    ``noexcept`` frame and the process aborts: "terminate called without an active exception",
    exit status 134 (gdb: ``AsyncAllreduceWork::~AsyncAllreduceWork`` -> ``take_gil`` ->
    ``PyThread_exit_thread``). Seen with torch 2.13 CPU in 2 of 15 two-process runs of a trainer
    script, 0 of 15 with this hook. An ``atexit`` hook runs while the interpreter still works: it
    puts the plain policy back and collects the wrapper then. The trainer is held weakly, so the
    hook keeps nothing alive.
    """
    owner = weakref.ref(trainer)

    def release() -> None:
        trainer = owner()
        if trainer is not None and trainer.train_logprobs is not trainer.logprobs:
            trainer.train_logprobs = trainer.logprobs
            gc.collect()  # the wrapper sits in reference cycles: free it now, not at finalisation

    atexit.register(release)
    return release


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


def fsdp_shard(module: CompletionLogprobs, device: torch.device, world: int) -> None:
    """Shard ``module`` with FSDP2: each decoder layer is its own unit, the log-prob module is the root.

    The root owns what no layer owns: embeddings, final norm and the LM head. Making the log-prob
    module the root (not the causal LM) puts the fused log-prob computation inside the root's
    forward, so the LM head has been all-gathered when ``linear_token_logprobs`` reads it;
    generation reaches the model through :meth:`CompletionLogprobs.lm_forward`, registered as a
    forward method of the root.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    layers = getattr(module.model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            "GRPOTrainer: distributed_strategy='fsdp2' shards each decoder layer, found at "
            "model.base_model.layers (an nn.ModuleList); this model has none"
        )
    mesh = init_device_mesh(device.type, (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    register_fsdp_forward_method(module, "lm_forward")


class RootForward(nn.Module):
    """What the sampler calls as "the model" under FSDP2: the causal LM's forward, through the FSDP
    root (``root.lm_forward``). The root is held, not registered, so nothing is counted twice."""

    def __init__(self, root: CompletionLogprobs) -> None:
        super().__init__()
        object.__setattr__(self, "root", root)
        self.config = root.model.config

    def parameters(self, recurse: bool = True):
        return self.root.parameters(recurse)

    def forward(self, **kwargs: Any) -> Any:
        return self.root.lm_forward(**kwargs)


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
