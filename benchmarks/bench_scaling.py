"""Distributed scaling on CPU: 1 process vs 2 processes, replicated vs row-wise, and memory per rank.

Three measurements, each through the real CLI (`python -m trainer train` and `torchrun ... -m trainer train`),
each process pinned to one intra-op thread so "2 processes" means 2 cores:

1. throughput: tokens/s on the Debian demo data, 1 process x 1 thread vs 2 processes x 1 thread (replicated and
   row_wise), same global batch, figures from metrics.jsonl (warm-up steps excluded by the trainer); at each
   global batch size of `--batch-sizes` (default 1024; 2 processes take half each). Communication per step grows
   sublinearly with the batch (Zipf: more repeated ids), so the ratio depends on it: report every batch measured;
2. step time: row_wise vs replicated at 2 processes (seconds per optimizer step, from examples/s);
3. memory: peak resident memory per rank with a 2M x 300 frozen table (full_pretrained, memory-mapped) plus a
   1M x 300 trainable table (hashed bigram buckets), row_wise and replicated at W=2 and W=1.

Ratios are taken within one run of this script (the machines are noisy). Prints a table and writes JSON.

    python benchmarks/bench_scaling.py [--steps 150] [--repeat 3] [--batch-sizes 512 2048 8192] [--pin-cores]
        [--skip-memory] [--json out.json]

`--pin-cores` adds the same setups with one core per process (1 process under taskset, so its data thread
shares its core; ranks through `--dist.pin_cores`): a per-core scaling figure, next to the unpinned one a user
gets by default.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_training(nproc: int, args: list[str], run_dir: Path, timeout: int = 1800, pin: bool = False) -> dict:
    """`pin`: one core per process: the single process under `taskset` on the first visible core (its data
    thread shares that core), torchrun's ranks through `--dist.pin_cores true`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONUNBUFFERED": "1"}
    common = ["--run.dir", str(run_dir), "--train.threads", "1", "--metrics.progress", "false"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "trainer", "train", *args, *common]
        if pin:
            cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *cmd]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "trainer", "train",
               *args, *common, *(["--dist.pin_cores", "true"] if pin else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = [r["throughput/tokens_per_s"] for r in rows if "throughput/tokens_per_s" in r]
    eps = [r["throughput/examples_per_s"] for r in rows if "throughput/examples_per_s" in r]
    peak = max((r.get("memory/peak_rss_gb_max_rank", 0.0) for r in rows), default=0.0)
    return {"tokens_per_s": statistics.median(tps[1:] or tps or [0.0]),
            "examples_per_s": statistics.median(eps[1:] or eps or [0.0]),
            "peak_rss_gb_max_rank": peak, "wall_s": wall}


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def throughput(args, work: Path, batch: int) -> dict:
    data = ROOT / "data" / "debian"
    if not (data / "train.csv").exists():
        subprocess.run([sys.executable, "-m", "trainer", "data", "debian", "--out", str(data)], check=True, cwd=ROOT)
    base = ["--config", str(ROOT / "configs" / "demo.toml"), "--train.max_steps", str(args.steps),
            "--train.batch_size", str(batch), "--checkpoint.enabled", "false",
            "--metrics.log_every_steps", "10", "--metrics.warmup_steps", "5", "--metrics.tensorboard", "false",
            "--data.valid", "", "--data.test", "", "--data.cache_dir", str(work / "cache"),
            "--metrics.projector_words", "0", *args.train_args]
    setups = {"1proc": (1, []), "2proc_replicated": (2, ["--dist.embedding_sharding", "replicated"]),
              "2proc_row_wise": (2, ["--dist.embedding_sharding", "row_wise"])}
    if args.pin_cores:  # the same three, each process on one core of its own
        setups.update({f"{k}_pinned": v for k, v in list(setups.items())})
    results: dict[str, list[dict]] = {k: [] for k in setups}
    for r in range(args.repeat):
        for name, (nproc, extra) in setups.items():  # interleaved, so drift in machine load hits all alike
            run_dir = work / f"tp-{batch}-{name}-{r}"
            out = run_training(nproc, base + extra, run_dir, pin=name.endswith("_pinned"))
            shutil.rmtree(run_dir, ignore_errors=True)  # metrics are read; checkpoints and exports are not needed
            results[name].append(out)
            print(f"  [{r}] batch {batch} {name}: {out['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    summary = {name: {"tokens_per_s": summarize([o["tokens_per_s"] for o in outs]),
                      "step_s": summarize([batch / o["examples_per_s"] for o in outs])}
               for name, outs in results.items()}
    for suffix in ("", "_pinned") if args.pin_cores else ("",):
        one, rep, rw = (results[k + suffix] for k in ("1proc", "2proc_replicated", "2proc_row_wise"))
        summary[f"ratio_2proc_replicated_over_1proc{suffix}"] = summarize(
            [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(one, rep, strict=True)])
        summary[f"ratio_2proc_row_wise_over_1proc{suffix}"] = summarize(
            [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(one, rw, strict=True)])
        summary[f"ratio_row_wise_step_over_replicated{suffix}"] = summarize(
            [a["examples_per_s"] / b["examples_per_s"] for a, b in zip(rep, rw, strict=True)])
    return summary


