"""One command, every system side by side on the Debian demo data; prints a markdown table and writes JSON.

    python benchmarks/bench_compare.py [--repeat 3] [--with-svm] [--quick]

Systems, each a separate process run `--repeat` times, interleaved (repeat 1 of every system, then repeat 2, ...)
so that drift in machine load hits all of them alike:

  ours                  `python -m trainer train --config configs/demo.toml`, 2 threads, checkpoints / TensorBoard /
                        projector off (side outputs the others do not write), a fresh data cache each run, so the
                        whole-process time includes tokenizing; GloVe comes from the trainer's vector cache (its
                        first-load cost is in the vector-load table)
  ours, wide & deep     `--config configs/demo_wide.toml` (the most accurate config), same settings; not with --quick
  ours, bag unigram     the same with `--model.encoder bag --embeddings.ngram_buckets 0` (throughput target)
  ours, time to acc.    epochs 1, 2, ... up to the config's: the fewest whose test accuracy reaches fastText
                        bigram's median, then its whole-process time (cold cache); stops at the first success
  fastText              pip fastText (`bench` extra), dim 50, epoch 5, lr 1.0, 2 threads, wordNgrams 1 / 2, and
                        bigram + GloVe 6B 50d as -pretrainedVectors; input tokenized once beforehand (untimed, see
                        fasttext_baseline.py); skipped with a message when fasttext is not installed
  tutorial              benchmarks/tutorial_baseline.py: padded batches of 64, mean pooling, Adam, 3 epochs;
                        frozen GloVe and trainable embeddings
  TF-IDF SVM            benchmarks/tfidf_svm_baseline.py, only with --with-svm (about 150 s per run)

Per system: test accuracy, whole-process wall seconds (process start to exit), the system's own training seconds,
tokens/s, and peak resident memory from `os.wait4` on the child (ru_maxrss: the child's own peak, not the
benchmark's). Then the optimizer step over table sizes (bench_sparse_optim.py) and vector load times
(bench_vectors.py), both as subprocesses. Every figure is a median with min-max; every target line is computed
from figures measured in this run. Results: benchmarks/results/compare.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from compare_report import render_markdown, targets  # noqa: E402
from fasttext_baseline import write_fasttext_file  # noqa: E402

from trainer.config import load_config  # noqa: E402

DATA = ROOT / "data" / "debian"
# side outputs the other systems do not write; otherwise ours runs the config as shipped
WIDE_CONFIG = ROOT / "configs" / "demo_wide.toml"
SIDE_OUTPUTS_OFF = (
    "--checkpoint.enabled false --metrics.tensorboard false --metrics.projector_words 0 --metrics.progress false"
).split()
VECTORS_WORK = Path(tempfile.gettempdir()) / "trainer-bench-vectors"  # bench_vectors.py's default work folder


@dataclass(frozen=True)
class System:
    key: str
    label: str
    cmd: list[str]  # run as is; "{run}" / "{cache}" are replaced by a fresh per-run folder
    kind: str  # "ours" reads metrics.jsonl from the run folder; the others print everything on stdout


@dataclass
class Context:
    args: argparse.Namespace
    work: Path
    config: Path
    epochs: int
    fasttext_files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.notes.append(text)


def child_env() -> dict[str, str]:
    """Children import `trainer` from this checkout (not whichever one is pip-installed), so running this script
    from a clean `git worktree` measures exactly that commit."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def run_measured(cmd: list[str], log_stem: Path, timeout_s: float) -> dict:
    """Run one child to completion; wall time and the child's own peak RSS from wait4; its last stdout JSON line.

    stdout/stderr go to files (no pipes to drain), so the child is reaped with os.wait4, whose rusage belongs to
    that child alone (getrusage(RUSAGE_CHILDREN) would be the maximum over every child so far). Linux starts a
    child's ru_maxrss at the resident size of the process it was spawned from (exec keeps the old image's peak),
    so this process must stay small: `rss_floor_gb` records its peak at the spawn, and the report flags rows
    whose figure does not rise above it.
    """
    out_path, err_path = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    floor_gb = own_peak_rss_gb()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=child_env())
        watchdog = threading.Timer(timeout_s, proc.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
        wall_s = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = err_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"exit status {proc.returncode}: {' '.join(cmd)}\n{tail}")
    lines = [ln for ln in out_path.read_text().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON result on stdout: {' '.join(cmd)}")
    result = json.loads(lines[-1])
    result["wall_s"] = wall_s
    result["peak_rss_gb"] = usage.ru_maxrss / 2**20  # KiB on Linux
    result["rss_floor_gb"] = floor_gb
    return result


def own_peak_rss_gb() -> float:
    """This process's peak resident size (VmHWM), the floor of every child's ru_maxrss; 0 off Linux."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        return 0.0


def ours_metrics(run_dir: Path) -> dict:
    """Median logged `throughput/tokens_per_s` (the trainer excludes warm-up steps) and the final tokens seen."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rates = [r["throughput/tokens_per_s"] for r in rows if "throughput/tokens_per_s" in r]
    seen = [r["progress/tokens_seen"] for r in rows if "progress/tokens_seen" in r]
    return {
        "tokens_per_s": statistics.median(rates) if rates else None,
        "tokens_seen": max(seen, default=None),
    }


def run_system(ctx: Context, system: System, tag: str) -> dict | None:
    """One run of one system; None (with a printed message) when it fails, so the other rows still come out."""
    run_dir, cache_dir = ctx.work / "runs" / f"{system.key}-{tag}", ctx.work / "cache" / f"{system.key}-{tag}"
    for d in (run_dir, cache_dir):
        shutil.rmtree(d, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [c.replace("{run}", str(run_dir)).replace("{cache}", str(cache_dir)) for c in system.cmd]
    try:
        result = run_measured(cmd, ctx.work / "logs" / f"{system.key}-{tag}", ctx.args.timeout)
    except RuntimeError as e:
        print(f"  {system.key} [{tag}] FAILED: {e}", flush=True)
        return None
    if system.kind == "ours":
        result.update(ours_metrics(run_dir))
    for d in (run_dir, cache_dir):  # the tables and caches of a 2M-bucket run are large; the figures are kept
        shutil.rmtree(d, ignore_errors=True)
    acc = result.get("test", {}).get("accuracy")
    tps = result.get("tokens_per_s")
    print(
        f"  {system.key} [{tag}]: test acc {acc:.4f}, whole {result['wall_s']:.1f} s, "
        f"train {result['train_seconds']:.1f} s, "
        f"{f'{tps:,.0f} tokens/s' if tps else 'tokens/s n/a'}, peak RSS {result['peak_rss_gb']:.2f} GiB",
        flush=True,
    )
    return result


def warm_up(ctx: Context, ours: list[System]) -> None:
    """One untimed 3-step run of each of our systems first. Why: numba compiles our kernels once per install
    (about 12 s here) and caches them (trainer/jit.py); a checkout that never ran, such as a fresh `git worktree`,
    would otherwise pay that in its first timed run (24.1 s against 10.3 s whole process, seen)."""
    if not ours:
        return
    print("warm-up (untimed): a 3-step run of each of ours, so numba's kernels are compiled and cached", flush=True)
    t0 = time.perf_counter()
    for system in ours:
        run_system(ctx, System(system.key, system.label, [*system.cmd, "--train.max_steps", "3"], system.kind),
                   "warmup")
    ctx.notes.append(f"before the timed runs, one untimed 3-step run of each of ours ({time.perf_counter() - t0:.1f} s):"
                     " numba compiles our kernels once per install and caches them")


def ours_system(ctx: Context, key: str, label: str, *extra: str, config: Path | None = None) -> System:
    cmd = [sys.executable, "-m", "trainer", "train", "--config", str(config or ctx.config), "--run.dir", "{run}"]
    cmd += ["--data.cache_dir", "{cache}", "--train.threads", str(ctx.args.threads)]
    return System(key, label, [*cmd, *SIDE_OUTPUTS_OFF, *extra], "ours")


def fasttext_available() -> bool:
    try:
        import fasttext  # noqa: F401
    except ImportError:
        return False
    return True


def write_fasttext_vec(ctx: Context) -> Path:
    """GloVe 6B 50d as a fastText .vec (`N D` header, then GloVe text lines), from bench_vectors' text copy."""
    vec = ctx.work / "glove.6B.50d.vec"
    if vec.exists():
        return vec
    text = VECTORS_WORK / "glove.6B.50d.txt"
    if not text.exists():
        # in a child process: converting the table took this process's resident memory to 0.8 GiB, and every
        # later child's ru_maxrss starts at this process's resident size (see run_measured)
        VECTORS_WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from bench_vectors import "
                        "write_glove_text; write_glove_text(Path(sys.argv[1]))", str(text)],
                       cwd=BENCH, env=child_env(), check=True)
    with open(text, "rb") as f:
        dim = len(f.readline().split()) - 1
        f.seek(0)
        rows = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))
    with open(vec, "wb") as out, open(text, "rb") as src:
        out.write(f"{rows} {dim}\n".encode())
        shutil.copyfileobj(src, out, 1 << 24)
    return vec


