"""Stopping a run cleanly when the cluster asks, and one run per output folder.

:class:`Preemption` turns SIGTERM, SIGINT and SIGUSR1 (what SLURM and Kubernetes send before
killing a job; SLURM's ``--signal``) into a request that the training loop reads between steps:
the step in progress finishes, a checkpoint of it is written, the reason is logged and the process
exits with :data:`PREEMPTED_EXIT_CODE` (:class:`TrainingPreempted`). Past
``GRPOConfig.preemption_grace_s`` the step in progress is abandoned at its next safe point instead
(:meth:`Preemption.safe_point`, between the step's stages: nothing has been applied to the model
yet, so the checkpoint is the last completed step's). A second signal, one second or more after the
first, exits at once. Under ``torchrun`` the processes agree once per step (one all-reduce of the
signal number on a CPU ``gloo`` group, no device synchronisation), so every rank stops after the
same step.

:class:`OutputDirLock` holds ``output_dir`` for one process (and its torchrun ranks): a second run
on the same folder is refused with the holder's pid and host; a lock left by a process that died is
taken over, with a warning naming it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import time
import weakref
from typing import Any

import torch

from . import checkpoint

__all__ = [
    "PREEMPTED_EXIT_CODE", "STOP_SIGNALS", "TrainingPreempted", "StepAbandoned", "Preemption", "OutputDirLock",
    "OutputDirLocked", "LOCK_FILE",
]

logger = logging.getLogger("gtalign_fast.trainer")

# sysexits.h's EX_TEMPFAIL: "a temporary failure; the user is invited to retry" (a requeue script
# resumes on 75 and stops on anything else; 143 = 128 + SIGTERM would mean "killed", not "saved")
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# SLURM signals every process of a step and torchrun forwards the signal it gets: copies of one
# request arrive within milliseconds, so only a signal this long after the first means "now"
DUPLICATE_WINDOW_S = 1.0
LOCK_FILE = ".gtalign_fast.lock"


class TrainingPreempted(SystemExit):
    """Raised by ``GRPOTrainer.train`` after a stop signal, once the checkpoint is written.

    A ``SystemExit`` with code :data:`PREEMPTED_EXIT_CODE`: uncaught, the process exits with 75.
    ``step`` is the last completed step, ``checkpoint`` its folder, ``signal_name`` the signal.
    """

    def __init__(self, step: int, checkpoint_path: str, signal_name: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.checkpoint, self.signal_name = step, checkpoint_path, signal_name

    def __str__(self) -> str:
        return (f"stopped by {self.signal_name} after step {self.step}; checkpoint {self.checkpoint} "
                f"(exit code {PREEMPTED_EXIT_CODE})")


class StepAbandoned(Exception):
    """The grace period ran out mid-step: the step in progress is dropped at a safe point."""


class Preemption:
    """Stop signals during ``train()``: a flag the loop reads, agreed over processes once per step.

    :meth:`install` before the loop, :meth:`uninstall` after it; call :meth:`step_begins` before each
    step, :meth:`safe_point` between its stages and :meth:`agreed_signal` after it (every process,
    the same number of times: the two last are collectives when several processes run).
    """

    def __init__(self, grace_s: float | None, dist: Any) -> None:
        self.grace_s, self.dist = grace_s, dist
        self.signum: int | None = None  # the first stop signal this process received
        self.received_at = 0.0
        self.rng_at_step_start: dict | None = None
        self._group = _flag_group() if dist.enabled else None
        self._previous: dict = {}

    # -- signal handling ------------------------------------------------------------------------

    def install(self) -> None:
        """Handle the stop signals (main thread only) until :meth:`uninstall`."""
        import threading

        self._previous, self.signum = {}, None
        if threading.current_thread() is not threading.main_thread():
            logger.warning("GRPOTrainer: train() runs outside the main thread; stop signals are not handled "
                           "(a preemption loses the steps since the last checkpoint)")
            return
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def uninstall(self) -> None:
        """Give the stop signals back to the handlers they had before :meth:`install`."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        # no logging here: the handler may run while the main thread holds the logging lock
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.received_at = signum, now
            _say(f"GRPOTrainer: got {signal.Signals(signum).name}: finishing the step in progress, saving a "
                 "checkpoint, then exiting (a second signal exits at once)")
            return
        if now - self.received_at < DUPLICATE_WINDOW_S:
            return  # the same request again (SLURM and torchrun both deliver it)
        _say(f"GRPOTrainer: second stop signal ({signal.Signals(signum).name}): exiting at once")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    # -- the loop's questions -------------------------------------------------------------------

    def step_begins(self) -> None:
        """Remember the RNG state: a step abandoned half-way must leave the checkpoint the state a
        completed previous step left (a resumed run then draws what an uninterrupted one does)."""
        if self.grace_s is not None:  # without a grace period no step is abandoned
            self.rng_at_step_start = checkpoint.rng_state()

    def safe_point(self) -> None:
        """Raise :class:`StepAbandoned` when some process's grace period has run out (a collective
        when several processes run and ``grace_s`` is set, so all of them abandon together)."""
        if self.grace_s is None:
            return
        expired = self.signum is not None and time.monotonic() - self.received_at > self.grace_s
        signum = self._agree(self.signum if expired else 0)
        if signum:
            raise StepAbandoned(f"{signal.Signals(signum).name}, {self.grace_s} s grace period over mid-step")

    def agreed_signal(self) -> str | None:
        """After a step: the name of a stop signal any process received, or None (one all-reduce)."""
        signum = self._agree(self.signum or 0)
        return signal.Signals(signum).name if signum else None

    def _agree(self, value: int) -> int:
        if self._group is None:
            return value
        import torch.distributed as tdist

        flag = torch.tensor([value], dtype=torch.int64)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=self._group)
        return int(flag)


