"""Data for a run: read the splits, build (or reload) the vocabulary, featurize once, cache, and plan batches.

Batches are planned globally: every rank derives the same sequence of global batches from (seed, epoch), and
takes a contiguous part of each. `train.batch_size` and `train.tokens_per_batch` are global budgets, so a run
trains on the same batches at any world size, and a resume at another world size continues at the right place
from the global step alone.
"""

import hashlib
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.config import Config
from trainer.distributed import DistInfo, barrier, broadcast_object
from trainer.embeddings import pretrained_scale
from trainer.features import EncodedDocs, Featurizer, tokenize
from trainer.parallel import resolve_workers
from trainer.tabular import DataError, TextTable, read_table
from trainer.vectors import PretrainedVectors
from trainer.vocab import Tokenizer, Vocabulary, build_vocabulary, coverage

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    vocab: Vocabulary
    train: EncodedDocs
    valid: EncodedDocs | None
    test: EncodedDocs | None
    coverage: dict[str, float]
    stats: dict[str, int]
    # The frozen rows the vocabulary uses, memory-mapped from the cache: ranks on one host share the page cache,
    # and a row-wise rank reads only the pages of its own slice. (0, 1) when there are no pretrained vectors.
    frozen: np.ndarray
    # Per-element std of the pretrained rows: trainable rows start at the same scale.
    init_std: float


def make_featurizer(cfg: Config, vocab: Vocabulary, workers: int = 1) -> Featurizer:
    """`workers` > 1 forks tokenizing processes (trainer.parallel): the data cache build only, not inference,
    which may run inside any host process."""
    e = cfg.embeddings
    return Featurizer(
        Tokenizer(cfg.data.token_pattern, cfg.data.lowercase, cfg.data.tokenizer_version),
        vocab,
        ngram_buckets=e.ngram_buckets,
        char_buckets=e.char_ngrams,
        char_minn=e.char_minn,
        char_maxn=e.char_maxn,
        max_tokens=cfg.data.max_tokens_per_doc,
        workers=workers,
    )


def _source_key(spec: str) -> str:
    """Identity of a data source for the cache: a local file's path, size, inode and change times; a hub name as
    given. The inode change time (ctime) is in the key because a tool can put the old modification time back on
    new contents (`cp -p`, `rsync -t`, `tar x` do): ctime cannot be set, and every write, rename or copy moves it."""
    if not spec:  # an unset split; Path("") is the current directory, whose mtime would change the key
        return ""
    path = Path(spec)
    if path.exists():
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
    return spec


# Bump when the cache's layout or contents change, so old caches are never misread.
CACHE_FORMAT = "5"  # 3: vocabulary ids in hashed order within each block; 4: vocabulary fingerprint v2;
# 5: label text normalised like typed labels (tabular: "1.0" -> "1", "True" -> "true")


def _cache_key(cfg: Config, *parts: str) -> str:
    d, e = cfg.data, cfg.embeddings
    settings = [CACHE_FORMAT, d.text_column, d.label_column, str(d.lowercase), d.token_pattern, str(d.max_tokens_per_doc),
                str(d.tokenizer_version),
                str(e.ngram_buckets), str(e.char_ngrams), str(e.char_minn), str(e.char_maxn), *parts]
    return hashlib.blake2b("\x00".join(settings).encode(), digest_size=10).hexdigest()


# the hub split a dataset name without `:split` means in each role (a bare name for data.valid used to read the
# train split, validating on the training data)
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def _read(spec: str, cfg: Config, role: str = "train") -> TextTable:
    return read_table(spec, cfg.data.text_column, cfg.data.label_column, split=HUB_SPLITS[role])


