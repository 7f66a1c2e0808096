"""How embedding tables are placed across ranks, and how the model is wrapped for data parallelism.

- `replicated`: every rank holds every table. Only the dense part is wrapped in DDP; the trainable tables' sparse
  gradients are averaged by `sync_sparse_grads` after backward, on gloo and NCCL alike (NCCL has no sparse
  all-reduce; with gloo's, a 2-process bag + bigram step at global batch 1024 took 54-61 ms against 37-48 ms with
  `sync_sparse_grads`, interleaved runs on the loaded 2-core VM). The frozen table is a plain tensor attribute,
  invisible to DDP (never broadcast).
- `row_wise`: each rank holds a contiguous block of rows of every table (see row_wise.py) but model.wide's, which
  stay whole on every rank and are synchronised as replicated tables are; only the dense part is wrapped in DDP.
"""

import logging
import math
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer import kernels
from trainer.config import DistConfig
from trainer.distributed import DistInfo, host_group
from trainer.embeddings import LocalTables, TableSpec, whole_on_every_rank
from trainer.sparse_optim import Workspace

log = logging.getLogger(__name__)


def resolve_sharding(cfg: DistConfig, specs: list[TableSpec], info: DistInfo) -> str:
    if cfg.embedding_sharding != "auto":
        return cfg.embedding_sharding
    table_bytes = sum(s.num_bytes for s in specs if not whole_on_every_rank(s.name))  # what sharding would split
    return "row_wise" if info.world_size > 1 and table_bytes > cfg.auto_shard_bytes else "replicated"


def build_tables(mode: str, specs: list[TableSpec], frozen: torch.Tensor, seed: int, info: DistInfo) -> nn.Module:
    if mode == "row_wise" and info.world_size > 1:
        from trainer.row_wise import RowWiseTables

        return RowWiseTables(specs, frozen, seed, info)
    return LocalTables(specs, frozen, seed)


def _ddp(module: nn.Module) -> DistributedDataParallel:
    # device_ids=None on CUDA too (allowed for a module on one device): with device_ids, DDP's forward copies every
    # tensor argument to that GPU with a blocking copy, a host sync per step, and it would move `seq_lengths`,
    # which the LSTM encoder keeps on the host on purpose, onto the GPU.
    with warnings.catch_warnings():
        # torch 2.13 deprecates broadcast_buffers in favour of forward_sync_buffers, which still syncs at init;
        # our modules have no buffers, and nothing may be broadcast per forward
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(module, device_ids=None, broadcast_buffers=False)


def wrap_for_training(model: nn.Module, mode: str, info: DistInfo) -> nn.Module:
    """DDP around what is data-parallel: the dense part. Returns the module the training loop calls.

    Tables are either sharded (row_wise: each row has one owner) or replicated and synchronised by
    `sync_sparse_grads` after backward; neither is DDP's business."""
    if not info.is_distributed:
        return model
    model.dense = _ddp(model.dense)
    return model


