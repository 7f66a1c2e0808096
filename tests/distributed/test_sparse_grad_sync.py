"""`sharding.sync_sparse_grads` (replicated tables' sparse gradients averaged over ranks) on real gloo groups.

Each rank gets uncoalesced row-sparse gradients with duplicate rows, rows shared with other ranks, a table that
one rank does not touch, and (in one round) no rows at all on any rank, plus a table whose grad is None. The
result must equal the average over ranks of the dense gradients, be coalesced (sorted distinct rows), be
bit-identical on every rank, and be the same through the numba path and the torch-op fallback.
"""

import pytest
import torch
from harness import run_distributed
from torch import nn

from trainer import kernels, sharding
from trainer.distributed import DistInfo, all_reduce_

ROWS, DIM = 23, 3


def _tables(info: DistInfo, round_: int) -> nn.Module:
    """Three tables with rank-dependent sparse gradients (see the module docstring)."""
    g = torch.Generator().manual_seed(1000 * round_ + info.rank)
    tables = nn.Module()
    tables.bags = nn.ModuleDict({n: nn.EmbeddingBag(ROWS, DIM, mode="sum", sparse=True) for n in ("a", "b", "c")})
    tables.replicated_weights = lambda: [bag.weight for bag in tables.bags.values()]  # as LocalTables'
    for name, bag in tables.bags.items():
        if name == "c" and round_ == 0:
            continue  # grad stays None on every rank
        nnz = 0 if round_ == 2 or (name == "b" and info.rank == 1) else 17
        ids = torch.randint(0, ROWS, (nnz,), generator=g)
        ids[: min(nnz, 4)] = torch.tensor([5, 5, 0, ROWS - 1])[: min(nnz, 4)]  # duplicates, shared rows, edges
        values = torch.randn(nnz, DIM, generator=g)
        bag.weight.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), values, (ROWS, DIM))
    return tables


def _worker(info: DistInfo) -> dict:
    out = {}
    for fused in (True, False):
        original = kernels.can_fuse
        if not fused:
            kernels.can_fuse = lambda *tensors: False  # the torch-op fallback (CUDA, other dtypes, no numba)
        try:
            for round_ in range(3):
                tables = _tables(info, round_)
                expected = {
                    n: all_reduce_(b.weight.grad.to_dense() if b.weight.grad is not None else torch.zeros(ROWS, DIM),
                                   info) / info.world_size
                    for n, b in tables.bags.items()
                }
                sharding.sync_sparse_grads(tables, info)
                for name, bag in tables.bags.items():
                    grad = bag.weight.grad
                    out[fused, round_, name] = {
                        "err": float((grad.to_dense() - expected[name]).abs().max()),
                        "coalesced": grad.is_coalesced(),
                        "sorted_distinct": bool((grad._indices()[0].diff() > 0).all()),
                        "indices": grad._indices().clone(),
                        "values": grad._values().clone(),
                    }
        finally:
            kernels.can_fuse = original
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_sync_sparse_grads_averages_over_ranks(world_size):
    results = run_distributed(_worker, world_size, timeout_s=120)
    for key, got in results[0].items():
        assert got["err"] < 1e-6, key
        assert got["coalesced"] and got["sorted_distinct"], key
        for other in results[1:]:  # every replica must step with the same bits
            assert torch.equal(other[key]["indices"], got["indices"]), key
            assert torch.equal(other[key]["values"], got["values"]), key
    for round_ in range(3):  # numba path and torch-op fallback agree
        for name in ("a", "b", "c"):
            fused, plain = results[0][True, round_, name], results[0][False, round_, name]
            assert torch.equal(fused["indices"], plain["indices"]), (round_, name)
            torch.testing.assert_close(fused["values"], plain["values"], rtol=1e-6, atol=1e-6)
