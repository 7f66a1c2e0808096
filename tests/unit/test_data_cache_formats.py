"""The data cache of one dataset is the same, byte for byte, whichever file format holds it, and however the
chunked reader (tabular_stream) and the batched tokenizing (data_cache._read_tokenized) cut it."""

import csv
import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer import fast_tokenize, tabular_stream
from trainer.config import load_config
from trainer.data_cache import build_cache

WORDS = ["ball", "goal", "match", "vote", "law", "café", "naïve", "x1", "it's", "über"]


def rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))
        out.append((text if i % 17 else "", rng.choice(["sport", "politics", "1.0"])))  # some empty texts
    return out


def write(folder: Path, split: str, data: list[tuple[str, str]], fmt: str) -> Path:
    path = folder / f"{split}.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"text": [t for t, _ in data], "label": [y for _, y in data]}), path,
                       row_group_size=50)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in data), encoding="utf-8")
    else:
        opener = gzip.open if fmt.endswith(".gz") else open
        with opener(path, "wt", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t" if fmt.startswith("tsv") else ",")
            w.writerow(["text", "label"])
            w.writerows(data)
    return path


@pytest.mark.parametrize("small", [False, True], ids=["one_chunk", "small_chunks_and_batches"])
def test_cache_is_the_same_from_every_format(tmp_path, monkeypatch, small):
    if small:  # chunks of ~1 KiB of file and tokenizer batches of ~300 characters: many of each
        monkeypatch.setattr(tabular_stream, "CHUNK_BYTES", 1)
        monkeypatch.setattr(fast_tokenize, "BLOCK_CHARS", 150)
    data = {"train": rows(400, 1), "valid": rows(60, 2)}
    caches = {}
    for fmt in ("csv", "tsv.gz", "parquet", "jsonl"):
        folder = tmp_path / fmt.replace(".", "_")
        folder.mkdir()
        paths = {split: write(folder, split, d, fmt) for split, d in data.items()}
        cfg = load_config(None, ["--data.train", str(paths["train"]), "--data.valid", str(paths["valid"]),
                                 "--embeddings.ngram_buckets", "97", "--embeddings.char_ngrams", "89",
                                 "--embeddings.min_freq", "1", "--data.workers", "2"])
        build_cache(cfg, None, folder / "cache")
        caches[fmt] = {p.relative_to(folder / "cache"): p.read_bytes()
                       for p in sorted((folder / "cache").rglob("*")) if p.is_file()}
    reference = caches.pop("csv")
    assert len(reference) > 10
    for fmt, files in caches.items():
        assert files.keys() == reference.keys(), fmt
        for name, content in files.items():
            assert content == reference[name], (fmt, name)


def test_tokenizing_batches_are_capped_and_shared_by_the_workers(monkeypatch):
    from trainer.data_cache import BATCH_MAX_BLOCKS, tokenizing_batch

    monkeypatch.setattr(fast_tokenize, "BLOCK_CHARS", 1000)
    assert tokenizing_batch(0) == tokenizing_batch(1) == (1000, 1000)
    assert tokenizing_batch(2) == (2000, 1000)  # a block each: the forked workers share the batch
    assert tokenizing_batch(16) == (BATCH_MAX_BLOCKS * 1000, BATCH_MAX_BLOCKS * 1000 // 16)  # not 16 blocks of text
    # trainer eval's smaller batch: still a block each for the workers
    assert tokenizing_batch(2, max_chars=500) == (500, 250) and tokenizing_batch(1, max_chars=5000) == (1000, 1000)