def build_systems(ctx: Context) -> list[System]:
    args, py = ctx.args, sys.executable
    cfg = load_config(ctx.config)
    ours_label = (
        f"ours: {ctx.config.name} ({cfg.model.encoder}, {cfg.embeddings.ngram_buckets:,} bigram buckets, "
        f"{cfg.embeddings.pretrained or 'no pretrained'} frozen={cfg.embeddings.freeze_pretrained}, {ctx.epochs} epochs)"
    )
    unigram_bag = ("--model.encoder", "bag", "--embeddings.ngram_buckets", "0")
    systems = [
        ours_system(ctx, "ours_default", ours_label),
        ours_system(
            ctx, "ours_bag_unigram", f"ours: bag encoder, unigrams only, {ctx.epochs} epochs", *unigram_bag
        ),
        # the throughput configuration: same model, 1024 documents a step (fewer per-step overheads per token)
        ours_system(
            ctx, "ours_bag_unigram_b1024", f"ours: bag encoder, unigrams only, batch 1024, {ctx.epochs} epochs",
            *unigram_bag, "--train.batch_size", "1024",
        ),
    ]
    if not args.quick:  # the most accurate config we have (about 25 s of training a run)
        wide = load_config(WIDE_CONFIG)
        systems.insert(1, ours_system(
            ctx, "ours_wide", f"ours: {WIDE_CONFIG.name} (wide & deep over {wide.model.wide}, "
            f"{wide.embeddings.pretrained} frozen={wide.embeddings.freeze_pretrained}, {wide.train.epochs} epochs)",
            config=WIDE_CONFIG,
        ))
    if fasttext_available():
        t0 = time.perf_counter()
        for split in ("train", "test"):
            ctx.fasttext_files[split] = ctx.work / f"fasttext.{split}.txt"
            write_fasttext_file(DATA / f"{split}.csv", ctx.fasttext_files[split])
        ctx.note(
            f"fastText input written once, untimed: {time.perf_counter() - t0:.1f} s (lowercase, the trainer's "
            "token pattern, space-joined)"
        )
        ft = [py, str(BENCH / "fasttext_baseline.py"), "--thread", str(args.threads)]
        ft += ["--train", str(ctx.fasttext_files["train"]), "--test", str(ctx.fasttext_files["test"])]
        ft += ["--dim", "50", "--epoch", "5", "--lr", "1.0"]
        systems += [
            System(
                "fasttext_unigram",
                "fastText unigram (dim 50, 5 epochs, lr 1.0)",
                [*ft, "--word-ngrams", "1"],
                "child",
            ),
            System("fasttext_bigram", "fastText bigram (wordNgrams 2)", [*ft, "--word-ngrams", "2"], "child"),
        ]
        if not args.quick and not args.skip_fasttext_glove:
            vec = write_fasttext_vec(ctx)
            systems.append(
                System(
                    "fasttext_bigram_glove",
                    "fastText bigram + GloVe 6B 50d (-pretrainedVectors)",
                    [*ft, "--word-ngrams", "2", "--pretrained-vectors", str(vec)],
                    "child",
                )
            )
    else:
        ctx.note(
            "fasttext is not installed (pip install -e .[bench]): fastText rows and targets b, c skipped"
        )
    tutorial = [py, str(BENCH / "tutorial_baseline.py"), "--threads", str(args.threads)]
    if not args.quick:
        systems.append(
            System(
                "tutorial_frozen_glove",
                "tutorial PyTorch: frozen GloVe 6B 50d, Adam, 3 epochs",
                [*tutorial, "--pretrained", "glove-6b-50d", "--freeze"],
                "child",
            )
        )
    systems.append(
        System(
            "tutorial_trainable",
            "tutorial PyTorch: trainable 50d embeddings, Adam, 3 epochs",
            tutorial,
            "child",
        )
    )
    if args.with_svm and importlib.util.find_spec("sklearn") is None:
        ctx.note("scikit-learn is not installed (pip install -e .[bench]): TF-IDF SVM row skipped")
    elif args.with_svm:
        systems.append(
            System(
                "tfidf_svm",
                "TF-IDF word 1-2 + char 2-5, LinearSVC (1 thread)",
                [py, str(BENCH / "tfidf_svm_baseline.py")],
                "child",
            )
        )
    return systems


