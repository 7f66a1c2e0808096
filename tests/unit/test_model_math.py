"""The model's arithmetic against hand computations: bag pooling, masked bag, the pretrained correction, the
LSTM over packed sequences, and which tensors get (sparse) gradients."""

import numpy as np
import pytest
import torch

from trainer.batch import collate
from trainer.config import DataConfig, ModelConfig
from trainer.embeddings import LocalTables, build_table_specs, init_rows_, segment_counts, segment_index
from trainer.features import Featurizer
from trainer.model import TextClassifier
from trainer.vocab import Tokenizer, Vocabulary, char_ngram_buckets

D = 3
# ids: the=0 cat=1 (pretrained, frozen) | zork=2 blip=3 (OOV); "dog" is unknown
VOCAB = Vocabulary(
    words=["the", "cat", "zork", "blip"],
    num_pretrained=2,
    pretrained_rows=np.array([0, 1]),
    counts=np.array([1, 1, 1, 1]),
    labels=["a", "b", "c"],
)
FROZEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
OOV_ROWS = torch.tensor([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
E = torch.cat([FROZEN, OOV_ROWS])  # rows by global word id


def make_model(
    encoder: str = "bag",
    pooling: str = "mean",
    ngram: int = 0,
    char: int = 0,
    delta: bool = False,
    frozen: torch.Tensor = FROZEN,
    combine: str = "sum",
) -> TextClassifier:
    specs = build_table_specs(
        num_pretrained=2,
        num_oov=2,
        dim=D,
        ngram_buckets=ngram,
        char_buckets=char,
        masked=encoder == "masked_bag",
        pretrained_trainable=delta,
        init_std=0.5,
    )
    tables = LocalTables(specs, frozen.clone(), seed=0)
    with torch.no_grad():
        tables.bags["oov"].weight.copy_(OOV_ROWS)
        for name in ("bigram", "char"):
            if name in tables.bags:
                n = tables.bags[name].weight.shape[0]
                tables.bags[name].weight.copy_(torch.arange(n * D, dtype=torch.float32).view(n, D) / 7)
    cfg = ModelConfig(encoder=encoder, pooling=pooling, lstm_hidden=4, combine=combine)
    return TextClassifier(tables, cfg, 2, 3)


def batch_for(texts: list[str], ngram: int = 0, char: int = 0, token_level: bool = False):
    f = Featurizer(Tokenizer(DataConfig().token_pattern, True), VOCAB, ngram, char, 3, 3, 1000)
    docs = f.encode(texts, ["a"] * len(texts))
    return docs, collate(docs, np.arange(len(texts)), VOCAB.num_pretrained, token_level)


def randomize_head(model: TextClassifier) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.dense.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- bag
def pool(v: torch.Tensor, n: int, pooling: str) -> torch.Tensor:
    return {"mean": v / max(n, 1), "sqrt": v / max(n, 1) ** 0.5, "sum": v}[pooling]


@pytest.mark.parametrize("pooling", ["sum", "mean", "sqrt"])
def test_bag_document_vectors_by_hand(pooling):
    buckets = 5
    model = make_model(pooling=pooling, ngram=buckets)
    texts = ["the cat zork", "dog blip", "", "the the"]
    docs, batch = batch_for(texts, ngram=buckets)
    bigram_w = model.tables.bags["bigram"].weight.detach()
    expected = []
    for d in range(len(texts)):
        words = docs.token_ids[docs.token_offsets[d] : docs.token_offsets[d + 1]]
        bigrams = docs.bigram_ids[docs.bigram_offsets[d] : docs.bigram_offsets[d + 1]]
        v = E[words].sum(0) + bigram_w[bigrams].sum(0)
        n = len(words) + len(bigrams)
        expected.append(pool(v, n, pooling))
    expected = torch.stack(expected)
    # spot-check one row fully by hand: "dog blip" = blip + bigram(dog, blip)
    assert torch.allclose(
        expected[1] * {"mean": 2, "sqrt": 2**0.5, "sum": 1}[pooling], OOV_ROWS[1] + bigram_w[docs.bigram_ids[2]]
    )
    got = model.embed(batch)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(got[2], torch.zeros(D))  # the empty document
    assert model(batch).shape == (4, 3)


@pytest.mark.parametrize("encoder", ["bag", "masked_bag"])
@pytest.mark.parametrize("pooling", ["mean", "sqrt"])
def test_concat_pools_each_family_over_its_own_count(encoder, pooling):
    model = make_model(encoder=encoder, pooling=pooling, ngram=5, char=4, combine="concat")
    texts = ["the cat zork", "dog blip", ""]
    docs, batch = batch_for(texts, ngram=5, char=4)
    got = model.embed(batch)
    assert got.shape == (3, 3 * D) and model(batch).shape == (3, 3)
    tables = model.tables.bags
    for d in range(len(texts)):
        words = docs.token_ids[docs.token_offsets[d] : docs.token_offsets[d + 1]]
        words = words[words >= 0]
        parts = [(E[words].sum(0), len(words))]  # the mask starts at 1: masked_bag equals bag here
        for name, ids, offs in (("bigram", docs.bigram_ids, docs.bigram_offsets), ("char", docs.char_ids,
                                                                                   docs.char_offsets)):
            rows = ids[offs[d] : offs[d + 1]]
            parts.append((tables[name].weight.detach()[rows].sum(0), len(rows)))
        expected = torch.cat([pool(v, n, pooling) for v, n in parts])
        assert torch.allclose(got[d], expected, atol=1e-4), d


def test_bag_with_char_ngrams_by_hand():
    buckets = 11
    model = make_model(pooling="mean", char=buckets)
    _, batch = batch_for(["the dog"], char=buckets)
    c = model.tables.bags["char"].weight.detach()
    grams = np.concatenate([char_ngram_buckets(w, 3, 3, buckets) for w in ("the", "dog")])
    expected = (E[0] + c[grams].sum(0)) / (1 + len(grams))
    assert torch.allclose(model.embed(batch)[0], expected, atol=1e-5)


# ---------------------------------------------------------------- masked bag
def masked_expected(model: TextClassifier, docs, pooling: str) -> torch.Tensor:
    mask = model.tables.bags["mask"].weight.detach()
    out = []
    for d in range(len(docs)):
        words = docs.token_ids[docs.token_offsets[d] : docs.token_offsets[d + 1]]
        v = (E[words] * mask[words]).sum(0)
        out.append(v / max(len(words), 1) if pooling == "mean" else v)
    return torch.stack(out)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_masked_bag_by_hand(pooling):
    model = make_model(encoder="masked_bag", pooling=pooling)
    texts = ["the cat zork", "blip dog", "", "zork zork the"]
    docs, batch = batch_for(texts)
    # starts at M = 1: same as the plain bag
    assert torch.allclose(model.embed(batch), masked_expected(model, docs, pooling), atol=1e-5)
    assert torch.allclose(model.embed(batch), make_model(pooling=pooling).embed(batch), atol=1e-5)
    with torch.no_grad():
        model.tables.bags["mask"].weight.copy_(
            torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, 3.0], [1.5, 0.25, -2.0], [-0.5, 0.0, 1.0]])
        )
    got = model.embed(batch)
    assert torch.allclose(got, masked_expected(model, docs, pooling), atol=1e-5)
    # row 0 written out: the*M0 + cat*M1 + zork*M2
    by_hand = torch.tensor(
        [1 * 0.5 + 4 * 0 + 10 * 1.5, 2 * -1.0 + 5 * 1 + 20 * 0.25, 3 * 2 + 6 * 3 + 30 * -2.0]
    )
    assert torch.allclose(got[0] * (3 if pooling == "mean" else 1), by_hand, atol=1e-5)


