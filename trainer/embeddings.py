"""Embedding tables: one frozen pretrained table plus small trainable sparse tables, one id space.

The id space of a trained model (the vocabulary is what a run learns; n-gram buckets are hashed)::

    global word id    0 ............ P-1 | P ........... P+O-1
                      pretrained words   | out-of-vocabulary words
    table             `pretrained`       | `oov`                      (each table addressed by local ids 0..rows-1)
                      (frozen, mmapped,  | (trainable, sparse grads,
                       never optimized,  |  init at pretrained scale)
                       not checkpointed) |
    optional tables   `pretrained_delta` rows 0..P-1: trainable correction E'(w) = E(w) + D(w), zero-initialised,
                                         used after embeddings.unfreeze_after_steps (the frozen bytes never change)
                      `mask`             rows 0..P+O-1: per-word, per-dimension multiplier M(w), initialised to 1
                                         (masked_bag encoder: sum over tokens of E'(w) * M(w))
                      `bigram`           rows 0..B-1: hashed word bigrams   (bag encoders)
                      `char`             rows 0..C-1: hashed character n-grams of every token (fastText subwords)

Each batch carries, per table, EmbeddingBag-style `(ids, offsets)` whose segments are either documents (bag
encoders) or token positions (LSTM). Only trainable tables are `nn.EmbeddingBag(sparse=True)` modules, so DDP
recognises their sparse gradients; the frozen table is a plain tensor attribute: no parameter, no buffer, so DDP
never broadcasts it, optimizers never see it and checkpoints never contain it.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer import kernels
from trainer.bag_lookup import bag_sum, masked_words
from trainer.kernels import advise_hugepages

TRAINABLE_TABLES = ("oov", "pretrained_delta", "mask", "bigram", "char", "wide_word", "wide_bigram", "wide_char")


@dataclass(frozen=True)
class TableSpec:
    """One embedding table: how many rows, how wide, whether an optimizer may move it, how it starts."""

    name: str
    num_rows: int
    dim: int
    trainable: bool
    # "pretrained" (rows supplied), "normal" (N(0, init_std)), "zeros" or "ones"
    init: str
    init_std: float = 0.0

    @property
    def num_bytes(self) -> int:
        return self.num_rows * self.dim * 4


def build_table_specs(
    *,
    num_pretrained: int,
    num_oov: int,
    dim: int,
    ngram_buckets: int,
    char_buckets: int,
    masked: bool,
    pretrained_trainable: bool,
    init_std: float,
    wide: tuple[str, ...] = (),
    num_classes: int = 0,
    deep_chars: bool = True,
) -> list[TableSpec]:
    """The tables a model needs, in a fixed order (the order of the plan and of the checkpoint)."""
    specs = [TableSpec("pretrained", num_pretrained, dim, trainable=False, init="pretrained")]
    specs.append(TableSpec("oov", num_oov, dim, trainable=True, init="normal", init_std=init_std))
    if pretrained_trainable:
        specs.append(TableSpec("pretrained_delta", num_pretrained, dim, trainable=True, init="zeros"))
    if masked:
        specs.append(TableSpec("mask", num_pretrained + num_oov, dim, trainable=True, init="ones"))
    # Hashed n-gram rows start at zero. A bucket is shared by unrelated rare features, and its random start value is
    # noise wherever one of them shows up at test time; at init_scale 0.01 that noise was already small, and zero
    # scored within noise of it (demo, 2 epochs, seeds 0-2: 0.8263 / 0.8261 / 0.8239 against 0.8261 / 0.8261 /
    # 0.8241; 5 epochs, seeds 0-1: 0.8327 / 0.8308 against 0.8340 / 0.8310; bag encoder 0.8055 / 0.8065 against
    # 0.8053 / 0.8061; char n-grams 0.8082 / 0.8060 against 0.8083 / 0.8066; WordNet 0.7669 against 0.7653). Zero
    # rows cost no random draws at start, and the export stores only the rows that training moved (export.py: the
    # demo's 2 epochs move half of its 1M bigram buckets).
    if ngram_buckets:
        specs.append(TableSpec("bigram", ngram_buckets, dim, trainable=True, init="zeros"))
    if char_buckets and deep_chars:
        specs.append(TableSpec("char", char_buckets, dim, trainable=True, init="zeros"))
    if "words" in wide:
        specs.append(TableSpec("wide_word", num_pretrained + num_oov, num_classes, trainable=True, init="zeros"))
    if "bigrams" in wide:
        specs.append(TableSpec("wide_bigram", ngram_buckets, num_classes, trainable=True, init="zeros"))
    if "chars" in wide:
        specs.append(TableSpec("wide_char", char_buckets, num_classes, trainable=True, init="zeros"))
    return specs


def whole_on_every_rank(name: str) -> bool:
    """Whether a table stays whole on every rank under row_wise sharding: the wide tables (model.wide). They are
    narrow (one logit per class), their TF-IDF weighted lookups (`Batch.weighted`) need no exchange when every rank
    holds every row, and their sparse gradients are averaged over ranks as replicated tables' are."""
    return name.startswith("wide_")


