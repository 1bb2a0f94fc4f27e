"""Checkpoints of a GRPO run: the ``checkpoint-<step>`` folders, what they hold, and how to read them back.

Write protocol: every file goes to ``tmp-checkpoint-<step>`` first, and the folder is renamed to
``checkpoint-<step>`` only once complete (:func:`publish`), so a crash mid-save never leaves a
``checkpoint-<step>`` behind. Resuming with ``resume_from_checkpoint=True`` takes the newest
*complete* checkpoint (:func:`latest_checkpoint`, :func:`why_incomplete`); rotation never deletes
the checkpoint just written nor counts incomplete folders (:func:`rotate_checkpoints`).

A checkpoint folder holds the model (``save_pretrained``: safetensors, full tensors even under
FSDP2), the tokenizer, ``trainer_state.pt`` (step, NaN streak, optimizer, scheduler, a pending
rollout, RNG states) and a readable ``trainer_state.json``. Only rank 0 writes; under FSDP2 the full
model and optimizer states are gathered to it first, and every process re-shards them on load.

A failed write (disk full, quota, file-size limit, permission) raises one :class:`CheckpointSaveError`
on every process, naming the checkpoint, the file and the cause (:class:`SaveAttempt`); the partial
``tmp-checkpoint-<step>`` folder is removed (or, when it cannot be, left under its ``tmp-`` name,
which resume and rotation never take for a checkpoint), and earlier checkpoints are untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "CHECKPOINT_PREFIX", "TRAINER_STATE", "CheckpointSaveError", "SaveAttempt", "folder", "temporary_folder",
    "why_incomplete", "latest_checkpoint",
    "publish", "remove_temporary_folders", "rotate_checkpoints",
    "write_trainer_state", "read_trainer_state", "rng_state", "restore_rng_state", "full_model_state",
    "optimizer_state", "load_optimizer_state", "load_model_weights", "read_model_weights",
]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.pt"
TRAINER_SUMMARY = "trainer_state.json"
TMP_PREFIX = "tmp-"


# ---------------------------------------------------------------------------------------------
# Folders


def folder(output_dir: str, step: int) -> str:
    """The folder of the checkpoint written after optimizer step ``step``."""
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")


def temporary_folder(output_dir: str, step: int) -> str:
    """Where checkpoint ``step`` is written before it is renamed to :func:`folder` (not a checkpoint name)."""
    return os.path.join(output_dir, f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step}")


def _steps(output_dir: str) -> list[int]:
    """The steps of the ``checkpoint-<step>`` folders in ``output_dir``, newest first."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(
        (int(m.group(1)) for name in os.listdir(output_dir) if (m := re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name))),
        reverse=True,
    )


def why_incomplete(path: str) -> str | None:
    """Why ``path`` is not a complete checkpoint (a missing or unreadable file), or None when it is.

    A checkpoint written by :func:`publish` is complete by construction (it appears only once every
    file is written); this also catches folders left by a crash in code that wrote in place.
    ``trainer_state.json`` is written last and must name the folder's step.
    """
    if not os.path.isdir(path):
        return "not a folder"
    summary_file = os.path.join(path, TRAINER_SUMMARY)
    for name in (TRAINER_STATE, TRAINER_SUMMARY):
        if not os.path.isfile(os.path.join(path, name)):
            return f"no {name} (the save did not finish)"
    try:
        with open(summary_file) as handle:
            summary = json.load(handle)
    except (OSError, ValueError) as error:
        return f"{TRAINER_SUMMARY} is unreadable ({error})"
    m = re.search(rf"{CHECKPOINT_PREFIX}(\d+)$", os.path.normpath(path))
    if m and summary.get("global_step") != int(m.group(1)):
        return f"{TRAINER_SUMMARY} says step {summary.get('global_step')}, not {m.group(1)}"
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return None
    if not os.path.isfile(index):
        return "no model.safetensors(.index.json)"
    try:
        with open(index) as handle:
            shards = set(json.load(handle)["weight_map"].values())
    except (OSError, ValueError, KeyError) as error:
        return f"model.safetensors.index.json is unreadable ({error})"
    missing = sorted(name for name in shards if not os.path.isfile(os.path.join(path, name)))
    return f"missing weight shards {missing[:3]}" if missing else None


def latest_checkpoint(output_dir: str, skipped: list[tuple[str, str]] | None = None) -> str | None:
    """The complete ``checkpoint-<step>`` folder with the largest step in ``output_dir``, or None.

    Newer folders that are not complete (:func:`why_incomplete`) are passed over; each is appended
    to ``skipped`` as ``(path, reason)`` when a list is given.
    """
    for step in _steps(output_dir):
        path = folder(output_dir, step)
        reason = why_incomplete(path)
        if reason is None:
            return path
        if skipped is not None:
            skipped.append((path, reason))
    return None


