"""`row_wise.plan_route`: the requesting side of a row-wise lookup, planned without a process group.

The oracle is the definition: every id goes to owner id // ceil(V/W) as a local row; each owner receives, per
segment that has ids it owns, one run of those ids in their original order, and the run lengths; the parts'
segments come back owner-major. Decoding the payload must give exactly that, for any W, an empty shard,
segments with no ids and no ids at all. (The collectives around it are checked against one process in
tests/distributed/test_row_wise.py, with and without routes planned ahead.)
"""

from __future__ import annotations

import pytest
import torch

from trainer import kernels
from trainer.row_wise import plan_route, shard_rows


def _expected(ids: list[int], offsets: list[int], num_rows: int, world: int):
    """Per owner: (local rows in send order, part lengths, part segments), by the definition above."""
    chunk = max(1, -(-num_rows // world))
    bounds = [*offsets, len(ids)]
    out = []
    for owner in range(world):
        rows, lengths, segments = [], [], []
        for s in range(len(offsets)):
            mine = [i - owner * chunk for i in ids[bounds[s]:bounds[s + 1]] if i // chunk == owner]
            if mine:
                rows += mine
                lengths.append(len(mine))
                segments.append(s)
        out.append((rows, lengths, segments))
    return out


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("num_rows", "world", "num_ids", "segments"), [
    (10, 1, 30, 4), (10, 2, 30, 4), (10, 3, 41, 7), (5, 4, 25, 3),  # 5 rows over 4 ranks: the last owns none
    (100, 2, 0, 3), (100, 3, 0, 0), (5, 2, 9, 1),
])
def test_plan_route_sends_each_owner_its_ids_as_runs_per_segment(monkeypatch, num_rows, world, num_ids, segments,
                                                                  fused) -> None:
    """Both implementations: the numba kernel (CPU int64) and the torch ops (CUDA, TRAINER_FUSED_KERNELS=0)."""
    if fused and kernels.numba is None:
        pytest.skip("numba is not installed")
    monkeypatch.setenv("TRAINER_FUSED_KERNELS", "1" if fused else "0")
    gen = torch.Generator().manual_seed(num_rows * 31 + world * 7 + num_ids)
    ids = torch.randint(0, num_rows, (num_ids,), generator=gen)
    # sorted random starts, repeats allowed: some segments are empty
    offsets = torch.sort(torch.randint(0, num_ids + 1, (segments,), generator=gen)).values if segments else \
        torch.zeros(0, dtype=torch.long)
    if segments:
        offsets[0] = 0
    route = plan_route(ids, offsets, num_rows, world)
    assert (route.num_ids, route.num_segments) == (num_ids, segments)
    assert route.counts.device.type == "cpu" and route.counts.shape == (world, 2)
    want = _expected(ids.tolist(), offsets.tolist(), num_rows, world)
    payload, pos, part_pos = route.payload.tolist(), 0, 0
    for owner, (rows, lengths, segs) in enumerate(want):
        n, k = route.counts[owner].tolist()
        assert payload[pos : pos + n] == rows
        assert payload[pos + n : pos + n + k] == lengths
        assert route.part_segment[part_pos : part_pos + k].tolist() == segs
        start, end = shard_rows(num_rows, world, owner)
        assert all(0 <= r < end - start for r in rows)  # local rows fit the owner's shard
        pos, part_pos = pos + n + k, part_pos + k
    assert pos == len(payload) and part_pos == route.part_segment.numel()


def test_plan_route_refuses_an_id_outside_the_table() -> None:
    if kernels.numba is None:
        pytest.skip("numba is not installed")
    # 10 rows over 3 ranks (4, 4, 2): id 10 would be rank 2's local row 2, which it does not have
    with pytest.raises(IndexError, match="out of the table's range"):
        plan_route(torch.tensor([0, 10]), torch.tensor([0]), num_rows=10, world=3)
    with pytest.raises(IndexError, match="out of the table's range"):
        plan_route(torch.tensor([-1]), torch.tensor([0]), num_rows=10, world=3)
    with pytest.raises(ValueError, match="offsets must start at 0"):
        plan_route(torch.tensor([1, 2]), torch.tensor([1]), num_rows=10, world=3)


def test_plan_route_of_no_ids_is_empty_and_stays_on_the_host() -> None:
    route = plan_route(torch.zeros(0, dtype=torch.long), torch.zeros(4, dtype=torch.long), num_rows=10, world=3)
    assert route.counts.tolist() == [[0, 0]] * 3 and route.payload.numel() == 0 and route.num_segments == 4