def init_rows_(weight: torch.Tensor, spec: TableSpec, generator: torch.Generator, row_start: int = 0) -> None:
    """Initialise rows [row_start, row_start + len(weight)) of a table deterministically.

    Rows are drawn in fixed-size blocks from a generator seeded per (table, block), so a row's initial value does
    not depend on how the table is sharded across ranks: replicated and row-wise runs start identical. Blocks are
    drawn straight into the table (`normal_(0, std)` gives the same numbers as `randn() * std`) by up to
    `torch.get_num_threads()` threads, which torch lets run without the GIL: a 1M x 50 table took 0.55 s through a
    temporary per block, 0.13 s this way on 2 cores."""
    with torch.no_grad():
        if spec.init == "zeros":
            weight.zero_()
        elif spec.init == "ones":
            weight.fill_(1.0)
        elif spec.init == "normal":
            block = 65536
            seed = int(generator.initial_seed())
            name_salt = sum(ord(c) * 131**i for i, c in enumerate(spec.name)) % (1 << 31)
            end = row_start + weight.shape[0]
            first_block, last_block = row_start // block, (end - 1) // block if end > row_start else -1

            # detached: the pool's threads do not inherit this thread's no_grad (grad mode is thread-local), and
            # in-place writes into a Parameter's rows (row_wise.py passes one) are refused with grad mode on
            rows = weight.detach()

            def fill(b: int) -> None:
                g = torch.Generator().manual_seed((seed * 1_000_003 + name_salt * 7919 + b) % (1 << 63))
                lo, hi = max(b * block, row_start), min((b + 1) * block, end)
                if (lo, hi) == (b * block, (b + 1) * block) and rows.device.type == "cpu":
                    rows[lo - row_start : hi - row_start].normal_(0.0, spec.init_std, generator=g)
                else:  # a partial block (the table's or the shard's edge): draw it whole, keep the rows inside
                    values = torch.empty(block, spec.dim).normal_(0.0, spec.init_std, generator=g).to(rows.device)
                    rows[lo - row_start : hi - row_start] = values[lo - b * block : hi - b * block]

            blocks = range(first_block, last_block + 1)
            threads = min(torch.get_num_threads(), len(blocks))
            if threads > 1 and rows.device.type == "cpu":
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(threads, thread_name_prefix="init-rows") as pool:
                    list(pool.map(fill, blocks))  # list(): re-raises a block's error here
            else:
                for b in blocks:
                    fill(b)
        else:
            raise ValueError(f"table {spec.name}: init {spec.init!r} needs rows supplied")


