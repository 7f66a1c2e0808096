"""Targets and the markdown report for bench_compare.py, computed from its JSON report (no measuring here).

Every target compares two figures measured in the same run (ratios within one run: these 2-core machines are
noisy); a target whose figures are missing says so instead of guessing.
"""

from __future__ import annotations

import statistics

STEP_RATIO_MAX = 1.2  # (d) step time with the largest table / with the smallest
STATE_SHARE_MAX = 0.05  # (d) rowwise_adagrad state bytes / table bytes
FIRST_LOAD_MAX_S = 1.3  # (e) GloVe 400K x 50 text, empty cache
CACHED_LOAD_MAX_S = 0.2  # (e) the same, warm cache


def summarize(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(summary: dict | None, spec: str = ".3f", scale: float = 1.0) -> str:
    if summary is None:
        return "n/a"
    m, lo, hi = (summary[k] * scale for k in ("median", "min", "max"))
    if summary["n"] == 1:
        return f"{m:{spec}}"
    return f"{m:{spec}} ({lo:{spec}}-{hi:{spec}})"


def system_runs(report: dict, key: str) -> list[dict]:
    return next((s["runs"] for s in report["systems"] if s["key"] == key), [])


def figure(runs: list[dict], name: str) -> dict | None:
    if name == "accuracy":
        return summarize([r.get("test", {}).get("accuracy") for r in runs])
    return summarize([r.get(name) for r in runs])


def _line(tid: str, target: str, measured: str, met: bool | None) -> dict:
    verdict = {True: "met", False: "not met", None: "not measured"}[met]
    return {"id": tid, "target": target, "measured": measured, "result": verdict}


def targets(report: dict) -> list[dict]:
    lines = []
    acc = {
        k: figure(system_runs(report, k), "accuracy")
        for k in ("ours_default", "fasttext_bigram", "tfidf_svm")
    }
    ours = acc["ours_default"]
    for key, name in (("fasttext_bigram", "fastText bigram"), ("tfidf_svm", "TF-IDF SVM")):
        other = acc[key]
        if ours and other:
            d = ours["median"] - other["median"]
            lines.append(
                _line(
                    "a",
                    f"accuracy: ours (default config) >= {name}",
                    f"{ours['median']:.4f} vs {other['median']:.4f} ({d:+.4f})",
                    d >= 0,
                )
            )
        else:
            if key == "tfidf_svm":
                svm_asked = report["settings"].get("with_svm")
                why = (
                    "no result (scikit-learn missing or failed)" if svm_asked else "not run (pass --with-svm)"
                )
            else:
                why = "no result (fastText missing or failed)"
            lines.append(_line("a", f"accuracy: ours (default config) >= {name}", why, None))

    wide = figure(system_runs(report, "ours_wide"), "accuracy")
    if wide:
        best = wide["median"]
        svm = acc["tfidf_svm"]
        above = f", TF-IDF SVM {svm['median']:.4f}" if svm else ""
        lines.append(_line("a", "accuracy: ours, best config (demo_wide.toml, pretrained frozen) >= 0.86",
                           f"{best:.4f}{above}", best >= 0.86))

    tta = report.get("time_to_accuracy")
    ft_wall = figure(system_runs(report, "fasttext_bigram"), "wall_s")
    target_b = (
        "time to fastText-bigram accuracy: ours whole process (cold cache) <= fastText bigram whole process"
    )
    if tta and tta.get("reached") and tta.get("paired_fasttext"):
        # pairs run back to back: the median of the pairs' ratios
        ours_wall, ft_pair_wall = figure(tta["runs"], "wall_s"), figure(tta["paired_fasttext"], "wall_s")
        ratios = [o["wall_s"] / f["wall_s"] for o, f in zip(tta["runs"], tta["paired_fasttext"], strict=True)]
        ratio = statistics.median(ratios)
        lines.append(
            _line(
                "b",
                target_b,
                f"{ours_wall['median']:.1f} s ({tta['epochs']} epochs) vs {ft_pair_wall['median']:.1f} s, run in "
                f"{len(ratios)} back-to-back pairs: {ratio:.2f}x (pairs {min(ratios):.2f}-{max(ratios):.2f}x)",
                ratio <= 1.0,
            )
        )
    elif tta and tta.get("reached") and ft_wall:
        ours_wall = figure(tta["runs"], "wall_s")
        ratio = ours_wall["median"] / ft_wall["median"]
        lines.append(
            _line(
                "b",
                target_b,
                f"{ours_wall['median']:.1f} s ({tta['epochs']} epochs) vs "
                f"{ft_wall['median']:.1f} s ({ratio:.2f}x)",
                ratio <= 1.0,
            )
        )
    elif tta and not tta.get("error"):
        best = max((t["test_accuracy"] for t in tta["tried"]), default=float("nan"))
        lines.append(
            _line(
                "b",
                target_b,
                f"accuracy {tta['target_accuracy']:.4f} not reached in epochs 1-"
                f"{tta['searched_up_to']} (best {best:.4f})",
                False,
            )
        )
    else:
        lines.append(_line("b", target_b, "missing figures (fastText not run, or a run failed)", None))

    # the bag encoder at its throughput setting (batch 1024) when that row ran, else at the default batch
    bag_row = "ours_bag_unigram_b1024" if system_runs(report, "ours_bag_unigram_b1024") else "ours_bag_unigram"
    ours_tps = figure(system_runs(report, bag_row), "tokens_per_s")
    ft_tps = figure(system_runs(report, "fasttext_unigram"), "tokens_per_s")
    threads = report["settings"]["threads"]
    batch = "batch 1024" if bag_row.endswith("b1024") else "default batch"
    target_c = f"throughput: ours bag encoder ({batch}) tokens/s >= fastText unigram tokens/s ({threads} threads)"
    if ours_tps and ft_tps:
        ratio = ours_tps["median"] / ft_tps["median"]
        lines.append(
            _line(
                "c",
                target_c,
                f"{ours_tps['median']:,.0f} vs {ft_tps['median']:,.0f} ({ratio:.2f}x)",
                ratio >= 1.0,
            )
        )
    else:
        lines.append(_line("c", target_c, "missing figures", None))

    lines += _optimizer_targets(report)
    lines += _vector_targets(report)
    return lines


def _optimizer_targets(report: dict) -> list[dict]:
    optim = report.get("optimizer_step")
    if not optim:
        return [_line("d", "optimizer step and state", "not run", None)]
    results = optim["results"]
    lo, hi = min(r["rows"] for r in results), max(r["rows"] for r in results)
    by_key = {(r["optimizer"], r["rows"]): r for r in results}
    lines = []
    names = dict.fromkeys(
        ["rowwise_adagrad", report["settings"].get("config_sparse_optimizer", "sparse_adam")]
    )
    for name in names:
        dim = optim["config"]["dim"]
        target = f"step time ({name}): {hi:,} x {dim} table <= {STEP_RATIO_MAX}x the {lo:,} x {dim} table"
        a, b = by_key.get((name, lo)), by_key.get((name, hi))
        if a and b:
            cpu_ratio = b["cpu_median_ms"] / a["cpu_median_ms"]
            rounds = optim.get("ratios", {}).get(name, {}).get("round_ratios")
            if rounds:  # interleaved rounds (bench_sparse_optim.bench_interleaved): the median of their own ratios
                ratio = statistics.median(rounds)
                figure = (f"{b['median_ms']:.1f} / {a['median_ms']:.1f} ms; median of {len(rounds)} interleaved "
                          f"rounds' ratios {ratio:.2f}x ({min(rounds):.2f}-{max(rounds):.2f}x)")
            else:  # a result file from before the rounds
                ratio = b["median_ms"] / a["median_ms"]
                figure = f"{b['median_ms']:.1f} / {a['median_ms']:.1f} ms = {ratio:.2f}x"
            lines.append(_line("d", target, f"{figure} (CPU time {cpu_ratio:.2f}x)", ratio <= STEP_RATIO_MAX))
        else:
            lines.append(_line("d", target, "missing figures", None))
    big = by_key.get(("rowwise_adagrad", hi))
    target = f"rowwise_adagrad state <= {STATE_SHARE_MAX:.0%} of table bytes"
    if big:
        share = big["state_mb"] / (big["rows"] * big["dim"] * 4 / 2**20)
        lines.append(_line("d", target, f"{share:.2%} at {hi:,} rows", share <= STATE_SHARE_MAX))
    else:
        lines.append(_line("d", target, "missing figures", None))
    return lines


def _vector_targets(report: dict) -> list[dict]:
    vectors = report.get("vector_load")
    rows = {r["name"]: r for r in vectors["results"]} if vectors else {}
    lines = []
    for name, limit, label in (
        ("first load (empty cache)", FIRST_LOAD_MAX_S, "first"),
        ("cached load", CACHED_LOAD_MAX_S, "cached"),
    ):
        target = f"GloVe 400K x 50 text load, {label} <= {limit} s"
        row = rows.get(name)
        if row:
            lines.append(
                _line(
                    "e",
                    target,
                    f"{row['median_s']:.3f} s ({row['min_s']:.3f}-{row['max_s']:.3f})",
                    row["median_s"] <= limit,
                )
            )
        else:
            lines.append(_line("e", target, "not run", None))
    return lines


def render_markdown(report: dict) -> str:
    m, v, g, s = report["machine"], report["versions"], report["git"], report["settings"]
    modified = " + uncommitted changes to trainer/ or configs/" if g["trainer_or_configs_modified"] else ""
    out = [
        f"Side-by-side benchmark, {report['date']}: `{report['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; load average "
        f"{report['load_average_start'][0]:.2f} at start, {report['load_average_end'][0]:.2f} at end. "
        f"Versions: Python {v['python']}, torch {v['torch']}, numpy {v['numpy']}, fastText {v['fasttext']}, "
        f"scikit-learn {v['scikit-learn']}; commit {g['commit']}{modified}. {s['threads']} threads per system, "
        f"runs per system: {s['repeat']}, median (min-max).",
        "",
        "| system | test accuracy | whole process s | train s | tokens/s | peak RSS GiB |",
        "|---|---|---|---|---|---|",
    ]
    for system in report["systems"]:
        runs = system["runs"]
        if not runs:
            out.append(f"| {system['label']} | failed | | | | |")
            continue
        out.append(
            f"| {system['label']} | {fmt(figure(runs, 'accuracy'), '.4f')} | {fmt(figure(runs, 'wall_s'), '.1f')} "
            f"| {fmt(figure(runs, 'train_seconds'), '.1f')} | {fmt(figure(runs, 'tokens_per_s'), ',.0f')} "
            f"| {fmt(figure(runs, 'peak_rss_gb'), '.2f')} |"
        )
    floor = max((r.get("rss_floor_gb", 0.0) for system in report["systems"] for r in system["runs"]), default=0.0)
    if floor > 0.1:  # a child's ru_maxrss starts at the benchmark process's own size (run_measured)
        out += ["", f"Peak RSS figures at or below {floor:.2f} GiB are this benchmark process's own size, not the "
                    "system's: it grew before spawning them."]
    out += [
        "",
        "Whole process: process start to exit. Ours: fresh data cache each run (tokenizing included), GloVe from the "
        "vector cache, checkpoints / TensorBoard off. fastText: input tokenized beforehand, untimed. tokens/s: ours, "
        "the trainer's meter (warm-up steps excluded); fastText, its own words/sec/thread x threads (counts `</s>`, "
        "excludes reading the file); tutorial, training tokens x epochs / training-loop seconds; SVM, one pass.",
    ]
    tta = report.get("time_to_accuracy")
    if tta:
        tried = ", ".join(f"{t['epochs']} epochs {t['test_accuracy']:.4f}" for t in tta["tried"])
        out += [
            "",
            f"Time to fastText-bigram accuracy ({tta['target_accuracy']:.4f}), ours, cold data cache: {tried}.",
        ]
        if tta.get("reached"):
            runs = tta["runs"]
            out[-1] += (
                f" Reached with {tta['epochs']} epochs: whole process {fmt(figure(runs, 'wall_s'), '.1f')} s, "
                f"train {fmt(figure(runs, 'train_seconds'), '.1f')} s."
            )
            if tta.get("paired_fasttext"):
                out[-1] += (
                    f" Each of those runs right after a fastText bigram run: "
                    f"{fmt(figure(tta['paired_fasttext'], 'wall_s'), '.1f')} s whole process."
                )
    out += _optimizer_table(report.get("optimizer_step"))
    out += _vector_table(report.get("vector_load"))
    out += ["", "| target | measured | result |", "|---|---|---|"]
    out += [f"| ({t['id']}) {t['target']} | {t['measured']} | {t['result']} |" for t in report["targets"]]
    if report["notes"]:
        out += [""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(out) + "\n"


def _optimizer_table(optim: dict | None) -> list[str]:
    if not optim:
        return []
    results = optim["results"]
    sizes = sorted({r["rows"] for r in results})
    names = list(dict.fromkeys(r["optimizer"] for r in results))
    by_key = {(r["optimizer"], r["rows"]): r for r in results}
    c = optim["config"]
    threads = f"{c['threads']} thread(s)" if c["threads"] else "torch's default threads"
    if c["threads"] and optim["threads"] != c["threads"]:  # something in the process changed torch's setting
        threads += f" requested, {optim['threads']} reported by torch at the end"
    out = [
        "",
        f"Optimizer step (`bench_sparse_optim.py`), ms per step on a table of N x {c['dim']}, batch "
        f"{c['batch']}x{c['tokens']} ids touching {c['touched']:,} rows, {threads}, median "
        f"(min-max) of {c['repeats']}; dense = AdamW over the full table's dense gradient; state as % of table bytes "
        "at the largest size each optimizer ran.",
        "",
        "| optimizer | " + " | ".join(f"{n:,} rows ms" for n in sizes) + " | largest / smallest | state % |",
        "|---|" + "---|" * (len(sizes) + 2),
    ]
    for name in names:
        cells, ran = [], [n for n in sizes if (name, n) in by_key]
        for n in sizes:
            r = by_key.get((name, n))
            cells.append(f"{r['median_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f})" if r else "not run")
        first, last = by_key[(name, ran[0])], by_key[(name, ran[-1])]
        ratio = f"{last['median_ms'] / first['median_ms']:.2f}x" if len(ran) > 1 else ""
        share = last["state_mb"] / (last["rows"] * last["dim"] * 4 / 2**20)
        out.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} | {share:.1%} |")
    return out


def _vector_table(vectors: dict | None) -> list[str]:
    if not vectors:
        return []
    out = [
        "",
        f"Vector load (`bench_vectors.py`), GloVe 6B 50d as text ({vectors['file_mb']:.0f} MB, "
        f"{vectors['num_rows']:,} x {vectors['dim']}), seconds, median (min-max) of {vectors['repeat']}:",
        "",
        "| step | wall s | CPU s |",
        "|---|---|---|",
    ]
    for r in vectors["results"]:
        out.append(
            f"| {r['name']} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['cpu_median_s']:.3f} |"
        )
    return out
