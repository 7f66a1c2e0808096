"""Checkpoints: `RUN_DIR/checkpoints/step-N/`, written with torch.distributed.checkpoint (DCP).

A folder is valid only once `trainer_state.json` exists: rank 0 writes it (atomically) after DCP has written
every shard and its `.metadata`, so a crash mid-save leaves a folder that resume ignores. The newest valid folder
is loaded; if it turns out to be unreadable the previous valid one is tried. Trainable tables and optimizer
state may be DTensors (row-wise sharding): DCP then saves row shards and reshards on load at any world size.
The frozen pretrained table is never saved, only its fingerprint, which a resume checks.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from trainer.config import CheckpointConfig
from trainer.distributed import DistInfo, agree_any, barrier, broadcast_object

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


class ResumeError(RuntimeError):
    """The run folder holds a run that this configuration cannot continue; the message says why."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def valid_steps(folder: Path) -> list[int]:
    """Steps with a complete checkpoint, oldest first."""
    if not folder.is_dir():
        return []
    steps = []
    for child in folder.iterdir():
        m = STEP_DIR.match(child.name)
        if m and (child / STATE_FILE).exists() and (child / ".metadata").exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def _dcp():
    """torch.distributed.checkpoint, imported on first use: the import takes ~0.9 s (DTensor, sympy), which a run
    with checkpoint.enabled = false, and every run until its first save, need not pay up front."""
    import torch.distributed.checkpoint as dcp

    return dcp


def _describe(e: BaseException) -> str:
    """One line for a failed load: the underlying error of each failing rank, not DCP's wrapped traceback."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException) and e.failures:
        parts = []
        for rank, failure in sorted(e.failures.items()):
            inner = failure[0] if isinstance(failure, tuple) else failure
            text = _first_line(str(inner))
            parts.append(f"rank {rank}: {type(inner).__name__}: {text}".rstrip(": "))
        return "; ".join(parts)
    return f"{type(e).__name__}: {_first_line(str(e))}".rstrip(": ")


def _first_line(text: str, limit: int = 300) -> str:
    """The first line of an error's text, cut at `limit` characters with a visible mark (torch's messages run on)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 4].rstrip() + " ..."


class _DropDcpTracebacks(logging.Filter):
    """DCP logs the metadata fallbacks of a failed load on the root logger with full tracebacks; the caller
    reports the failure in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torch/distributed/checkpoint" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def _quiet_dcp_logging():
    root, quiet = logging.getLogger(), _DropDcpTracebacks()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


@contextlib.contextmanager
def _single_process_quiet():
    """A single process has no process group, and DCP warns on every save and load that it is "assuming" it is
    one process (even when told so with no_dist): correct, and noise in every user's log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)", category=UserWarning)
        yield


