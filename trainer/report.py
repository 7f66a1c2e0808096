"""`python -m trainer report --run RUN_DIR`: a short summary of a run for a person, and PNG curves.

Reads only what the run folder already holds, and imports no torch:

- `metrics.jsonl`: every logged scalar (a partial last line from a crash is skipped and counted; rows of steps a
  resumed run took again, those after its checkpoint, replace the first run's);
- `result.json`: the final metrics of the last completed training;
- `eval/*.json`: per-split evaluations written by training and by `trainer eval`;
- `checkpoints/step-N/trainer_state.json`: how far the run got.

The summary gives final and best metrics, throughput (median over the logged intervals, warm-up already excluded
by the trainer), where step time went (mean of the `time/*_share` tags), pretrained coverage and peak memory.
With matplotlib installed, `RUN_DIR/report/loss.png` and `accuracy.png` hold the curves (each written to a
temporary file and renamed into place); without it the plots are skipped with a message.
"""

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from trainer.metrics import RESUMED_AT_STEP

_STEP_DIR = re.compile(r"^step-(\d+)$")
LOSS_TAGS = ("loss/train", "loss/valid", "loss/test")
ACCURACY_TAGS = ("accuracy/train_batch", "accuracy/valid", "accuracy/test")


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of metrics.jsonl and the number of unreadable lines (a crash can cut the last one)."""
    rows, bad = [], 0
    if not path.is_file():
        return rows, bad
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                if RESUMED_AT_STEP in row:  # training went on from this step's checkpoint: later rows are replaced
                    rows = [r for r in rows if r["step"] <= row["step"]]
                    continue
                if rows and row["step"] < rows[-1]["step"]:  # the same, in files written before the marker existed
                    rows = [r for r in rows if r["step"] < row["step"]]
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def series(rows: list[dict[str, Any]], tag: str) -> list[tuple[int, float]]:
    """(step, value) for one tag, in file order; a resumed run's repeated steps keep their last value."""
    by_step: dict[int, float] = {}
    for row in rows:
        value = row.get(tag)
        if isinstance(value, int | float):
            by_step[row["step"]] = float(value)
    return sorted(by_step.items())


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _resume_steps(path: Path) -> list[int]:
    """The steps metrics.jsonl's resume markers name (MetricsLogger.resumed), in file order."""
    steps = []
    if path.is_file():
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if RESUMED_AT_STEP in line:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(row, dict) and isinstance(row.get(RESUMED_AT_STEP), int):
                        steps.append(row[RESUMED_AT_STEP])
    return steps


def _checkpoint_steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(
        int(m.group(1))
        for p in folder.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()
    )


