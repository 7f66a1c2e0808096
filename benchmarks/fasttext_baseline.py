"""fastText supervised baseline on a `text,label` CSV split, as one process that prints one JSON line.

fastText splits on whitespace only, so its users tokenize first. `write_fasttext_file` does that once, outside
the timed process: lowercase, keep the matches of the trainer's default token pattern (words with internal
apostrophes; punctuation dropped), join with spaces, prefix `__label__<label>`. Both systems therefore see the
same tokens, and the token counts behind tokens/s agree.

tokens/s is fastText's own training-loop rate (`words/sec/thread` x threads, parsed from its progress output):
it excludes reading the file and building the dictionary and counts one `</s>` per line, both in fastText's
favour. `train_seconds` is the whole `train_supervised` call.

    python benchmarks/fasttext_baseline.py --train train.txt --test test.txt [--word-ngrams 2] [--thread 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

# the trainer's default data.token_pattern
TOKEN_PATTERN = r"\w+(?:['’]\w+)*"


def write_fasttext_file(csv_path: Path, out_path: Path, token_pattern: str = TOKEN_PATTERN) -> int:
    """`text,label` CSV -> `__label__<label> tok tok ...` lines; returns the number of word tokens written."""
    token_re = re.compile(token_pattern)
    tokens = 0
    with open(csv_path, newline="", encoding="utf-8") as src, open(out_path, "w", encoding="utf-8") as dst:
        for row in csv.DictReader(src):
            words = token_re.findall(row["text"].lower())
            tokens += len(words)
            label = re.sub(r"\s+", "_", row["label"].strip())
            dst.write(f"__label__{label} {' '.join(words)}\n")
    return tokens


def count_tokens(txt_path: Path) -> tuple[int, int]:
    """(word tokens without labels, lines) of a fastText training file."""
    tokens = lines = 0
    with open(txt_path, encoding="utf-8") as f:
        for line in f:
            tokens += len(line.split()) - 1
            lines += 1
    return tokens, lines


def train_capturing_progress(fasttext, **params):
    """Run train_supervised with fd 2 redirected to a file: fastText's C++ progress goes there, not to Python."""
    with tempfile.TemporaryFile(mode="w+b") as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            model = fasttext.train_supervised(**params)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        progress = captured.read().decode(errors="replace")
    rates = re.findall(r"words/sec/thread:\s*([0-9]+)", progress)
    return model, (float(rates[-1]) if rates else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, required=True, help="fastText-format training file")
    ap.add_argument("--test", type=Path, required=True, help="fastText-format test file")
    ap.add_argument("--word-ngrams", type=int, default=1)
    ap.add_argument("--dim", type=int, default=50)
    ap.add_argument("--epoch", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--thread", type=int, default=2)
    ap.add_argument("--pretrained-vectors", default="", help=".vec file (header line `N D`) of width --dim")
    args = ap.parse_args(argv)
    try:
        import fasttext
    except ImportError:
        print("fasttext is not installed: pip install -e .[bench]", file=sys.stderr)
        return 3

    params = dict(
        input=str(args.train),
        dim=args.dim,
        epoch=args.epoch,
        lr=args.lr,
        wordNgrams=args.word_ngrams,
        thread=args.thread,
        verbose=2,
        pretrainedVectors=args.pretrained_vectors,
    )
    t0 = time.perf_counter()
    model, words_per_s_per_thread = train_capturing_progress(fasttext, **params)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n, precision_at_1, _ = model.test(str(args.test))  # one label per line: P@1 is accuracy
    test_s = time.perf_counter() - t0
    tokens, docs = count_tokens(args.train)
    result = {
        "test": {"accuracy": precision_at_1, "n": n},
        "train_seconds": train_s,
        "test_seconds": test_s,
        "train_tokens": tokens,
        "epochs": args.epoch,
        # fastText's own loop rate (None if its progress line was not found): the strict comparison
        "tokens_per_s": words_per_s_per_thread * args.thread if words_per_s_per_thread else None,
        "tokens_per_s_whole_call": tokens * args.epoch / train_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "params": {k: v for k, v in params.items() if k not in ("input", "verbose")},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
