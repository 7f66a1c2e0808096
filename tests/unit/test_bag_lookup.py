"""Grouped bag lookups (trainer/bag_lookup.py): same outputs and gradients as EmbeddingBag, delivered coalesced."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer import batch_kernels, kernels
from trainer import model as model_module
from trainer.bag_lookup import bag_sum, gather_pool, group_ids, group_ids_many, sorted_groups
from trainer.batch import Batch, batch_from_collated, collate, collate_grouped
from trainer.config import load_config
from trainer.distributed import DistInfo
from trainer.embeddings import segment_index
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


@pytest.mark.parametrize("sizes", [[], [0], [5], [300, 0, 17, 4000], [0, 0]])
def test_group_ids_many_equals_group_ids_of_each(sizes) -> None:
    rng = np.random.default_rng(len(sizes) + sum(sizes))
    ids = [torch.from_numpy(rng.integers(0, high, n)) for n, high in zip(sizes, [3, 2_000_000, 40, 10**9], strict=False)]
    got = group_ids_many(ids)
    assert len(got) == len(ids)
    for (distinct, inverse), t in zip(got, ids, strict=True):
        want_distinct, want_inverse = group_ids(t)
        assert torch.equal(distinct, want_distinct) and torch.equal(inverse, want_inverse)


def test_group_ids_many_refuses_negative_ids() -> None:
    if kernels.numba is None:
        pytest.skip("numba is not installed")
    with pytest.raises(ValueError, match="non-negative"):
        group_ids_many([torch.tensor([1, 2]), torch.tensor([3, -1])])


@pytest.mark.parametrize("docs", [1, 4, 9])
def test_the_word_index_kernel_equals_the_concatenated_segments(docs) -> None:
    if kernels.numba is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(docs)
    pre_counts, oov_counts = rng.integers(0, 4, docs), rng.integers(0, 3, docs)
    pre, oov = torch.from_numpy(rng.integers(0, 50, pre_counts.sum())), torch.from_numpy(rng.integers(0, 9, oov_counts.sum()))
    pre_off = torch.from_numpy(np.cumsum(pre_counts) - pre_counts)
    oov_off = torch.from_numpy(np.cumsum(oov_counts) - oov_counts)
    (pre_distinct, pre_inverse), (_, oov_inverse) = group_ids(pre), group_ids(oov)
    inverse, segment = map(torch.from_numpy, batch_kernels._word_index(pre_off.numpy(), pre_inverse.numpy(), oov_off.numpy(),
                                                                       oov_inverse.numpy(), pre_distinct.shape[0]))
    assert torch.equal(inverse, torch.cat([pre_inverse, oov_inverse + pre_distinct.shape[0]]))
    assert torch.equal(segment, torch.cat([segment_index(pre_off, pre.shape[0]), segment_index(oov_off, oov.shape[0])]))


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
        batch.groups, batch.words = {}, ()
        assert torch.equal(trainer.model(batch), ahead)


@pytest.mark.parametrize(("encoder", "chars", "plan"), [
    ("masked_bag", 0, (("pretrained", "oov", "bigram"), True)),
    ("bag", 50, (("oov", "bigram", "char"), False)),
    ("masked_bag", 50, (("pretrained", "oov", "bigram", "char"), True)),
])
def test_the_one_call_data_thread_batch_equals_collate_then_prepare(tiny_config, monkeypatch, encoder, chars,
                                                                    plan) -> None:
    if not kernels.fused_kernels_enabled():
        pytest.skip("numba is not installed")
    cfg = load_config(tiny_config("run", model={"encoder": encoder},
                                  embeddings={"ngram_buckets": 64, "char_ngrams": chars}), ["--train.threads", "1"])
    trainer = Trainer(cfg, DistInfo(0, 0, 1, torch.device("cpu"), "none"))
    trainer.build()
    assert trainer.grouping_plan == plan

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.dtype == b.dtype and torch.equal(a, b)

    def check(fast: Batch, slow: Batch) -> None:
        for name in ("tables", "groups"):
            want, got = getattr(slow, name), getattr(fast, name)
            assert want.keys() == got.keys()
            for key in want:
                assert all(same(a, b) for a, b in zip(got[key], want[key], strict=True)), (name, key)
        assert len(fast.words) == len(slow.words) and all(same(a, b) for a, b in zip(fast.words, slow.words, strict=True))
        for name in ("labels", "lengths", "seq_lengths"):
            assert same(getattr(fast, name), getattr(slow, name)), name
        assert (fast.num_docs, fast.num_tokens) == (slow.num_docs, slow.num_tokens)

    def reference(rows: np.ndarray) -> Batch:
        """collate's numpy path, torch.unique per table and the word index by torch ops: none of the kernels the
        one-call batch runs (`batch_kernels`)."""
        with monkeypatch.context() as m:
            m.setattr(model_module, "group_ids_many",
                      lambda ids: [torch.unique(t, sorted=True, return_inverse=True) for t in ids])
            slow = collate(trainer.data.train, rows, trainer.data.vocab.num_pretrained, False)
            return trainer.model.prepare(slow)

    for step in range(3):
        rows, fast, _ = trainer._make_batch(step)
        check(fast, reference(rows))
    empty = np.array([], dtype=np.int64)
    check(batch_from_collated(collate_grouped(trainer.data.train, empty, trainer.data.vocab.num_pretrained, *plan)),
          reference(empty))


def test_no_one_call_batch_where_prepare_has_more_to_do(tiny_config) -> None:
    for model in ({"encoder": "lstm"}, {"wide": "words"}):
        cfg = load_config(tiny_config("run", model=model), ["--train.threads", "1"])
        trainer = Trainer(cfg, DistInfo(0, 0, 1, torch.device("cpu"), "none"))
        trainer.build()
        assert trainer.grouping_plan is None
        assert isinstance(trainer._batch_parts(0)[1], Batch)


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


def op_by_op_words(oov, mask, frozen, pre_ids, oov_ids, inverse, segment, num_docs):
    """The model's word sums before `masked_words`: three lookups, a concatenation, a product and `gather_pool`."""
    mask_rows = torch.cat([pre_ids, oov_ids + frozen.shape[0]])
    per_id = [torch.arange(t.numel()) for t in (pre_ids, oov_ids, mask_rows)]
    with torch.no_grad():
        pre = F.embedding_bag(pre_ids, frozen, per_id[0], mode="sum") if frozen.shape[0] else torch.zeros(0, 5)
    rows = torch.cat([pre, bag_sum(oov, oov_ids, per_id[1], (oov_ids, per_id[1]))])
    return gather_pool(rows * bag_sum(mask, mask_rows, per_id[2], (mask_rows, per_id[2])), inverse, segment, num_docs)