def prepare_data(cfg: Config, pretrained: PretrainedVectors | None, info: DistInfo, cache_dir: Path) -> DataBundle:
    """Rank 0 reads, builds the vocabulary and featurizes every split into the cache; other ranks wait, then
    memory-map the same files (so one host holds one copy)."""
    key = _cache_key(cfg, _source_key(cfg.data.train), _source_key(cfg.data.valid), _source_key(cfg.data.test),
                     pretrained.fingerprint if pretrained is not None else "none",
                     str(cfg.embeddings.min_freq), str(cfg.embeddings.max_vocab), str(cfg.embeddings.full_pretrained))
    # rank 0 builds the cache, so its view of the files names it: another node's copy of the data (same path,
    # another inode) must not send that node's ranks looking for a folder nobody writes
    key = broadcast_object(key, info)
    folder = cache_dir / f"data-{key}"
    if info.is_main and not (folder / "done.json").exists():
        _build_cache(cfg, pretrained, folder)
    barrier(info)
    vocab = Vocabulary.load(folder / "vocab")
    meta = json.loads((folder / "done.json").read_text(encoding="utf-8"))
    if pretrained is None:  # no rows, but the model's width: word_vectors concatenates it with the OOV rows
        frozen = np.zeros((0, cfg.embeddings.dim), dtype=np.float32)
    elif cfg.embeddings.full_pretrained:
        frozen = pretrained.vectors
    else:
        frozen = np.load(folder / "frozen.npy", mmap_mode="r")
    return DataBundle(
        vocab=vocab,
        train=EncodedDocs.load(folder / "train"),
        valid=EncodedDocs.load(folder / "valid") if (folder / "valid").exists() else None,
        test=EncodedDocs.load(folder / "test") if (folder / "test").exists() else None,
        coverage=meta["coverage"],
        stats=meta["stats"],
        frozen=frozen,
        init_std=meta["init_std"],
    )