def test_masked_bag_gradients_reach_mask_and_oov_sparsely():
    model = make_model(encoder="masked_bag")
    randomize_head(model)
    _, batch = batch_for(["the cat zork", "blip"])
    model(batch).sum().backward()
    mask_grad = model.tables.bags["mask"].weight.grad
    assert mask_grad.is_sparse
    assert set(mask_grad.coalesce().indices()[0].tolist()) == {0, 1, 2, 3}
    assert set(model.tables.bags["oov"].weight.grad.coalesce().indices()[0].tolist()) == {0, 1}


# ---------------------------------------------------------------- pretrained correction
@pytest.mark.parametrize("encoder", ["bag", "masked_bag"])
def test_pretrained_delta_only_when_active(encoder):
    model = make_model(encoder=encoder, pooling="sum", delta=True)
    delta = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 1000.0]])
    with torch.no_grad():
        model.tables.bags["pretrained_delta"].weight.copy_(delta)
    _, batch = batch_for(["the cat zork"])
    plain = (FROZEN[0] + FROZEN[1] + OOV_ROWS[0]).unsqueeze(0)
    model.delta_active = False
    assert torch.allclose(model.embed(batch), plain)
    randomize_head(model)
    model(batch).sum().backward()
    g = model.tables.bags["pretrained_delta"].weight.grad
    assert g is None or g.coalesce().values().abs().sum() == 0  # inactive: no update signal
    model.zero_grad(set_to_none=True)
    model.delta_active = True
    assert torch.allclose(model.embed(batch), plain + delta.sum(0))
    model(batch).sum().backward()
    g = model.tables.bags["pretrained_delta"].weight.grad
    assert g.is_sparse and set(g.coalesce().indices()[0].tolist()) == {0, 1}


