"""How much does making the next batch on the data thread cost the step? Blocks of training steps in one process.

Modes, interleaved block by block (the order reversed every other round), each the trainer's own step:
  thread       batches made on BatchPrefetcher's thread, as training does (Trainer._batch_parts / _finish_batch)
  inline       each batch made on the step's thread, just before its step
  ahead        every batch made before the clock starts: the step alone, the floor
  nogil_spin   the thread busy for `--spin-us` in a numba loop that releases the GIL, then an `ahead` batch
  python_spin  the thread busy for `--spin-us` in Python (holding the GIL), then an `ahead` batch

`thread` close to `ahead` means the thread's work overlaps the step; `python_spin` shows what holding the GIL for
that long costs the step.

    python benchmarks/bench_data_thread.py --config configs/demo.toml [--threads 1 2] [--modes thread ahead]

Several `--threads` counts run in the same process, interleaved with the modes (torch.set_num_threads between
blocks; the fused kernels follow torch's count).
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's trainer, not an installed one

if "OMP_WAIT_POLICY" not in os.environ:  # as the trainer's CLI does (trainer/cli.py); before torch loads
    os.environ.setdefault("GOMP_SPINCOUNT", "100000")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.data import BatchPrefetcher  # noqa: E402
from trainer.distributed import exit_process, init_distributed  # noqa: E402
from trainer.jit import numba  # noqa: E402
from trainer.trainer import Trainer  # noqa: E402

MODES = ("thread", "inline", "ahead", "nogil_spin", "python_spin")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=40, help="steps per block")
    p.add_argument("--spin-us", type=float, default=800.0, help="length of the spin modes' busy loop")
    args, rest = p.parse_known_args()
    span = args.steps * args.rounds * len(args.modes) * len(args.threads) + args.steps  # warm-up block included
    cfg = load_config(args.config, rest + ["--run.dir", "/tmp/bench-data-thread-run", "--train.threads", str(args.threads[0]),
                                           "--train.max_steps", str(span), "--metrics.tensorboard", "false",
                                           "--metrics.progress", "false"])
    trainer = Trainer(cfg, init_distributed("cpu"))
    trainer.build()
    trainer.optim.init_state()
    ahead = {}

    def make_ahead(step: int):
        return ahead[step]

    if numba is not None:
        from numba import njit

        @njit(nogil=True)
        def gil_free_loop(n):
            t = 0.0
            for i in range(n):
                t += np.sqrt(i)
            return t

        gil_free_loop(10)
        t0 = time.perf_counter()
        gil_free_loop(1_000_000)
        per_iteration = (time.perf_counter() - t0) / 1_000_000
    iterations = int(args.spin_us * 1e-6 / per_iteration) if numba is not None else 0

    def nogil_spin(step: int):
        gil_free_loop(iterations)
        return ahead[step]

    def python_spin(step: int):
        end = time.perf_counter() + args.spin_us * 1e-6
        while time.perf_counter() < end:
            pass
        return ahead[step]

    def one_step(rows, batch, i: int) -> None:
        trainer.optim.set_lr(i)
        trainer.optim.zero_grad()
        loss, *_ = trainer._loss(trainer.train_model(batch), batch, rows)
        loss.backward()
        trainer.optim.clip_dense(cfg.optim.grad_clip)
        trainer.optim.step(i)

    def block(mode: str, threads: int, start: int) -> float:
        torch.set_num_threads(threads)
        steps = range(start, start + args.steps)
        if mode != "inline" and mode != "thread":
            ahead.clear()
            ahead.update({i: trainer._batch_parts(i) for i in steps})
        t0 = time.perf_counter()
        if mode == "inline":
            for i in steps:
                rows, batch, _ = trainer._make_batch(i)
                one_step(rows, batch, i)
        elif mode == "ahead":
            for i in steps:
                rows, parts, _ = ahead[i]
                one_step(rows, trainer._finish_batch(parts), i)
        else:
            make = {"thread": trainer._batch_parts, "nogil_spin": nogil_spin, "python_spin": python_spin}[mode]
            prefetch = BatchPrefetcher(make, start + args.steps)
            try:
                for i in steps:
                    rows, parts, _ = prefetch.get(i)
                    one_step(rows, trainer._finish_batch(parts), i)
            finally:
                prefetch.close()
        return (time.perf_counter() - t0) / args.steps * 1e3

    runs = [(m, t) for t in args.threads for m in args.modes if numba is not None or m != "nogil_spin"]
    block("inline", args.threads[0], 0)  # warm-up
    times = {run: [] for run in runs}
    start = args.steps
    for r in range(args.rounds):
        for run in (runs if r % 2 == 0 else runs[::-1]):
            times[run].append(block(*run, start))
            start += args.steps
    print(f"{args.config}, {args.rounds} blocks of {args.steps} steps per mode and thread count, spin "
          f"{args.spin_us:.0f} us; ms per step, median (min-max):")
    for (mode, threads), v in times.items():
        med = float(np.median(v))
        floor = times.get(("ahead", threads))
        vs = f"  {med - float(np.median(floor)):+6.2f} vs ahead" if floor and mode != "ahead" else ""
        print(f"  {mode:<12} {threads} thread(s) {med:6.2f} ({min(v):.2f}-{max(v):.2f}){vs}")
    return 0


if __name__ == "__main__":
    exit_process(main())
