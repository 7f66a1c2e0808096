"""Data for a run: the cached splits (built by `data_cache` on rank 0, memory-mapped on every rank) and the batches.

Batches are planned globally: every rank derives the same sequence of global batches from (seed, epoch), and
takes a contiguous part of each. `train.batch_size` and `train.tokens_per_batch` are global budgets, so a run
trains on the same batches at any world size, and a resume at another world size continues at the right place
from the global step alone.
"""

import json
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.config import Config
from trainer.data_cache import build_cache, cache_key
from trainer.distributed import DistInfo, barrier, broadcast_object, data_wait_group
from trainer.features import EncodedDocs
from trainer.vectors import PretrainedVectors
from trainer.vocab import Vocabulary

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


def prepare_data(cfg: Config, pretrained: PretrainedVectors | None, info: DistInfo, cache_dir: Path) -> DataBundle:
    """Rank 0 reads, builds the vocabulary and featurizes every split into the cache; other ranks wait, then
    memory-map the same files (so one host holds one copy)."""
    key = cache_key(cfg, pretrained)
    # rank 0 builds the cache, so its view of the files names it: another node's copy of the data (same path,
    # another inode) must not send that node's ranks looking for a folder nobody writes
    key = broadcast_object(key, info, group=data_wait_group())  # waits for rank 0's vectors (and its build child)
    folder = cache_dir / f"data-{key}"
    if info.is_main and not (folder / "done.json").exists():
        build_cache(cfg, pretrained, folder)
    barrier(info, group=data_wait_group())
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
