"""BatchPrefetcher: the batch for a step is the same whether it was built ahead on the thread or inline."""

import threading

import pytest

from trainer.data import BatchPrefetcher


def test_prefetched_batches_equal_inline_ones_and_run_one_ahead():
    built: list[tuple[int, str]] = []

    def make(step):
        built.append((step, threading.current_thread().name))
        return (step, f"batch-{step}", 7)

    p = BatchPrefetcher(make, total_steps=5)
    try:
        assert [p.get(s) for s in range(5)] == [(s, f"batch-{s}", 7) for s in range(5)]
    finally:
        p.close()
    assert sorted(s for s, _ in built) == list(range(5)), "every step built once, none past the end"
    assert all(name.startswith("collate") for s, name in built if s > 0), "steps after the first come from the thread"


def test_a_jump_builds_inline_and_an_error_reaches_the_caller():
    def make(step):
        if step == 3:
            raise ValueError("bad document at step 3")
        return (step, None, 1)

    p = BatchPrefetcher(make, total_steps=10)
    try:
        assert p.get(0)[0] == 0
        assert p.get(5)[0] == 5  # resumed elsewhere: the prefetched step 1 is dropped
        with pytest.raises(ValueError, match="step 3"):
            p.get(3)
    finally:
        p.close()