def publish(temporary: str, path: str) -> None:
    """Make the fully written ``temporary`` folder the checkpoint ``path`` (one rename; an older
    folder of the same name is moved aside first and deleted after)."""
    stale = None
    if os.path.exists(path):
        stale = f"{temporary}.old"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(path, stale)
    os.replace(temporary, path)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def remove_temporary_folders(output_dir: str) -> None:
    """Delete what crashed saves left behind (``tmp-checkpoint-*`` folders)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(f"{TMP_PREFIX}{CHECKPOINT_PREFIX}"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def rotate_checkpoints(output_dir: str, keep: int | None, newest: str | None = None) -> list[str]:
    """Delete checkpoints beyond ``keep`` (``save_total_limit``); returns the deleted folders.

    Kept: ``newest`` (the checkpoint just written) and the complete checkpoints with the largest
    steps, ``keep`` in all. Incomplete folders are deleted (nothing can resume from them), so a
    crashed save never pushes a readable checkpoint out.
    """
    if not keep:
        return []
    newest = os.path.normpath(newest) if newest else None
    complete, incomplete = [], []
    for step in _steps(output_dir):
        path = folder(output_dir, step)
        (complete if why_incomplete(path) is None else incomplete).append(path)
    kept = [p for p in complete if os.path.normpath(p) == newest]
    kept += [p for p in complete if p not in kept][: max(0, keep - len(kept))]
    deleted = [p for p in complete + incomplete if p not in kept]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    return deleted


# ---------------------------------------------------------------------------------------------
# The trainer's state


def write_trainer_state(path: str, state: dict, summary: dict) -> None:
    """``state`` to ``trainer_state.pt``, then a readable ``summary`` to ``trainer_state.json`` (the
    last file of a checkpoint: :func:`why_incomplete` looks for it)."""
    # through a Python file: a failed write then carries its OSError (errno), which torch.save's own
    # writer loses ("unexpected pos 70016 vs 69908")
    with _naming(os.path.join(path, TRAINER_STATE)) as file, open(file, "wb") as handle:
        torch.save(state, handle)
    with _naming(os.path.join(path, TRAINER_SUMMARY)) as file, open(file, "w") as handle:
        json.dump(summary, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def _naming(file: str):
    """Tag an exception raised while writing ``file`` with its name (a failed ``write`` does not say)."""
    try:
        yield file
    except Exception as error:
        error.checkpoint_file = file
        raise


def read_trainer_state(path: str, device: torch.device) -> dict:
    state_file = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"GRPOTrainer: {path} is not a checkpoint (no {TRAINER_STATE})")
    return torch.load(state_file, map_location=device, weights_only=True)


def rng_state() -> dict:
    """The CPU and CUDA generators' states (for a resumed run to draw what the uninterrupted one did)."""
    return {
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["rng_cpu"].cpu())
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])


# ---------------------------------------------------------------------------------------------
# Model and optimizer states (full tensors under FSDP2)


def full_model_state(model: nn.Module) -> dict:
    """FSDP2: the full model state on rank 0's CPU (empty elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    """The optimizer state to save. DDP keeps it identical on every process; FSDP2 gathers the
    shards into full tensors on rank 0's CPU (a collective: every process must call it)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict, fsdp: bool) -> None:
    """Load a saved optimizer state; under FSDP2 every process reads the full state and keeps its shards."""
    if not fsdp:
        optimizer.load_state_dict(saved)
        return
    if not saved["state"]:  # no tensors to shard (SGD without momentum): the hyper-parameters only
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


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


