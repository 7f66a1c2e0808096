"""Grouped bag lookups (trainer/bag_lookup.py): same outputs and gradients as EmbeddingBag, delivered coalesced."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer import kernels
from trainer.bag_lookup import bag_sum, gather_pool, group_ids, sorted_groups
from trainer.config import load_config
from trainer.distributed import DistInfo
from trainer.sparse_optim import FastSparseAdam, RowWiseAdagrad, SparseSGD
from trainer.trainer import Trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse invariant checks"),
    pytest.mark.skipif(not kernels.fused_kernels_enabled(), reason="numba not installed"),
]


def lookup_case(rows: int, num_ids: int, segments: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, rows, (num_ids,), generator=gen)
    ids = torch.cat([ids, ids[: num_ids // 2]])  # duplicates, in other segments
    cuts = torch.sort(torch.randint(0, ids.numel() + 1, (max(segments - 1, 0),), generator=gen)).values
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), cuts])[:segments]
    return ids, offsets, torch.randn(rows, 6, generator=gen)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000, 50_000])
def test_sorted_groups_equals_numpy_unique(n) -> None:
    ids = np.random.default_rng(n).integers(0, n // 3 + 2, n)
    distinct, inverse = sorted_groups(ids)
    want, want_inverse = np.unique(ids, return_inverse=True)
    assert np.array_equal(distinct, want) and np.array_equal(inverse, want_inverse.ravel())


CASES = [(50, 200, 13), (1000, 0, 4), (10, 30, 1), (100_000, 5000, 300), (8, 40, 40), (30, 0, 0)]


def sample_weights(ids: torch.Tensor, weighted: bool) -> torch.Tensor | None:
    """Per-id weights (the wide part's TF-IDF weights are such), or None."""
    return torch.rand(ids.numel(), generator=torch.Generator().manual_seed(7)) if weighted else None


@pytest.mark.parametrize(("rows", "num_ids", "segments"), CASES)
@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_forward_and_gradient_equal_embedding_bag(rows, num_ids, segments, ahead, weighted) -> None:
    ids, offsets, w0 = lookup_case(rows, num_ids, segments, seed=rows + num_ids)
    psw = sample_weights(ids, weighted)
    ours, ref = w0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    out = bag_sum(ours, ids, offsets, group_ids(ids) if ahead else None, psw)
    want = F.embedding_bag(ids, ref, offsets, mode="sum", sparse=True, per_sample_weights=psw)
    assert torch.equal(out, want)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * upstream).sum().backward()
    (want * upstream).sum().backward()
    grad, ref_grad = ours.grad, ref.grad.coalesce()
    assert grad.is_sparse and grad.shape == ref_grad.shape
    # the gradient arrives coalesced (sorted, distinct rows) even though autograd drops the flag
    assert kernels.rows_are_distinct_sorted(grad)
    idx = grad._indices()[0]
    assert idx.numel() == len(set(ids.tolist())) and bool((idx[1:] > idx[:-1]).all())
    assert torch.equal(idx, ref_grad._indices()[0])
    torch.testing.assert_close(grad._values(), ref_grad._values(), rtol=1e-6, atol=1e-6)


OPTIMIZERS = {
    "sgd": lambda ps: SparseSGD(ps, lr=0.5),
    "sparse_adam": lambda ps: FastSparseAdam(ps, lr=0.05),
    "rowwise_adagrad": lambda ps: RowWiseAdagrad(ps, lr=0.3),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("weighted", [False, True])
def test_steps_are_bit_identical_to_embedding_bag_gradients(name, weighted) -> None:
    """Duplicates are summed in their original order, as the fused optimizer kernels summed EmbeddingBag's
    per-id rows: training gives the same bits whichever lookup produced the gradient."""
    ids, offsets, w0 = lookup_case(5000, 3000, 200, seed=11)
    psw = sample_weights(ids, weighted)
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_ours, opt_ref = OPTIMIZERS[name]([ours]), OPTIMIZERS[name]([ref])
    upstream = torch.randn(offsets.numel(), 6, generator=torch.Generator().manual_seed(5))

    def embedding_bag(w, i, o, groups=None, per_sample_weights=None):
        return F.embedding_bag(i, w, o, mode="sum", sparse=True, per_sample_weights=per_sample_weights)

    for _ in range(3):
        for p, opt, lookup in ((ours, opt_ours, bag_sum), (ref, opt_ref, embedding_bag)):
            opt.zero_grad()
            (lookup(p, ids, offsets, None, psw) * upstream).sum().backward()
            opt.step()
    assert torch.equal(ours.detach(), ref.detach())


def test_falls_back_to_embedding_bag_without_kernels_or_grad(monkeypatch) -> None:
    ids, offsets, w0 = lookup_case(40, 30, 5, seed=2)
    w = w0.clone().requires_grad_(True)
    with torch.no_grad():
        assert torch.equal(bag_sum(w, ids, offsets), F.embedding_bag(ids, w0, offsets, mode="sum"))
    monkeypatch.setenv("TRAINER_FUSED_KERNELS", "0")
    bag_sum(w, ids, offsets).sum().backward()
    assert w.grad._nnz() == ids.numel()  # EmbeddingBag's own gradient: one row per id


@pytest.mark.parametrize(("encoder", "wide", "grouped"), [
    ("masked_bag", "", {"pretrained", "oov", "bigram"}),
    ("bag", "", {"oov", "bigram"}),
    ("masked_bag", "words,bigrams", {"pretrained", "oov", "bigram", "wide_word", "wide_bigram"}),
])
def test_the_data_thread_groups_the_ids_of_every_trainable_lookup(tiny_config, encoder, wide, grouped) -> None:
    cfg = load_config(tiny_config("run", model={"encoder": encoder, "wide": wide}, embeddings={"ngram_buckets": 64}),
                      ["--train.threads", "1"])
    trainer = Trainer(cfg, DistInfo(0, 0, 1, torch.device("cpu"), "none"))
    trainer.build()
    _, batch, _ = trainer._make_batch(0)
    assert set(batch.groups) == grouped
    for name, (distinct, inverse) in batch.groups.items():
        ids = batch.weighted[name][0] if name.startswith("wide_") else batch.tables[name][0]
        assert torch.equal(distinct[inverse], ids)
        assert bool((distinct[1:] > distinct[:-1]).all())
    # the model gives the same logits whether the data thread grouped the ids or the forward does
    with torch.no_grad():
        ahead = trainer.model(batch)
        batch.groups = {}
        assert torch.equal(trainer.model(batch), ahead)


@pytest.mark.parametrize(("distinct", "num_ids", "segments"), [(20, 300, 17), (5, 0, 3), (1, 10, 1), (0, 0, 0)])
def test_gather_pool_equals_index_add_of_gathered_rows(distinct, num_ids, segments) -> None:
    gen = torch.Generator().manual_seed(distinct + num_ids)
    rows0 = torch.randn(distinct, 4, generator=gen)
    inverse = torch.randint(0, max(distinct, 1), (num_ids,), generator=gen)
    segment = torch.randint(0, max(segments, 1), (num_ids,), generator=gen)
    ours, ref = rows0.clone().requires_grad_(True), rows0.clone().requires_grad_(True)
    out = gather_pool(ours, inverse, segment, segments)
    want = torch.zeros(segments, 4).index_add(0, segment, ref[inverse])
    assert torch.equal(out, want)
    upstream = torch.randn(segments, 4, generator=gen)
    (out * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-6, atol=1e-6)
