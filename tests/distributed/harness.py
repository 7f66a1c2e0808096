"""Run one function in W real processes joined by a gloo process group, and collect what each rank returns.

    results = run_distributed(fn, world_size, *args)   # fn(info: DistInfo, *args) -> picklable value, per rank

- Processes come from a `forkserver` that has imported torch and the trainer once, so a W-process run does not
  pay W torch imports; each process uses one thread (`torch.set_num_threads(1)`).
  The processes inherit the forkserver's environment (the one of the moment it started, usually the first
  run of the session), not the caller's current one: pass what varies per test as arguments.
- The group rendezvous on a free TCP port of 127.0.0.1 (found by binding port 0) with a finite collective timeout,
  and every process destroys its group in a `finally`.
- A run has a wall-clock limit: a hung collective fails the test (the processes are killed) instead of hanging CI.
  When one rank fails, the others get a short grace period (they are usually blocked in a collective that will
  never complete) and are then killed; the error names every failed rank with its traceback.
- Results travel through files (`torch.save`), not pipes, so large tensors cannot deadlock the parent.
"""

import datetime
import multiprocessing as mp
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PRELOAD = [
    "torch",
    "torch.distributed.checkpoint",
    "torch.distributed.tensor",
    "numpy",
    "trainer.model",
    "trainer.optim",
    "trainer.sharding",
    "trainer.row_wise",
    "trainer.trainer",
]


class DistributedRunError(AssertionError):
    """One or more ranks raised, died or timed out; the message holds each rank's traceback or exit status."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    fn: Callable, rank: int, world_size: int, port: int, pg_timeout_s: float, out: str, args
) -> None:
    import torch.distributed as dist

    from trainer.distributed import DistInfo

    torch.set_num_threads(1)
    try:
        try:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=pg_timeout_s),
            )
            info = DistInfo(rank, rank, world_size, torch.device("cpu"), "gloo")
            result = fn(info, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        torch.save({"ok": result}, out)
    except BaseException:  # noqa: BLE001 - report anything, including SystemExit, to the parent
        torch.save({"error": traceback.format_exc()}, out)
        raise SystemExit(1) from None


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    timeout_s: float = 120.0,
    pg_timeout_s: float = 30.0,
    grace_s: float = 3.0,
) -> list[Any]:
    """`fn(info, *args)` on ranks 0..world_size-1; returns the per-rank results in rank order.

    `fn` must be importable by name (a module-level function). Raises DistributedRunError when a rank raises,
    exits abnormally, or the run exceeds `timeout_s`."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # only takes effect when this process starts its forkserver
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dist-harness-") as tmp:
        outs = [str(Path(tmp) / f"rank{r}.pt") for r in range(world_size)]
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, r, world_size, port, pg_timeout_s, outs[r], args),
                name=f"rank{r}",
                daemon=True,
            )
            for r in range(world_size)
        ]
        timed_out: list[int] = []
        first_failure = None
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout_s
            while any(p.is_alive() for p in procs):
                now = time.monotonic()
                if first_failure is None and any(p.exitcode not in (None, 0) for p in procs):
                    first_failure = now
                if now > deadline or (first_failure is not None and now > first_failure + grace_s):
                    timed_out = [r for r, p in enumerate(procs) if p.is_alive()]
                    break
                time.sleep(0.02)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)
        results, errors = [], []
        for r, (p, out) in enumerate(zip(procs, outs, strict=True)):
            if r in timed_out:
                why = f"the {timeout_s:g} s run limit" if first_failure is None else "another rank failed"
                errors.append(f"rank {r}: still running, killed ({why}; a hung collective?)")
                results.append(None)
                continue
            payload = torch.load(out, weights_only=False) if Path(out).exists() else None
            if payload is None:
                errors.append(f"rank {r}: exited with status {p.exitcode} and no result")
                results.append(None)
            elif "error" in payload:
                errors.append(f"rank {r} raised:\n{payload['error']}")
                results.append(None)
            else:
                results.append(payload["ok"])
        if errors:
            raise DistributedRunError(f"{fn.__name__} on {world_size} ranks failed:\n" + "\n".join(errors))
        return results
