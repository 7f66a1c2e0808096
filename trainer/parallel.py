"""Forked worker processes for the Python-bound passes of building the data cache (tokenizing, hashing).

Why processes: the regex tokenizer and the per-word hashing hold the GIL, so threads would not overlap them. Why
fork: the children inherit the texts (copy-on-write) instead of receiving them pickled, and start in
milliseconds without importing torch again; only each chunk's result travels back. The children run pure Python
and numpy (no torch ops, no process-group calls) and leave through multiprocessing's `os._exit`, so the parent's
threads (a TensorBoard writer, gloo's), process groups and CUDA context are never used in them. The trainer
forks only while rank 0 builds the data cache; inference (`trainer eval`, `Predictor`) stays in its process.

`chunked_map(fn, items, workers)` returns `[fn(chunk) for chunk in chunks]` for contiguous chunks in order, so a
caller that merges the results in order gets exactly what one `fn(items)` would have given; the parent works on
the first chunk itself while the children do the rest. Where fork is unavailable, or the input is too small to
be worth a process (or off Linux), it is one call in this process.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

MAX_AUTO_WORKERS = 16

# The sequence being mapped, in a forked child only: set by the pool's initializer, whose arguments a fork
# inherits rather than pickles. The parent never sets it, so concurrent calls from threads cannot mix inputs.
_SHARED: Sequence | None = None


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (a Kubernetes `limits.cpu`), or None when unlimited."""
    try:  # cgroup v2: "max 100000" or "400000 100000"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" else None
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Cores this process may use: its affinity mask (a pinned rank gets its block), capped by its cgroup's CPU
    quota (a pod limited to 4 CPUs on a 64-core node gets 4), not the machine's count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        cores = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(limit))) if limit else cores


def resolve_workers(workers: int) -> int:
    """`data.workers`: 0 means one per usable core, at most MAX_AUTO_WORKERS; otherwise as given."""
    return workers if workers > 0 else min(usable_cores(), MAX_AUTO_WORKERS)


def can_fork() -> bool:
    """Linux only: macOS has fork, but forking a process that has used its system frameworks is unsafe (why
    Python's default there is spawn). Not from a daemonic multiprocessing process (a launcher's or a Pool's
    worker): multiprocessing refuses to give it children."""
    return (sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
            and not multiprocessing.current_process().daemon)


def _share(items: Sequence) -> None:
    global _SHARED
    _SHARED = items


def _run_chunk(task: tuple[Callable, int, int]):
    fn, start, stop = task
    assert _SHARED is not None, "chunked_map: worker started without its input"
    return fn(_SHARED[start:stop])


def chunked_map(fn: Callable[[Sequence[T]], R], items: Sequence[T], workers: int, min_per_worker: int) -> list[R]:
    """`fn` over contiguous chunks of `items`, one per worker, results in chunk order. `fn` must be picklable
    (a module-level function or a functools.partial of one) and must not use torch. Each worker gets at least
    `min_per_worker` items: a pool costs 15-30 ms to start from a trainer process (measured with 0.6 GB
    resident), and the parent pays copy-on-write faults on the memory it writes while the children live, so a
    chunk must hold a few hundred ms of work to gain. A worker that dies (killed for memory, say) does not hang
    the call: its pool breaks, a warning says so, and the whole map runs again in this process."""
    workers = min(workers, len(items) // max(1, min_per_worker))
    if workers <= 1 or not can_fork():
        return [fn(items)]
    bounds = [len(items) * i // workers for i in range(workers + 1)]
    tasks = [(fn, bounds[i], bounds[i + 1]) for i in range(1, workers)]
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns when a process with threads forks; the children run none of those threads' code
            warnings.simplefilter("ignore", DeprecationWarning)
            with ProcessPoolExecutor(workers - 1, mp_context=multiprocessing.get_context("fork"),
                                     initializer=_share, initargs=(items,)) as pool:
                futures = [pool.submit(_run_chunk, task) for task in tasks]
                first = fn(items[bounds[0] : bounds[1]])
                return [first, *(f.result() for f in futures)]
    except BrokenProcessPool as e:
        log.warning("a worker process died (%s); doing its work in this process instead (data.workers = 1 "
                    "keeps all of it here)", e)
        return [fn(items)]
