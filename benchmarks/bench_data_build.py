"""Data-cache build of a large training file: wall time and resident memory per step, and the peak.

    python benchmarks/bench_data_build.py                 # the demo's training split 40 times (800 MB, 120M tokens)
    python benchmarks/bench_data_build.py --times 10 --config configs/demo.toml

The file is the demo's training CSV repeated `--times` times (built once in the work folder, untimed). The build
runs in a child process (so its peak resident memory is its own; its forked tokenizing workers' largest peak is
printed beside it), through `data_cache.build_cache` with the
config's settings and `data.train` pointed at the big file; each step of it (reading, tokenizing, counting, the
vocabulary, encoding and writing: one step since the encoder writes as it goes, `save` before) is wrapped to print
its seconds and the resident memory after it. Needs the demo data (`python -m trainer data debian --out data/debian`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import functools, json, resource, shutil, sys, time
from pathlib import Path
from trainer import data_cache
from trainer import features as F
from trainer.config import load_config

T0 = time.perf_counter()
steps = []

def rss_gib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30

def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

def wrap(owner, name):
    fn = getattr(owner, name)
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        steps.append({"step": name, "s": time.perf_counter() - t, "rss_gib": rss_gib(), "peak_gib": peak_gib()})
        print(f"  {name:18s} {steps[-1]['s']:7.2f} s   resident {steps[-1]['rss_gib']:5.2f} GiB   "
              f"peak so far {steps[-1]['peak_gib']:5.2f} GiB", file=sys.stderr, flush=True)
        return out
    setattr(owner, name, timed)

for name in ("_read", "read_tokenized", "tokenize", "build_vocabulary"):  # whichever this checkout has
    if hasattr(data_cache, name):
        wrap(data_cache, name)
wrap(F.TokenizedDocs, "word_counts")
wrap(F.Featurizer, "encode_tokenized")
wrap(F.EncodedDocs, "save")
config, train, out = sys.argv[1:4]
cfg = load_config(Path(config), ["--data.train", train])
pretrained = data_cache.load_pretrained(cfg, progress=False)
shutil.rmtree(out, ignore_errors=True)
data_cache.build_cache(cfg, pretrained, Path(out) / "cache")
print(json.dumps({"build_s": time.perf_counter() - T0, "peak_gib": peak_gib(), "steps": steps,
                  "worker_peak_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}))
"""


def big_csv(source: Path, times: int, work: Path) -> Path:
    target = work / f"train_x{times}.csv"
    if target.exists():
        return target
    header, _, body = source.read_text(encoding="utf-8").partition("\n")
    body = body if body.endswith("\n") else body + "\n"
    with open(target.with_suffix(".tmp"), "w", encoding="utf-8") as f:
        f.write(header + "\n")
        for _ in range(times):
            f.write(body)
    target.with_suffix(".tmp").rename(target)
    return target


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.toml")
    p.add_argument("--source", type=Path, default=ROOT / "data" / "debian" / "train.csv")
    p.add_argument("--times", type=int, default=40, help="copies of the source's rows in the big file")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "trainer-bench-data-build")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    if not args.source.exists():
        print(f"{args.source}: not found; build the demo data first: python -m trainer data debian --out "
              "data/debian", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    train = big_csv(args.source, args.times, args.work)
    print(f"{train}: {train.stat().st_size / 2**20:,.0f} MiB", file=sys.stderr)
    out = args.work / "out"
    done = subprocess.run([sys.executable, "-c", CHILD, str(args.config.resolve()), str(train), str(out)],
                          cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode:
        return done.returncode
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(file=str(train), file_mib=train.stat().st_size / 2**20)
    print(f"build {result['build_s']:.1f} s, peak resident memory {result['peak_gib']:.2f} GiB; largest peak of a "
          f"forked tokenizing worker {result.get('worker_peak_gib', 0):.2f} GiB (shares its parent's pages until "
          "written; data.workers)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
