"""Row-wise sharded embedding tables: each rank owns one contiguous block of rows of every table.

Rank r of W owns rows [r*c, min(V, (r+1)*c)) of a V-row table, c = ceil(V/W) (torch.chunk / DTensor `Shard(0)`
layout; trailing ranks may own no rows). The frozen table is sharded the same way (a copy of this rank's slice,
no autograd); each trainable table is an `nn.EmbeddingBag(local_rows, dim, sparse=True)` whose rows start equal to
the replicated model's (`init_rows_` draws rows by global index).

`pooled(name, ids, offsets)` is a collective: every rank calls it for every table in the same order, also with no
ids, no segments or an empty shard (the payloads are then empty, the collectives still run)::

    requesting rank (segments S, ids n)                      owning ranks
    1. owner = id // c; stable sort by owner, so each
       owner's ids stay grouped by segment
    2. all_to_all [ids, distinct segments] per owner  --->  counts (W, 2)
    3. all_to_all (local row, segment) pairs          --->  sum rows per (source, segment): partial rows
    4.                                                <---  all_to_all partial rows (autograd: the backward sends
                                                            each partial's gradient back to its owner)
    5. index_add the partials into (S, D)

Gradient scale: replicated DDP averages gradients over W ranks, while an owner here receives the SUM of every
rank's gradient for its rows, so the partials carry a 1/W gradient scale; with the trainer's loss
(local sum * W / global denominator) both give the gradient of the global-batch mean. Each row has one owner:
no sparse all-reduce is needed on either backend.

Lock-step rule: the backward all-to-all runs when autograd reaches a partial, so every rank's loss must depend on
every pooled output of a step (ops on empty tensors keep the graph connected); a rank that skips one waits for
the others until the process-group timeout.
"""

import re
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainer.bag_lookup import bag_sum
from trainer.distributed import DistInfo
from trainer.embeddings import TableSpec, init_rows_, segment_index
from trainer.kernels import advise_hugepages

_TABLE_PARAM = re.compile(r"(?:^|\.)bags\.([^.]+)\.weight$")
_SEGMENT_BITS = 40  # (source rank, segment) packed into one int64 key on the owner


