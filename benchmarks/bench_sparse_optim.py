"""Optimizer step time for trainable embedding tables: does the cost track the batch or the table?

For each table size (default 20K and 2M rows x 300) and each sparse optimizer, time `optimizer.step()` alone on the
sparse gradient of a 256 x 50 id batch, made as the trainer makes it (`bag_lookup.bag_sum`: sorted, distinct rows;
`--gradient embedding`: a plain `nn.Embedding(sparse=True)`, one row per id). The batch touches exactly
`--touched` distinct rows (default 10K, spread uniformly over the table, the rest repeats), so both table sizes do
the same work; uniform ids would touch ~9K rows of 20K but ~12.8K of 2M and skew the ratio. State is created
(and page-faulted in) before timing. The sizes are timed in interleaved rounds (`--rounds`; in each, `--warmup`
untimed then `--repeats` timed steps of every size in turn), and the ratio of two sizes is also given as the median
of the rounds' own ratios, both sizes measured seconds apart under the same load. `sparse_adam[torch]` is
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


def make_optimizer(name: str, emb: torch.nn.Embedding) -> torch.optim.Optimizer:
    if name == "sparse_adam[torch]":
        return torch.optim.SparseAdam([emb.weight], lr=1e-3)
    if name == "dense_adam":
        return torch.optim.Adam([emb.weight], lr=1e-3)
    if name == "dense_adamw":
        return torch.optim.AdamW([emb.weight], lr=1e-3)
    return build_sparse_optimizer(name, [emb.weight], lr=1e-3)


def bench_interleaved(name: str, ids_by_rows: dict[int, torch.Tensor], args: argparse.Namespace) -> tuple[list[dict], list[float]]:
    """One optimizer on every table size, measured in `args.rounds` interleaved rounds: each round times
    `args.repeats` steps of every size (after `args.warmup` steps of that size, so each block runs in its own
    steady cache state), ascending in even rounds and descending in odd ones. Load on a shared machine drifts over
    seconds; within a round both sizes see the same load, so the per-round ratio of the largest to the smallest
    size is the trustworthy figure (before rounds, all repeats of one size ran, then all of the next, some 10 s
    apart: the sgd ratio read 1.11x in one run and 1.48x in the next). Returns one row per size (medians over every
    round's steps) and the per-round ratios largest / smallest of the wall medians."""
    setups = {}
    for rows, ids in ids_by_rows.items():
        torch.manual_seed(0)
        # allocated as the trainer allocates its tables (huge pages where the kernel allows, then initialised)
        weight = advise_hugepages(torch.empty(rows, args.dim)).normal_()
        emb = torch.nn.Embedding(rows, args.dim, sparse=name not in DENSE_OPTIMIZERS, _weight=weight)
        opt = make_optimizer(name, emb)
        t0 = time.perf_counter()
        init_optimizer_state(opt)
        setups[rows] = (emb, opt, ids, time.perf_counter() - t0)
    times: dict[int, tuple[list[float], list[float], list[float]]] = {rows: ([], [], []) for rows in setups}
    round_ratios = []
    order = sorted(setups)
    for r in range(args.rounds):
        medians = {}
        for rows in order if r % 2 == 0 else order[::-1]:
            emb, opt, ids, _ = setups[rows]
            wall, cpu, whole = time_steps(emb, opt, ids, args.warmup, args.repeats, args.gradient)
            for acc, new in zip(times[rows], (wall, cpu, whole), strict=True):
                acc.extend(new)
            medians[rows] = statistics.median(wall)
        if len(order) > 1:
            round_ratios.append(medians[order[-1]] / medians[order[0]])
    out = []
    for rows, (emb, opt, _, init_s) in setups.items():
        wall, cpu, whole = times[rows]
        out.append({
            "optimizer": name,
            "optimizer_class": type(opt).__name__,
            "rows": rows,
            "dim": emb.embedding_dim,
            "median_ms": statistics.median(wall) * 1e3,
            "min_ms": min(wall) * 1e3,
            "max_ms": max(wall) * 1e3,
            "cpu_median_ms": statistics.median(cpu) * 1e3,
            "lookup_step_median_ms": statistics.median(whole) * 1e3,
            "init_s": init_s,
            "state_mb": state_bytes(opt) / 2**20,
            "times_ms": [t * 1e3 for t in wall],
        })
    setups.clear()
    gc.collect()
    return out, round_ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 2_000_000])
    ap.add_argument("--dim", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--touched", type=int, default=10_000, help="distinct rows per batch")
    ap.add_argument("--repeats", type=int, default=9, help="timed steps per size and round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the sizes (bench_interleaved)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each size's block in a round")
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
    ids_by_rows = {rows: make_ids(rows, args.batch, args.tokens, args.touched, gen) for rows in args.rows}
    results, round_ratios = [], {}
    for name in [*args.optimizers, *args.dense]:
        sizes = {rows: ids for rows, ids in ids_by_rows.items()
                 if name not in DENSE_OPTIMIZERS or rows <= args.dense_max_rows}
        rows_out, round_ratios[name] = bench_interleaved(name, sizes, args)
        results += rows_out
        for r in rows_out:
            print(f"  {name:<20} rows={r['rows']:>9,}  {r['median_ms']:8.2f} ms", flush=True)

    print(
        f"\noptimizer step, table rows x {args.dim}, batch {args.batch}x{args.tokens} ids touching "
        f"{args.touched:,} rows, gradients from {args.gradient}; torch {torch.__version__}, {torch.get_num_threads()} threads; wall median of "
        f"{args.rounds} interleaved rounds x {args.repeats} steps (min-max), and median process CPU time; load average at end "
        f"{os.getloadavg()[0]:.1f}"
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
        print(f"\nratio {hi:,} / {lo:,} rows (target <= 1.2x): of the medians over all rounds, of the minima, of the CPU "
              "medians, and the median (min-max) of the rounds' own ratios")
        by_key = {(r["optimizer"], r["rows"]): r for r in results}
        for name in [*args.optimizers, *args.dense]:
            if (name, lo) in by_key and (name, hi) in by_key:
                a, b = by_key[(name, lo)], by_key[(name, hi)]
                ratios[name] = {k: b[k] / a[k] for k in ("median_ms", "min_ms", "cpu_median_ms")}
                paired = round_ratios.get(name) or []
                if paired:
                    ratios[name] |= {"round_ratios": paired, "round_ratio_median": statistics.median(paired)}
                q = ratios[name]
                rounds = (f"  rounds {statistics.median(paired):5.2f}x ({min(paired):.2f}-{max(paired):.2f})"
                          if paired else "")
                print(f"  {name:<24} {q['median_ms']:5.2f}x {q['min_ms']:5.2f}x {q['cpu_median_ms']:5.2f}x{rounds}")
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
