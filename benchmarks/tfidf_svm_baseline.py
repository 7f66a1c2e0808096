"""TF-IDF + linear SVM baseline (scikit-learn) on a `text,label` CSV split, as one process printing one JSON line.

Features: word 1-2-grams and character 2-5-grams within word boundaries (`char_wb`), both lowercase, sublinear
tf, min_df 2, stacked side by side; classifier LinearSVC (liblinear, one-vs-rest, single-threaded).
`train_seconds` covers fitting both vectorizers and the SVM; tokens/s is training tokens (the trainer's token
pattern) over those seconds, one pass, so it is not comparable with the epoch-based systems' rates.

    python benchmarks/tfidf_svm_baseline.py [--train CSV] [--test CSV] [--c 0.5]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def tfidf_features(train_x: list[str]):
    """(training matrix, transform) of the baseline's features: fitted on `train_x`, `transform(texts)` maps other
    texts into the same columns (scipy CSR, float32)."""
    import numpy as np
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, dtype=np.float32)
    chars = TfidfVectorizer(
        analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2, dtype=np.float32
    )
    train = hstack([words.fit_transform(train_x), chars.fit_transform(train_x)]).tocsr()
    return train, lambda texts: hstack([words.transform(texts), chars.transform(texts)]).tocsr()


def main(argv: list[str] | None = None) -> int:
    data = ROOT / "data" / "debian"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, default=data / "train.csv")
    ap.add_argument("--test", type=Path, default=data / "test.csv")
    ap.add_argument("--c", type=float, default=0.5, help="LinearSVC regularisation C")
    args = ap.parse_args(argv)
    try:
        from sklearn.svm import LinearSVC
    except ImportError:
        print("scikit-learn is not installed: pip install -e .[bench]", file=sys.stderr)
        return 3

    train_x, train_y = read_csv(args.train)
    test_x, test_y = read_csv(args.test)
    t0 = time.perf_counter()
    features, transform = tfidf_features(train_x)
    svm = LinearSVC(C=args.c).fit(features, train_y)
    train_s = time.perf_counter() - t0
    predicted = svm.predict(transform(test_x))
    correct = sum(p == y for p, y in zip(predicted, test_y, strict=True))
    token_re = re.compile(r"\w+(?:['’]\w+)*")
    train_tokens = sum(len(token_re.findall(t.lower())) for t in train_x)
    result = {
        "test": {"accuracy": correct / len(test_y), "n": len(test_y)},
        "train_seconds": train_s,
        "train_tokens": train_tokens,
        "epochs": 1,
        "tokens_per_s": train_tokens / train_s,
        "features": features.shape[1],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