def time_to_accuracy(ctx: Context, target_acc: float, default_runs: list[dict], fasttext: System | None) -> dict:
    """Fewest epochs whose test accuracy reaches `target_acc`, each candidate a cold-cache whole-process run; then
    `--repeat` pairs of runs, fastText bigram and ours at that epoch count one right after the other, so the ratio
    is taken between runs made under the same machine load (this VM's speed drifts by up to 2x within minutes:
    fastText's rows at the start of a benchmark and ours tens of minutes later made ratios of 1.87x and 2.12x
    of the same code)."""
    last = 2 if ctx.args.quick else ctx.epochs
    if last < ctx.epochs:
        ctx.note(f"--quick: time to accuracy searched up to {last} of {ctx.epochs} epochs only")
    tried = []
    for epochs in range(1, last + 1):
        system = ours_system(ctx, f"ours_epochs{epochs}", "", "--train.epochs", str(epochs))
        if epochs == ctx.epochs and default_runs:
            runs = list(default_runs)  # the default-config rows are exactly this run; no need to train again
        else:
            first = run_system(ctx, system, "tta0")
            if first is None:
                return {"target_accuracy": target_acc, "tried": tried, "reached": False, "error": True}
            runs = [first]
        acc = statistics.median(r["test"]["accuracy"] for r in runs)
        tried.append({"epochs": epochs, "test_accuracy": acc})
        if acc >= target_acc:
            paired_fasttext = []
            if fasttext is not None:  # fresh pairs: fastText bigram, then ours, each pair back to back
                runs = []
                for r in range(ctx.args.repeat):
                    ft, ours = run_system(ctx, fasttext, f"pair{r}"), run_system(ctx, system, f"pair{r}")
                    if ft and ours:
                        paired_fasttext.append(ft)
                        runs.append(ours)
            else:
                for r in range(len(runs), ctx.args.repeat):  # more runs of the winner, for the time's spread
                    again = run_system(ctx, system, f"tta{r}")
                    runs += [again] if again else []
            return {
                "target_accuracy": target_acc,
                "tried": tried,
                "reached": True,
                "epochs": epochs,
                "runs": runs,
                "paired_fasttext": paired_fasttext,
            }
    return {"target_accuracy": target_acc, "tried": tried, "reached": False, "searched_up_to": last}


