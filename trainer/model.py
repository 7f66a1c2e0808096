"""The classifier: embedding tables (local or row-wise sharded) -> encoder -> head.

The model is split in two on purpose. `tables` holds the embedding tables and knows nothing about encoders;
`dense` holds every dense parameter (LSTM, hidden layer, output layer). Replicated training wraps the whole
model in DDP; row-wise sharded training wraps only `dense`, because each rank owns different table rows.
"""

import numpy as np
import torch
from torch import nn

from trainer import kernels
from trainer.bag_lookup import bag_sum, gather_pool, group_ids, group_ids_many
from trainer.batch import Batch
from trainer.config import ModelConfig
from trainer.embeddings import per_token_offsets, segment_counts, segment_index
from trainer.lstm_encoder import bidirectional_states

if kernels.numba is not None:
    from trainer.batch_kernels import _wide_normalise, _wide_weights


class ClassifierHead(nn.Module):
    """Dropout -> optional hidden ReLU layer -> linear output. The output layer starts at zero (as fastText's
    does), so the first steps move the head before noise from random logits reaches the embeddings."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.hidden = nn.Linear(in_dim, hidden) if hidden else None
        self.out = nn.Linear(hidden or in_dim, num_classes)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        x_BD = self.dropout(x_BD)
        if self.hidden is not None:
            x_BD = self.dropout(torch.relu(self.hidden(x_BD)))
        return self.out(x_BD)


class DenseNet(nn.Module):
    """Everything dense: an optional bidirectional LSTM over token vectors, then the head."""

    def __init__(self, cfg: ModelConfig, dim: int, num_classes: int, families: int = 1) -> None:
        super().__init__()
        self.lstm = None
        in_dim = dim * families
        if cfg.encoder == "lstm":
            self.lstm = nn.LSTM(dim, cfg.lstm_hidden, num_layers=cfg.lstm_layers, bidirectional=True, batch_first=True)
            in_dim = 2 * cfg.lstm_hidden
        self.head = ClassifierHead(in_dim, cfg.hidden, num_classes, cfg.dropout)

    def forward(self, x: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
        if self.lstm is None:
            return self.head(x)
        # x: (num_tokens, D) in document order. A rank with no documents runs one empty document and drops its
        # output: the LSTM's parameters then take part in every step (DDP waits for their gradients), and x
        # always reaches the output, so every table lookup stays in the autograd graph (row-wise backward
        # collectives need that).
        num_docs = seq_lengths.shape[0]
        lengths = seq_lengths if num_docs else torch.zeros(1, dtype=torch.long)
        # The recurrence runs in float32 even under train.bf16: autocast sends torch.lstm on CUDA to cuDNN in
        # float16 whatever dtype was asked for (ATen's AutocastRNN.cpp), and nothing scales an fp16 loss here.
        with torch.autocast(device_type=x.device.type, enabled=False):
            states = bidirectional_states(self.lstm, x.float(), lengths)
        return self.head(states[:num_docs])


class TextClassifier(nn.Module):
    def __init__(self, tables: nn.Module, cfg: ModelConfig, num_pretrained: int, num_classes: int) -> None:
        super().__init__()
        self.tables = tables
        self.encoder = cfg.encoder
        self.pooling = cfg.pooling
        # wide & deep (model.wide): linear tables of one logit per class and feature, TF-IDF weighted; their idf
        # per row comes from the training split (`wide_idf`, set by the trainer or the exported model)
        self.wide_tables = [n for n in ("wide_word", "wide_bigram", "wide_char") if tables.has(n)]
        self.chars_wide_only = "wide_char" in self.wide_tables and not tables.has("char")  # model.deep_chars = false
        self.wide_idf: dict[str, torch.Tensor] = {}
        self._idf_copies: dict[tuple[str, str], torch.Tensor] = {}
        self._idf_blocks: dict[tuple[str, ...], tuple] = {}  # _block_idf
        self._log_tf = np.zeros(0, np.float32)  # _wide_lookups_cpu
        self.num_pretrained = num_pretrained
        # concat: words, then each n-gram table, pooled separately (bag encoders only)
        self.concat_tables = (
            [n for n in ("bigram", "char") if tables.has(n)]
            if cfg.combine == "concat" and cfg.encoder != "lstm" else None
        )
        families = 1 + len(self.concat_tables) if self.concat_tables is not None else 1
        self.dense = DenseNet(cfg, tables.dim, num_classes, families)
        # The pretrained-row correction joins the lookups only once unfrozen (set by the trainer at a step that
        # every rank agrees on, so row-wise collectives stay in lock-step).
        self.delta_active = False
        # bf16 autocast for the dense part on CUDA (train.bf16); lookups and pooling stay float32
        self.dense_autocast = False
        # set by the trainer where sgd on the tables can be fused with their lookups (fused_sgd.py); training only
        self.fused_sgd = None

    def _lookups(self, batch: Batch, word_groups: tuple | None, words_fused: bool = False) -> dict[str, torch.Tensor]:
        """Every table lookup of the step in one `pooled_many` call (row-wise tables fuse its collectives);
        `words_fused`: without the word and mask lookups, which `tables.masked_words` made.

        The list of lookups depends only on the configuration and on `delta_active`, which all ranks agree on, so
        row-wise collectives stay in lock-step."""
        requests, groups = self._planned_requests(batch, word_groups, with_words=not words_fused)
        routes = dict(batch.routes)
        if self.tables.has("pretrained_delta"):
            pre_ids, pre_off = requests[0][1:]
            if self.delta_active:
                requests.append(("pretrained_delta", pre_ids, pre_off))
                if "pretrained" in routes:  # the same ids into a table of the same rows: the same route
                    routes["pretrained_delta"] = routes["pretrained"]
            else:  # called with no ids: every table joins every step (DDP, row-wise collectives)
                groups.pop("pretrained_delta", None)
                requests.append(("pretrained_delta", pre_ids[:0], torch.zeros_like(pre_off)))
        pooled = self.tables.pooled_many(requests, groups, routes)
        rows = dict(zip([r[0] for r in requests], pooled, strict=True))
        if "pretrained_delta" in rows:
            rows["pretrained"] = rows["pretrained"] + rows.pop("pretrained_delta")
        return rows

    def _planned_requests(self, batch: Batch, word_groups: tuple | None,
                          with_words: bool = True) -> tuple[list, dict]:
        """The step's lookups that do not depend on the step (all but the pretrained correction's), as
        (table, ids, offsets), pretrained first, and the groups they use; `with_words` false: the n-gram tables'
        only (`tables.masked_words` made the word sums).

        Word tables are pooled per segment, or, for masked_bag, looked up once per distinct word of the step
        (`word_groups`, from `_word_groups`) so their rows can be multiplied by the mask rows before pooling."""
        groups = dict(batch.groups)
        ngrams = [(name, *batch.tables[name]) for name in ("bigram", "char") if self.tables.has(name)]
        if not with_words:
            return ngrams, groups
        (pre_ids, pre_off), (oov_ids, oov_off) = batch.tables["pretrained"], batch.tables["oov"]
        masked = word_groups is not None
        if masked:
            pre_ids, oov_ids, *_ = word_groups
            distinct = torch.cat([pre_ids, oov_ids + self.num_pretrained])  # the step's mask rows, sorted
            pre_off = per_token_offsets(pre_ids.shape[0], pre_ids.device)
            oov_off = per_token_offsets(oov_ids.shape[0], oov_ids.device)
            # already distinct and sorted: each is its own group, no hashing again
            groups.update({"oov": (oov_ids, oov_off), "pretrained_delta": (pre_ids, pre_off),
                           "mask": (distinct, per_token_offsets(distinct.shape[0], distinct.device))})
        requests = [("pretrained", pre_ids, pre_off), ("oov", oov_ids, oov_off)]
        if masked:
            requests.append(("mask", distinct, groups["mask"][1]))
        return requests + ngrams, groups

    def prepare(self, batch: Batch) -> Batch:
        """The data thread's work on a collated batch, ahead of its step (same results as leaving it to forward):
        group the ids of the lookups that can be grouped (`Batch.groups`; the wide tables' TF-IDF weighted lookups
        `Batch.weighted` with theirs), then, for row-wise tables, plan where every lookup's ids go (`Batch.routes`,
        `RowWiseTables.route`; masked_bag's are built from the groups)."""
        groupable = self.groupable_ids(batch)
        batch.groups = dict(zip(groupable, group_ids_many(list(groupable.values())), strict=True))
        batch.words = ()  # made again below from these groups, never kept from an earlier call
        if self.wide_tables:
            batch.weighted = self.wide_lookups(batch)
            batch.groups.update({name: group_ids(ids) for name, (ids, _, _) in batch.weighted.items()
                                 if kernels.can_fuse(self.tables.bags[name].weight)})
        if self.encoder == "masked_bag":
            batch.words = self._word_groups(batch)
        if hasattr(self.tables, "route"):
            word_groups = batch.words or None
            batch.routes = {name: self.tables.route(name, ids, offsets)
                            for name, ids, offsets in self._planned_requests(batch, word_groups)[0]}
        return batch

    def _word_groups(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's distinct pretrained and OOV word ids (each sorted), and for every word token (pretrained
        tokens, then OOV tokens) its row among [distinct pretrained | distinct OOV] and its document (segment):
        `Batch.words` if the data thread made them, else from its groups (`Batch.groups`) or here. Sizes come from
        shapes, so a CUDA step needs no host sync for them."""
        if batch.words:
            return batch.words
        parts = []
        for name in ("pretrained", "oov"):
            ids = batch.tables[name][0]
            parts.append(batch.groups[name] if name in batch.groups else group_ids(ids))
        (pre, pre_inverse), (oov, oov_inverse) = parts
        (pre_ids, pre_off), (oov_ids, oov_off) = batch.tables["pretrained"], batch.tables["oov"]
        segment = torch.cat([segment_index(pre_off, pre_ids.shape[0]), segment_index(oov_off, oov_ids.shape[0])])
        return pre, oov, torch.cat([pre_inverse, oov_inverse + pre.shape[0]]), segment

    def groupable_ids(self, batch: Batch) -> dict[str, torch.Tensor]:
        """By table, the ids the data thread can group ahead (`Batch.groups`, bag_lookup.group_ids): the words of
        masked_bag, and, for tables this process holds whole, the lookups that do not depend on the step (not the
        pretrained correction's)."""
        return {name: batch.tables[name][0] for name in self._groupable_names()}

    def _groupable_names(self) -> list[str]:
        names = ["pretrained", "oov"] if self.encoder == "masked_bag" else []
        if self.tables.takes_groups:
            names += [n for n in ("oov", "bigram", "char") if n not in names and self.tables.has(n)]
        return names

    def grouping_plan(self) -> tuple[tuple[str, ...], bool] | None:
        """What `prepare` does to a batch of this model, as `batch.collate_grouped` takes it (the tables to group,
        and whether to make masked_bag's word index), where that one kernel call does all of it; None where
        `prepare` has more to do (the LSTM's token segments, wide tables' weighted lookups, row-wise routes)."""
        if self.encoder == "lstm" or self.wide_tables or hasattr(self.tables, "route"):
            return None
        return tuple(self._groupable_names()), self.encoder == "masked_bag"

    def embed(self, batch: Batch) -> torch.Tensor:
        """Document vectors (B, D) for bag encoders; token vectors (N, D) for the LSTM."""
        word_groups = self._word_groups(batch) if self.encoder == "masked_bag" else None
        if self.fused_sgd is not None and self.training and torch.is_grad_enabled():
            # the word and n-gram sums in one Function whose tables get no gradient: the optimizer step applies
            # their SGD update from the sums' gradient (fused_sgd.py)
            return self._pooled(batch, self.fused_sgd.pool(batch, word_groups))
        x = None
        if word_groups is not None and not self.tables.has("pretrained_delta"):
            # (the fused sums know no pretrained correction)
            x = self.tables.masked_words(*word_groups, batch.num_docs)
        rows = self._lookups(batch, word_groups, words_fused=x is not None)
        if word_groups is None:
            x = rows["pretrained"] + rows["oov"]
        elif x is None:
            # E(w) * M(w) once per distinct word, then summed per document through each token's index: the
            # (tokens x dim) block of per-token rows is never made, forward or backward
            words = torch.cat([rows["pretrained"], rows["oov"]]) * rows["mask"]
            x = gather_pool(words, *word_groups[2:], batch.num_docs)
        if self.concat_tables is not None:
            return self._concat(batch, x, rows)
        for name in ("bigram", "char"):
            if name in rows:
                x = x + rows[name]
        if self.encoder == "lstm":
            # a token's vector is the mean of its word row and its character n-gram rows
            has_word = _counts(batch, "pretrained") + _counts(batch, "oov")
            n_chars = _counts(batch, "char")
            return x / (has_word + n_chars).clamp(min=1).unsqueeze(1).to(x.dtype)
        return self._pooled(batch, x)

    def _pooled(self, batch: Batch, x: torch.Tensor) -> torch.Tensor:
        """A bag encoder's per-document sums divided as `model.pooling` says."""
        lengths = batch.lengths
        if self.chars_wide_only:  # batch.lengths counts the char ids, which only the wide part looks up
            lengths = lengths - _counts(batch, "char").to(lengths.dtype)
        return x / _pool_divisor(lengths, self.pooling).unsqueeze(1).to(x.dtype)

    def _concat(self, batch: Batch, words: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """[words | bigrams | chars], each family pooled over its own ids (as TF-IDF blocks are normalised
        separately): a long document's thousands of char n-grams then cannot drown its words."""
        parts = [(words, _counts(batch, "pretrained") + _counts(batch, "oov"))]
        parts += [(rows[name], _counts(batch, name)) for name in self.concat_tables]
        return torch.cat([x / _pool_divisor(n, self.pooling).unsqueeze(1).to(x.dtype) for x, n in parts], dim=1)

    def wide_lookups(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The wide part's lookups, by table: (distinct feature ids, offsets, TF-IDF weights) per document, as
        sklearn's TfidfVectorizer(sublinear_tf=True, min_df=2) weights them: (1 + ln tf) x idf, features of fewer
        than two training documents weighted 0, each block (words with bigrams; char n-grams) L2-normalised per
        document. The data thread makes them (`prepare`, `Batch.weighted`); evaluation batches here."""
        device, num_docs = batch.tables["pretrained"][0].device, batch.num_docs
        if device.type == "cpu" and kernels.numba is not None:
            return self._wide_lookups_cpu(batch)
        out = {}
        for block in self._wide_blocks():
            parts, sq = [], torch.zeros(num_docs, dtype=torch.float32, device=device)
            for name, sources in block:
                ids = torch.cat([batch.tables[family][0] + shift for family, shift in sources])
                seg = torch.cat([segment_index(batch.tables[family][1], batch.tables[family][0].shape[0])
                                 for family, _ in sources])
                rows = self.tables.specs[name].num_rows
                # distinct (document, feature) pairs, sorted by document (group_ids: the radix grouping on the
                # data thread's host batches): tf = how often each occurs
                key, inverse = group_ids(seg * rows + ids)
                tf = torch.bincount(inverse, minlength=key.shape[0])
                doc, feature = torch.div(key, rows, rounding_mode="floor"), key % rows
                weight = (1 + torch.log(tf.float())) * self._idf(name, device)[feature]
                sq.index_add_(0, doc, weight * weight)
                parts.append((name, doc, feature, weight))
            norm = sq.sqrt().clamp(min=1e-12)
            for name, doc, feature, weight in parts:
                offsets = torch.zeros(num_docs, dtype=torch.long, device=device)
                offsets[1:] = torch.cumsum(torch.bincount(doc, minlength=num_docs), 0)[:-1]
                out[name] = (feature, offsets, weight / norm[doc])
        return out

    def _wide_blocks(self) -> list[list[tuple[str, list[tuple[str, int]]]]]:
        """The wide tables by normalisation block (words with bigrams; char n-grams), each with the batch tables
        its features come from and the shift into its rows: wide_word's rows are [pretrained | OOV] words."""
        blocks = [[], []]
        if "wide_word" in self.wide_tables:
            blocks[0].append(("wide_word", [("pretrained", 0), ("oov", self.num_pretrained)]))
        for name, family, block in (("wide_bigram", "bigram", 0), ("wide_char", "char", 1)):
            if name in self.wide_tables:
                blocks[block].append((name, [(family, 0)]))
        return [b for b in blocks if b]

    def _block_idf(self, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The block's idf vectors end to end (float32) and where each starts; made once per `wide_idf`."""
        cached = self._idf_blocks.get(names)
        if cached is None or any(a is not self.wide_idf[n] for a, n in zip(cached[0], names, strict=True)):
            parts = [self.wide_idf[n].detach().cpu().float().numpy() for n in names]
            base = np.cumsum([0] + [len(a) for a in parts[:-1]]).astype(np.int64)
            cached = ([self.wide_idf[n] for n in names], np.concatenate(parts), base)
            self._idf_blocks[names] = cached
        return cached[1], cached[2]

    def _wide_lookups_cpu(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`wide_lookups` on CPU: each table's (document, feature) keys sorted by numpy, then one numba call per
        block (`batch_kernels._wide_weights`), the same bits as the torch ops; on the demo's wide config those
        took about 15 ms of the data thread's 23 ms a batch."""
        num_docs, out = batch.num_docs, {}
        for block in self._wide_blocks():
            names = tuple(name for name, _ in block)
            keys, rows, longest = [], [], 1
            for name, sources in block:
                num_rows = self.tables.specs[name].num_rows
                parts = []
                for family, shift in sources:
                    ids, offsets = batch.tables[family]
                    ids, offsets = ids.numpy(), offsets.numpy()
                    counts = np.diff(offsets, append=ids.shape[0])
                    longest = max(longest, int(counts.max(initial=0)))
                    seg = np.repeat(np.arange(num_docs, dtype=np.int64) * num_rows, counts)
                    parts.append(seg + ids + shift if shift else seg + ids)
                table_keys = np.concatenate(parts) if len(parts) > 1 else parts[0]
                table_keys.sort()
                keys.append(table_keys)
                rows.append(num_rows)
            longest *= max(len(sources) for _, sources in block)  # a feature's count in a document, at most
            log_tf = self._log_tf  # torch's ln 0..n, kept: its float32 log is not numpy's (a local: the data
            if log_tf.shape[0] <= longest:  # thread and an evaluation may both be here)
                log_tf = torch.log(torch.arange(max(longest + 1, 2 * log_tf.shape[0]), dtype=torch.float32)).numpy()
                self._log_tf = log_tf
            idf, idf_base = self._block_idf(names)
            key_bounds = np.cumsum([0] + [len(k) for k in keys]).astype(np.int64)
            features, pair_starts, weights, sq = _wide_weights(
                np.concatenate(keys) if len(keys) > 1 else keys[0], key_bounds, np.array(rows, np.int64), num_docs,
                idf, idf_base, log_tf)
            _wide_normalise(weights, pair_starts, torch.from_numpy(sq).sqrt().clamp(min=1e-12).numpy())
            features, weights = torch.from_numpy(features), torch.from_numpy(weights)
            for t, name in enumerate(names):
                lo, hi = int(pair_starts[t, 0]), int(pair_starts[t, num_docs])
                out[name] = (features[lo:hi], torch.from_numpy(pair_starts[t, :num_docs] - lo), weights[lo:hi])
        return out

    def _idf(self, name: str, device: torch.device) -> torch.Tensor:
        """`wide_idf[name]` on `device`, one copy per device (the data thread works on host batches, evaluation on a
        GPU on device batches)."""
        key = (name, str(device))
        if key not in self._idf_copies:
            self._idf_copies[key] = self.wide_idf[name].to(device)
        return self._idf_copies[key]

    def wide_logits(self, batch: Batch) -> torch.Tensor:
        """Sum over the wide tables of their rows (one logit per class) weighted by `wide_lookups`."""
        lookups = batch.weighted or self.wide_lookups(batch)
        if self.fused_sgd is not None and self.fused_sgd.wide and self.training and torch.is_grad_enabled():
            # the same logits from one Function whose tables get no gradient: the optimizer step applies their SGD
            # update from the logits' gradient (fused_sgd.py)
            return self.fused_sgd.wide_logits(lookups, batch.groups)
        logits = None
        for name in self.wide_tables:
            ids, offsets, weights = lookups[name]
            # groups: the data thread's grouping of the ids (prepare), so the gradient comes out coalesced
            z = bag_sum(self.tables.bags[name].weight, ids, offsets, batch.groups.get(name), weights)
            logits = z if logits is None else logits + z
        return logits

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.embed(batch)
        # Training steps only: evaluation stays float32, as the exported model runs (export.LoadedModel), so the
        # valid / test figures a run reports are the ones `trainer eval` gives its model.
        if self.dense_autocast and self.training:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = self.dense(x, batch.seq_lengths).float()
        else:
            logits = self.dense(x, batch.seq_lengths)
        return logits + self.wide_logits(batch) if self.wide_tables else logits


def _pool_divisor(counts: torch.Tensor, pooling: str) -> torch.Tensor:
    """What a bag's sum is divided by: its count (mean), sqrt of it (sqrt), or 1 (sum)."""
    if pooling == "sum":
        return torch.ones_like(counts, dtype=torch.float32)
    n = counts.clamp(min=1).to(torch.float32)
    return n if pooling == "mean" else n.sqrt()


def _counts(batch: Batch, name: str) -> torch.Tensor:
    """Per-document number of ids of one table (from its EmbeddingBag offsets)."""
    ids, offsets = batch.tables[name]
    return segment_counts(offsets, ids.shape[0])

