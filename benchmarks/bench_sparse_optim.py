"""Optimizer step time for trainable embedding tables: does the cost track the batch or the table?

For each table size (default 20K and 2M rows x 300) and each sparse optimizer, time `optimizer.step()` alone on the
sparse gradient of a 256 x 50 id batch, made as the trainer makes it (`bag_lookup.bag_sum`: sorted, distinct rows;
`--gradient embedding`: a plain `nn.Embedding(sparse=True)`, one row per id). The batch touches exactly
`--touched` distinct rows (default 10K, spread uniformly over the table, the rest repeats), so both table sizes do
the same work; uniform ids would touch ~9K rows of 20K but ~12.8K of 2M and skew the ratio. State is created
(and page-faulted in) before timing and a few warm-up steps run first. `sparse_adam[torch]` is
torch.optim.SparseAdam, which `sparse_adam` (FastSparseAdam) replaces. For contrast, dense optimizers on the
full table (`--dense dense_adam dense_adamw`: torch Adam / AdamW over a dense gradient, which is what a plain
`nn.Embedding` + AdamW setup does) are timed on tables up to `--dense-max-rows` (at 2M a step takes seconds and
the table, its gradient and two moments need 9.6 GB).

Beside the optimizer step alone, the embedding part of a whole training step is timed in the same runs: the
lookup (forward), its backward and the step together, the part of a step that touches the table.

Reading the ratio: a 20K x 300 table (24 MB, 72 MB with Adam state) largely sits in cache, a 2M one does not, so
even a perfectly row-proportional step pays more per random row at 2M. `--rows 200000 2000000` compares two
out-of-cache sizes. Process CPU time is printed next to wall time because on a shared machine the wall time of
multi-threaded steps swings several-fold with load (`--threads 1` is the steadiest).

    python benchmarks/bench_sparse_optim.py [--rows 20000 2000000] [--threads 1] [--repeats 9] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

# `trainer` from this checkout (an editable install may point at another one, e.g. in an A/B from a worktree)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.bag_lookup import bag_sum  # noqa: E402
from trainer.kernels import advise_hugepages  # noqa: E402
from trainer.sparse_optim import SPARSE_OPTIMIZERS, build_sparse_optimizer, init_optimizer_state  # noqa: E402

DENSE_OPTIMIZERS = ("dense_adam", "dense_adamw")


def make_ids(rows: int, batch: int, tokens: int, touched: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, tokens) ids covering exactly `touched` distinct rows (needs touched <= batch * tokens)."""
    n = batch * tokens
    touched = min(touched, rows, n)
    distinct = torch.randperm(rows, generator=gen)[:touched]
    repeats = distinct[torch.randint(0, touched, (n - touched,), generator=gen)]
    ids = torch.cat([distinct, repeats])
    return ids[torch.randperm(n, generator=gen)].view(batch, tokens)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    )


def make_gradient(emb: torch.nn.Embedding, ids: torch.Tensor, source: str) -> None:
    """Forward and backward of one batch, as the trainer's lookups produce it (`lookup`: bag_lookup.bag_sum over
    documents of `ids`' rows, whose gradient has sorted, distinct rows) or as a plain `nn.Embedding` does
    (`embedding`: one gradient row per id, duplicates included, which the optimizers then group)."""
    if source == "lookup" and emb.sparse:
        offsets = torch.arange(ids.shape[0]) * ids.shape[1]
        bag_sum(emb.weight, ids.flatten(), offsets).sum().backward()
    else:
        emb(ids).sum().backward()


def time_steps(
    emb: torch.nn.Embedding, opt: torch.optim.Optimizer, ids: torch.Tensor, warmup: int, repeats: int,
    source: str = "lookup",
) -> tuple[list[float], list[float], list[float]]:
    """Wall and process-CPU seconds per `opt.step()`, and wall seconds of the embedding part of a whole training
    step: the lookup, its backward (which makes the gradient) and `opt.step()` together.

    CPU time is reported too because on a shared VM the wall time of memory-bound steps swings several-fold
    with host contention, while the CPU time the step itself needs does not.
    """
    wall, cpu, whole = [], [], []
    for i in range(warmup + repeats):
        t_lookup = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        make_gradient(emb, ids, source)
        t0, c0 = time.perf_counter(), time.process_time()
        opt.step()
        if i >= warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            whole.append(time.perf_counter() - t_lookup)
    opt.zero_grad(set_to_none=True)
    return wall, cpu, whole