def _say(line: str) -> None:
    """One line on stderr from a signal handler (a raw write: logging may hold its lock right now)."""
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode())


_FLAG_GROUP: list = []  # [(the default group, its gloo twin)]: one per process group, shared by trainers


def _flag_group():
    """A gloo group of every process (made once per default group: making one is a collective):
    the stop flag is reduced on the host, without synchronising the training device."""
    import torch.distributed as tdist

    world = tdist.group.WORLD
    if not _FLAG_GROUP or _FLAG_GROUP[0][0] is not world:
        _FLAG_GROUP[:] = [(world, tdist.new_group(backend="gloo"))]
    return _FLAG_GROUP[0][1]


# ---------------------------------------------------------------------------------------------
# One run per output folder


class OutputDirLocked(RuntimeError):
    """Another live run holds the output folder."""


class OutputDirLock:
    """``output_dir/.gtalign_fast.lock``: an exclusive ``flock`` held while the process lives, and
    the holder's pid, host and start time inside the file.

    The kernel drops a ``flock`` when its process dies, however it dies, so a lock file whose lock
    can be taken was left by a dead process: it is taken over, with a warning naming that process.
    A process may hold several trainers on one folder (they share the lock). Network filesystems
    hold ``flock`` across hosts when mounted so (NFSv4; Lustre with ``-o flock``); where ``flock``
    is not supported, a lock file naming another live process (this host) or another host is
    honoured as held.
    """

    _held: dict[str, tuple[int | None, int]] = {}  # realpath -> (fd or None, number of trainers holding it)

    @classmethod
    def acquire(cls, output_dir: str, owner: Any, overwrite: bool = False) -> None:
        """Hold ``output_dir`` for ``owner`` (released when ``owner`` is garbage collected or the
        process exits). Raises :class:`OutputDirLocked` naming the holder unless ``overwrite``."""
        os.makedirs(output_dir, exist_ok=True)
        key = os.path.realpath(output_dir)
        if key in cls._held:
            fd, count = cls._held[key]
            cls._held[key] = (fd, count + 1)
        else:
            cls._held[key] = (cls._lock(output_dir, overwrite), 1)
        weakref.finalize(owner, cls._release, key)

    @classmethod
    def _lock(cls, output_dir: str, overwrite: bool) -> int | None:
        path = os.path.join(output_dir, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        except OSError as error:  # no flock on this filesystem: judge by the file's content
            logger.warning("GRPOTrainer: %s cannot be flock()ed (%s); judging the holder by its pid", path, error)
            held = holder is not None and _may_be_alive(holder)
        described = _describe(holder)
        if held and not overwrite:
            os.close(fd)
            raise OutputDirLocked(
                f"GRPOTrainer: output_dir {output_dir} is held by another run ({described}; lock file {path}). "
                "Two runs on one folder delete each other's saves and log every step twice: wait for it, "
                "stop it, or pick another output_dir; GRPOConfig(overwrite_output_dir=True) uses the folder anyway"
            )
        if held:  # the holder keeps its lock and its name in the file
            logger.warning("GRPOTrainer: overwrite_output_dir=True: using %s although %s holds it", output_dir,
                           described)
            os.close(fd)
            return None
        if holder is not None:
            logger.warning("GRPOTrainer: taking over the lock of %s left by %s, which no longer runs",
                           output_dir, described)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        return fd

    @classmethod
    def _release(cls, key: str) -> None:
        if key not in cls._held:
            return
        fd, count = cls._held.pop(key)
        if count > 1:
            cls._held[key] = (fd, count - 1)
            return
        if fd is None:  # used under overwrite_output_dir: nothing of ours to release
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly (a dead holder leaves its pid)
            os.close(fd)  # drops the flock


def _read_holder(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if not text:
            return None  # a new lock file, or one released cleanly
        holder = json.loads(text)
    except (OSError, ValueError):
        holder = None
    # something unreadable is there: say so rather than treat the folder as free
    return holder if isinstance(holder, dict) else {"pid": "?", "host": "?"}


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "nobody"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since', '?')}"


def _may_be_alive(holder: dict) -> bool:
    """Without flock: a process on another host cannot be checked (assumed alive); here, ask the kernel."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError as error:
        return error.errno == errno.EPERM  # alive, owned by someone else
    return holder["pid"] != os.getpid()


def hold_output_dir(output_dir: str, owner: Any, dist: Any, overwrite: bool) -> None:
    """:meth:`OutputDirLock.acquire` on rank 0 (which writes everything in ``output_dir``); every
    process raises when it fails, so no rank waits for a refused one."""
    error = None
    if dist.is_main:
        try:
            OutputDirLock.acquire(output_dir, owner, overwrite)
        except OutputDirLocked as refused:
            error = refused
    if dist.enabled and int(dist.max(torch.tensor(int(error is not None)))):
        raise error or OutputDirLocked(f"GRPOTrainer: output_dir {output_dir} is held by another run (see rank 0)")
    if error is not None:
        raise error