class LocalTables(nn.Module):
    """All tables held whole by this process (single process, or `replicated` under DDP).

    `pooled(name, ids, offsets)` sums the rows of each segment: the one primitive the encoders use, and the one
    the row-wise sharded implementation provides too (distributed/sharded_tables.py)."""

    @property
    def takes_groups(self) -> bool:
        """Whether pooled_many uses ids grouped ahead (Batch.groups): only where bag_sum's CPU kernels run. On
        CUDA (or with the kernels off) EmbeddingBag ignores them, so the data thread need not make and copy them."""
        return all(kernels.can_fuse(bag.weight) for bag in self.bags.values())

    def __init__(self, specs: list[TableSpec], frozen: torch.Tensor, seed: int,
                 rows: dict[str, torch.Tensor] | None = None) -> None:
        """`rows`: trained weights by table name (an exported model), taken as they are instead of initialising
        rows only to overwrite them (0.76 s of a one-line `trainer predict` on the demo model)."""
        super().__init__()
        self.specs = {s.name: s for s in specs}
        self.dim = specs[0].dim
        # Plain attribute on purpose: not a Parameter or buffer (see module docstring).
        self.frozen = frozen
        self.bags = nn.ModuleDict()
        generator = torch.Generator().manual_seed(seed)
        rows = rows or {}
        for spec in specs:
            if not spec.trainable:
                continue
            if spec.name in rows:
                weight = rows[spec.name]
                if tuple(weight.shape) != (spec.num_rows, spec.dim) or weight.dtype != torch.float32:
                    raise ValueError(f"table {spec.name}: weights are {tuple(weight.shape)} {weight.dtype}, the "
                                     f"spec says ({spec.num_rows}, {spec.dim}) float32")
                weight = weight.contiguous()
            else:
                # _weight: skip EmbeddingBag's own random init, which would draw rows*dim numbers from the global
                # generator (slow for big tables, and it would shift the dense layers' init by the table sizes)
                weight = advise_hugepages(torch.empty(spec.num_rows, spec.dim))
                init_rows_(weight, spec, generator)
            bag = nn.EmbeddingBag(spec.num_rows, spec.dim, mode="sum", sparse=True, _weight=weight)
            self.bags[spec.name] = bag

    def has(self, name: str) -> bool:
        return name == "pretrained" or name in self.bags

    def move_frozen(self, device: torch.device) -> None:
        if self.frozen.device != device:
            self.frozen = self.frozen.to(device)

    def pooled(self, name: str, ids: torch.Tensor, offsets: torch.Tensor, groups=None) -> torch.Tensor:
        """`groups`: `bag_lookup.group_ids(ids)` computed ahead, or None."""
        if name == "pretrained":
            if self.frozen.shape[0] == 0:
                return torch.zeros(offsets.shape[0], self.dim, device=offsets.device)
            with torch.no_grad():
                return F.embedding_bag(ids, self.frozen, offsets, mode="sum")
        return bag_sum(self.bags[name].weight, ids, offsets, groups)

    def pooled_many(self, requests: list[tuple[str, torch.Tensor, torch.Tensor]], groups: dict | None = None,
                    routes: dict | None = None) -> list[torch.Tensor]:
        """`pooled` for several tables (the row-wise implementation fuses their collectives); `groups` by table
        name, as `Batch.groups`. `routes` (`Batch.routes`) are row-wise tables' and do not apply here."""
        groups = groups or {}
        return [self.pooled(name, ids, offsets, groups.get(name)) for name, ids, offsets in requests]

    def masked_words(self, pre_ids: torch.Tensor, oov_ids: torch.Tensor, inverse: torch.Tensor,
                     segment: torch.Tensor, num_docs: int) -> torch.Tensor | None:
        """masked_bag's per-document sums of E(w) * M(w) in one fused Function (`bag_lookup.masked_words`, which
        documents the arguments); None where it does not apply: the model then pools the lookups op by op."""
        if "mask" not in self.bags:
            return None
        return masked_words(self.bags["oov"].weight, self.bags["mask"].weight, self.frozen, pre_ids, oov_ids, inverse,
                            segment, num_docs)

    def replicated_weights(self) -> list[torch.Tensor]:
        """The weights whose sparse gradients ranks average (`sync_sparse_grads`): here every table's."""
        return [bag.weight for bag in self.bags.values()]

    def checkpoint_view(self, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """How a table-row-indexed tensor is saved: whole here; row-wise sharded tables return a DTensor."""
        return tensor

    def full_rows(self, name: str) -> torch.Tensor:
        """The whole table (for export and neighbours)."""
        if name == "pretrained":
            return self.frozen
        return self.bags[name].weight.detach()

    def full_rows_on_main(self, name: str) -> torch.Tensor:
        """The whole table for the export (RowWiseTables gathers it to rank 0 only; here every rank has it)."""
        return self.full_rows(name)

    def rows_of(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a table, float32 in host memory (the projector's few words): picked where the table lives,
        so a GPU table is not copied to the host whole."""
        table = self.full_rows(name)
        return table[ids.to(table.device)].float().cpu()


def per_token_offsets(num_ids: int, device: torch.device) -> torch.Tensor:
    """Offsets that make every id its own segment: EmbeddingBag then returns per-id rows with sparse gradients."""
    return torch.arange(num_ids, device=device)


def segment_counts(offsets: torch.Tensor, num_ids: int) -> torch.Tensor:
    """For EmbeddingBag-style start offsets over `num_ids` ids, the number of ids in each segment."""
    # new_full, not torch.tensor([num_ids], device=...): that one is a blocking host-to-device copy on CUDA
    return torch.diff(offsets, append=offsets.new_full((1,), num_ids))


def segment_index(offsets: torch.Tensor, num_ids: int) -> torch.Tensor:
    """For EmbeddingBag-style start offsets, the segment each id belongs to."""
    if offsets.device.type == "cpu":  # numpy's repeat: a third of repeat_interleave's time, and no OpenMP wake-ups
        counts = np.diff(offsets.numpy(), append=num_ids)
        return torch.from_numpy(np.repeat(np.arange(offsets.shape[0], dtype=np.int64), counts))
    counts = segment_counts(offsets, num_ids)
    # output_size: without it repeat_interleave reads the total back from the device (a host sync on CUDA)
    return torch.repeat_interleave(torch.arange(offsets.shape[0], device=offsets.device), counts, output_size=num_ids)