def run_json_script(ctx: Context, name: str, script_args: list[str]) -> dict | None:
    """Run one of the component benchmarks with --json, echoing its output; None when it fails."""
    out = ctx.work / f"{name}.json"
    cmd = [sys.executable, str(BENCH / f"{name}.py"), *script_args, "--json", str(out)]
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), timeout=ctx.args.timeout)
    if proc.returncode != 0:
        ctx.note(f"{name}.py failed with exit status {proc.returncode}")
        return None
    return json.loads(out.read_text())


def optimizer_bench(ctx: Context) -> dict | None:
    a = ctx.args
    rows = ["20000", "2000000"] if a.quick else ["20000", "200000", "2000000"]
    script_args = [
        "--rows",
        *rows,
        "--threads",
        str(a.optim_threads),
        "--repeats",
        "5" if a.quick else "9",
        "--dense",
        "dense_adamw",
        "--dense-max-rows",
        str(20_000 if a.quick else a.dense_max_rows),
    ]
    if a.quick:
        script_args += ["--optimizers", "rowwise_adagrad", "sparse_adam"]
    return run_json_script(ctx, "bench_sparse_optim", script_args)


def vector_bench(ctx: Context) -> dict | None:
    script_args = ["--repeat", str(ctx.args.repeat)] + (["--skip-naive"] if ctx.args.quick else [])
    return run_json_script(ctx, "bench_vectors", script_args)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for key, dist in (
        ("torch", "torch"),
        ("numpy", "numpy"),
        ("fasttext", "fasttext-wheel"),
        ("scikit-learn", "scikit-learn"),
    ):
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    return out


