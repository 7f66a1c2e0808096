"""Profile training steps of a config with torch.profiler: where does a step's time go?

Builds the real Trainer (data, tables, optimizers) in one process, runs warm-up steps, then profiles a few
steps and prints the top operators by self CPU time, plus wall time per phase.

    python benchmarks/profile_step.py --config configs/demo.toml [--steps 10] [--section.field VALUE ...]
    torchrun --nproc-per-node 2 benchmarks/profile_step.py --config configs/demo.toml --train.threads 1 \
        --dist.embedding_sharding row_wise          # every rank prints its own breakdown

"collate" is the data thread's work for one step (collate, then `TextClassifier.prepare`: id grouping and row-wise
routes), run inline here; in training it overlaps the previous step.
"""

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

# Import `trainer` from the checkout this script is in, not from wherever the environment installed it: an A/B
# run from a second `git worktree` must measure that worktree's code (an editable install points elsewhere).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if "OMP_WAIT_POLICY" not in os.environ:  # as the trainer's CLI does (trainer/cli.py); before torch loads
    os.environ.setdefault("GOMP_SPINCOUNT", "100000")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.distributed import exit_process, init_distributed  # noqa: E402
from trainer.optim import unwrap  # noqa: E402
from trainer.sharding import sync_sparse_grads  # noqa: E402
from trainer.trainer import Trainer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--no-profiler", action="store_true", help="phase wall times only (the profiler adds ~30%%)")
    args, rest = p.parse_known_args()
    cfg = load_config(args.config, rest + ["--run.dir", str(Path("/tmp") / "profile-step-run"),
                                           "--metrics.tensorboard", "false", "--metrics.progress", "false"])
    info = init_distributed("cpu")
    trainer = Trainer(cfg, info)
    trainer.build()
    trainer.optim.init_state()
    batches = trainer.plan.epoch(0)
    phases = {"collate": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def one_step(i: int) -> None:
        t0 = time.perf_counter()
        rows, batch, _ = trainer._make_batch(i % len(batches))
        t1 = time.perf_counter()
        trainer.optim.zero_grad()
        loss, *_ = trainer._loss(trainer.train_model(batch), batch, rows)
        t2 = time.perf_counter()
        loss.backward()
        if trainer.sync_tables:  # replicated tables under torchrun: their sparse gradients are averaged here
            sync_sparse_grads(unwrap(trainer.model).tables, info)
        t3 = time.perf_counter()
        trainer.optim.clip_dense(cfg.optim.grad_clip)
        trainer.optim.step(i)
        t4 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            phases[k] += v

    for i in range(args.warmup):
        one_step(i)
    phases = dict.fromkeys(phases, 0.0)
    with (contextlib.nullcontext() if args.no_profiler else
          profile(activities=[ProfilerActivity.CPU], record_shapes=False)) as prof:
        for i in range(args.steps):
            one_step(args.warmup + i)
    tokens = np.mean([trainer.data.train.raw_tokens[b].sum() for b in batches[: args.steps]])
    total = sum(phases.values())
    print(f"threads {torch.get_num_threads()}, {args.steps} steps, {total / args.steps * 1000:.1f} ms/step "
          f"(profiler {'off' if args.no_profiler else 'on'}), ~{tokens * args.steps / total:,.0f} tokens/s")
    for k, v in phases.items():
        print(f"  {k:<10} {v / args.steps * 1000:8.1f} ms  {100 * v / total:5.1f}%")
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    exit_process(main())  # under torchrun: no interpreter finalisation after a gloo group (see there)