class Checkpointer:
    def __init__(self, run_dir: Path, cfg: CheckpointConfig, info: DistInfo) -> None:
        self.folder = run_dir / "checkpoints"
        self.cfg = cfg
        self.info = info
        self.last_saved_step = -1
        self.unloadable: set[int] = set()  # newer checkpoints the resume could not load (removed by _prune)

    def should_save(self, step: int, epoch_end: bool, final: bool) -> bool:
        """The save policy lives here, not in the training loop. `step` counts completed steps."""
        if not self.cfg.enabled or step == self.last_saved_step or step == 0:
            return False
        if final or (epoch_end and self.cfg.at_epoch_end):
            return True
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0

    def save(self, step: int, state: dict[str, Any], trainer_state: dict[str, Any]) -> Path:
        path = self.folder / f"step-{step}"
        if self.info.is_main:
            if path.exists():  # a partial folder from a crash at this very step
                shutil.rmtree(path)
            path.mkdir(parents=True)
        barrier(self.info)
        with _single_process_quiet():
            _dcp().save(state, checkpoint_id=str(path))
        barrier(self.info)
        if self.info.is_main:
            atomic_write_text(path / STATE_FILE, json.dumps(trainer_state, indent=1))
            self._prune(step)
        barrier(self.info)
        self.last_saved_step = step
        return path

    def _prune(self, saved: int) -> None:
        steps = valid_steps(self.folder)
        # Checkpoints the resume tried and could not load are from a timeline this run abandoned. Kept, those past
        # the one just saved would outrank every new checkpoint, and those before it would count among the
        # newest `keep_latest_k`, so the count below would delete the good ones instead (a broken step-120 kept,
        # the step-100 the run resumed from deleted). They stay until this first save, in case it never comes.
        for stale in [s for s in steps if s > saved and s not in self.unloadable]:
            log.warning("removing checkpoint %s: newer than this run's step %d, and it could not be loaded",
                        self.folder / f"step-{stale}", saved)
            shutil.rmtree(self.folder / f"step-{stale}", ignore_errors=True)
        # those that failed to load when this run resumed are set aside, not deleted: the failure may have been
        # passing (a shared file system's hiccup, one rank's read), and the folder holds more progress
        for stale in sorted(self.unloadable - {saved}):
            aside = self.folder / f"step-{stale}.unloadable"
            shutil.rmtree(aside, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.folder / f"step-{stale}").rename(aside)
                log.warning("checkpoint step-%d could not be loaded when this run resumed: moved to %s (not loaded, "
                            "not counted; delete it when it is not needed)", stale, aside)
        self.unloadable.clear()
        steps = [s for s in valid_steps(self.folder) if s <= saved]
        for old in steps[: -self.cfg.keep_latest_k]:
            shutil.rmtree(self.folder / f"step-{old}", ignore_errors=True)
        # partial folders older than the newest valid one are crash debris
        newest = steps[-1] if steps else -1
        for child in self.folder.iterdir():
            m = STEP_DIR.match(child.name)
            if m and int(m.group(1)) < newest and int(m.group(1)) not in steps:
                shutil.rmtree(child, ignore_errors=True)

    def load_latest(self, state: dict[str, Any], check: "callable") -> dict[str, Any] | None:
        """Load the newest loadable checkpoint into `state` (in place); returns its trainer state, or None.

        `check(trainer_state)` raises ResumeError when the checkpoint belongs to an incompatible run; that is
        final. A checkpoint that fails to load (corrupted file) is reported and the previous one is tried; when
        none loads, ResumeError (nothing is removed: a run started over would prune them).
        With checkpoints disabled nothing is loaded, and a folder that holds some is refused: a run started over
        beside them would later be resumed from them."""
        steps = broadcast_object(valid_steps(self.folder), self.info)
        if not self.cfg.enabled:
            if steps:
                raise ResumeError(f"checkpoint.enabled = false, but {self.folder} holds checkpoints (newest: step "
                                  f"{steps[-1]}); resume with checkpoints enabled, or use another run.dir")
            return None
        from torch.distributed.checkpoint.api import CheckpointException

        dcp = _dcp()
        failures = []
        for step in reversed(steps):
            path = self.folder / f"step-{step}"
            try:
                trainer_state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
                if not isinstance(trainer_state, dict) or not isinstance(trainer_state.get("step"), int):
                    raise ValueError("not a trainer state object with an integer 'step'")
            except (OSError, ValueError) as e:  # every rank reads the same file, so every rank skips it
                log.warning("checkpoint %s is unusable: %s is corrupt (%s); trying an older one", path, STATE_FILE, e)
                failures.append(f"step-{step}: {STATE_FILE} is corrupt ({e})")
                continue
            check(trainer_state)
            try:
                with _quiet_dcp_logging(), _single_process_quiet():
                    dcp.load(state, checkpoint_id=str(path))
                failed = False
            # DCP wraps read errors in CheckpointException, a BaseException subclass: name it explicitly
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - any unreadable shard: try the previous one
                log.warning("checkpoint %s could not be loaded (%s); trying an older one", path, _describe(e))
                failures.append(f"step-{step}: {_describe(e)}")
                failed = True
            if not agree_any(failed, info=self.info):  # one rank's unreadable shard sends every rank back a step
                self.last_saved_step = step
                self.unloadable = {s for s in steps if s > step}
                return trainer_state
            if not failed:  # another rank could not read its shard of this one
                failures.append(f"step-{step}: another rank could not read its part")
        if steps:
            # Starting over here would overwrite (and prune) checkpoints that may be recoverable: the user decides.
            raise ResumeError(
                f"none of the {len(steps)} checkpoints in {self.folder} could be loaded ({'; '.join(failures)}); "
                "to start over, move them away or use another run.dir")
        return None
