"""How embedding tables are placed across ranks, and how the model is wrapped for data parallelism.

- `replicated`: every rank holds every table; the whole model (dense layers and trainable tables) is wrapped in
  DDP. The frozen table is a plain tensor attribute, invisible to DDP (never broadcast). gloo all-reduces the
  sparse table gradients natively.
- `row_wise`: each rank holds a contiguous block of rows of every table (see row_wise.py); only the dense part is
  wrapped in DDP.
"""

import logging
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.config import DistConfig
from trainer.distributed import DistInfo
from trainer.embeddings import LocalTables, TableSpec

log = logging.getLogger(__name__)


def resolve_sharding(cfg: DistConfig, specs: list[TableSpec], info: DistInfo) -> str:
    if cfg.embedding_sharding != "auto":
        return cfg.embedding_sharding
    table_bytes = sum(s.num_bytes for s in specs)
    return "row_wise" if info.world_size > 1 and table_bytes > cfg.auto_shard_bytes else "replicated"


def build_tables(mode: str, specs: list[TableSpec], frozen: torch.Tensor, seed: int, info: DistInfo) -> nn.Module:
    if mode == "row_wise" and info.world_size > 1:
        from trainer.row_wise import RowWiseTables

        return RowWiseTables(specs, frozen, seed, info)
    return LocalTables(specs, frozen, seed)


def _ddp(module: nn.Module, info: DistInfo) -> DistributedDataParallel:
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    with warnings.catch_warnings():
        # torch 2.13 deprecates broadcast_buffers in favour of forward_sync_buffers, which still syncs at init;
        # our modules have no buffers, and nothing may be broadcast per forward
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def wrap_for_training(model: nn.Module, mode: str, info: DistInfo) -> nn.Module:
    """DDP around what is data-parallel. Returns the module the training loop calls."""
    if not info.is_distributed:
        return model
    if mode == "row_wise" or info.backend == "nccl":
        # Tables are either sharded (each row has one owner) or synchronised by sync_sparse_grads (NCCL has no
        # sparse all-reduce); only the dense part is DDP's business.
        model.dense = _ddp(model.dense, info)
        return model
    return _ddp(model, info)


def describe_plan(specs: list[TableSpec], mode: str, info: DistInfo, optim) -> str:
    """Rows and bytes per rank for every table, and optimizer-state bytes per rank."""
    world = info.world_size if mode == "row_wise" else 1
    lines = [f"embedding plan: {mode}, world size {info.world_size}"]
    lines.append(f"  {'table':<17}{'rows':>12}{'dim':>6}{'trainable':>10}{'rows/rank':>12}{'MiB/rank':>10}")
    for s in specs:
        rows_per_rank = -(-s.num_rows // world) if s.num_rows else 0
        lines.append(f"  {s.name:<17}{s.num_rows:>12,}{s.dim:>6}{str(s.trainable):>10}{rows_per_rank:>12,}"
                     f"{rows_per_rank * s.dim * 4 / 2**20:>10.1f}")
    state_bytes = sum(t.numel() * t.element_size() for t in optim.state_tensors().values())
    lines.append(f"  optimizer state on this rank: {state_bytes / 2**20:.1f} MiB "
                 f"({', '.join(f'{k}={type(v).__name__}' for k, v in optim.optimizers.items())})")
    return "\n".join(lines)


def needs_sparse_grad_sync(mode: str, info: DistInfo) -> bool:
    """Replicated tables on NCCL are outside DDP and synchronised by `sync_sparse_grads` after backward."""
    return info.is_distributed and mode != "row_wise" and info.backend == "nccl"


def sync_sparse_grads(tables: nn.Module, info: DistInfo) -> None:
    """Average replicated tables' sparse gradients over ranks with all-gathers (NCCL has no sparse all-reduce).

    Per table: gather every rank's number of touched rows, pad to the largest, all-gather indices and values,
    drop the padding, and rebuild one coalesced gradient divided by the world size. Every rank calls every
    collective, also with zero touched rows."""
    world = info.world_size
    for bag in tables.bags.values():
        weight = bag.weight
        if weight.grad is None:
            grad = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long, device=weight.device),
                                           weight.new_zeros(0, weight.shape[1]), weight.shape)
        else:
            grad = weight.grad.coalesce()
        idx, vals = grad.indices()[0], grad.values()
        count = torch.tensor([idx.numel()], device=weight.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]  # host sync: needed to size the buffers
        longest = max(sizes)
        pad = longest - idx.numel()
        idx_p = torch.cat([idx, idx.new_zeros(pad)])
        vals_p = torch.cat([vals, vals.new_zeros(pad, vals.shape[1])])
        all_idx = [torch.empty_like(idx_p) for _ in range(world)]
        all_vals = [torch.empty_like(vals_p) for _ in range(world)]
        dist.all_gather(all_idx, idx_p)
        dist.all_gather(all_vals, vals_p)
        idx_cat = torch.cat([t[:n] for t, n in zip(all_idx, sizes, strict=True)])
        vals_cat = torch.cat([t[:n] for t, n in zip(all_vals, sizes, strict=True)])
        weight.grad = torch.sparse_coo_tensor(idx_cat.unsqueeze(0), vals_cat / world, weight.shape).coalesce()