def describe_plan(specs: list[TableSpec], mode: str, info: DistInfo, optim) -> str:
    """Rows and bytes per rank for every table, and optimizer-state bytes per rank."""
    world = info.world_size if mode == "row_wise" else 1
    lines = [f"embedding plan: {mode}, world size {info.world_size}"]
    lines.append(f"  {'table':<17}{'rows':>12}{'dim':>6}{'trainable':>10}{'rows/rank':>12}{'MiB/rank':>10}")
    for s in specs:
        rows_per_rank = -(-s.num_rows // (1 if whole_on_every_rank(s.name) else world)) if s.num_rows else 0
        lines.append(f"  {s.name:<17}{s.num_rows:>12,}{s.dim:>6}{str(s.trainable):>10}{rows_per_rank:>12,}"
                     f"{rows_per_rank * s.dim * 4 / 2**20:>10.1f}")
    state_bytes = sum(t.numel() * t.element_size() for t in optim.state_tensors().values())
    lines.append(f"  optimizer state on this rank: {state_bytes / 2**20:.1f} MiB "
                 f"({', '.join(f'{k}={type(v).__name__}' for k, v in optim.optimizers.items())})")
    return "\n".join(lines)


def needs_sparse_grad_sync(tables: nn.Module, info: DistInfo) -> bool:
    """Replicated tables are outside DDP and synchronised by `sync_sparse_grads` after backward (any backend): all
    tables in replicated mode, the wide tables (whole on every rank) under row_wise."""
    return info.world_size > 1 and bool(tables.replicated_weights())


if kernels.numba is not None:

    @kernels.njit(cache=kernels._CACHE, nogil=True, boundscheck=False)
    def _pack_rows_kernel(rows, starts, order, perm, values, scale, out_ids, out_values):
        """out_ids[i] = rows[u], out_values[i] = scale * (sum of the u-th row's gradient rows, in their order),
        u = perm[i] (perm sorts the rows: numpy's argsort, several times faster than numba's)."""
        for i in range(perm.shape[0]):
            u = perm[i]
            out_ids[i] = rows[u]
            out = out_values[i]
            s = starts[u]
            first = values[order[s]]
            for j in range(out.shape[0]):
                out[j] = first[j]
            for k in range(s + 1, starts[u + 1]):
                src = values[order[k]]
                for j in range(out.shape[0]):
                    out[j] += src[j]
            for j in range(out.shape[0]):
                out[j] *= scale

    @kernels.njit(cache=kernels._CACHE, nogil=True, boundscheck=False)
    def _merge_rows_kernel(ids, perm, value_at, flat_a, flat_b, out_ids, out_values):
        """Coalesce W runs of distinct ids (one per rank, concatenated in rank order; `perm` a stable argsort):
        the sorted distinct ids into out_ids and, per id, the sum of its value rows in rank order into out_values;
        returns how many. value_at[k] is where id k's row starts in the concatenation [flat_a | flat_b] (received
        blocks, then this rank's own)."""
        n, split, width = ids.shape[0], flat_a.shape[0], out_values.shape[1]
        m = -1
        for i in range(n):
            k = perm[i]
            start = value_at[k]
            # row views, not flat indexing: the inner loops then vectorise (measured 2.9 -> 0.8 ms for 42K x 50)
            if start >= split:
                row = flat_b[start - split : start - split + width]
            else:
                row = flat_a[start : start + width]
            if m >= 0 and out_ids[m] == ids[k]:
                dst = out_values[m]
                for j in range(width):
                    dst[j] += row[j]
            else:
                m += 1
                out_ids[m] = ids[k]
                dst = out_values[m]
                for j in range(width):
                    dst[j] = row[j]
        return m + 1


class _LocalRows:
    """One table's local sparse gradient, grouped by row: its distinct rows in increasing order and, written on
    demand into the send buffer, each row's summed gradient times `scale` (the 1/W of the average)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.width = math.prod(weight.shape[1:])
        grad = weight.grad
        if grad is None:
            idx, values = weight.new_zeros(0, dtype=torch.long), weight.new_zeros(0, self.width)
        else:
            idx, values = kernels.row_sparse_parts(grad)
        self.fused = kernels.can_fuse(values)
        if self.fused:  # numba hash grouping (O(nnz)); the pack kernel sorts the distinct rows only
            self.values = values.contiguous()
            distinct_sorted = grad is None or kernels.rows_are_distinct_sorted(grad)  # bag_lookup's: as they are
            self.rows, self.starts, self.order = kernels.grouped_rows(idx, distinct_sorted)
            self.num_rows = self.rows.shape[0]
        else:  # CUDA, other dtypes, TRAINER_FUSED_KERNELS=0: torch ops
            self.rows, inverse = torch.unique(idx, return_inverse=True)
            self.summed = values.new_zeros(self.rows.numel(), self.width).index_add_(0, inverse, values)
            self.num_rows = self.rows.numel()

    def write(self, out_ids: torch.Tensor, out_values: torch.Tensor, scale: float) -> None:
        if self.fused:
            _pack_rows_kernel(self.rows, self.starts, self.order, np.argsort(self.rows), self.values.numpy(),
                              np.float32(scale), out_ids.numpy(), out_values.numpy())
        else:
            out_ids.copy_(self.rows)
            torch.mul(self.summed, scale, out=out_values)


def sync_sparse_grads(tables: nn.Module, info: DistInfo) -> None:
    """Average the sparse gradients of `tables.replicated_weights()` over ranks (every table in replicated mode, the
    wide tables under row_wise): two collectives for all tables together.

    Why not DDP's (gloo's) sparse all-reduce, or one all-gather per table with a `coalesce()` before and after:
    measured on the 2-core VM (bag + bigrams, 512 documents per rank), `coalesce` of the 32K-row bigram gradient
    alone takes 11 ms (a single-threaded sort that moves the value rows). Here each rank sums its duplicate rows
    (hash grouping, then a sort of the distinct row ids only) and scales them by 1/W; all tables' rows and values
    travel in one block per rank: an all-gather of the row counts (on the host: they size the buffers), then an
    all-to-all that sends the block to every other rank (gloo's all-to-all moved 4.5 MB to the other rank in
    3.4 ms where its all-gather took 7.3 ms; no padding, and no copy of a rank's own block). The W sorted runs are
    merged into a coalesced gradient (sorted distinct rows, duplicates summed in rank order, so every rank computes
    the same bits), which the sparse optimizers step without grouping rows again. Every rank calls every
    collective, also with zero touched rows."""
    world, rank = info.world_size, info.rank
    weights = tables.replicated_weights()
    if not weights:
        return
    dtype = weights[0].dtype
    if any(w.dtype != dtype for w in weights):
        raise TypeError("sync_sparse_grads: replicated tables must share one dtype")
    id_width = torch.empty(0, dtype=torch.long).element_size() // torch.empty(0, dtype=dtype).element_size()
    local = [_LocalRows(w) for w in weights]
    # the row counts size the buffers, so the host needs them: gathered on the host group (gloo under NCCL),
    # no device round trip
    counts = torch.tensor([p.num_rows for p in local], dtype=torch.long)
    all_counts = torch.empty(world * len(local), dtype=torch.long)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # 2.13 renamed it
    gather(all_counts, counts, group=host_group())
    per_rank = all_counts.view(world, len(local)).tolist()
    # A rank's block: [ids of table 0 | ids of table 1 | ... | values of table 0 | values of table 1 | ...], ids as
    # int64 bit patterns in `dtype` elements (first, so they stay aligned), rounded up to whole ids.
    widths = [p.width for p in local]
    sizes = [-(-sum(c * (id_width + w) for c, w in zip(n, widths, strict=True)) // id_width) * id_width
             for n in per_rank]
    # reused send / receive blocks: fresh multi-MB tensors are page-faulted in on every step (sparse_optim's
    # Workspace); measured 20 -> 12.7 ms for the whole sync on the loaded 2-core VM
    workspace = tables.__dict__.setdefault("_grad_sync_buffers", Workspace())
    send = workspace.get("send", sizes[rank], 1, weights[0]).view(-1)
    send_ids, send_values, _ = _split_block(send, per_rank[rank], widths, id_width)
    for p, i, v in zip(local, send_ids, send_values, strict=True):
        p.write(i, v, 1.0 / world)
    out_splits = [0 if r == rank else sizes[r] for r in range(world)]
    in_splits = [0 if r == rank else sizes[rank] for r in range(world)]
    recv = workspace.get("recv", sum(out_splits), 1, weights[0]).view(-1)
    if world > 1:  # each rank's own block stays where it is
        dist.all_to_all_single(recv, send if world == 2 else send.repeat(world - 1), out_splits, in_splits)
    # where rank r's block starts in [recv | send]
    base = [sum(out_splits[:r]) if r != rank else recv.numel() for r in range(world)]
    blocks = [_split_block(recv[base[r] : base[r] + sizes[r]] if r != rank else send, per_rank[r], widths, id_width)
              for r in range(world)]
    for t, (weight, p) in enumerate(zip(weights, local, strict=True)):
        ids = torch.cat([b[0][t] for b in blocks])
        if p.fused:
            value_at = np.concatenate([
                (base[r] + b[2][t]) + np.arange(per_rank[r][t], dtype=np.int64) * p.width
                for r, b in enumerate(blocks)
            ])
            ids_np = ids.numpy()
            perm = np.argsort(ids_np, kind="stable")  # equal ids (rows touched by several ranks) keep rank order
            rows = torch.empty(ids.numel(), dtype=torch.long)
            values = torch.empty(ids.numel(), p.width, dtype=dtype)  # a fresh block: the gradient keeps it
            n = _merge_rows_kernel(ids_np, perm, value_at, recv.numpy(), send.numpy(), rows.numpy(), values.numpy())
            rows, values = rows[:n], values[:n]
            grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values.view(rows.numel(), *weight.shape[1:]),
                                           weight.shape, is_coalesced=True, check_invariants=False)
        else:
            values = torch.cat([b[1][t] for b in blocks]).view(ids.numel(), *weight.shape[1:])
            grad = torch.sparse_coo_tensor(ids.unsqueeze(0), values, weight.shape).coalesce()
        weight.grad = grad


def _split_block(block: torch.Tensor, counts: list[int], widths: list[int], id_width: int):
    """Per table, the ids and values views of one rank's block (see sync_sparse_grads), and where each table's
    values start in the block."""
    ids, values, starts, pos = [], [], [], 0
    for n in counts:
        ids.append(block[pos : pos + n * id_width].view(torch.long))
        pos += n * id_width
    for n, w in zip(counts, widths, strict=True):
        values.append(block[pos : pos + n * w].view(n, w))
        starts.append(pos)
        pos += n * w
    return ids, values, starts
