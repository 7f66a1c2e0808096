"""trainer.parallel and the forked tokenizing / hashing it drives: any worker count gives the one-process result,
array for array, and the data cache built with workers is the cache built without."""

import functools
import logging
import multiprocessing
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

import trainer.features as features
from trainer import parallel
from trainer.config import ConfigError, DataConfig, load_config
from trainer.data_cache import build_cache
from trainer.features import Featurizer, tokenize
from trainer.vocab import Tokenizer, Vocabulary

WORDS = ["the", "cat", "zork", "blip", "dog", "naïve", "café", "it's", "x1", "über", "ox", "gnu", "yak"]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    # new words keep appearing late, so chunks see types that earlier chunks never did
    return [" ".join(rng.choice(WORDS) + (str(rng.randrange(n)) if rng.random() < 0.2 else "")
                     for _ in range(rng.randrange(0, 12))) for _ in range(n)]


@pytest.fixture
def small_shares(monkeypatch):
    """Let tiny inputs fork: a few documents or words per worker."""
    monkeypatch.setattr(features, "TOKENIZE_MIN_DOCS_PER_WORKER", 5)
    monkeypatch.setattr(features, "HASH_MIN_WORDS_PER_WORKER", 5)
    monkeypatch.setattr(features, "CHARS_MIN_WORDS_PER_WORKER", 5)


def _chunk_sum(chunk):
    return sum(chunk)


def _first_or_fail(chunk):
    if 13 in chunk:
        raise ValueError("bad chunk holding 13")
    return chunk[0]


PARENT = os.getpid()


def _pid(chunk):
    return os.getpid()


def _die_in_a_child(chunk):
    if os.getpid() != PARENT:
        os._exit(3)  # as the OOM killer would end it: no exception, no result
    return list(chunk)


def test_chunked_map_gives_contiguous_chunks_in_order():
    items = list(range(100))
    parts = parallel.chunked_map(list, items, workers=4, min_per_worker=10)
    assert len(parts) == 4
    assert [x for part in parts for x in part] == items
    assert parallel.chunked_map(_chunk_sum, items, workers=3, min_per_worker=1) == [528, 1617, 2805]  # 0..32, 33..65, 66..99


def test_chunked_map_forks_and_the_parent_takes_the_first_chunk():
    pids = parallel.chunked_map(_pid, list(range(30)), workers=3, min_per_worker=1)
    # the pool may give both tasks to one child when the first ends fast; what matters is they left the parent
    assert len(pids) == 3 and pids[0] == os.getpid() and os.getpid() not in pids[1:]


def test_a_worker_that_dies_does_not_hang_the_map(caplog):
    items = list(range(40))
    with caplog.at_level(logging.WARNING, logger="trainer.parallel"):
        assert parallel.chunked_map(_die_in_a_child, items, workers=3, min_per_worker=1) == [items]
    assert "worker process died" in caplog.text


def test_an_error_in_the_parents_own_chunk_is_raised():
    with pytest.raises(ValueError, match="bad chunk holding 13"):
        parallel.chunked_map(_first_or_fail, list(range(10, 50)), workers=2, min_per_worker=1)


def test_concurrent_maps_from_threads_keep_their_own_inputs():
    inputs = [[f"{name}{i}" for i in range(60)] for name in "abcd"]
    with ThreadPoolExecutor(4) as threads:
        results = list(threads.map(lambda items: parallel.chunked_map(list, items, 3, 1), inputs))
    for items, parts in zip(inputs, results, strict=True):
        assert [x for part in parts for x in part] == items


def test_chunked_map_stays_in_process_for_small_inputs_one_worker_or_no_fork(monkeypatch):
    items = list(range(10))
    assert parallel.chunked_map(list, items, workers=4, min_per_worker=6) == [items]
    assert parallel.chunked_map(list, items, workers=1, min_per_worker=1) == [items]
    monkeypatch.setattr(parallel, "can_fork", lambda: False)
    assert parallel.chunked_map(list, items, workers=4, min_per_worker=1) == [items]


def test_chunked_map_raises_a_workers_error_and_leaves_no_shared_input():
    with pytest.raises(ValueError, match="bad chunk holding 13"):
        parallel.chunked_map(_first_or_fail, list(range(40)), workers=4, min_per_worker=1)
    assert parallel._SHARED is None


def test_resolve_workers_follows_the_affinity_mask_and_the_cgroup_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(parallel, "_cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert parallel.resolve_workers(0) == 1  # a rank pinned to one core tokenizes alone
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert parallel.resolve_workers(0) == parallel.MAX_AUTO_WORKERS
    assert parallel.resolve_workers(3) == 3
    monkeypatch.setattr(parallel, "_cgroup_cpu_limit", lambda: 2.5)  # a pod's limits.cpu: 2500m
    assert parallel.resolve_workers(0) == 3


def test_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path):
    assert parallel._cgroup_cpu_limit(tmp_path) is None  # no cgroup files: no limit
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert parallel._cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    assert parallel._cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert parallel._cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert parallel._cgroup_cpu_limit(tmp_path) == 4.0


