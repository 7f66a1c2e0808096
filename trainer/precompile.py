"""`python -m trainer precompile`: compile every numba kernel the trainer runs, ahead of time, into numba's cache.

Why: numba compiles a kernel at its first call on a machine and caches it on disk (trainer/jit.py), so a first run
pays about 12 s of compiling here (a 1-epoch demo run took 18.0 s cold against 5.5 s warm). A pod starts with an
empty cache every time. The Dockerfile runs this at build time into a seed folder and names it in
TRAINER_NUMBA_SEED_DIR; each process then uses a whole copy of it inside its own cache (`jit.seeded_cache_dir`).

How: which kernels run, and for which argument types, depends on the route through the model, so this trains a few
tiny models on synthetic data, each for a handful of steps, one per route: the demo's (masked_bag + bigrams, sgd;
then eval, predict and neighbors on its exported model), bag + char n-grams with rowwise_adagrad and a token
budget, wide & deep with sparse_adam and a late unfreeze, masked_bag with concat pooling and adagrad, the LSTM, and (unless
--no-distributed) row_wise and replicated tables over 2 gloo processes under torchrun. It ends by listing the
kernels none of them compiled, if any (--strict: and exits 1, so that a kernel no route reaches fails the image
build). A kernel is cached for this CPU (or for NUMBA_CPU_NAME, e.g. `generic`, which makes the cache valid on any
x86-64 machine) and for its source file, by path and contents: the package must be imported from the same
installed location at run time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainer import jit

ROUTES = {
    # name: (description, overrides)
    "demo": ("masked_bag + bigrams, sgd (configs/demo.toml)",
             ["--model.encoder", "masked_bag", "--embeddings.ngram_buckets", "64", "--optim.sparse", "sgd",
              "--optim.sparse_lr", "100"]),
    "chars": ("bag + bigrams + char n-grams, rowwise_adagrad, token budget",
              ["--model.encoder", "bag", "--embeddings.ngram_buckets", "64", "--embeddings.char_ngrams", "64",
               "--optim.sparse", "rowwise_adagrad", "--train.tokens_per_batch", "200", "--model.pooling", "sum"]),
    "wide": ("wide & deep (configs/demo_wide.toml), sparse_adam, late unfreeze",
             ["--model.encoder", "masked_bag", "--embeddings.ngram_buckets", "64", "--embeddings.char_ngrams", "64",
              "--model.wide", "words,bigrams,chars", "--model.deep_chars", "false", "--optim.sparse", "sparse_adam",
              "--embeddings.unfreeze_after_steps", "2"]),
    "wide_sgd": ("wide & deep with sgd (configs/demo_wide.toml's optimizers: fused with the lookups)",
                 ["--model.encoder", "masked_bag", "--embeddings.ngram_buckets", "64", "--embeddings.char_ngrams", "64",
                  "--model.wide", "words,bigrams,chars", "--model.deep_chars", "false", "--optim.sparse", "sgd",
                  "--optim.sparse_lr", "100", "--optim.wide_lr", "30"]),
    # masked_bag's word sums with a table gradient (the demo's route fuses sgd with the lookups: fused_sgd.py)
    "concat": ("masked_bag, concat of words / bigrams / char n-grams, sqrt pooling, hidden layer, adagrad",
               ["--model.encoder", "masked_bag", "--embeddings.ngram_buckets", "64", "--embeddings.char_ngrams", "64",
                "--model.combine", "concat", "--model.pooling", "sqrt", "--model.hidden", "8",
                "--optim.sparse", "adagrad"]),
    "lstm": ("lstm encoder, sgd", ["--model.encoder", "lstm", "--model.lstm_hidden", "8", "--optim.sparse", "sgd"]),
}
DISTRIBUTED = {
    # the sparse gradients' exchange between ranks: row_wise routes ids and rows, replicated syncs whole gradients
    mode: (f"{mode}, 2 gloo processes (torchrun)",
           ["--model.encoder", "masked_bag", "--embeddings.ngram_buckets", "64", "--embeddings.char_ngrams", "64",
            "--dist.embedding_sharding", mode, "--optim.sparse", "sgd", "--optim.sparse_lr", "100"])
    for mode in ("row_wise", "replicated")
}

DISTRIBUTED_MODULES = ("trainer.row_wise.", "trainer.sharding.")

# words with and without pretrained vectors, non-ASCII ones included (the tokenizer has a separate path for them)
_TOPICS = {
    "a": "ball goal match team score player coach league referee stadium".split(),
    "b": "computer software chip network server code compiler kernel laptop router".split(),
    "c": "bread cheese pasta soup recipe oven garlic tomato café crème".split(),
}
_COMMON = "the a of and to in is it with for on this that very new good naïve नमस्ते".split()


def _write_data(folder: Path) -> None:
    rng = random.Random(0)
    for split, n in (("train", 240), ("valid", 48), ("test", 48)):
        lines = ["text,label"]
        for i in range(n):
            label = "abc"[i % 3]
            words = rng.choices(_TOPICS[label], k=4) + rng.choices(_COMMON, k=4) + [f"rare{label}{i % 7}"]
            rng.shuffle(words)
            lines.append(f"{' '.join(words)},{label}")
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    vocab = sorted({w for ws in _TOPICS.values() for w in ws} | set(_COMMON))[::2]  # half the words pretrained
    vec = random.Random(1)
    (folder / "vectors.txt").write_text(
        "".join(f"{w} {' '.join(f'{vec.gauss(0, 0.4):.4f}' for _ in range(8))}\n" for w in vocab), encoding="utf-8")


def _base_overrides(data: Path, run_dir: Path) -> list[str]:
    return ["--data.train", str(data / "train.csv"), "--data.valid", str(data / "valid.csv"),
            "--data.test", str(data / "test.csv"), "--data.workers", "1", "--data.build_in_background", "false",
            "--embeddings.pretrained", str(data / "vectors.txt"), "--embeddings.min_freq", "1",
            "--embeddings.vectors_cache_dir", str(data / "vectors-cache"),
            "--train.max_steps", "4", "--train.batch_size", "32", "--train.eval_every_steps", "2",
            "--train.threads", "1", "--train.device", "cpu", "--optim.warmup_steps", "1",
            "--checkpoint.every_steps", "2", "--metrics.tensorboard", "false", "--metrics.progress", "false",
            "--run.dir", str(run_dir)]


def _run_route(name: str, overrides: list[str], data: Path, work: Path) -> None:
    from trainer.config import load_config
    from trainer.trainer import run_training

    run_dir = work / name
    with contextlib.redirect_stdout(io.StringIO()):
        run_training(load_config(None, _base_overrides(data, run_dir) + overrides))
    if name == "demo":  # the exported model's commands: eval, predict, neighbors
        from trainer.inference import Predictor, neighbors, run_eval

        run_eval(str(run_dir), str(data / "test.csv"))
        list(Predictor(str(run_dir)).predict_stream(["the ball and the goal", "café naïve crème"], 2))
        neighbors(str(run_dir), "ball", 3)


def _run_distributed(name: str, overrides: list[str], data: Path, work: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["NUMBA_CACHE_DIR"] = jit.CACHE_DIR  # the workers compile into the same cache as this process
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "trainer", "train", *_base_overrides(data, work / name), *overrides]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the 2-process {name} run failed ({done.returncode}):\n{done.stderr[-4000:]}")


def kernel_dispatchers() -> dict[str, object]:
    """Every numba kernel of the package that is compiled on its own (helpers inlined into others are not)."""
    import importlib
    import pkgutil

    import trainer

    found = {}
    for info in pkgutil.iter_modules(trainer.__path__):
        if info.name.startswith("_"):  # __main__ runs the command line when imported
            continue
        try:
            module = importlib.import_module(f"trainer.{info.name}")
        except ImportError as e:  # a module needing an optional package holds no kernel of the training path
            print(f"  (trainer.{info.name} not imported: {e})")
            continue
        found.update({name: kernel for name, kernel in jit.module_kernels(module).items()
                      if kernel.targetoptions.get("inline", "never") != "always"})
    return found


@contextlib.contextmanager
def _kernels_at_any_size():
    """Below size thresholds the data cache's build keeps to Python (`re`, hashlib), since a numba kernel's first
    call in a process costs more than small inputs take; the tiny data here must take the kernels' path."""
    from trainer import fast_tokenize, features

    saved = fast_tokenize.MIN_CHARS, features.BLAKE2B_MIN_STRINGS
    fast_tokenize.MIN_CHARS, features.BLAKE2B_MIN_STRINGS = 0, 0
    try:
        yield
    finally:
        fast_tokenize.MIN_CHARS, features.BLAKE2B_MIN_STRINGS = saved