def test_delta_table_starts_at_zero():
    model = make_model(delta=True)
    assert torch.equal(model.tables.bags["pretrained_delta"].weight, torch.zeros(2, D))


# ---------------------------------------------------------------- lstm
def test_lstm_token_vectors_by_hand():
    buckets = 13
    model = make_model(encoder="lstm", char=buckets)
    _, batch = batch_for(["the dog zork"], char=buckets, token_level=True)
    c = model.tables.bags["char"].weight.detach()
    rows = []
    for word, row in (("the", E[0]), ("dog", None), ("zork", E[2])):
        grams = char_ngram_buckets(word, 3, 3, buckets)
        total = c[grams].sum(0) + (row if row is not None else 0)
        rows.append(total / (len(grams) + (row is not None)))
    assert torch.allclose(model.embed(batch), torch.stack(rows), atol=1e-5)


def test_lstm_packed_forward_with_empty_document_matches_documents_alone():
    model = make_model(encoder="lstm", char=17)
    randomize_head(model)
    model.eval()
    texts = ["the cat zork", "", "blip dog the cat the", "cat"]
    _, batch = batch_for(texts, char=17, token_level=True)
    logits = model(batch)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    for i, text in enumerate(texts):
        _, alone = batch_for([text], char=17, token_level=True)
        assert torch.allclose(model(alone)[0], logits[i], atol=1e-5), text
    # the empty document is one zero token
    zero_token = model.dense.lstm(torch.zeros(1, 1, D))[1][0]
    assert torch.allclose(
        logits[1], model.dense.head(torch.cat([zero_token[-2], zero_token[-1]], 1))[0], atol=1e-5
    )


def test_lstm_backward_reaches_tables_sparsely():
    model = make_model(encoder="lstm", char=17)
    _, batch = batch_for(["the cat zork", "", "blip"], char=17, token_level=True)
    model(batch).sum().backward()
    for name in ("oov", "char"):
        assert model.tables.bags[name].weight.grad.is_sparse
    assert model.dense.lstm.weight_ih_l0.grad is not None


# ---------------------------------------------------------------- gradients and the frozen table
@pytest.mark.parametrize("encoder", ["bag", "masked_bag", "lstm"])
def test_frozen_table_is_no_parameter_buffer_or_state_and_gets_no_gradient(encoder):
    ngram = 0 if encoder == "lstm" else 7
    model = make_model(encoder=encoder, ngram=ngram, char=5, delta=True)
    model.delta_active = True
    randomize_head(model)
    frozen = model.tables.frozen
    ptr = frozen.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() != ptr for p in model.parameters())
    assert all(b.untyped_storage().data_ptr() != ptr for b in model.buffers())
    assert not any("frozen" in k or k.startswith("tables.pretrained.") for k in model.state_dict())
    assert not frozen.requires_grad
    before = frozen.clone()
    _, batch = batch_for(["the cat zork dog", "blip the"], ngram=ngram, char=5, token_level=encoder == "lstm")
    model(batch).sum().backward()
    assert frozen.grad is None
    assert torch.equal(frozen, before)
    for name, bag in model.tables.bags.items():
        assert bag.weight.grad is not None and bag.weight.grad.is_sparse, name
    for name, p in model.dense.named_parameters():
        assert p.grad is not None and not p.grad.is_sparse, name


def test_trainable_tables_are_sparse_embedding_bags():
    model = make_model(encoder="masked_bag", ngram=7, char=5, delta=True)
    assert set(model.tables.bags) == {"oov", "pretrained_delta", "mask", "bigram", "char"}
    for bag in model.tables.bags.values():
        assert bag.sparse and bag.mode == "sum"


