"""Row-wise sharded embedding tables: each rank owns one contiguous block of rows of every table (but model.wide's
tables, narrow, which stay whole on every rank: `whole_on_every_rank`, synchronised by `sync_sparse_grads`).

Rank r of W owns rows [r*c, min(V, (r+1)*c)) of a V-row table, c = ceil(V/W) (torch.chunk / DTensor `Shard(0)`
layout; trailing ranks may own no rows). The frozen table is sharded the same way (a copy of this rank's slice,
no autograd); each trainable table is an `nn.EmbeddingBag(local_rows, dim, sparse=True)` whose rows start equal to
the replicated model's (`init_rows_` draws rows by global index).

`pooled(name, ids, offsets)` is a collective: every rank calls it for every table in the same order, also with no
ids, no segments or an empty shard (the payloads are then empty, the collectives still run)::

    requesting rank (segments S, ids n)                      owning ranks
    1. owner = id // c; stable sort by owner, so each
       owner's ids stay grouped by segment; a part = one
       segment's ids of one owner (`plan_route`, planned
       ahead on the trainer's data thread: `Batch.routes`)
    2. all_to_all [ids, parts] per owner, on the host  --->  counts (W, 2)
    3. all_to_all (local rows, part lengths)           --->  sum each part's rows: one partial row per part
    4.                                                <---  all_to_all partial rows (autograd: the backward sends
                                                            each partial's gradient back to its owner)
    5. index_add the partials into (S, D)

Gradient scale: replicated DDP averages gradients over W ranks, while an owner here receives the SUM of every
rank's gradient for its rows, so the partials carry a 1/W gradient scale; with the trainer's loss
(local sum * W / global denominator) both give the gradient of the global-batch mean. Each row has one owner:
no sparse gradient exchange is needed on either backend (for the sharded tables; the wide ones are averaged).

Lock-step rule: the backward all-to-all runs when autograd reaches a partial, so every rank's loss must depend on
every pooled output of a step (ops on empty tensors keep the graph connected); a rank that skips one waits for
the others until the process-group timeout.
"""

import re
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainer import kernels
from trainer.bag_lookup import bag_sum
from trainer.distributed import DistInfo, host_group
from trainer.embeddings import TableSpec, init_rows_, segment_index, whole_on_every_rank
from trainer.kernels import advise_hugepages

_TABLE_PARAM = re.compile(r"(?:^|\.)bags\.([^.]+)\.weight$")