def machine() -> dict:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), ""
    )
    mem_kib = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "os": platform.platform(),
    }


def git_state() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    # uncommitted changes to the trainer or its configs change what "ours" measures, so they are recorded
    dirty = git("status", "--porcelain", "--", "trainer", "configs")
    return {"commit": git("rev-parse", "--short", "HEAD"), "trainer_or_configs_modified": bool(dirty)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="runs per system (median, min-max)")
    ap.add_argument("--quick", action="store_true", help="smoke run: repeat 1, fewer systems and table sizes")
    ap.add_argument(
        "--with-svm", action="store_true", help="add the TF-IDF + LinearSVC row (about 150 s a run)"
    )
    ap.add_argument(
        "--skip-fasttext-glove", action="store_true", help="leave out fastText with GloVe vectors"
    )
    ap.add_argument("--skip-optim", action="store_true", help="leave out the optimizer step benchmark")
    ap.add_argument("--skip-vectors", action="store_true", help="leave out the vector load benchmark")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.toml", help="our default config")
    ap.add_argument("--threads", type=int, default=2, help="threads for every system (fastText, torch)")
    ap.add_argument(
        "--optim-threads", type=int, default=1, help="torch threads for the optimizer step benchmark"
    )
    ap.add_argument(
        "--dense-max-rows",
        type=int,
        default=200_000,
        help="largest table for the dense AdamW contrast (2M x 300 needs ~10 GB)",
    )
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before a child process is killed")
    ap.add_argument("--out-dir", type=Path, default=BENCH / "results")
    ap.add_argument("--work", type=Path, default=None, help="work folder (kept); default: a temporary one")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (DATA / "train.csv").exists():
        print(f"building the demo data in {DATA} ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "trainer", "data", "debian", "--out", str(DATA)], cwd=ROOT, check=True
        )
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-compare-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    ctx = Context(args, work, args.config, load_config(args.config).train.epochs)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    systems = build_systems(ctx)
    runs: dict[str, list[dict]] = {s.key: [] for s in systems}
    print(f"work folder {work}; {len(systems)} systems x {args.repeat} runs", flush=True)
    warm_up(ctx, [s for s in systems if s.kind == "ours"])
    for r in range(args.repeat):
        for system in systems:
            result = run_system(ctx, system, f"r{r}")
            if result is not None:
                runs[system.key].append(result)

    tta = None
    if runs.get("fasttext_bigram") and runs.get("ours_default") is not None:
        target_acc = statistics.median(r["test"]["accuracy"] for r in runs["fasttext_bigram"])
        print(f"\ntime to fastText-bigram accuracy ({target_acc:.4f}):", flush=True)
        fasttext = next(s for s in systems if s.key == "fasttext_bigram")
        tta = time_to_accuracy(ctx, target_acc, runs["ours_default"], fasttext)
    optim = None if args.skip_optim else optimizer_bench(ctx)
    vectors = None if args.skip_vectors else vector_bench(ctx)

    report = {
        "date": started.isoformat(timespec="seconds"),
        "benchmark_seconds": time.perf_counter() - t_start,
        "command": " ".join(
            ["python", "benchmarks/bench_compare.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(),
        "load_average_start": load_before,
        "load_average_end": os.getloadavg(),
        "versions": versions(),
        "git": git_state(),
        "settings": {
            "repeat": args.repeat,
            "threads": args.threads,
            "optim_threads": args.optim_threads,
            "quick": args.quick,
            "with_svm": args.with_svm,
            "config": str(ctx.config.relative_to(ROOT)),
            "config_epochs": ctx.epochs,
            "config_sparse_optimizer": load_config(ctx.config).optim.sparse,
        },
        "systems": [{"key": s.key, "label": s.label, "command": s.cmd, "runs": runs[s.key]} for s in systems],
        "time_to_accuracy": tta,
        "optimizer_step": optim,
        "vector_load": vectors,
        "notes": ctx.notes,
    }
    report["targets"] = targets(report)
    markdown = render_markdown(report)
    print("\n" + markdown)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "compare.json").write_text(json.dumps(report, indent=1))
    (args.out_dir / "compare.md").write_text(markdown)
    print(f"wrote {args.out_dir / 'compare.json'} and {args.out_dir / 'compare.md'}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