# ---------------------------------------------------------------------------------------------
# Failed saves


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed: ``checkpoint`` (the folder it was to become), ``file`` (the one
    being written) and ``cause`` (``ENOSPC``, ``EFBIG``, ``EACCES``, ... and what it means)."""

    def __init__(self, message: str, checkpoint: str, file: str, cause: str, errno_: int | None) -> None:
        super().__init__(errno_, message)
        self.message, self.checkpoint, self.file, self.cause = message, checkpoint, file, cause

    def __str__(self) -> str:
        return self.message


_MEANINGS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit: ulimit -f / RLIMIT_FSIZE, or the filesystem's)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only filesystem",
    errno.EIO: "I/O error",
}


class SaveAttempt:
    """The writes of one checkpoint on rank 0: :meth:`run` each one; after the first failure the
    later writes are skipped (collectives between them still run on every process), and
    :meth:`raise_if_failed` (every process) removes the partial folder and raises one
    :class:`CheckpointSaveError` everywhere."""

    def __init__(self, temporary: str, path: str) -> None:
        self.temporary, self.path = temporary, path
        self.error: CheckpointSaveError | None = None

    def run(self, write: Callable[..., Any], *args: Any) -> None:
        if self.error is not None:
            return
        try:
            write(*args)
        except Exception as error:  # any write failure: named, explained, then raised on every process
            self.error = self._explain(error)

    def raise_if_failed(self, dist: Any) -> None:
        failed = self.error is not None
        if dist.enabled:
            failed = bool(int(dist.max(torch.tensor(int(failed)))))
        if not failed:
            return
        if self.error is None:  # another rank (rank 0) failed; it names the file
            raise CheckpointSaveError(f"GRPOTrainer: saving checkpoint {self.path} failed on rank 0 (see its error)",
                                      self.path, "", "on rank 0", None)
        raise self.error from self.error.__cause__

    def _explain(self, error: Exception) -> CheckpointSaveError:
        file = _failed_file(error, self.temporary)
        code = _errno(error)
        cause = (f"{errno.errorcode.get(code, code)}: {_MEANINGS.get(code, os.strerror(code))}" if code is not None
                 else _diagnose(file, self.temporary, error))
        shutil.rmtree(self.temporary, ignore_errors=True)
        left = (f"the partial folder {self.temporary} is left (it could not be removed; its tmp- name keeps "
                "resume and rotation away from it)" if os.path.exists(self.temporary)
                else f"the partial folder {self.temporary} was removed")
        newest = latest_checkpoint(os.path.dirname(self.temporary))
        message = (f"GRPOTrainer: saving checkpoint {self.path} failed writing {file}: {cause}; {left}; "
                   f"earlier checkpoints are untouched (newest complete: {newest}). Original error: {error!r}")
        result = CheckpointSaveError(message, self.path, file, cause, code)
        result.__cause__ = error
        return result


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _errno(error: Exception) -> int | None:
    """The errno of the failure: an OSError in the exception chain, or safetensors' "(os error N)"."""
    for link in _chain(error):
        if isinstance(link, OSError) and link.errno:
            return link.errno
        m = re.search(r"os error (\d+)", str(link))
        if m:
            return int(m.group(1))
    return None


def _failed_file(error: Exception, temporary: str) -> str:
    """The file being written: ours name themselves (:func:`_naming`), an OSError may carry it;
    otherwise the newest file in the folder (the writer that failed had created it), a
    ``.safetensors`` one when safetensors failed. Files as new as each other (the clock's tick)
    are all named."""
    for link in _chain(error):
        if getattr(link, "checkpoint_file", None):
            return link.checkpoint_file
        if isinstance(link, OSError) and link.filename:
            return str(link.filename)
    try:
        entries = [(e.stat().st_mtime_ns, e.path) for e in os.scandir(temporary) if e.is_file()]
    except OSError:
        return temporary
    if any("safetensor" in f"{type(link).__name__} {link}".lower() for link in _chain(error)):
        entries = [entry for entry in entries if entry[1].endswith(".safetensors")]
        if not entries:  # the writer removed its partial file
            return os.path.join(temporary, "model.safetensors")
    if not entries:
        return temporary
    newest = max(t for t, _ in entries)
    files = sorted(path for t, path in entries if t == newest)
    if len(files) > 1:  # as new as each other: the one cut short (a JSON file that does not parse)
        files = [f for f in files if f.endswith(".json") and not _parses(f)] or files
    return files[0] if len(files) == 1 else f"one of {files} (the writer does not say which)"


def _parses(path: str) -> bool:
    try:
        with open(path) as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    return True


def _diagnose(file: str, temporary: str, error: Exception) -> str:
    """The likely cause when the error carries no errno (checked on the spot)."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and os.path.isfile(file) and os.path.getsize(file) >= limit - 4096:
        return f"EFBIG: {_MEANINGS[errno.EFBIG]}; the limit is {limit} bytes"
    probe = temporary if os.path.isdir(temporary) else os.path.dirname(temporary)
    with contextlib.suppress(OSError):
        stats = os.statvfs(probe)
        if stats.f_bavail * stats.f_frsize < 1 << 20:
            return f"ENOSPC: {_MEANINGS[errno.ENOSPC]} (under 1 MiB free)"
    if not os.access(probe, os.W_OK):
        return f"EACCES: {_MEANINGS[errno.EACCES]} ({probe} is not writable)"
    return f"unknown cause ({type(error).__name__})"