def shard_rows(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [start, end) of a `num_rows` table owned by `rank` (torch.chunk layout; may be empty)."""
    chunk = -(-num_rows // world_size)
    start = min(num_rows, rank * chunk)
    return start, min(num_rows, start + chunk)


class _AllToAllRows(torch.autograd.Function):
    """all_to_all_single along dim 0 whose backward is the reverse exchange, scaled by `grad_scale`.

    The one autograd all-to-all shim of this module. Chosen over `torch.distributed.nn.functional
    .all_to_all_single` (works on gloo, but deprecated in torch 2.13: a FutureWarning on every call) and over
    `torch.distributed._functional_collectives.all_to_all_single_autograd` (also works on gloo, but a private
    module, returns lazily-waited AsyncCollectiveTensors): this uses only the public eager `dist.all_to_all_single`
    (gloo and NCCL) and folds the 1/W gradient scale into the same backward. Eager only, as the lookups are
    (EmbeddingBag(sparse=True) does not compile anyway)."""

    @staticmethod
    def forward(
        ctx, rows: torch.Tensor, out_splits: list[int], in_splits: list[int], grad_scale: float, group
    ):
        ctx.out_splits, ctx.in_splits, ctx.grad_scale, ctx.group = out_splits, in_splits, grad_scale, group
        return _exchange(rows, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_in = _exchange(grad_out.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group)
        if ctx.grad_scale != 1.0:
            grad_in = grad_in * ctx.grad_scale
        return grad_in, None, None, None, None


# Seconds spent inside all-to-all calls (forward and backward), read by the trainer for the `time/communication`
# share. Host wall time: exact for gloo's blocking collectives; on NCCL it times only the launch.
COMM_SECONDS = [0.0]


def _exchange(send: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    start = time.perf_counter()
    recv = send.new_empty((sum(out_splits), *send.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), out_splits, in_splits, group=group)
    COMM_SECONDS[0] += time.perf_counter() - start
    return recv


def all_to_all_rows(
    rows: torch.Tensor, out_splits: list[int], in_splits: list[int], grad_scale: float = 1.0, group=None
) -> torch.Tensor:
    """Autograd-aware all-to-all of rows (see `_AllToAllRows`)."""
    return _AllToAllRows.apply(rows, out_splits, in_splits, grad_scale, group)


def _sort_owners(owner: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of owner ranks (values < world). int16 keys where they fit: torch's CPU sort of narrow integer
    keys took 0.14 ms for 33K ids against 0.37 ms for int64 (one thread), for the same permutation."""
    if world >= 2**15:
        return torch.sort(owner, stable=True)
    sorted_owner, order = torch.sort(owner.to(torch.int16), stable=True)
    return sorted_owner.long(), order


def _blocks(per_table: list[torch.Tensor], counts: list[list[int]]) -> list[torch.Tensor]:
    """Rank-major, table-minor blocks: rank r's rows of table t are the next counts[r][t] rows of per_table[t]
    (each table's rows are grouped by rank, in rank order)."""
    taken = [0] * len(per_table)
    out = []
    for per_rank in counts:
        for t, n in enumerate(per_rank):
            out.append(per_table[t][taken[t] : taken[t] + n])
            taken[t] += n
    return out


def _split(rows: torch.Tensor, counts: list[list[int]]) -> list[list[torch.Tensor]]:
    """The inverse layout: [rank][table] views of rank-major, table-minor rows with counts[rank][table] rows each."""
    out, pos = [], 0
    for per_rank in counts:
        out.append([])
        for n in per_rank:
            out[-1].append(rows[pos : pos + n])
            pos += n
    return out


class RowWiseTables(nn.Module):
    """The `LocalTables` interface over row-wise sharded tables (one block of rows of every table per rank)."""

    takes_groups = False  # owners group the ids they receive (pooled_many)

    def __init__(self, specs: list[TableSpec], frozen: torch.Tensor, seed: int, info: DistInfo) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("row_wise embedding sharding needs an initialised process group")
        self.specs = {s.name: s for s in specs}
        self.dim = specs[0].dim
        self.info = info
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        if (self.world_size, self.rank) != (info.world_size, info.rank):
            raise RuntimeError(
                f"DistInfo says rank {info.rank} of {info.world_size}, the process group says "
                f"{self.rank} of {self.world_size}"
            )
        self.group = None  # the default group: the one DDP and the checkpoint mesh use too
        self.row_ranges = {s.name: shard_rows(s.num_rows, self.world_size, self.rank) for s in specs}
        pre = self.specs["pretrained"]
        start, end = self.row_ranges["pretrained"]
        if pre.num_rows and frozen.shape[0] != pre.num_rows:
            raise ValueError(
                f"table pretrained: spec says {pre.num_rows} rows, the frozen tensor has {frozen.shape[0]}"
            )
        # Plain attribute, not a Parameter or buffer (DDP, optimizers and checkpoints never see it). A view of this
        # rank's slice, not a copy: when the full table is memory-mapped (the trainer's data cache) the rank then
        # holds only the pages of its own rows it actually reads, shared through the page cache. (A clone measured
        # +1.2 GiB per rank on a 2M x 300 table: the copy plus the file pages it had to read.)
        self.frozen = (
            frozen[start:end]
            if pre.num_rows
            else torch.zeros(0, self.dim, dtype=frozen.dtype, device=frozen.device)
        )
        self.bags = nn.ModuleDict()
        generator = torch.Generator().manual_seed(seed)
        for spec in specs:
            if not spec.trainable:
                continue
            start, end = self.row_ranges[spec.name]
            # `_weight` skips EmbeddingBag's own random init (it would draw from the global RNG an amount that
            # depends on the shard size); init_rows_ gives each row its replicated value.
            bag = nn.EmbeddingBag(
                end - start, spec.dim, mode="sum", sparse=True, _weight=advise_hugepages(torch.empty(end - start, spec.dim)),
            )
            init_rows_(bag.weight, spec, generator, row_start=start)
            self.bags[spec.name] = bag
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(info.device.type, (self.world_size,))

    def extra_repr(self) -> str:
        ranges = ", ".join(f"{n}[{a}:{b}]/{self.specs[n].num_rows}" for n, (a, b) in self.row_ranges.items())
        return f"rank {self.rank} of {self.world_size}: {ranges}"

    def has(self, name: str) -> bool:
        return name == "pretrained" or name in self.bags

    def move_frozen(self, device: torch.device) -> None:
        if self.frozen.device != device:
            self.frozen = self.frozen.to(device)

    # ------------------------------------------------------------------ lookups
    def pooled(self, name: str, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Sum of the rows of each segment, (num_segments, dim). Collective: every rank calls it, same order.

        `ids` are this table's (global) row ids for this rank's segments, `offsets` EmbeddingBag start offsets."""
        world, device = self.world_size, offsets.device
        num_ids, num_segments = ids.shape[0], offsets.shape[0]
        chunk = max(1, -(-self.specs[name].num_rows // world))
        segment = segment_index(offsets, num_ids)
        owner = torch.div(ids, chunk, rounding_mode="floor")
        # stable: within one owner the ids keep their order, hence stay grouped by (non-decreasing) segment
        owner, order = _sort_owners(owner, world)
        segment = segment[order]
        local_row = ids[order] - owner * chunk
        pair = torch.unique_consecutive(owner * max(num_segments, 1) + segment)  # distinct (owner, segment)
        pair_segment = pair % max(num_segments, 1)
        counts = torch.stack(
            [
                torch.bincount(owner, minlength=world),
                torch.bincount(torch.div(pair, max(num_segments, 1), rounding_mode="floor"), minlength=world),
            ],
            dim=1,
        )
        # 1) counts: [ids, distinct segments] per owner; host sync, the split sizes must be Python ints
        recv_counts = _exchange(counts, [1] * world, [1] * world, self.group)
        send_ids, send_parts = counts.t().tolist()
        recv_ids, recv_parts = recv_counts.t().tolist()
        # 2) (local row, segment) pairs to their owners
        recv = _exchange(torch.stack([local_row, segment], dim=1), recv_ids, send_ids, self.group)
        # 3) owner side: sum rows per (source rank, segment); received blocks are ordered by source, then segment
        source = torch.repeat_interleave(
            torch.arange(world, device=device), torch.tensor(recv_ids, device=device)
        )
        _, per_part = torch.unique_consecutive((source << _SEGMENT_BITS) | recv[:, 1], return_counts=True)
        bag_offsets = torch.cumsum(per_part, 0) - per_part
        if name == "pretrained":
            with torch.no_grad():
                partial = F.embedding_bag(recv[:, 0], self.frozen, bag_offsets, mode="sum")
                returned = _exchange(partial, send_parts, recv_parts, self.group)
        else:
            partial = bag_sum(self.bags[name].weight, recv[:, 0], bag_offsets)
            returned = all_to_all_rows(partial, send_parts, recv_parts, 1.0 / world, self.group)
        # 4) partials back in (owner, segment) order == `pair` order: add them up per segment
        out = returned.new_zeros(num_segments, returned.shape[1])
        return out.index_add(0, pair_segment, returned)

    def pooled_many(self, requests: list[tuple[str, torch.Tensor, torch.Tensor]], groups: dict | None = None
                    ) -> list[torch.Tensor]:
        """`pooled` for several tables at once with four collectives in all (counts, pairs, partial rows, and
        the backward of the partial rows) instead of four per table: at small batches the latency of gloo's
        collectives, not their bytes, dominates a row-wise step. Same results as calling `pooled` per table.
        `groups` (ids grouped ahead, LocalTables) does not apply: owners group the ids they receive."""
        world, num_tables = self.world_size, len(requests)
        if num_tables == 0:
            return []
        device = requests[0][2].device
        plans = []
        for name, ids, offsets in requests:
            num_ids, num_segments = ids.shape[0], offsets.shape[0]
            span = max(num_segments, 1)
            chunk = max(1, -(-self.specs[name].num_rows // world))
            segment = segment_index(offsets, num_ids)
            owner = torch.div(ids, chunk, rounding_mode="floor")
            owner, order = _sort_owners(owner, world)  # stable: each owner's ids stay in segment order
            segment = segment[order]
            local_row = ids[order] - owner * chunk
            pair = torch.unique_consecutive(owner * span + segment)  # distinct (owner, segment), owner-major
            counts = torch.stack([torch.bincount(owner, minlength=world),
                                  torch.bincount(torch.div(pair, span, rounding_mode="floor"), minlength=world)], 1)
            plans.append((name, num_segments, owner, local_row, segment, pair % span, counts))
        counts = torch.stack([p[6] for p in plans], dim=1)  # (world, tables, [ids, parts])
        # 1) counts; host sync: the split sizes must be Python ints
        recv_counts = _exchange(counts.reshape(world, 2 * num_tables), [1] * world, [1] * world, self.group)
        recv_counts = recv_counts.view(world, num_tables, 2)
        send_ids, send_parts = counts[:, :, 0].tolist(), counts[:, :, 1].tolist()
        recv_ids, recv_parts = recv_counts[:, :, 0].tolist(), recv_counts[:, :, 1].tolist()
        # 2) (local row, segment) pairs, grouped by destination rank, then table: slices of each table's
        #    owner-sorted ids (the counts tell every block's length, so neither side sorts or masks)
        pairs = [torch.stack([p[3], p[4]], 1) for p in plans]
        recv = _exchange(torch.cat(_blocks(pairs, send_ids)), [sum(r) for r in recv_ids], [sum(r) for r in send_ids],
                         self.group)
        # 3) owner side, per table: sum rows per (source rank, segment); blocks arrive source-major, table-minor
        received = _split(recv, recv_ids)
        partials = []
        for t, (name, *_rest) in enumerate(plans):
            rows = torch.cat([received[r][t] for r in range(world)])
            src = torch.repeat_interleave(torch.arange(world, device=device),
                                          torch.tensor([recv_ids[r][t] for r in range(world)], device=device,
                                                       dtype=torch.long))
            _, per_part = torch.unique_consecutive((src << _SEGMENT_BITS) | rows[:, 1], return_counts=True)
            bag_offsets = torch.cumsum(per_part, 0) - per_part
            if name == "pretrained":
                with torch.no_grad():
                    partials.append(F.embedding_bag(rows[:, 0], self.frozen, bag_offsets, mode="sum"))
            else:
                partials.append(bag_sum(self.bags[name].weight, rows[:, 0], bag_offsets))
        # 4) partial rows back, grouped by requesting rank, then table; the autograd exchange returns gradients
        returned = all_to_all_rows(torch.cat(_blocks(partials, recv_parts)), [sum(r) for r in send_parts],
                                   [sum(r) for r in recv_parts], 1.0 / world, self.group)
        # returned: owner-major, table-minor; table t's rows in owner order are its `pair` order
        back = _split(returned, send_parts)
        outs = []
        for t, (_name, num_segments, *_x, pair_segment, _c) in enumerate(plans):
            rows = torch.cat([back[o][t] for o in range(world)])
            outs.append(rows.new_zeros(num_segments, rows.shape[1]).index_add(0, pair_segment, rows))
        return outs

    # ------------------------------------------------------------------ checkpoints and export
    def table_of(self, param_name: str) -> str | None:
        """The trainable table a parameter (or optimizer-state) name refers to: `tables.bags.oov.weight` -> oov."""
        m = _TABLE_PARAM.search(param_name)
        return m.group(1) if m and m.group(1) in self.bags else None

    def checkpoint_view(self, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A table-row-indexed tensor (weight, per-element or per-row optimizer state) as a row-sharded DTensor
        over the live local storage: DCP saves row shards and loads (resharded) straight into this rank's rows.
        0-dim tensors (optimizer `step`) and non-table tensors are returned unchanged."""
        name = self.table_of(param_name)
        if name is None or tensor.dim() == 0:
            return tensor
        from torch.distributed.tensor import DTensor, Shard

        start, end = self.row_ranges[name]
        if tensor.shape[0] != end - start:
            raise ValueError(
                f"{param_name}: {tensor.shape[0]} rows, but this rank owns {end - start} rows of table {name}"
            )
        shape = torch.Size((self.specs[name].num_rows, *tensor.shape[1:]))
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(tensor, self.mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)

    def full_rows(self, name: str) -> torch.Tensor:
        """The whole table on every rank (export, neighbours, projector). Collective: every rank calls it."""
        local = self.frozen if name == "pretrained" else self.bags[name].weight.detach()
        num_rows = self.specs[name].num_rows
        chunk = max(1, -(-num_rows // self.world_size))
        padded = local.new_zeros(chunk, self.dim)
        padded[: local.shape[0]] = local
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat(gathered)[:num_rows]
