"""The data cache: read the splits, build the vocabulary, featurize every split once, save it all in a folder.

`build_cache` writes `<cache_root>/data-<cache_key>/` (the key covers the data files, the settings that change the
arrays and the pretrained vectors' fingerprint), made valid by `done.json`, written last.
`data.prepare_data` reads it back, memory-mapped, on every rank.

Nothing here, nor in what it imports, imports torch. Why: `python -m trainer train` forks a child that builds
the cache (`background_build.start_background_build`) before the parent imports torch, so the two overlap on two cores instead of
running one after the other (about a second of the demo's whole process: torch's import is 1 s, building the
demo's cache 1.5 s). tests/unit/test_data_cache.py checks that importing this module leaves torch unimported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer import fast_tokenize

# the forked build, kept importable without numba (background_build.py); re-exported for callers of this module
from trainer.background_build import BackgroundBuild, start_background_build  # noqa: E402, F401
from trainer.config import Config
from trainer.features import Featurizer, TokenizedDocs, tokenize
from trainer.parallel import resolve_workers
from trainer.tabular import DataError, TextTable, check_data_path, relative_to_cwd
from trainer.tabular_stream import read_all_chunks
from trainer.vectors import PACKAGE_NAME, PretrainedVectors, VectorFileError, load_vectors
from trainer.vocab import Tokenizer, Vocabulary, build_vocabulary, coverage

log = logging.getLogger(__name__)


def pretrained_scale(rows: np.ndarray) -> float:
    """Per-element standard deviation of the pretrained rows: trainable rows start at the same scale so the
    classifier sees OOV, n-gram and pretrained contributions of comparable size from step 0."""
    if rows.size == 0:
        return 0.1
    sample = rows[:: max(1, len(rows) // 50_000)]
    return float(np.asarray(sample, dtype=np.float64).std())


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
CACHE_FORMAT = "6"  # 3: vocabulary ids in hashed order within each block; 4: vocabulary fingerprint v2;
# 5: label text normalised like typed labels (tabular: "1.0" -> "1", "True" -> "true"); 6: char_token_counts.npy
# left out when all zero (features.EncodedDocs.save), which an earlier checkout sharing the folder could not load


def _cache_key(cfg: Config, *parts: str) -> str:
    d, e = cfg.data, cfg.embeddings
    settings = [CACHE_FORMAT, d.text_column, d.label_column, str(d.lowercase), d.token_pattern, str(d.max_tokens_per_doc),
                str(d.tokenizer_version),
                str(e.ngram_buckets), str(e.char_ngrams), str(e.char_minn), str(e.char_maxn), *parts]
    return hashlib.blake2b("\x00".join(settings).encode(), digest_size=10).hexdigest()


# the hub split a dataset name without `:split` means in each role (a bare name for data.valid used to read the
# train split, validating on the training data)
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


@dataclass
class TokenizedSplit:
    tokenized: TokenizedDocs
    labels: list[str]
    source: str
    num_skipped_empty: int


def read_tokenized(spec: str, cfg: Config, role: str, tokenizer: Tokenizer, workers: int,
                   setting: str | None = None) -> TokenizedSplit:
    """A split read a chunk at a time (`tabular_stream`) and tokenized as it comes, a batch of texts at a time
    (`tokenizing_batch`), into what tokenizing the whole file at once gives (`TokenizedDocs.joined`). Memory
    holds one batch of texts, not the file's: 800 MB of CSV as Python strings took 1.2 GiB. `role`: train, valid
    or test (a bare hub name's split); `setting`: the flag that named `spec`, for messages (default `data.ROLE`)."""
    _check_exists(spec, role, setting)
    split = _SplitTokenizer(tokenizer, cfg.data.max_tokens_per_doc, workers, spec)
    read_all_chunks(spec, cfg.data.text_column, cfg.data.label_column, HUB_SPLITS[role], split.start, split.take)
    return split.finish()


def stream_tokenized(spec: str, cfg: Config, role: str, tokenizer: Tokenizer, workers: int,
                     take: Callable[[TokenizedDocs, list[str]], None], restart: Callable[[], None],
                     setting: str | None = None, batch_chars: int | None = None) -> tuple[str, int]:
    """`read_tokenized` that keeps nothing: each tokenized batch of texts goes to `take` with its labels and is
    dropped, so memory holds one batch whatever the file's size (`trainer eval`). `restart` is called when the
    file must be read again from its start (a CSV row longer than the chunk: `tabular_stream.ReadAgain`): the
    caller forgets what it took. `batch_chars`: a smaller batch than the data cache's (`tokenizing_batch`).
    Returns (the source's name, rows skipped for empty text)."""
    _check_exists(spec, role, setting)
    split = _SplitTokenizer(tokenizer, cfg.data.max_tokens_per_doc, workers, spec, take, restart, batch_chars)
    read_all_chunks(spec, cfg.data.text_column, cfg.data.label_column, HUB_SPLITS[role], split.start, split.take)
    split.finish()
    return split.source, split.skipped


class _SplitTokenizer:
    """Chunks of a split in, `TokenizedSplit` out: texts gathered into batches (`tokenizing_batch`), each batch
    tokenized as it fills and dropped, the parts joined at the end; or with `take`, each tokenized batch handed
    to it with its labels and not kept (`stream_tokenized`)."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, workers: int, source: str,
                 take: Callable[[TokenizedDocs, list[str]], None] | None = None,
                 restart: Callable[[], None] | None = None, batch_chars: int | None = None) -> None:
        self.tokenizer, self.max_tokens, self.workers, self.first_source = tokenizer, max_tokens, workers, source
        self.batch_chars, self.block_chars = tokenizing_batch(workers, batch_chars)
        self.hand_over, self.restart = take, restart

    def start(self) -> None:
        """(Again, when the file must be read again: tabular_stream.ReadAgain.)"""
        if self.restart is not None:
            self.restart()
        self.parts: list[TokenizedDocs] = []
        self.labels: list[str] = []
        self.texts: list[str] = []
        self.chars = self.skipped = 0
        self.source = self.first_source

    def take(self, chunk: TextTable) -> None:
        self.source, self.skipped = chunk.source, self.skipped + chunk.num_skipped_empty
        self.texts += chunk.texts
        self.labels += chunk.labels
        self.chars += sum(map(len, chunk.texts))
        if self.chars >= self.batch_chars:
            self._tokenize_batch()

    def _tokenize_batch(self) -> None:
        texts, self.texts, self.chars = self.texts, [], 0
        if self.hand_over is None:
            self.parts.append(tokenize(texts, self.tokenizer, self.max_tokens, self.workers, self.block_chars))
        elif texts:
            labels, self.labels = self.labels, []
            tokenized = tokenize(texts, self.tokenizer, self.max_tokens, self.workers, self.block_chars)
            del texts  # the batch's strings go before `take` works on its tokens
            self.hand_over(tokenized, labels)

    def finish(self) -> TokenizedSplit | None:
        """The split's tokens joined; with `take`, the last batch handed over, and None."""
        if self.hand_over is not None:
            if self.texts:
                self._tokenize_batch()
            return None
        if self.texts or not self.parts:
            self._tokenize_batch()
        parts = self.parts
        tokenized = parts[0] if len(parts) == 1 else TokenizedDocs.joined(parts)
        return TokenizedSplit(tokenized, self.labels, self.source, self.skipped)


# Texts tokenized at a time by the data-cache build: at most this many tokenizer blocks (fast_tokenize.BLOCK_CHARS)
# of text, whatever data.workers is. Why a cap: with a batch of `workers` blocks, 16 workers meant 1G characters,
# more than the whole 800 MB benchmark file, held as Python strings.
BATCH_MAX_BLOCKS = 4


def tokenizing_batch(workers: int, max_chars: int | None = None) -> tuple[int, int]:
    """(characters of text per tokenizing batch, characters per tokenizer block): a block for each worker, so the
    forked workers share each batch (at least 2 blocks for them to fork), at most BATCH_MAX_BLOCKS full blocks,
    and at most `max_chars` characters."""
    workers = max(1, workers)
    batch = min(workers, BATCH_MAX_BLOCKS) * fast_tokenize.BLOCK_CHARS
    if max_chars is not None:
        batch = max(1, min(batch, max_chars))
    return batch, min(fast_tokenize.BLOCK_CHARS, max(1, batch // workers))


def _check_exists(spec: str, role: str, setting: str | None) -> None:
    """A local file that is missing is an error naming the setting that named it (default `data.ROLE`)."""
    check_data_path(spec, setting or f"data.{role}")


def cache_key(cfg: Config, pretrained: PretrainedVectors | None) -> str:
    """The cache folder's key for this configuration, data files and vectors, as this process sees them."""
    return _cache_key(cfg, _source_key(cfg.data.train), _source_key(cfg.data.valid), _source_key(cfg.data.test),
                      pretrained.fingerprint if pretrained is not None else "none",
                      str(cfg.embeddings.min_freq), str(cfg.embeddings.max_vocab), str(cfg.embeddings.full_pretrained))


def build_cache(cfg: Config, pretrained: PretrainedVectors | None, folder: Path) -> None:
    """Written into a temporary folder renamed into place at the end; a failure (bad data) removes it, so the
    run folder keeps no debris."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    made = [p for p in (folder.parent, *folder.parent.parents) if not p.exists()]  # innermost first
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        _fill_cache(cfg, pretrained, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in made:  # the cache and run folders this build made, if still empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    if folder.exists():  # another process won the race; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "done.json").exists():  # not a race lost between the check and the rename
            raise


def _fill_cache(cfg: Config, pretrained: PretrainedVectors | None, tmp: Path) -> None:
    tokenizer = Tokenizer(cfg.data.token_pattern, cfg.data.lowercase, cfg.data.tokenizer_version)
    workers = resolve_workers(cfg.data.workers)
    train = read_tokenized(cfg.data.train, cfg, "train", tokenizer, workers)  # once: counts, encoding
    tokenized_train, num_train_docs = train.tokenized, len(train.labels)
    log.info("read %s: %d documents (%d empty skipped)", train.source, num_train_docs, train.num_skipped_empty)
    counts = tokenized_train.word_counts()
    if not counts:
        raise DataError(f"{train.source}: no token in its {num_train_docs} documents with data.token_pattern "
                        f"{cfg.data.token_pattern!r}")
    e = cfg.embeddings
    vocab = build_vocabulary(
        counts,
        train.labels,
        None if pretrained is None else pretrained.index() if e.full_pretrained else pretrained.index_of(counts),
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
    stats = {"train_docs": num_train_docs, "train_skipped_empty": train.num_skipped_empty,
             "train_tokens": int(sum(counts.values()))}
    # written to the cache a block at a time, never held whole (encoded.FolderSink); the tokenized split goes after
    featurizer.encode_tokenized(tokenized_train, train.labels, folder=tmp / "train")
    del tokenized_train, train
    for split in ("valid", "test"):
        spec = getattr(cfg.data, split)
        if not spec:
            continue
        table = read_tokenized(spec, cfg, split, featurizer.tokenizer, featurizer.workers)
        encoded = featurizer.encode_tokenized(table.tokenized, table.labels, folder=tmp / split)
        unseen = sorted({y for y in table.labels if y not in vocab.label_index})
        stats[f"{split}_docs"] = len(table.labels)
        stats[f"{split}_skipped_empty"] = table.num_skipped_empty
        stats[f"{split}_unseen_label_docs"] = int((encoded.labels < 0).sum())
        if unseen:
            log.warning("%s: %d documents have labels never seen in training (%s); they count as errors",
                        table.source, stats[f"{split}_unseen_label_docs"], ", ".join(unseen[:10]))
    meta = {"coverage": coverage(vocab, counts), "stats": stats, "init_std": init_std}
    (tmp / "done.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


def cache_root(cfg: Config) -> Path:
    """The folder that holds the data caches: data.cache_dir, else RUN_DIR/cache."""
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.run.dir) / "cache"


def load_pretrained(cfg: Config, progress: bool) -> PretrainedVectors | None:
    """The configured pretrained vectors (through the vector cache), or None."""
    e = cfg.embeddings
    if not e.pretrained:
        return None
    if e.pretrained.strip().lower() != PACKAGE_NAME:
        path = Path(e.pretrained).expanduser()
        where = f"embeddings.pretrained{relative_to_cwd(e.pretrained)}"
        if not path.exists():
            # a name shaped like the built-in one (glove-6b-100d): say which names are built in
            hint = (f"; the only built-in name is {PACKAGE_NAME}, other vectors are given as a file path"
                    if "/" not in e.pretrained and not path.suffix else "")
            raise VectorFileError(f"{e.pretrained}: no such file ({where}){hint}")
        if not path.is_file():
            raise VectorFileError(f"{e.pretrained}: not a regular file ({where}); give a GloVe / word2vec / "
                                  "fastText .vec file")
    return load_vectors(e.pretrained, cache_dir=Path(e.vectors_cache_dir) if e.vectors_cache_dir else None,
                        progress=progress)