def build_report(run_dir: Path) -> dict[str, Any]:
    """Everything the summary shows, as plain data (also what `--json` prints)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--run {run_dir}: no such folder")
    rows, bad_lines = read_metrics(run_dir / "metrics.jsonl")
    result = _read_json(run_dir / "result.json")
    if not rows and result is None:
        raise FileNotFoundError(
            f"--run {run_dir}: not a run folder (neither metrics.jsonl nor result.json); "
            "train first, or pass the folder given as run.dir"
        )
    report: dict[str, Any] = {"run": str(run_dir), "bad_metric_lines": bad_lines}
    report["checkpoints"] = _checkpoint_steps(run_dir / "checkpoints")
    # the furthest step reached: rows are logged every metrics.log_every_steps, a checkpoint may be later
    report["last_step"] = max([r["step"] for r in rows] + [int((result or {}).get("step", 0))]
                              + report["checkpoints"][-1:])
    report["result"] = result
    newest = (_read_json(run_dir / "checkpoints" / f"step-{report['checkpoints'][-1]}" / "trainer_state.json")
              if report["checkpoints"] else None) or {}
    report["world_size"], report["sharding"] = newest.get("world_size"), newest.get("sharding")
    resumes = _resume_steps(run_dir / "metrics.jsonl")
    report["segment_from_step"] = resumes[-1] if resumes else None
    # throughput and step-time shares depend on the world size and the machine, which a resume may change: they
    # describe the run's last segment (since its last resume)
    recent = [r for r in rows if r["step"] > resumes[-1]] if resumes else rows

    final: dict[str, float] = {}
    best: dict[str, dict[str, float]] = {}
    for tag in LOSS_TAGS + ACCURACY_TAGS + ("accuracy/valid_macro_f1", "accuracy/test_macro_f1"):
        points = series(rows, tag)
        if not points:
            continue
        final[tag] = points[-1][1]
        pick = min if tag.startswith("loss/") else max
        step, value = pick(points, key=lambda p: p[1])
        best[tag] = {"step": step, "value": value}
    report["final"], report["best"] = final, best

    evals = {}
    for path in sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []:
        m = _read_json(path)
        if m and "accuracy" in m:
            evals[path.stem] = {
                k: m[k] for k in ("accuracy", "macro_f1", "loss", "n", "unseen_label_docs") if k in m
            }
    report["eval"] = evals

    throughput = {}
    for tag in ("throughput/tokens_per_s", "throughput/examples_per_s"):
        values = [v for _, v in series(recent, tag)]
        if values:
            throughput[tag.split("/", 1)[1]] = {
                "median": statistics.median(values),
                "max": max(values),
                "intervals": len(values),
            }
    report["throughput"] = throughput

    shares: dict[str, list[float]] = {}
    for row in recent:
        for key, value in row.items():
            if key.startswith("time/") and key.endswith("_share") and isinstance(value, int | float):
                shares.setdefault(key[len("time/") : -len("_share")], []).append(float(value))
    total = sum(statistics.fmean(v) for v in shares.values()) or 1.0
    report["time_share"] = dict(
        sorted(((k, statistics.fmean(v) / total) for k, v in shares.items()), key=lambda kv: -kv[1])
    )

    coverage = {}
    for row in rows:
        coverage.update({k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("embeddings/")})
    report["coverage"] = coverage
    peaks = [v for _, v in series(rows, "memory/peak_rss_gb")]
    report["peak_rss_gb"] = max(peaks) if peaks else None
    return report


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"run {report['run']}: step {report['last_step']}"
        + (
            f", checkpoints at steps {', '.join(map(str, report['checkpoints']))}"
            if report["checkpoints"]
            else ", no checkpoints"
        )
        + (f" (world size {report['world_size']}, {report['sharding']} tables)" if report.get("world_size") else "")
    ]
    result = report["result"]
    if result is None:
        lines.append("  no result.json: training has not completed (interrupted, or still running)")
    else:
        lines.append(
            f"  last training: {result.get('steps_this_run', '?')} steps in "
            f"{result.get('train_seconds', 0.0):.1f}s"
        )
    lines.append("final metrics")
    for split in ("valid", "test"):
        m = (result or {}).get(split)
        if m:
            lines.append(
                f"  {split:<6} accuracy {m['accuracy']:.4f}  macro_f1 {m['macro_f1']:.4f}  "
                f"loss {'n/a' if m.get('loss') is None else format(m['loss'], '.4f')}  n {m['n']}"
            )
    for tag, value in report["final"].items():  # what result.json does not already say
        if not (result or {}).get(tag.split("/", 1)[1].removesuffix("_macro_f1")):
            lines.append(f"  {tag:<24} {_fmt(value)} (last logged)")
    best = {tag: b for tag, b in report["best"].items() if "valid" in tag}
    if best:
        lines.append("best on validation")
        for tag, b in best.items():
            lines.append(f"  {tag:<24} {_fmt(b['value'])} at step {b['step']}")
    if report["eval"]:
        lines.append("evaluations (eval/)")
        for name, m in report["eval"].items():
            extra = f"  unseen-label docs {m['unseen_label_docs']}" if m.get("unseen_label_docs") else ""
            lines.append(
                f"  {name:<24} accuracy {m['accuracy']:.4f}  macro_f1 {m.get('macro_f1', 0.0):.4f}  "
                f"n {m.get('n', '?')}{extra}"
            )
    since = report.get("segment_from_step")
    segment = f"; since the resume at step {since}" if since is not None else ""
    if report["throughput"]:
        lines.append(f"throughput (median over logged intervals, warm-up excluded{segment})")
        for name, t in report["throughput"].items():
            lines.append(f"  {name:<24} {t['median']:,.0f} (max {t['max']:,.0f}, {t['intervals']} intervals)")
    else:
        lines.append(
            "throughput: not logged (the run was shorter than metrics.warmup_steps + one log interval)"
        )
    if report["time_share"]:
        lines.append(f"where step time went{f' ({segment[2:]})' if segment else ''}")
        for phase, share in report["time_share"].items():
            if share < 0.0005:  # a phase this run does not have (communication in one process)
                continue
            lines.append(f"  {phase:<24} {100 * share:5.1f}%  {'#' * round(40 * share)}")
    if report["coverage"]:
        lines.append("pretrained coverage")
        for name, value in report["coverage"].items():
            shown = f"{100 * value:5.1f}%" if name.endswith("coverage") else f"{value:,.0f}"
            lines.append(f"  {name:<26} {shown}")
    if report["peak_rss_gb"] is not None:
        lines.append(f"peak memory (RSS)            {report['peak_rss_gb']:.2f} GiB")
    if report["bad_metric_lines"]:
        lines.append(f"note: {report['bad_metric_lines']} unreadable line(s) in metrics.jsonl skipped")
    return "\n".join(lines)


def write_plots(run_dir: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """loss.png and accuracy.png under RUN_DIR/report/; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(run_dir) / "report"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, tags, ylabel in (("loss", LOSS_TAGS, "cross-entropy"), ("accuracy", ACCURACY_TAGS, "accuracy")):
        curves = {tag: series(rows, tag) for tag in tags}
        curves = {tag: points for tag, points in curves.items() if points}
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for tag, points in curves.items():
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=tag)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name}: {Path(run_dir).name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        tmp = out_dir / f".{name}.png.tmp{os.getpid()}"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m trainer report",
        description="Summarise a run folder: metrics, throughput, time split, plots.",
    )
    p.add_argument("--run", required=True, help="run folder (run.dir)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object instead of text")
    args = p.parse_args(argv)
    run_dir = Path(args.run)
    report = build_report(run_dir)
    plots: list[Path] = []
    note = ""
    if not args.no_plots:
        try:
            plots = write_plots(run_dir, read_metrics(run_dir / "metrics.jsonl")[0])
        except ImportError:
            note = "plots skipped: matplotlib is not installed (pip install matplotlib)"
        if not plots and not note:
            note = "plots skipped: no loss or accuracy was logged"
    report["plots"] = [str(p) for p in plots]
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
        for path in plots:
            print(f"plot: {path}")
    if note:
        sys.stderr.write(note + "\n")
    return 0
