"""A step's batch: the EmbeddingBag inputs (ids and offsets per table) of some encoded documents, as tensors.

`collate` gathers documents from the cached CSR arrays (`features.EncodedDocs`); the data thread then groups and
routes the ids (`TextClassifier.prepare`) before the step takes the batch.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.features import EncodedDocs, document_frequency, exclusive_cumsum, gather_csr
from trainer.jit import fused_kernels_enabled, numba

TABLES = ("pretrained", "oov", "bigram", "char")  # the lookups of a bag-encoder batch, in the kernels' order

if numba is not None:
    from trainer.batch_kernels import _collate_grouped


@dataclass
class Batch:
    """One rank's share of a step: per-table (ids, offsets) for EmbeddingBag, plus what the loss needs.

    Segments are documents for bag encoders and token positions for the LSTM (`seq_lengths` then says how many
    tokens each document has). `lengths` is each document's number of looked-up ids (for mean pooling). `groups`
    optionally holds, by table name, the ids of `tables[name]` grouped ahead on the data thread
    (bag_lookup.group_ids), and for a wide table (`wide_*`) the ids of `weighted[name]`; masked_bag builds its
    per-word lookups from the "pretrained" and "oov" groups.
    `routes` holds, for row-wise sharded tables, where each lookup's ids go (row_wise.plan_route), also planned
    ahead."""

    tables: dict[str, tuple[torch.Tensor, torch.Tensor]]
    labels: torch.Tensor
    lengths: torch.Tensor
    seq_lengths: torch.Tensor
    num_docs: int
    num_tokens: int
    groups: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    routes: dict = field(default_factory=dict)
    # by wide table (model.wide), its TF-IDF weighted lookups (ids, offsets, weights), made on the data thread
    weighted: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # masked_bag's word index, made on the data thread (TextClassifier.prepare): the distinct pretrained and OOV
    # word ids, each token's row among them, each token's document
    words: tuple[torch.Tensor, ...] = ()

    def pinned(self) -> "Batch":
        """A copy in page-locked host memory (for asynchronous copies to a GPU)."""
        return Batch(
            tables={k: (i.pin_memory(), o.pin_memory()) for k, (i, o) in self.tables.items()},
            labels=self.labels.pin_memory(),
            lengths=self.lengths.pin_memory(),
            seq_lengths=self.seq_lengths,
            num_docs=self.num_docs,
            num_tokens=self.num_tokens,
            groups={k: (d.pin_memory(), i.pin_memory()) for k, (d, i) in self.groups.items()},
            routes={k: r.pinned() for k, r in self.routes.items()},
            weighted={k: tuple(t.pin_memory() for t in v) for k, v in self.weighted.items()},
            words=tuple(t.pin_memory() for t in self.words),
        )

    def to(self, device: torch.device) -> "Batch":
        if device.type == "cpu":
            return self
        nb = dict(non_blocking=True)
        return Batch(
            tables={k: (i.pin_memory().to(device, **nb), o.pin_memory().to(device, **nb)) for k, (i, o) in self.tables.items()},
            labels=self.labels.pin_memory().to(device, **nb),
            lengths=self.lengths.pin_memory().to(device, **nb),
            seq_lengths=self.seq_lengths,  # the LSTM encoder buckets documents by length on the host
            num_docs=self.num_docs,
            num_tokens=self.num_tokens,
            groups={k: (d.pin_memory().to(device, **nb), i.pin_memory().to(device, **nb))
                    for k, (d, i) in self.groups.items()},
            routes={k: r.pinned().to(device, **nb) for k, r in self.routes.items()},
            weighted={k: tuple(t.pin_memory().to(device, **nb) for t in v) for k, v in self.weighted.items()},
            words=tuple(t.pin_memory().to(device, **nb) for t in self.words),
        )


def collate(docs: EncodedDocs, rows: np.ndarray, num_pretrained: int, token_level: bool,
            fused: bool = False) -> Batch:
    """Assemble the EmbeddingBag inputs of documents `rows` (this rank's share of a global batch). `fused`: for bag
    encoders, one numba call without the GIL (`collate_grouped` with nothing to group), for the training data
    thread; off by default, since a process that has not run a numba kernel yet (`trainer predict` of a few lines)
    would pay numba's first-kernel cost (~0.4 s) for it."""
    rows = np.asarray(rows, dtype=np.int64)
    num_docs = len(rows)
    if fused and not token_level and fused_kernels_enabled():
        return batch_from_collated(collate_grouped(docs, rows, num_pretrained, (), False))
    tokens, token_counts = gather_csr(docs.token_offsets, docs.token_ids, rows)
    bigrams, bigram_counts = gather_csr(docs.bigram_offsets, docs.bigram_ids, rows)
    chars, char_counts = gather_csr(docs.char_offsets, docs.char_ids, rows)
    is_pre = (tokens >= 0) & (tokens < num_pretrained)
    is_oov = tokens >= num_pretrained

    def as_tensors(ids: np.ndarray, counts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)), torch.from_numpy(exclusive_cumsum(counts))

    if token_level:
        # one segment per kept token: 0 or 1 word id, and that token's char n-grams
        tok_char_counts, _ = gather_csr(docs.token_offsets, docs.char_token_counts, rows)
        tables = {
            "pretrained": as_tensors(tokens[is_pre], is_pre.astype(np.int64)),
            "oov": as_tensors(tokens[is_oov] - num_pretrained, is_oov.astype(np.int64)),
            "char": as_tensors(chars, tok_char_counts),
            "bigram": as_tensors(bigrams[:0], np.zeros(len(tokens), dtype=np.int64)),
        }
        seq_lengths = torch.from_numpy(token_counts)
    else:
        doc_of_token = np.repeat(np.arange(num_docs), token_counts)
        pre_counts = np.bincount(doc_of_token[is_pre], minlength=num_docs)
        oov_counts = np.bincount(doc_of_token[is_oov], minlength=num_docs)
        tables = {
            "pretrained": as_tensors(tokens[is_pre], pre_counts),
            "oov": as_tensors(tokens[is_oov] - num_pretrained, oov_counts),
            "bigram": as_tensors(bigrams, bigram_counts),
            "char": as_tensors(chars, char_counts),
        }
        seq_lengths = torch.from_numpy(token_counts)
    lengths = (is_pre | is_oov).astype(np.int64)
    per_doc_words = np.bincount(np.repeat(np.arange(num_docs), token_counts), weights=lengths, minlength=num_docs)
    total = per_doc_words + bigram_counts + char_counts
    return Batch(
        tables=tables,
        labels=torch.from_numpy(docs.labels[rows].copy()),
        lengths=torch.from_numpy(total.astype(np.float32)),
        seq_lengths=seq_lengths,
        num_docs=num_docs,
        num_tokens=int(docs.raw_tokens[rows].sum()),
    )


