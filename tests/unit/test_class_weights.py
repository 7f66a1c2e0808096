"""Class weights for the loss, and the deterministic global batch plan with its per-rank shares."""

import math

import numpy as np
import pytest

from trainer.data import BatchPlan, class_weights, rank_share


# ---------------------------------------------------------------- class weights
def test_inverse_log_by_hand():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, -1])  # -1 (unseen label) is not counted
    w = class_weights(labels, 4, "inverse_log")
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, [math.log(9 / 6), math.log(9 / 2), math.log(9 / 1), 0.0], rtol=1e-6)


def test_inverse_log_single_class_gets_zero_weight():
    np.testing.assert_array_equal(class_weights(np.array([1, 1, 1]), 2, "inverse_log"), [0.0, 0.0])


def test_none_is_ones():
    w = class_weights(np.array([0, 1, 1, 1]), 3, "none")
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, [1.0, 1.0, 1.0])


# ---------------------------------------------------------------- batch plan
def test_plan_is_a_deterministic_permutation_per_epoch():
    tokens = np.arange(1, 101)
    a, b = BatchPlan(tokens, 16, 0, seed=3), BatchPlan(tokens, 16, 0, seed=3)
    for epoch in (0, 1, 5):
        ea, eb = a.epoch(epoch), b.epoch(epoch)
        assert len(ea) == 7
        assert [len(x) for x in ea] == [16] * 6 + [4]
        assert all(np.array_equal(x, y) for x, y in zip(ea, eb, strict=True))
        assert sorted(np.concatenate(ea).tolist()) == list(range(100))
    # recomputing an earlier epoch after a later one (the plan caches one epoch) gives the same batches
    first = [x.copy() for x in a.epoch(0)]
    a.epoch(4)
    assert all(np.array_equal(x, y) for x, y in zip(first, a.epoch(0), strict=True))


def test_plan_differs_across_epochs_and_seeds():
    tokens = np.ones(50, dtype=np.int64)
    plan = BatchPlan(tokens, 10, 0, seed=0)
    e0, e1 = np.concatenate(plan.epoch(0)), np.concatenate(plan.epoch(1))
    assert not np.array_equal(e0, e1)
    other = np.concatenate(BatchPlan(tokens, 10, 0, seed=1).epoch(0))
    assert not np.array_equal(e0, other)


def test_unshuffled_plan_keeps_order():
    plan = BatchPlan(np.ones(5, dtype=np.int64), 2, 0, seed=0, shuffle=False)
    assert [x.tolist() for x in plan.epoch(0)] == [[0, 1], [2, 3], [4]]


def test_token_budget_cuts():
    tokens = np.array([3, 4, 2, 6, 1, 1, 10, 2])
    plan = BatchPlan(tokens, 0, 7, seed=0, shuffle=False)
    # [3,4]=7 | [2]+6 would be 8 -> [2] | [6,1] | [1]+10 -> [1] | [10] alone exceeds but is never split | [2]
    assert [x.tolist() for x in plan.epoch(0)] == [[0, 1], [2], [3, 4], [5], [6], [7]]
    assert plan.total_steps(3) == 18


def test_batch_size_and_token_budget_both_cut():
    tokens = np.ones(10, dtype=np.int64)
    plan = BatchPlan(tokens, 3, 100, seed=0, shuffle=False)
    assert [len(x) for x in plan.epoch(0)] == [3, 3, 3, 1]
    tokens = np.full(10, 4)
    plan = BatchPlan(tokens, 3, 8, seed=0, shuffle=False)
    assert [len(x) for x in plan.epoch(0)] == [2, 2, 2, 2, 2]


def test_total_steps_count_partial_batches():
    plan = BatchPlan(np.ones(100, dtype=np.int64), 32, 0, seed=0)
    assert plan.steps_in_epoch(0) == 4
    assert plan.total_steps(3) == 12


def test_position_across_epochs():
    plan = BatchPlan(np.ones(10, dtype=np.int64), 4, 0, seed=0)  # 3 steps per epoch
    assert [plan.position(s) for s in range(8)] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
        (2, 0),
        (2, 1),
    ]


def test_position_with_token_budget_epochs_of_different_lengths():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 20, size=40)
    plan = BatchPlan(tokens, 0, 50, seed=7)
    lengths = [plan.steps_in_epoch(e) for e in range(4)]
    step = 0
    for epoch, n in enumerate(lengths):
        for index in range(n):
            assert plan.position(step) == (epoch, index)
            step += 1
    assert plan.total_steps(4) == sum(lengths)


# ---------------------------------------------------------------- rank shares
def test_rank_share_contiguous_and_complete():
    batch = np.arange(10, 20)
    shares = [rank_share(batch, r, 3) for r in range(3)]
    assert [s.tolist() for s in shares] == [[10, 11, 12, 13], [14, 15, 16], [17, 18, 19]]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_share_with_fewer_documents_than_ranks(world):
    batch = np.array([5, 9])
    shares = [rank_share(batch, r, world) for r in range(world)]
    assert np.concatenate(shares).tolist() == [5, 9]
    assert sum(len(s) == 0 for s in shares) == max(0, world - 2)
    empty = rank_share(np.zeros(0, dtype=np.int64), world - 1, world)
    assert len(empty) == 0