def _map_in_a_daemon(queue):
    queue.put(parallel.chunked_map(_pid, list(range(30)), workers=3, min_per_worker=1) == [os.getpid()])


def test_a_daemonic_process_maps_in_process():
    # multiprocessing refuses children to a daemonic process ("daemonic processes are not allowed to have
    # children"): the trainer run inside one (a launcher's worker) must not fail on its data cache
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_map_in_a_daemon, args=(queue,), daemon=True)
    proc.start()
    assert queue.get(timeout=60) is True
    proc.join(timeout=60)
    assert proc.exitcode == 0


def test_no_fork_off_linux(monkeypatch):
    monkeypatch.setattr(parallel.sys, "platform", "darwin")
    assert not parallel.can_fork()
    assert parallel.chunked_map(_pid, list(range(30)), workers=3, min_per_worker=1) == [os.getpid()]


@pytest.mark.parametrize("workers", [2, 3, 7])
def test_tokenize_with_workers_is_the_one_process_result(small_shares, workers):
    texts = random_texts(400)
    tokenizer = Tokenizer(DataConfig().token_pattern, True)
    one = tokenize(texts, tokenizer, 9)
    many = tokenize(texts, tokenizer, 9, workers)
    assert many.type_words == one.type_words
    assert np.array_equal(many.types, one.types) and many.types.dtype == one.types.dtype
    assert np.array_equal(many.doc_lengths, one.doc_lengths)


@pytest.mark.parametrize("numba_hashing", [True, False])
def test_encode_with_workers_is_the_one_process_result(small_shares, monkeypatch, numba_hashing):
    if not numba_hashing:  # hashlib in forked chunks, the path without numba
        monkeypatch.setattr(features.blake2b, "available", False)
    forked = []
    real_map = features.chunked_map
    monkeypatch.setattr(features, "chunked_map", lambda *a: forked.append(len(out := real_map(*a))) or out)
    texts = random_texts(300, seed=1)
    vocab = Vocabulary(words=WORDS[:6], num_pretrained=3, pretrained_rows=np.array([4, 0, 2]),
                       counts=np.arange(6, 0, -1), labels=["a", "b"])
    labels = ["a", "b", "c"] * 100

    def encode(workers: int):
        f = Featurizer(Tokenizer(DataConfig().token_pattern, True), vocab, 101, 53, 2, 4, 50, workers=workers)
        return f.encode(texts, labels)

    one = encode(1)
    forked.clear()
    many = encode(3)
    assert forked and max(forked) == 3  # the work was split
    for f in fields(one):
        a, b = getattr(one, f.name), getattr(many, f.name)
        assert a.dtype == b.dtype and np.array_equal(a, b), f.name
    assert len(one.char_ids) and len(one.bigram_ids)


def test_data_cache_is_the_same_with_and_without_workers(small_shares, tmp_path: Path):
    rng = random.Random(2)
    for split, n in (("train", 200), ("valid", 40)):
        rows = [f'"{t}",{rng.choice("ab")}' for t in random_texts(n, seed=n) if t]
        (tmp_path / f"{split}.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    base = ["--data.train", str(tmp_path / "train.csv"), "--data.valid", str(tmp_path / "valid.csv"),
            "--embeddings.ngram_buckets", "97", "--embeddings.char_ngrams", "89", "--embeddings.min_freq", "1"]
    for workers in ("1", "3"):
        build_cache(load_config(None, [*base, "--data.workers", workers]), None, tmp_path / f"cache{workers}")
    one, three = sorted((tmp_path / "cache1").rglob("*")), sorted((tmp_path / "cache3").rglob("*"))
    assert [p.relative_to(tmp_path / "cache1") for p in one] == [p.relative_to(tmp_path / "cache3") for p in three]
    for a, b in zip(one, three, strict=True):
        if a.is_file():
            assert a.read_bytes() == b.read_bytes(), a.name


def test_workers_must_not_be_negative():
    with pytest.raises(ConfigError, match="data.workers"):
        DataConfig(workers=-1)


def test_partial_of_a_module_function_reaches_the_workers(small_shares):
    # what tokenize sends: a functools.partial holding the tokenizer (a compiled pattern) must pickle
    fn = functools.partial(features._tokenize_chunk, tokenizer=Tokenizer(r"\w+", False), max_tokens=3)
    parts = parallel.chunked_map(fn, ["a b c d", "e f", "g", "h i"] * 5, workers=2, min_per_worker=1)
    assert [p.doc_lengths.tolist() for p in parts] == [[3, 2, 1, 2] * 2 + [3, 2], [1, 2] + [3, 2, 1, 2] * 2]