def collate_grouped(docs: EncodedDocs, rows: np.ndarray, num_pretrained: int, group: tuple[str, ...],
                    words: bool) -> tuple:
    """The data thread's whole share of a bag-encoder step in one numba call without the GIL: `collate`, then the
    groups of the `group` tables and (`words`) masked_bag's word index, as `TextClassifier.prepare` makes them.
    Returns plain arrays; `batch_from_collated` makes the Batch on the step's thread.

    Why: the step's thread needs the GIL between its torch ops, and every Python-level call on the data thread
    takes it, so the thread's work should be few calls (README, "A data thread that does not take the GIL";
    benchmarks/bench_data_thread.py measures what it costs the step)."""
    if words and not {"pretrained", "oov"} <= set(group):
        raise ValueError("collate_grouped: the word index needs the pretrained and oov groups")
    flags = np.array([name in group for name in TABLES], dtype=np.bool_)
    out = _collate_grouped(docs.token_offsets, docs.token_ids, docs.bigram_offsets, docs.bigram_ids,
                           docs.char_offsets, docs.char_ids, docs.labels, docs.raw_tokens,
                           np.asarray(rows, dtype=np.int64), num_pretrained, flags, words)
    return group, words, len(rows), out


def batch_from_collated(collated: tuple) -> Batch:
    """The Batch of `collate_grouped`'s arrays (tensors sharing their memory), with `groups` and `words` set."""
    group, words, num_docs, out = collated
    (pre, oov, bigrams, chars, offsets, token_counts, lengths, labels, num_tokens, distinct, distinct_bounds,
     inverse, inverse_bounds, word_inverse, word_segment) = out
    offsets = torch.from_numpy(offsets)
    ids = [torch.from_numpy(a) for a in (pre, oov, bigrams, chars)]
    distinct, inverse = torch.from_numpy(distinct), torch.from_numpy(inverse)
    db, ib = distinct_bounds.tolist(), inverse_bounds.tolist()
    groups = {name: (distinct[db[t]:db[t + 1]], inverse[ib[t]:ib[t + 1]])
              for t, name in enumerate(TABLES) if name in group}
    batch = Batch(
        tables={name: (ids[t], offsets[t]) for t, name in enumerate(TABLES)},
        labels=torch.from_numpy(labels),
        lengths=torch.from_numpy(lengths),
        seq_lengths=torch.from_numpy(token_counts),
        num_docs=num_docs,
        num_tokens=int(num_tokens),
        groups=groups,
    )
    if words:
        batch.words = (groups["pretrained"][0], groups["oov"][0], torch.from_numpy(word_inverse),
                       torch.from_numpy(word_segment))
    return batch


def wide_idf(docs: EncodedDocs, rows: dict[str, int]) -> dict[str, torch.Tensor]:
    """For the wide tables among `rows` (table name -> rows), sklearn's smoothed idf ln((1 + n) / (1 + df)) + 1 of
    every row over the (training) documents; 0 where df < 2 (min_df = 2: a feature of one document only memorises
    it)."""
    sources = {"wide_word": (docs.token_ids, docs.token_offsets), "wide_bigram": (docs.bigram_ids, docs.bigram_offsets),
               "wide_char": (docs.char_ids, docs.char_offsets)}
    out = {}
    for name, (ids, offsets) in sources.items():
        if name in rows:
            df = document_frequency(ids, offsets, rows[name])
            idf = np.log((1 + len(docs)) / (1 + df)) + 1
            idf[df < 2] = 0
            out[name] = torch.from_numpy(idf.astype(np.float32))
    return out