@contextlib.contextmanager
def _quiet_logs():
    """The tiny runs' own INFO lines (plans, steps, their kernel reports) would drown the summary in a build log."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)


def _cached(dispatcher) -> bool:
    """Compiled in this process, or by another one (the torchrun workers) into the cache: its index file exists."""
    if dispatcher.signatures:
        return True
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    return cache_file is not None and os.path.exists(cache_file._index_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer precompile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-distributed", action="store_true",
                   help="skip the 2-process runs (row_wise and replicated; their exchange kernels then compile on a "
                        "first multi-process run)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a kernel is not cached at the end")
    args = p.parse_args(argv)
    if jit.numba is None:
        print("numba is not installed: nothing to compile (the trainer uses its torch ops)")
        return 0
    if not jit.CACHE_DIR:
        print("error: numba has no writable cache folder (set NUMBA_CACHE_DIR or TRAINER_CACHE_DIR)",
              file=sys.stderr)
        return 2
    print(f"compiling the trainer's numba kernels into {jit.CACHE_DIR} (CPU: "
          f"{jit.numba.config.CPU_NAME or 'this machine'})", flush=True)
    import torch

    from trainer import kernels

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trainer-precompile-") as tmp:
        data, work = Path(tmp) / "data", Path(tmp) / "runs"
        data.mkdir()
        _write_data(data)
        with _kernels_at_any_size(), _quiet_logs():
            kernels.load_numba()
            # the optimizers' grouping of a gradient with repeated rows (as a plain nn.Embedding makes; the
            # trainer's own lookups give distinct sorted rows, so no route below reaches it)
            kernels.grouped_rows(torch.tensor([2, 0, 2]), distinct_sorted=False)
            for name, (description, overrides) in ROUTES.items():
                t0 = time.perf_counter()
                before = len(jit.compiled_kernels())
                _run_route(name, overrides, data, work)
                made = len(jit.compiled_kernels()) - before
                print(f"  {name:<10} {description}: {made} kernel{'' if made == 1 else 's'} compiled, "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
        for name, (description, overrides) in ({} if args.no_distributed else DISTRIBUTED).items():
            t0 = time.perf_counter()
            _run_distributed(name, overrides, data, work)
            print(f"  {name:<10} {description}: compiled in its workers, {time.perf_counter() - t0:.1f} s",
                  flush=True)
    kernels = kernel_dispatchers()
    missing = sorted(name for name, d in kernels.items() if not _cached(d))
    # kernels only multi-process runs call: with --no-distributed they are expected to be missing
    expected = {n for n in missing if args.no_distributed and n.startswith(DISTRIBUTED_MODULES)}
    print(f"{len(kernels) - len(missing)} of {len(kernels)} kernels cached in {time.perf_counter() - start:.1f} s" +
          (f"; never run here, so compiled on first use: {', '.join(missing)}" if missing else ""))
    return 1 if set(missing) - expected and args.strict else 0