def bench_one(name: str, emb: torch.nn.Embedding, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    if name == "sparse_adam[torch]":
        opt: torch.optim.Optimizer = torch.optim.SparseAdam([emb.weight], lr=1e-3)
    elif name == "dense_adam":
        opt = torch.optim.Adam([emb.weight], lr=1e-3)
    elif name == "dense_adamw":
        opt = torch.optim.AdamW([emb.weight], lr=1e-3)
    else:
        opt = build_sparse_optimizer(name, [emb.weight], lr=1e-3)
    t0 = time.perf_counter()
    init_optimizer_state(opt)
    init_s = time.perf_counter() - t0
    times, cpu, whole = time_steps(emb, opt, ids, args.warmup, args.repeats, args.gradient)
    row = {
        "optimizer": name,
        "optimizer_class": type(opt).__name__,
        "rows": emb.num_embeddings,
        "dim": emb.embedding_dim,
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "cpu_median_ms": statistics.median(cpu) * 1e3,
        "lookup_step_median_ms": statistics.median(whole) * 1e3,
        "init_s": init_s,
        "state_mb": state_bytes(opt) / 2**20,
        "times_ms": [t * 1e3 for t in times],
    }
    del opt
    gc.collect()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 2_000_000])
    ap.add_argument("--dim", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--touched", type=int, default=10_000, help="distinct rows per batch")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--optimizers", nargs="+", default=[*SPARSE_OPTIMIZERS, "sparse_adam[torch]"])
    ap.add_argument(
        "--dense",
        nargs="*",
        default=["dense_adam"],
        choices=DENSE_OPTIMIZERS,
        help="dense full-table optimizers timed for contrast (none: pass --dense with no names)",
    )
    ap.add_argument(
        "--dense-max-rows", type=int, default=100_000, help="time the dense optimizers only up to this size"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    ap.add_argument("--gradient", choices=("lookup", "embedding"), default="lookup",
                    help="where the sparse gradient comes from: the trainer's lookups (sorted, distinct rows) or "
                         "a plain nn.Embedding (a row per id; the optimizers group them)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    results = []
    for rows in args.rows:
        ids = make_ids(rows, args.batch, args.tokens, args.touched, gen)
        names = list(args.optimizers) + (list(args.dense) if rows <= args.dense_max_rows else [])
        for name in names:
            torch.manual_seed(0)
            # allocated as the trainer allocates its tables (huge pages where the kernel allows, then initialised)
            weight = advise_hugepages(torch.empty(rows, args.dim)).normal_()
            emb = torch.nn.Embedding(rows, args.dim, sparse=name not in DENSE_OPTIMIZERS, _weight=weight)
            results.append(bench_one(name, emb, ids, args))
            r = results[-1]
            print(f"  {name:<20} rows={rows:>9,}  {r['median_ms']:8.2f} ms", flush=True)
            del emb
            gc.collect()

    print(
        f"\noptimizer step, table rows x {args.dim}, batch {args.batch}x{args.tokens} ids touching "
        f"{args.touched:,} rows, gradients from {args.gradient}; torch {torch.__version__}, {torch.get_num_threads()} threads; wall median of "
        f"{args.repeats} (min-max), and median process CPU time; load average at end {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'optimizer':<20} {'class':<16} {'rows':>10} {'median ms':>10} {'min-max ms':>16} {'cpu ms':>8} "
        f"{'state MB':>9} {'init s':>7}"
    )
    for r in results:
        span = f"{r['min_ms']:.2f}-{r['max_ms']:.2f}"
        print(
            f"{r['optimizer']:<20} {r['optimizer_class']:<16} {r['rows']:>10,} {r['median_ms']:>10.2f} {span:>16} "
            f"{r['cpu_median_ms']:>8.2f} {r['state_mb']:>9.1f} {r['init_s']:>7.2f}"
        )
    ratios: dict[str, dict[str, float]] = {}
    lo, hi = min(args.rows), max(args.rows)
    if lo != hi:
        print(f"\nratio {hi:,} / {lo:,} rows (target <= 1.2x)      median   min    cpu")
        by_key = {(r["optimizer"], r["rows"]): r for r in results}
        for name in [*args.optimizers, *args.dense]:
            if (name, lo) in by_key and (name, hi) in by_key:
                a, b = by_key[(name, lo)], by_key[(name, hi)]
                ratios[name] = {k: b[k] / a[k] for k in ("median_ms", "min_ms", "cpu_median_ms")}
                q = ratios[name]
                print(f"  {name:<42} {q['median_ms']:5.2f}x {q['min_ms']:5.2f}x {q['cpu_median_ms']:5.2f}x")
        print("the embedding part of a training step (lookup + backward + optimizer step), the same runs: median ms")
        for name in [*args.optimizers, *args.dense]:
            if (name, lo) in by_key and (name, hi) in by_key:
                a, b = by_key[(name, lo)]["lookup_step_median_ms"], by_key[(name, hi)]["lookup_step_median_ms"]
                ratios[name]["lookup_step_median_ms"] = b / a
                print(f"  {name:<28} {a:8.2f} -> {b:8.2f} ms  {b / a:5.2f}x")
    if args.json:
        payload = {
            "config": vars(args),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "results": results,
            "ratios": ratios,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