def rows_per_rank(num_rows: int, world_size: int) -> int:
    """c = ceil(V/W), at least 1: rank r owns rows [r*c, (r+1)*c), and row id // c is its owner."""
    return max(1, -(-num_rows // world_size))


def shard_rows(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [start, end) of a `num_rows` table owned by `rank` (torch.chunk layout; may be empty)."""
    chunk = rows_per_rank(num_rows, world_size)
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


# Both layouts cut tensors with one torch.split each, not a slice per piece: a slice's backward makes a zero tensor
# the size of the whole input and the engine then adds them up, so W x T slices of an exchanged buffer cost W x T
# buffer-sized fills and adds per step (measured 1.5-2.2 ms of zero fills per rank and step, masked_bag, 2 ranks,
# 2048 documents each); split's backward concatenates the pieces' gradients once.
def _blocks(per_table: list[torch.Tensor], counts: list[list[int]]) -> list[torch.Tensor]:
    """Rank-major, table-minor blocks: rank r's rows of table t are the next counts[r][t] rows of per_table[t]
    (each table's rows are grouped by rank, in rank order)."""
    pieces = [torch.split(rows, [per_rank[t] for per_rank in counts]) for t, rows in enumerate(per_table)]
    return [pieces[t][r] for r in range(len(counts)) for t in range(len(per_table))]


def _split(rows: torch.Tensor, counts: list[list[int]]) -> list[list[torch.Tensor]]:
    """The inverse layout: [rank][table] views of rank-major, table-minor rows with counts[rank][table] rows each."""
    pieces = iter(torch.split(rows, [n for per_rank in counts for n in per_rank]))
    return [[next(pieces) for _ in per_rank] for per_rank in counts]


@dataclass
class Route:
    """Where one table request's ids go (`plan_route`): everything the requesting side of a row-wise lookup can
    work out before the step, so the trainer's data thread does it (`Batch.routes`) and the step only exchanges.

    A part is this rank's ids of one segment that one owner holds; the owner returns one partial row per part."""

    payload: torch.Tensor  # int64; per owner, in rank order: its ids as local rows (stable), then its part lengths
    part_segment: torch.Tensor  # the segment of every part, owner-major
    counts: torch.Tensor  # (world, 2) int64 on the host: ids and parts per owner
    num_ids: int
    num_segments: int

    def pinned(self) -> "Route":
        return replace(self, payload=self.payload.pin_memory(), part_segment=self.part_segment.pin_memory())

    def to(self, device: torch.device, non_blocking: bool = False) -> "Route":
        return replace(self, payload=self.payload.to(device, non_blocking=non_blocking),
                       part_segment=self.part_segment.to(device, non_blocking=non_blocking))


if kernels.numba is not None:
    from numba import njit

    @njit(cache=kernels._CACHE, nogil=True, boundscheck=False)
    def _route_kernel(ids, offsets, num_rows, chunk, world):
        """`plan_route` in two passes over the ids (count, then place): a counting sort by owner, which is
        stable, so the same payload as the torch ops' sort, in O(ids)."""
        n, segments = ids.shape[0], offsets.shape[0]
        if (segments == 0 and n > 0) or (segments > 0 and offsets[0] != 0):
            raise ValueError("offsets must start at 0 and cover every id (EmbeddingBag layout)")
        id_count, part_count = np.zeros(world, np.int64), np.zeros(world, np.int64)
        last = np.full(world, -1, np.int64)  # the last segment that started a part, per owner
        for s in range(segments):
            for k in range(offsets[s], offsets[s + 1] if s + 1 < segments else n):
                if ids[k] < 0 or ids[k] >= num_rows:
                    raise IndexError("row id out of the table's range")
                o = ids[k] // chunk
                id_count[o] += 1
                if last[o] != s:
                    last[o] = s
                    part_count[o] += 1
        row_at, length_at, part_at = np.empty(world, np.int64), np.empty(world, np.int64), np.empty(world, np.int64)
        size, parts = 0, 0
        for o in range(world):  # owner o's block: its local rows, then its part lengths
            row_at[o], length_at[o], part_at[o] = size, size + id_count[o], parts
            size += id_count[o] + part_count[o]
            parts += part_count[o]
        payload, part_segment = np.empty(size, np.int64), np.empty(parts, np.int64)
        last[:] = -1
        for s in range(segments):
            for k in range(offsets[s], offsets[s + 1] if s + 1 < segments else n):
                o = ids[k] // chunk
                payload[row_at[o]] = ids[k] - o * chunk
                row_at[o] += 1
                if last[o] != s:
                    last[o] = s
                    part_segment[part_at[o]] = s
                    part_at[o] += 1
                    payload[length_at[o]] = 0
                    length_at[o] += 1
                payload[length_at[o] - 1] += 1
        return payload, part_segment, id_count, part_count


def plan_route(ids: torch.Tensor, offsets: torch.Tensor, num_rows: int, world: int) -> Route:
    """Plan a lookup of `ids` (global rows of a `num_rows` table; EmbeddingBag `offsets`) across `world` owners.

    Owner = id // ceil(num_rows / world); a stable sort by owner keeps each owner's ids in segment order, so the
    owner sums contiguous runs (one per part) and needs no segment ids: the payload carries the run lengths
    instead, 8 bytes per part rather than 8 per id, and the owner neither sorts nor deduplicates. CPU int64 ids
    take a numba kernel: 0.9 ms instead of 2.2 ms for 130K ids over 2 owners (the bigram lookups of 2048 demo
    documents), one thread."""
    num_ids, num_segments = ids.shape[0], offsets.shape[0]
    chunk = rows_per_rank(num_rows, world)
    if num_ids == 0:  # nothing to send (an inactive or empty lookup): no device work, no host sync
        none = torch.zeros(0, dtype=torch.long, device=ids.device)
        return Route(none, none, torch.zeros(world, 2, dtype=torch.long), 0, num_segments)
    if (kernels.fused_kernels_enabled() and ids.device.type == "cpu" and ids.dtype == torch.int64
            and offsets.dtype == torch.int64):
        payload, part_segment, id_count, part_count = _route_kernel(
            ids.contiguous().numpy(), offsets.contiguous().numpy(), num_rows, chunk, world)
        counts = torch.from_numpy(np.stack([id_count, part_count], axis=1))
        return Route(torch.from_numpy(payload), torch.from_numpy(part_segment), counts, num_ids, num_segments)
    span = max(num_segments, 1)
    owner, order = _sort_owners(torch.div(ids, chunk, rounding_mode="floor"), world)
    local_row = ids[order] - owner * chunk
    part, part_lengths = torch.unique_consecutive(owner * span + segment_index(offsets, num_ids)[order],
                                                  return_counts=True)  # distinct (owner, segment), owner-major
    counts = torch.stack([torch.bincount(owner, minlength=world),
                          torch.bincount(torch.div(part, span, rounding_mode="floor"), minlength=world)], 1).cpu()
    ids_per_owner, parts_per_owner = counts.t().tolist()
    payload = torch.cat([x for pair in zip(local_row.split(ids_per_owner), part_lengths.split(parts_per_owner),
                                           strict=True) for x in pair])
    return Route(payload, part % span, counts, num_ids, num_segments)


class RowWiseTables(nn.Module):
    """The `LocalTables` interface over row-wise sharded tables (one block of rows of every table per rank; the
    wide tables whole on every rank)."""

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
        # the wide tables stay whole on every rank (`whole_on_every_rank`): replicated inside the sharded module
        self.replicated_tables = [s.name for s in specs if s.trainable and whole_on_every_rank(s.name)]
        self.row_ranges = {s.name: (0, s.num_rows) if s.name in self.replicated_tables
                           else shard_rows(s.num_rows, self.world_size, self.rank) for s in specs}
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
    def route(self, name: str, ids: torch.Tensor, offsets: torch.Tensor) -> Route:
        """`plan_route` for one of this model's tables; needs no process group (the data thread calls it)."""
        if name in self.replicated_tables:
            raise ValueError(f"table {name} is whole on every rank: it is looked up locally, not routed")
        return plan_route(ids, offsets, self.specs[name].num_rows, self.world_size)

    def masked_words(self, *args) -> None:
        """No fused word sums here (LocalTables.masked_words): the word, OOV and mask rows come from their owners
        through `pooled_many`'s collectives, one request per table."""
        return None

    def pooled(self, name: str, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Sum of the rows of each segment, (num_segments, dim). Collective: every rank calls it, same order.

        `ids` are this table's (global) row ids for this rank's segments, `offsets` EmbeddingBag start offsets."""
        return self.pooled_many([(name, ids, offsets)])[0]

    def pooled_many(self, requests: list[tuple[str, torch.Tensor, torch.Tensor]], groups: dict | None = None,
                    routes: dict[str, Route] | None = None) -> list[torch.Tensor]:
        """`pooled` for several tables at once, with four collectives in all (counts, ids, partial rows, and the
        backward of the partial rows) instead of four per table: at small batches the latency of gloo's
        collectives, not their bytes, dominates a row-wise step.

        `routes`: by table name, `route(name, ids, offsets)` planned ahead (`Batch.routes`, the data thread); a
        request without one is planned here. `groups` (ids grouped ahead for LocalTables) does not apply: owners
        group the ids they receive."""
        world, num_tables = self.world_size, len(requests)
        if num_tables == 0:
            return []
        routes = routes or {}
        plans = []
        for name, ids, offsets in requests:
            plan = routes.get(name)
            if plan is None or (plan.num_ids, plan.num_segments) != (ids.shape[0], offsets.shape[0]):
                plan = self.route(name, ids, offsets)
            plans.append(plan)
        # 1) counts, on the host (a gloo group when the main backend is NCCL: no device sync for split sizes)
        counts = torch.stack([p.counts for p in plans], dim=1)  # (world, tables, [ids, parts])
        recv_counts = _exchange(counts.reshape(world, 2 * num_tables), [1] * world, [1] * world, host_group())
        send_ids, send_parts = counts[:, :, 0].tolist(), counts[:, :, 1].tolist()
        recv = recv_counts.view(world, num_tables, 2).tolist()
        recv_ids = [[n for n, _ in per_rank] for per_rank in recv]
        recv_parts = [[k for _, k in per_rank] for per_rank in recv]
        # 2) payloads (local rows, then part lengths, per owner), grouped by destination rank, then table
        send_sizes = [[n + k for n, k in zip(a, b, strict=True)] for a, b in zip(send_ids, send_parts, strict=True)]
        recv_sizes = [[n + k for n, k in per_rank] for per_rank in recv]
        received = _split(
            _exchange(torch.cat(_blocks([p.payload for p in plans], send_sizes)), [sum(r) for r in recv_sizes],
                      [sum(r) for r in send_sizes], self.group),
            recv_sizes,
        )
        # 3) owner side, per table: sum rows per part; blocks arrive source-major, each source's in part order
        partials = []
        for t, (name, _ids, _offsets) in enumerate(requests):
            rows = torch.cat([received[r][t][: recv_ids[r][t]] for r in range(world)])
            lengths = torch.cat([received[r][t][recv_ids[r][t]:] for r in range(world)])
            bag_offsets = torch.cumsum(lengths, 0) - lengths
            if name == "pretrained":
                with torch.no_grad():
                    partials.append(F.embedding_bag(rows, self.frozen, bag_offsets, mode="sum"))
            else:
                partials.append(bag_sum(self.bags[name].weight, rows, bag_offsets))
        # 4) partial rows back, grouped by requesting rank, then table; the autograd exchange returns gradients
        returned = all_to_all_rows(torch.cat(_blocks(partials, recv_parts)), [sum(r) for r in send_parts],
                                   [sum(r) for r in recv_parts], 1.0 / world, self.group)
        # returned: owner-major, table-minor; table t's rows in owner order are its parts' order
        back = _split(returned, send_parts)
        outs = []
        for t, plan in enumerate(plans):
            rows = torch.cat([back[o][t] for o in range(world)])
            outs.append(rows.new_zeros(plan.num_segments, rows.shape[1]).index_add(0, plan.part_segment, rows))
        return outs

    # ------------------------------------------------------------------ checkpoints and export
    def replicated_weights(self) -> list[torch.Tensor]:
        """The weights whose sparse gradients ranks average (`sync_sparse_grads`): the tables whole on every rank."""
        return [self.bags[name].weight for name in self.replicated_tables]

    def table_of(self, param_name: str) -> str | None:
        """The row-sharded table a parameter (or optimizer-state) name refers to: `tables.bags.oov.weight` -> oov;
        None for anything else, the tables whole on every rank included."""
        m = _TABLE_PARAM.search(param_name)
        return m.group(1) if m and m.group(1) in self.bags and m.group(1) not in self.replicated_tables else None

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

    def rows_of(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (global row numbers) of a table, float32, in host memory on every rank. Collective for the
        sharded tables: each rank fills the rows it owns and a sum over the host group (gloo under NCCL) completes
        them, so only the asked rows travel, not whole tables."""
        ids = ids.cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.specs[name].num_rows):
            raise IndexError(f"rows_of({name!r}): ids outside [0, {self.specs[name].num_rows})")
        if name in self.replicated_tables:
            return self.bags[name].weight.detach()[ids.to(self.bags[name].weight.device)].float().cpu()
        local = self.frozen if name == "pretrained" else self.bags[name].weight.detach()
        start, end = self.row_ranges[name]
        out = torch.zeros(ids.shape[0], self.dim)
        mine = (ids >= start) & (ids < end)
        out[mine] = local[(ids[mine] - start).to(local.device)].float().cpu()
        dist.all_reduce(out, group=host_group())
        return out

    def full_rows_on_main(self, name: str) -> torch.Tensor | None:
        """The whole table in rank 0's host memory, None on the other ranks (the export, which only rank 0 writes).
        Collective for the sharded tables: a gather, not `full_rows`' all-gather, so a node with 8 ranks holds one
        copy of a table too big for one device, not 8."""
        if name in self.replicated_tables:
            return self.bags[name].weight.detach().cpu() if self.rank == 0 else None
        local = self.frozen if name == "pretrained" else self.bags[name].weight.detach()
        num_rows = self.specs[name].num_rows
        chunk = rows_per_rank(num_rows, self.world_size)
        padded = torch.zeros(chunk, self.dim, dtype=local.dtype)
        padded[: local.shape[0]] = local.cpu()
        if self.rank != 0:
            dist.gather(padded, None, dst=0, group=host_group())
            return None
        gathered = torch.empty(self.world_size, chunk, self.dim, dtype=local.dtype)
        dist.gather(padded, list(gathered.unbind(0)), dst=0, group=host_group())
        return gathered.view(-1, self.dim)[:num_rows]

    def full_rows(self, name: str) -> torch.Tensor:
        """The whole table on every rank, in host memory (export, neighbours, projector). Collective for the
        sharded tables: every rank calls it (a table whole on every rank is returned as it is). Gathered on the
        host group (gloo under NCCL): row_wise is chosen for tables too big for one device, so a whole copy (and
        the gather's second) must not be made on the GPU."""
        if name in self.replicated_tables:
            return self.bags[name].weight.detach().cpu()
        local = self.frozen if name == "pretrained" else self.bags[name].weight.detach()
        num_rows = self.specs[name].num_rows
        chunk = rows_per_rank(num_rows, self.world_size)
        gathered = torch.empty(self.world_size, chunk, self.dim, dtype=local.dtype)
        padded = gathered[self.rank]
        padded[: local.shape[0]] = local.cpu()
        padded[local.shape[0]:] = 0
        dist.all_gather(list(gathered.unbind(0)), padded.clone(), group=host_group())
        return gathered.view(-1, self.dim)[:num_rows]