def write_word2vec(path: Path, rows: int, dim: int) -> None:
    """A word2vec binary table written in blocks (words w0000000 ...; values N(0, 0.4))."""
    rng = np.random.default_rng(0)
    with path.open("wb") as f:
        f.write(f"{rows} {dim}\n".encode())
        block = 100_000
        for start in range(0, rows, block):
            n = min(block, rows - start)
            values = rng.normal(0, 0.4, (n, dim)).astype("<f4")
            rec = np.zeros(n, dtype=[("word", "S9"), ("space", "S1"), ("vec", "<f4", (dim,)), ("nl", "S1")])
            rec["word"] = [f"w{start + i:07d}".encode() for i in range(n)]
            rec["space"] = b" "
            rec["vec"] = values
            rec["nl"] = b"\n"
            f.write(rec.tobytes())


def memory(args, work: Path) -> dict:
    rows, dim = args.frozen_rows, 300
    vec = work / "big.w2v.bin"
    if not vec.exists():
        write_word2vec(vec, rows, dim)
    rng = np.random.default_rng(1)
    data = work / "big.csv"
    if not data.exists():
        ids = (rng.zipf(1.2, size=(4000, 40)) - 1) % rows
        labels = rng.integers(0, 4, 4000)
        lines = ["text,label"] + [" ".join(f"w{i:07d}" for i in doc) + f",c{y}" for doc, y in zip(ids, labels, strict=True)]
        data.write_text("\n".join(lines) + "\n")
    base = ["--data.train", str(data), "--embeddings.pretrained", str(vec), "--embeddings.full_pretrained", "true",
            "--embeddings.ngram_buckets", str(args.trainable_rows), "--embeddings.vectors_cache_dir",
            str(work / "vcache"), "--data.cache_dir", str(work / "cache-big"), "--train.max_steps", "20",
            "--train.batch_size", "256", "--optim.sparse", "rowwise_adagrad", "--checkpoint.enabled", "false",
            "--metrics.log_every_steps", "5", "--metrics.tensorboard", "false", "--metrics.projector_words", "0"]
    # prime the vector cache once so the runs below measure training, not parsing
    run_training(1, base + ["--train.max_steps", "1"], work / "mem-prime")
    out = {}
    for name, nproc, mode in (("1proc", 1, "replicated"), ("2proc_replicated", 2, "replicated"),
                              ("2proc_row_wise", 2, "row_wise")):
        res = run_training(nproc, base + ["--dist.embedding_sharding", mode], work / f"mem-{name}")
        out[name] = res["peak_rss_gb_max_rank"]
        print(f"  {name}: peak RSS per rank {out[name]:.2f} GiB", file=sys.stderr)
    table_gb = (rows + args.trainable_rows) * dim * 4 / 2**30
    out["tables_gb"] = table_gb
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1024],
                   help="global batch sizes (documents) of the throughput runs, each run at every size")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--frozen-rows", type=int, default=2_000_000)
    p.add_argument("--trainable-rows", type=int, default=1_000_000)
    p.add_argument("--pin-cores", action="store_true",
                   help="also run every throughput setup with each process pinned to one core of its own")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--work", default="", help="work folder (kept); default: a temporary folder")
    p.add_argument("--json", default="")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="extra `trainer train` flags for the throughput runs, e.g. --model.encoder bag (last option)")
    args = p.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    # What produced the figures, so a results file can be read without the command line that made it
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    report: dict = {"cpus": os.cpu_count(), "commit": commit or None, "args": vars(args)}
    if not args.skip_throughput:
        by_batch = {b: throughput(args, work, b) for b in args.batch_sizes}
        report["throughput"] = by_batch[args.batch_sizes[0]]
        report["throughput_by_global_batch"] = {str(b): t for b, t in by_batch.items()}
    if not args.skip_memory:
        report["memory_gb"] = memory(args, work)
    print(json.dumps(report, indent=1))
    for batch, t in report.get("throughput_by_global_batch", {}).items():
        print(f"\nglobal batch {batch} documents ({int(batch) // 2} per rank with 2 processes)")
        print("| setup | tokens/s median (min-max) | step s median |")
        print("|---|---|---|")
        for name in [k for k in t if not k.startswith("ratio_")]:
            s = t[name]["tokens_per_s"]
            print(f"| {name} | {s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f}) | {t[name]['step_s']['median']:.4f} |")
        for key in [k for k in t if k.startswith("ratio_")]:
            s = t[key]
            print(f"{key}: {s['median']:.2f} (min {s['min']:.2f}, max {s['max']:.2f})")
    if "memory_gb" in report:
        m = report["memory_gb"]
        print(f"\npeak RSS per rank, tables {m['tables_gb']:.2f} GiB: 1 process {m['1proc']:.2f} GiB, "
              f"2 replicated {m['2proc_replicated']:.2f} GiB, 2 row_wise {m['2proc_row_wise']:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if not args.work:  # the temporary folder (data cache, big vector file) is ours: do not leave it in /tmp
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
