"""The data cache built by rank 0 with forked tokenizing workers (data.workers) while its gloo group is up: every
rank reads it, and it is byte for byte the cache one process builds without workers."""

import random
from pathlib import Path

import numpy as np
import pytest
from harness import run_distributed

from trainer.config import load_config
from trainer.data import prepare_data
from trainer.data_cache import build_cache
from trainer.distributed import DistInfo

WORDS = ["kernel", "python", "library", "font", "game", "daemon", "perl", "module", "naïve", "it's", "x11"]


def _write_split(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = [f"{' '.join(rng.choice(WORDS) + str(rng.randrange(40)) for _ in range(rng.randrange(1, 15)))},"
            f"{rng.choice('abc')}" for _ in range(n)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")


def _overrides(data: Path, workers: int) -> list[str]:
    return ["--data.train", str(data / "train.csv"), "--data.valid", str(data / "valid.csv"),
            "--embeddings.ngram_buckets", "97", "--embeddings.char_ngrams", "89", "--embeddings.min_freq", "1",
            "--data.workers", str(workers)]


def _rank(info: DistInfo, data: str, cache: str) -> dict:
    import multiprocessing

    import trainer.features as features

    # the harness starts ranks as daemonic processes, which multiprocessing gives no children (chunked_map then
    # stays in-process, tested in tests/unit/test_parallel.py); a torchrun rank is not daemonic, so be one here
    multiprocessing.current_process()._config["daemon"] = False

    # tiny shares, so the 300 documents are split among forked workers; count the splits rank 0 makes
    features.TOKENIZE_MIN_DOCS_PER_WORKER = features.CHARS_MIN_WORDS_PER_WORKER = 5
    features.BLAKE2B_MIN_STRINGS = 10**9  # the hashlib path, forked too
    real_map, splits = features.chunked_map, []
    features.chunked_map = lambda *a: splits.append(len(out := real_map(*a))) or out
    bundle = prepare_data(load_config(None, _overrides(Path(data), 3)), None, info, Path(cache))
    return {"splits": splits, "words": list(bundle.vocab.words),
            "token_ids": np.asarray(bundle.train.token_ids).copy(),
            "char_ids": np.asarray(bundle.train.char_ids).copy()}


@pytest.mark.slow
def test_rank_zero_builds_the_cache_with_workers_inside_a_process_group(tmp_path: Path):
    _write_split(tmp_path / "train.csv", 300, 0)
    _write_split(tmp_path / "valid.csv", 60, 1)
    results = run_distributed(_rank, 2, str(tmp_path), str(tmp_path / "cache"), timeout_s=120)
    assert max(results[0]["splits"]) == 3  # rank 0 forked its workers
    assert results[1]["splits"] == []  # the other rank only read what rank 0 wrote
    for key in ("words", "token_ids", "char_ids"):
        assert np.array_equal(results[0][key], results[1][key]), key

    (built,) = (tmp_path / "cache").iterdir()
    build_cache(load_config(None, _overrides(tmp_path, 1)), None, tmp_path / "serial")
    files = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*")
                           if p.is_file())
    for rel in files:
        assert (built / rel).read_bytes() == (tmp_path / "serial" / rel).read_bytes(), rel