def _build_cache(cfg: Config, pretrained: PretrainedVectors | None, folder: Path) -> None:
    """Written into a temporary folder renamed into place at the end; a failure (bad data) removes it, so the
    run folder keeps no debris."""
    import shutil

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        _fill_cache(cfg, pretrained, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():  # another process won the race; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp.rename(folder)


def _fill_cache(cfg: Config, pretrained: PretrainedVectors | None, tmp: Path) -> None:
    train = _read(cfg.data.train, cfg)
    log.info("read %s: %d documents (%d empty skipped)", train.source, len(train.texts), train.num_skipped_empty)
    tokenizer = Tokenizer(cfg.data.token_pattern, cfg.data.lowercase, cfg.data.tokenizer_version)
    workers = resolve_workers(cfg.data.workers)
    tokenized_train = tokenize(train.texts, tokenizer, cfg.data.max_tokens_per_doc, workers)  # once: counts, encoding
    counts = tokenized_train.word_counts()
    e = cfg.embeddings
    vocab = build_vocabulary(
        counts,
        train.labels,
        pretrained.index() if pretrained is not None else None,
        min_freq=e.min_freq,
        max_vocab=e.max_vocab,
        full_pretrained_rows=pretrained.num_rows if (pretrained is not None and e.full_pretrained) else 0,
    )
    if len(vocab.labels) < 2:
        raise DataError(f"{train.source}: training data has a single class ({vocab.labels}) in column "
                        f"{cfg.data.label_column!r}; need at least 2")
    vocab.save(tmp / "vocab")
    init_std = 0.1
    if pretrained is not None:
        # the 20,000 most frequent pretrained words (ids follow a hash, see build_vocabulary): enough to estimate
        # the scale, read in source order
        frequent = np.argsort(-vocab.counts[: vocab.num_pretrained], kind="stable")[:20000]
        init_std = pretrained_scale(pretrained.take(np.sort(vocab.pretrained_rows[frequent])))
        if not e.full_pretrained:
            np.save(tmp / "frozen.npy", pretrained.take(vocab.pretrained_rows))
    featurizer = make_featurizer(cfg, vocab, workers)
    stats = {"train_docs": len(train.texts), "train_skipped_empty": train.num_skipped_empty,
             "train_tokens": int(sum(counts.values()))}
    featurizer.encode_tokenized(tokenized_train, train.labels).save(tmp / "train")
    for split in ("valid", "test"):
        spec = getattr(cfg.data, split)
        if not spec:
            continue
        table = _read(spec, cfg, split)
        encoded = featurizer.encode(table.texts, table.labels)
        unseen = sorted({y for y in table.labels if y not in vocab.label_index})
        stats[f"{split}_docs"] = len(table.texts)
        stats[f"{split}_skipped_empty"] = table.num_skipped_empty
        stats[f"{split}_unseen_label_docs"] = int((encoded.labels < 0).sum())
        if unseen:
            log.warning("%s: %d documents have labels never seen in training (%s); they count as errors",
                        table.source, stats[f"{split}_unseen_label_docs"], ", ".join(unseen[:10]))
        encoded.save(tmp / split)
    meta = {"coverage": coverage(vocab, counts), "stats": stats, "init_std": init_std}
    (tmp / "done.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


def class_weights(labels: np.ndarray, num_classes: int, kind: str) -> np.ndarray:
    """none -> all ones; inverse_log -> w_y = log(N / N_y) (classes absent from training get weight 0)."""
    if kind == "none":
        return np.ones(num_classes, dtype=np.float32)
    counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
    total = counts.sum()
    with np.errstate(divide="ignore"):
        weights = np.where(counts > 0, np.log(total / np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)


class BatchPlan:
    """Deterministic global batches per epoch, and this rank's share of each."""

    def __init__(self, doc_tokens: np.ndarray, batch_size: int, tokens_per_batch: int, seed: int, shuffle: bool = True):
        self.doc_tokens = np.asarray(doc_tokens, dtype=np.int64)
        self.batch_size = batch_size
        self.tokens_per_batch = tokens_per_batch
        self.seed = seed
        self.shuffle = shuffle
        self._cache: dict[int, list[np.ndarray]] = {}
        self._counts: dict[int, int] = {}  # steps per epoch, kept for every epoch seen (position() walks them)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._cache:
            n = len(self.doc_tokens)
            order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                     else np.arange(n, dtype=np.int64))
            # keep two epochs: the current one and the next (the prefetch thread reaches it one step early)
            self._cache = {e: b for e, b in self._cache.items() if e == epoch - 1} | {epoch: self._cut(order)}
            self._counts[epoch] = len(self._cache[epoch])
        return self._cache[epoch]

    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        if not self.tokens_per_batch:
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches, start, tokens = [], 0, 0
        sizes = self.doc_tokens[order]
        for i, size in enumerate(sizes.tolist()):
            full_count = self.batch_size and i - start >= self.batch_size
            full_tokens = i > start and tokens + size > self.tokens_per_batch
            if full_count or full_tokens:
                batches.append(order[start:i])
                start, tokens = i, 0
            tokens += size
        if start < len(order):
            batches.append(order[start:])
        return batches

    def steps_in_epoch(self, epoch: int) -> int:
        if not self.tokens_per_batch:  # fixed-size batches: no need to build the epoch's plan
            return -(-len(self.doc_tokens) // self.batch_size)
        if epoch not in self._counts:
            self.epoch(epoch)
        return self._counts[epoch]

    def total_steps(self, epochs: int) -> int:
        if not self.tokens_per_batch:
            return epochs * -(-len(self.doc_tokens) // self.batch_size)
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index within epoch) of global step `step`."""
        epoch = 0
        while step >= (n := self.steps_in_epoch(epoch)):
            step -= n
            epoch += 1
        return epoch, step


def rank_share(global_batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Contiguous split of a global batch; with fewer documents than ranks some shares are empty."""
    return np.array_split(global_batch, world_size)[rank]


class BatchPrefetcher:
    """Builds step N+1's batch on a background thread while step N computes.

    Why: collating (numpy gathers over the token-id arrays) was 10-20 % of a bag-encoder step on CPU, run
    serially before the forward pass. numpy and torch release the GIL in their loops, so the next batch's
    collate overlaps the current step's kernels. One batch ahead only: memory stays one batch, and the batch for
    a step is a pure function of the step (the plan), so the results are bit-identical to collating inline.
    """

    def __init__(self, make: Callable[[int], tuple], total_steps: int, pin: bool = False) -> None:
        self._make = make
        self._total = total_steps
        self._pin = pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collate")
        self._pending: tuple[int, Future] | None = None

    def _build(self, step: int) -> tuple:
        out = self._make(step)
        if self._pin:  # page-locked host memory, so the main thread's copy to the GPU is asynchronous
            out = (*out[:1], out[1].pinned(), *out[2:])
        return out

    def get(self, step: int) -> tuple:
        """`make(step)`, from the thread if it was prefetched; then starts building step + 1."""
        if self._pending is not None and self._pending[0] == step:
            out = self._pending[1].result()
        else:  # first step of a run, or the caller jumped: build inline (an unused prefetch is just dropped)
            out = self._build(step)
        self._pending = (step + 1, self._pool.submit(self._build, step + 1)) if step + 1 < self._total else None
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
