"""Forked worker processes for the Python-bound passes of building the data cache (tokenizing, hashing).

Why processes: the regex tokenizer and the per-word hashing hold the GIL, so threads would not overlap them. Why
fork: the children inherit the texts (copy-on-write) instead of receiving them pickled, and start in
milliseconds without importing torch again; only each chunk's result travels back. The children run pure Python
and numpy (no torch ops, no process-group calls) and leave through multiprocessing's `os._exit`, so the parent's
threads, gloo groups and CUDA context are never used in them.

`chunked_map(fn, items, workers)` returns `[fn(chunk) for chunk in chunks]` for contiguous chunks in order, so a
caller that merges the results in order gets exactly what one `fn(items)` would have given; the parent works on
the first chunk itself while the children do the rest. Where fork is unavailable, or the input is too small to
be worth a process, it is one call in this process.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_AUTO_WORKERS = 16

# The sequence being mapped, visible to forked children (set around each pool's life only).
_SHARED: Sequence | None = None


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: a pinned rank gets 1), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        return os.cpu_count() or 1


def resolve_workers(workers: int) -> int:
    """`data.workers`: 0 means one per usable core, at most MAX_AUTO_WORKERS; otherwise as given."""
    return workers if workers > 0 else min(usable_cores(), MAX_AUTO_WORKERS)


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def _run_chunk(task: tuple[Callable, int, int]):
    fn, start, stop = task
    assert _SHARED is not None, "chunked_map: worker started without its input"
    return fn(_SHARED[start:stop])


def chunked_map(fn: Callable[[Sequence[T]], R], items: Sequence[T], workers: int, min_per_worker: int) -> list[R]:
    """`fn` over contiguous chunks of `items`, one per worker, results in chunk order. `fn` must be picklable
    (a module-level function or a functools.partial of one) and must not use torch. Each worker gets at least
    `min_per_worker` items: a pool costs 15-30 ms to start from a trainer process (measured with 0.6 GB
    resident), and the parent pays copy-on-write faults on the memory it writes while the children live, so a
    chunk must hold a few hundred ms of work to gain."""
    global _SHARED
    workers = min(workers, len(items) // max(1, min_per_worker))
    if workers <= 1 or not can_fork():
        return [fn(items)]
    bounds = [len(items) * i // workers for i in range(workers + 1)]
    tasks = [(fn, bounds[i], bounds[i + 1]) for i in range(1, workers)]
    _SHARED = items
    try:
        with multiprocessing.get_context("fork").Pool(workers - 1) as pool:
            pending = pool.map_async(_run_chunk, tasks, chunksize=1)
            first = fn(items[bounds[0] : bounds[1]])
            return [first, *pending.get()]
    finally:
        _SHARED = None
