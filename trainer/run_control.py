"""Control of a training process from outside its loop: one training process per run folder (`RunDirLock`), stopping
at a step boundary on SIGTERM / SIGINT (`StopFlag`), and the errors that end training (`TrainingStopped`,
`is_out_of_memory`)."""

import logging
import os
import signal
import sys
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

from trainer import process_exit
from trainer.checkpoint import ResumeError
from trainer.distributed import DistInfo, broadcast_object

log = logging.getLogger("trainer")


class TrainingStopped(RuntimeError):
    """Training cannot go on (non-finite loss or gradient, out of memory); the last good checkpoint is kept."""


def is_out_of_memory(e: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(e, TrainingStopped):
        return False
    if isinstance(e, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class StopFlag:
    """SIGTERM / SIGINT: finish the current step, checkpoint, exit. A second SIGINT (Ctrl-C again) exits at once;
    a repeated SIGTERM does not: schedulers deliver it more than once (Slurm signals every process of the job step,
    and torchrun then forwards its own to each worker), and their SIGKILL after the grace period is the hard stop."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the first signal's number (the stopped run's exit status is 128 + it)
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGTERM:
            log.warning("signal %d again: still checkpointing after the current step", signum)
            return
        if self.requested:
            sys.stderr.write(f"second signal {signum}: exiting now\n")
            process_exit.forced_exit = 128 + signum
            raise SystemExit(128 + signum)
        self.requested = True
        self.signum = signum
        log.warning("signal %d: will checkpoint after the current step and exit", signum)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


_HELD_LOCKS: dict[str, list] = {}  # resolved run.dir -> [fd, holders] (RunDirLock)


def _drop_locks_in_child() -> None:
    """A forked child (a tokenizing worker) shares the parent's flock until it closes its copy of the descriptor:
    it closes it at once, so that a worker outliving a killed trainer cannot keep a restarted one out."""
    for fd, _ in _HELD_LOCKS.values():
        os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


class RunDirLock:
    """An exclusive lock on `run.dir` for one training process at a time (global rank 0 holds it): a second
    command started on the same folder stops with a message before it trains or logs there, instead of both
    writing checkpoints, metrics, TensorBoard events and the model into it. `flock` on the folder itself, so
    nothing is written to take it (a refused or failed run leaves the folder as it was), and the lock is gone
    when the process ends, however it ends.

    One descriptor per folder and process, shared by every RunDirLock on it (a Trainer built twice, two Trainers in
    a notebook) and closed when the last of them is released: closing another descriptor would not drop a flock,
    but a second one would conflict with the first."""

    def __init__(self, run_dir: Path, info: DistInfo) -> None:
        self.path, self.key = run_dir, None
        refused = self._take() if info.is_main and fcntl is not None else None
        refused = broadcast_object(refused, info)  # every rank stops, not only the one that saw it
        if refused:
            raise ResumeError(refused)

    def _take(self) -> str | None:
        """None once locked (or where locks do not work), else why not."""
        key = str(self.path.resolve())
        if key in _HELD_LOCKS:
            _HELD_LOCKS[key][1] += 1
            self.key = key
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:  # not a folder, not readable: every rank hears it (broadcast)
            return f"run.dir {self.path}: cannot open it to lock it ({e})"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return (f"run.dir {self.path} is in use by another training process; wait for it to end, or use another "
                    "run.dir (on shared storage, a crashed node's lock lasts until the file server's lease on it "
                    "runs out)")
        except OSError as e:  # a file system without locks (some NFS mounts): run unprotected, and say so
            os.close(fd)
            log.warning("run.dir %s cannot be locked (%s): nothing stops a second training process from using it "
                        "at the same time", self.path, e)
            return None
        _HELD_LOCKS[key] = [fd, 1]
        self.key = key
        return None

    def release(self) -> None:
        if self.key is None:
            return
        held = _HELD_LOCKS[self.key]
        held[1] -= 1
        if held[1] == 0:
            os.close(held[0])  # and the lock with it
            del _HELD_LOCKS[self.key]
        self.key = None

    def __del__(self) -> None:
        self.release()