@pytest.mark.parametrize(("num_pre", "num_oov", "tokens", "docs"), [
    (40, 25, 300, 12), (40, 25, 0, 3), (0, 25, 50, 4), (40, 0, 50, 4), (1, 1, 1, 1), (30, 30, 0, 0),
])
def test_masked_words_equal_the_op_by_op_sums_and_gradients(num_pre, num_oov, tokens, docs) -> None:
    from trainer.bag_lookup import masked_words

    gen = torch.Generator().manual_seed(num_pre + tokens)
    frozen = torch.randn(num_pre, 5, generator=gen)
    oov0, mask0 = torch.randn(num_oov, 5, generator=gen), torch.rand(num_pre + num_oov, 5, generator=gen) + 0.5
    pre_tokens = torch.randint(0, max(num_pre, 1), (tokens // 2 if num_pre else 0,), generator=gen)
    oov_tokens = torch.randint(0, max(num_oov, 1), (tokens - pre_tokens.numel() if num_oov else 0,), generator=gen)
    (pre_ids, pre_inv), (oov_ids, oov_inv) = group_ids(pre_tokens), group_ids(oov_tokens)
    inverse = torch.cat([pre_inv, oov_inv + pre_ids.numel()])
    segment = torch.randint(0, max(docs, 1), (inverse.numel(),), generator=gen) if docs else inverse[:0]
    ours = [oov0.clone().requires_grad_(True), mask0.clone().requires_grad_(True)]
    ref = [oov0.clone().requires_grad_(True), mask0.clone().requires_grad_(True)]
    out = masked_words(*ours, frozen, pre_ids, oov_ids, inverse, segment, docs)
    want = op_by_op_words(*ref, frozen, pre_ids, oov_ids, inverse, segment, docs)
    assert out is not None and torch.equal(out, want)
    upstream = torch.randn(docs, 5, generator=gen)
    (out * upstream).sum().backward()
    (want * upstream).sum().backward()
    for a, b in zip(ours, ref, strict=True):
        assert a.grad.is_sparse and kernels.rows_are_distinct_sorted(a.grad)
        assert torch.equal(a.grad.to_dense(), b.grad.to_dense())  # same sums in the same order: bit for bit


def test_masked_words_refuse_a_backward_after_the_tables_changed() -> None:
    from trainer.bag_lookup import masked_words

    oov, mask = torch.randn(4, 3).requires_grad_(True), torch.ones(6, 3).requires_grad_(True)
    ids = torch.tensor([0, 1])
    out = masked_words(oov, mask, torch.randn(2, 3), ids, ids, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1]), 2)
    with torch.no_grad():
        mask.add_(1.0)  # an optimizer step between forward and backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    with pytest.raises(ValueError, match="inconsistent lookup"):  # an OOV id past the table: refused, not a crash
        masked_words(oov, mask, torch.randn(2, 3), ids, torch.tensor([0, 4]), torch.tensor([0, 1, 2, 3]),
                     torch.tensor([0, 0, 1, 1]), 2)


def test_the_fused_word_sums_train_the_same_model_as_the_op_by_op_path(tiny_config, monkeypatch) -> None:
    """Three training steps of a masked_bag model with and without `LocalTables.masked_words`: same tables."""
    from trainer.embeddings import LocalTables

    finals = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(LocalTables, "masked_words", lambda self, *args: None)
        cfg = load_config(tiny_config(f"run{fused}", model={"encoder": "masked_bag"},
                                      embeddings={"ngram_buckets": 64},
                                      # the autograd path (the fused table SGD would bypass masked_words)
                                      optim={"sparse": "sgd", "sparse_lr": 5.0, "fused_sgd": False}),
                          ["--train.threads", "1", "--train.max_steps", "3", "--checkpoint.enabled", "false"])
        trainer = Trainer(cfg, DistInfo(0, 0, 1, torch.device("cpu"), "none"))
        trainer.build()
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.fit()
        after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        assert not torch.equal(before["tables.bags.mask.weight"], after["tables.bags.mask.weight"])
        assert not torch.equal(before["tables.bags.oov.weight"], after["tables.bags.oov.weight"])
        finals.append(after)
    assert finals[0].keys() == finals[1].keys()
    for name in finals[0]:
        assert torch.equal(finals[0][name], finals[1][name]), name
