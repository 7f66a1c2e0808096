"""Metrics: TensorBoard + metrics.jsonl on the logging rank, a do-nothing logger everywhere else.

Tags are grouped (`loss/`, `accuracy/`, `throughput/`, `time/`, `memory/`, `lr/`, `embeddings/`). Throughput
skips the first `metrics.warmup_steps` steps after every (re)start, and counters reset after each log, so each
logged figure describes the interval since the previous one.

Files in the run folder: `metrics.jsonl` is append-only, one line-buffered JSON line per log, so a crash can cost at
most the last (partial) line, which readers skip; TensorBoard event files are append-only record streams with
per-record checksums. Neither is rewritten in place. Both are created on their first write, so a run refused
before training starts (bad data, a run folder it cannot resume) leaves no empty file behind.
"""

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

# the key of metrics.jsonl's resume marker rows (MetricsLogger.resumed); they carry no metric
RESUMED_AT_STEP = "resumed_at_step"


class NullLogger:
    """What non-logging ranks get: same interface, does nothing."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def resumed(self, step: int) -> None: ...
    def tb_scalars(self, values: dict[str, float], x: int) -> None: ...
    def text(self, tag: str, text: str, step: int = 0) -> None: ...
    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float], step: int) -> None: ...
    def image(self, tag: str, image_HWC: np.ndarray, step: int) -> None: ...
    def projector(self, vectors: np.ndarray, labels: list[list[str]], header: list[str], step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class MetricsLogger(NullLogger):
    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.run_dir = run_dir
        self._jsonl = None
        self._closed = False
        self.tensorboard = tensorboard
        self._writer = None

    @property
    def jsonl(self):
        """metrics.jsonl, opened on the first row (as the event file), so a refused run leaves no empty file."""
        if self._jsonl is None:
            self._jsonl = (self.run_dir / "metrics.jsonl").open("a", buffering=1)
        return self._jsonl

    @property
    def writer(self):
        """The SummaryWriter, created on first use (None when TensorBoard is off)."""
        if self._writer is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        return self._writer

    def scalars(self, values: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in values.items()}
        if self._closed:
            return
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        if self.writer is not None:
            for tag, value in clean.items():
                self.writer.add_scalar(tag, value, step)

    def resumed(self, step: int) -> None:
        """A marker row in metrics.jsonl: training goes on from the checkpoint of `step`, so rows an earlier
        attempt logged after that step describe steps taken again now, and readers (`trainer report`) drop them.
        Why a marker rather than "a step lower than the row before": an attempt killed right after logging the
        first step it took leaves a row at exactly the step the next attempt logs first."""
        if not self._closed:
            self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), RESUMED_AT_STEP: step}) + "\n")

    def tb_scalars(self, values: dict[str, float], x: int) -> None:
        """TensorBoard only, at an x other than the step (e.g. tokens seen): convergence against data consumed."""
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, float(value), x)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            # TensorBoard renders markdown; indent so configs and plans keep their layout
            self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        """The HPARAMS tab's entry, in this run's own event file. Why not `add_hparams`: it writes to a subfolder,
        which TensorBoard lists as a second run beside the training run."""
        if self.writer is not None:
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            flat = {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in hparams.items()}
            tagged = {f"hparam/{k}": v for k, v in metrics.items()}
            file_writer = self.writer._get_file_writer()
            for summary in hparams_summary(flat, tagged):
                file_writer.add_summary(summary)
            for tag, value in tagged.items():
                self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image_HWC: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_HWC, step, dataformats="HWC")

    def projector(self, vectors: np.ndarray, labels: list[list[str]], header: list[str], step: int) -> None:
        if self.writer is not None and len(vectors):
            import torch

            # a folder of this step from an earlier segment of the run (a rerun, a resume to the same step): replaced,
            # not left for tensorboard to print a warning to stdout, which holds the command's JSON result alone
            shutil.rmtree(Path(self.writer.log_dir) / f"{step:05d}", ignore_errors=True)
            with contextlib.redirect_stdout(sys.stderr):
                self.writer.add_embedding(torch.from_numpy(np.ascontiguousarray(vectors)), metadata=labels,
                                          metadata_header=header, global_step=step, tag="words")

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close both files; again is a no-op (run_training closes whatever way training ended)."""
        self._closed = True
        if self._jsonl is not None and not self._jsonl.closed:
            self._jsonl.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self.tensorboard = False  # a late log must not open a second event file


class StepTimer:
    """Accumulates wall time per phase of a step (data, forward, backward, optimizer, ...) between logs.

    On CUDA the host's clock measures kernel launches, not the kernels, unless it waits for the GPU at every mark,
    which would stall the pipeline: there the trainer times only logging steps (`start(active=...)`), waiting
    (`sync`, torch.cuda.synchronize) at each of their marks, and the shares describe those steps."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.totals: dict[str, float] = {}
        self._sync = sync
        self.active = True
        self._last = time.perf_counter()

    def start(self, active: bool = True) -> None:
        """Begin a step; an inactive one records nothing (marks and moves are no-ops)."""
        self.active = active
        if active and self._sync is not None:
            self._sync()
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if not self.active:
            return
        if self._sync is not None:
            self._sync()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + (now - self._last)
        self._last = now

    def move(self, seconds: float, from_phase: str, to_phase: str) -> None:
        """Re-attribute time measured inside another phase (collectives inside forward/backward)."""
        if not self.active:
            return
        seconds = min(seconds, self.totals.get(from_phase, 0.0))
        self.totals[from_phase] = self.totals.get(from_phase, 0.0) - seconds
        self.totals[to_phase] = self.totals.get(to_phase, 0.0) + seconds

    def shares(self) -> dict[str, float]:
        total = sum(self.totals.values()) or 1.0
        return {f"time/{k}_share": v / total for k, v in self.totals.items()}

    def reset(self) -> None:
        self.totals.clear()


class Throughput:
    """Tokens and examples per second over the steps since the last log, excluding warm-up steps."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.steps_seen = 0
        self.tokens = 0
        self.examples = 0
        self.measured_steps = 0  # steps counted since the last rates(): the same on every rank, unlike tokens
        self.start: float | None = None

    def update(self, tokens: int, examples: int) -> None:
        self.steps_seen += 1
        if self.steps_seen == self.warmup_steps:
            self.start = time.perf_counter()  # measure from the end of the last warm-up step
            return
        if self.steps_seen > self.warmup_steps:
            if self.start is None:
                self.start = time.perf_counter()
                return
            self.tokens += tokens
            self.examples += examples
            self.measured_steps += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside this block (evaluation, checkpoint saves) is left out of the rates."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.start is not None:
                self.start += time.perf_counter() - t0

    def rates(self) -> dict[str, float]:
        """Empty until a step has been measured since the last call. Decided by step counts, never by this rank's
        tokens: the trainer sums the rates across ranks, and a rank with no documents in the interval must still
        join that all-reduce."""
        if self.start is None or self.measured_steps == 0:
            return {}
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"throughput/tokens_per_s": self.tokens / elapsed, "throughput/examples_per_s": self.examples / elapsed}
        self.tokens = self.examples = self.measured_steps = 0
        self.start = time.perf_counter()
        return out


def peak_rss_bytes() -> int:
    import resource

    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