def test_output_layer_starts_at_zero():
    model = make_model()
    _, batch = batch_for(["the cat"])
    assert torch.equal(model(batch), torch.zeros(1, 3))


def test_init_rows_matches_per_block_randn_at_any_thread_count():
    """The in-place, threaded draw gives the rows the per-block `randn() * std` recipe gives (the recipe checkpoints
    and row-wise shards were made with), whole blocks and partial edge blocks alike, at 1 and 2 threads."""
    spec = build_table_specs(num_pretrained=0, num_oov=200_000, dim=3, ngram_buckets=0, char_buckets=0,
                             masked=False, pretrained_trainable=False, init_std=0.3)[1]
    seed, block, start, rows = 7, 65536, 60_000, 140_000  # a partial first block, two whole ones, a partial last
    salt = sum(ord(c) * 131**i for i, c in enumerate(spec.name)) % (1 << 31)
    expected = torch.empty(rows, 3)
    for b in range(start // block, (start + rows - 1) // block + 1):
        g = torch.Generator().manual_seed((seed * 1_000_003 + salt * 7919 + b) % (1 << 63))
        values = torch.randn(block, 3, generator=g) * 0.3
        lo, hi = max(b * block, start), min((b + 1) * block, start + rows)
        expected[lo - start : hi - start] = values[lo - b * block : hi - b * block]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = torch.full((rows, 3), float("nan"))
            init_rows_(got, spec, torch.Generator().manual_seed(seed), row_start=start)
            assert torch.equal(got, expected), threads
            # a Parameter, as row_wise.py passes: the pool's threads write its rows without grad mode errors
            param = torch.nn.Parameter(torch.full((rows, 3), float("nan")))
            init_rows_(param, spec, torch.Generator().manual_seed(seed), row_start=start)
            assert torch.equal(param.detach(), expected) and param.requires_grad, threads
    finally:
        torch.set_num_threads(before)


def test_init_rows_independent_of_sharding():
    """A row's initial value does not depend on which slice of the table is initialised."""
    spec = build_table_specs(
        num_pretrained=0,
        num_oov=70000,
        dim=2,
        ngram_buckets=0,
        char_buckets=0,
        masked=False,
        pretrained_trainable=False,
        init_std=0.3,
    )[1]
    g = torch.Generator().manual_seed(5)
    whole = torch.empty(70000, 2)
    init_rows_(whole, spec, g)
    part = torch.empty(1000, 2)
    init_rows_(part, spec, g, row_start=65000)
    assert torch.equal(part, whole[65000:66000])
    assert whole.std().item() == pytest.approx(0.3, rel=0.05)


def test_segment_index():
    offsets = torch.tensor([0, 2, 2, 5])
    assert segment_index(offsets, 6).tolist() == [0, 0, 2, 2, 2, 3]


@pytest.mark.parametrize(("segments", "num_ids"), [(0, 0), (1, 0), (3, 0), (1, 7), (256, 16000)])
def test_segment_index_on_the_cpu_equals_repeat_interleave(segments, num_ids):
    """The CPU path (numpy's repeat) against torch's repeat_interleave, which the other devices use; empty
    segments, empty batches and trailing empty segments included."""
    gen = torch.Generator().manual_seed(segments + num_ids)
    cuts = torch.sort(torch.randint(0, num_ids + 1, (max(segments - 1, 0),), generator=gen)).values
    offsets = torch.cat([torch.zeros(min(segments, 1), dtype=torch.long), cuts])
    want = torch.repeat_interleave(torch.arange(segments), segment_counts(offsets, num_ids), output_size=num_ids)
    got = segment_index(offsets, num_ids)
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_bf16_autocast_is_for_training_steps_only(monkeypatch):
    """train.bf16 runs the dense part of training steps under autocast; evaluation stays float32, as the exported
    model runs, so a run's valid / test figures are the ones `trainer eval` gives its model. (On the CPU the
    autocast region is observed, not executed: it is CUDA-only.)"""
    import contextlib

    import trainer.model as model_module

    entered = []
    monkeypatch.setattr(model_module.torch, "autocast",
                        lambda *a, **k: entered.append((a, k)) or contextlib.nullcontext())
    model = make_model("bag")
    model.dense_autocast = True
    _, batch = batch_for(["alpha beta", "zz"])
    model.eval()
    model(batch)
    assert entered == []
    model.train()
    model(batch)
    assert entered == [(("cuda",), {"dtype": torch.bfloat16})]
