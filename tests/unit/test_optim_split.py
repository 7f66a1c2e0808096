"""OptimizerContainer: the parameter split and its coverage proof, the lr schedule, the unfreeze gate."""

import math

import numpy as np
import pytest
import torch

import trainer.optim as optim_mod
from trainer.batch import collate
from trainer.config import ConfigError, DataConfig, ModelConfig, OptimConfig
from trainer.embeddings import LocalTables, build_table_specs
from trainer.features import Featurizer
from trainer.model import TextClassifier
from trainer.optim import OptimizerContainer, clean_name, group_of, lr_multiplier
from trainer.vocab import Tokenizer, Vocabulary

VOCAB = Vocabulary(
    words=["the", "cat", "zork", "blip"],
    num_pretrained=2,
    pretrained_rows=np.array([0, 1]),
    counts=np.array([1, 1, 1, 1]),
    labels=["a", "b", "c"],
)


def make_model(encoder: str = "masked_bag", delta: bool = True, hidden: int = 4) -> TextClassifier:
    specs = build_table_specs(
        num_pretrained=2,
        num_oov=2,
        dim=3,
        ngram_buckets=0 if encoder == "lstm" else 7,
        char_buckets=5,
        masked=encoder == "masked_bag",
        pretrained_trainable=delta,
        init_std=0.5,
    )
    tables = LocalTables(specs, torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), seed=0)
    model = TextClassifier(tables, ModelConfig(encoder=encoder, hidden=hidden, lstm_hidden=4), 2, 3)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.dense.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def backward(model: TextClassifier, texts=("the cat zork", "blip the dog")) -> None:
    f = Featurizer(
        Tokenizer(DataConfig().token_pattern, True), VOCAB, 7 if model.encoder != "lstm" else 0, 5, 3, 3, 100
    )
    docs = f.encode(list(texts), ["a"] * len(texts))
    batch = collate(docs, np.arange(len(texts)), 2, model.encoder == "lstm")
    torch.nn.functional.cross_entropy(model(batch), torch.tensor([0, 1])).backward()


def container(
    model, cfg: OptimConfig | None = None, total: int = 100, unfreeze: int = -1
) -> OptimizerContainer:
    return OptimizerContainer(model, cfg or OptimConfig(), total, unfreeze, model.tables.frozen)


# ---------------------------------------------------------------- the split
@pytest.mark.parametrize("encoder", ["bag", "masked_bag", "lstm"])
def test_every_trainable_parameter_in_exactly_one_optimizer(encoder):
    model = make_model(encoder)
    c = container(model)
    where: dict[str, list[str]] = {}
    for group, opt in c.optimizers.items():
        for pg in opt.param_groups:
            for p in pg["params"]:
                where.setdefault(c.names[p], []).append(group)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(where) == names
    assert all(len(groups) == 1 for groups in where.values()), where
    for name, (group,) in where.items():
        if name == "tables.bags.pretrained_delta.weight":
            assert group == "pretrained"
        elif name.startswith("tables."):
            assert group == "sparse"
        else:
            assert group == "dense"
    assert set(c.group_names["sparse"]) >= {"tables.bags.oov.weight", "tables.bags.char.weight"}
    assert c.group_names["pretrained"] == ["tables.bags.pretrained_delta.weight"]
    assert type(c.optimizers["dense"]).__name__ == "AdamW"
    assert c.optimizers["sparse"].param_groups[0]["lr"] == OptimConfig().sparse_lr
    assert c.optimizers["pretrained"].param_groups[0]["lr"] == OptimConfig().pretrained_lr


def test_frozen_table_in_no_optimizer():
    model = make_model()
    c = container(model)
    ptr = model.tables.frozen.untyped_storage().data_ptr()
    for opt in c.optimizers.values():
        for pg in opt.param_groups:
            assert all(p.untyped_storage().data_ptr() != ptr for p in pg["params"])


def test_no_pretrained_optimizer_without_correction():
    c = container(make_model(delta=False))
    assert set(c.optimizers) == {"dense", "sparse"}


def test_linear_head_without_pretrained_still_has_dense_and_sparse():
    c = container(make_model("bag", delta=False, hidden=0))
    assert c.group_names["dense"] == ["dense.head.out.weight", "dense.head.out.bias"]


def test_requires_grad_false_parameters_are_skipped():
    model = make_model()
    model.dense.head.out.bias.requires_grad_(False)
    c = container(model)
    assert "dense.head.out.bias" not in c.group_names["dense"]


def test_names_are_independent_of_ddp_wrapping():
    assert clean_name("module.tables.bags.oov.weight") == "tables.bags.oov.weight"
    assert clean_name("dense.module.head.out.weight") == "dense.head.out.weight"
    assert group_of("tables.bags.pretrained_delta.weight") == "pretrained"
    assert group_of("tables.bags.mask.weight") == "sparse"
    assert group_of("dense.lstm.weight_ih_l0") == "dense"


def _params(groups) -> list:
    return [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]


def test_coverage_assertion_fires_for_a_parameter_left_out(monkeypatch):
    real = optim_mod.build_sparse_optimizer

    def drop_last(name, groups, lr, **kw):
        params = _params(groups)
        return real(name, params[:-1] if len(params) > 1 else params, lr, **kw)

    monkeypatch.setattr(optim_mod, "build_sparse_optimizer", drop_last)
    with pytest.raises(AssertionError, match="trainable parameters in no optimizer: .*tables.bags"):
        container(make_model())


def test_coverage_assertion_fires_for_a_duplicate(monkeypatch):
    real = optim_mod.build_sparse_optimizer
    seen: list = []

    def sloppy(name, groups, lr, **kw):
        params = _params(groups)
        out = real(name, params + seen, lr, **kw)  # the second call also grabs the first call's tables
        seen.extend(params)
        return out

    monkeypatch.setattr(optim_mod, "build_sparse_optimizer", sloppy)
    with pytest.raises(AssertionError, match="is in optimizers sparse and pretrained"):
        container(make_model())


def test_coverage_assertion_fires_when_an_optimizer_holds_the_frozen_table():
    model = make_model()
    with pytest.raises(AssertionError, match="holds the frozen pretrained table"):
        OptimizerContainer(model, OptimConfig(), 10, -1, model.tables.bags["oov"].weight.data)


def test_describe_lists_the_split():
    c = container(make_model())
    text = c.describe()
    assert text.startswith("optimizer split:")
    lines = text.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["dense", "sparse", "pretrained"]
    assert "AdamW" in lines[0] and "FastSparseAdam" in lines[1]
    for name in (
        "tables.bags.oov.weight",
        "tables.bags.mask.weight",
        "tables.bags.pretrained_delta.weight",
        "dense.head.out.weight",
    ):
        assert name in text
    oov_mask_bigram_char = 2 * 3 + 4 * 3 + 7 * 3 + 5 * 3
    assert f"params={oov_mask_bigram_char:,}" in lines[1]


# ---------------------------------------------------------------- schedule
def test_linear_schedule_warmup_then_decay_to_min():
    cfg = OptimConfig(warmup_steps=10, schedule="linear", min_lr_ratio=0.0)
    assert lr_multiplier(0, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(4, cfg, 110) == pytest.approx(0.5)
    assert lr_multiplier(9, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg, 110) == pytest.approx(0.5)
    assert lr_multiplier(110, cfg, 110) == pytest.approx(0.0)
    cfg = OptimConfig(warmup_steps=10, schedule="linear", min_lr_ratio=0.2)
    assert lr_multiplier(60, cfg, 110) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_multiplier(110, cfg, 110) == pytest.approx(0.2)
    assert lr_multiplier(500, cfg, 110) == pytest.approx(0.2)  # never below the floor
    values = [lr_multiplier(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_cosine_schedule():
    cfg = OptimConfig(warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg, 100) == pytest.approx(1.0)
    assert lr_multiplier(25, cfg, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_multiplier(50, cfg, 100) == pytest.approx(0.55)
    assert lr_multiplier(100, cfg, 100) == pytest.approx(0.1)


def test_constant_schedule_and_warmup_longer_than_run():
    cfg = OptimConfig(warmup_steps=4, schedule="constant")
    assert [lr_multiplier(s, cfg, 50) for s in (0, 3, 4, 49)] == pytest.approx([0.25, 1.0, 1.0, 1.0])
    cfg = OptimConfig(warmup_steps=20, schedule="linear")
    assert lr_multiplier(9, cfg, 10) == pytest.approx(0.5)  # a run shorter than its warm-up never decays
    assert lr_multiplier(25, cfg, 10) == 1.0


def test_set_lr_scales_every_optimizer():
    cfg = OptimConfig(warmup_steps=4, sparse_lr=0.2, dense_lr=0.02, pretrained_lr=0.002)
    c = container(make_model(), cfg, total=100, unfreeze=0)
    c.set_lr(1)
    assert c.lrs(1) == pytest.approx({"dense": 0.01, "sparse": 0.1, "pretrained": 0.001})
    c.set_lr(52)  # halfway through the decay
    assert c.lrs(52) == pytest.approx({"dense": 0.01, "sparse": 0.1, "pretrained": 0.001})


def test_logged_pretrained_lr_is_zero_until_the_unfreeze():
    """The pretrained correction's optimizer is not stepped before the unfreeze step: its logged rate is 0."""
    cfg = OptimConfig(warmup_steps=0, schedule="constant", pretrained_lr=0.002)
    c = container(make_model(), cfg, total=100, unfreeze=10)
    c.set_lr(9)
    assert c.lrs(9)["pretrained"] == 0.0 and c.lrs(9)["sparse"] > 0
    c.set_lr(10)
    assert c.lrs(10)["pretrained"] == pytest.approx(0.002)


# ---------------------------------------------------------------- stepping
def test_pretrained_optimizer_not_stepped_before_unfreeze():
    model = make_model()
    model.delta_active = True  # produce correction gradients from the start, to prove only the gate holds it
    c = container(model, OptimConfig(warmup_steps=0, pretrained_lr=0.1), unfreeze=3)
    c.init_state()
    delta = model.tables.bags["pretrained_delta"].weight
    oov = model.tables.bags["oov"].weight
    for step in range(3):
        assert not c.pretrained_active(step)
        oov_before = oov.detach().clone()
        c.zero_grad()
        backward(model)
        assert delta.grad is not None
        c.step(step)
        assert torch.equal(delta, torch.zeros_like(delta)), step
        assert not torch.equal(oov, oov_before)
    assert int(c.optimizers["pretrained"].state[delta]["step"]) == 0
    assert c.pretrained_active(3)
    c.zero_grad()
    backward(model)
    c.step(3)
    assert not torch.equal(delta, torch.zeros_like(delta))
    assert int(c.optimizers["pretrained"].state[delta]["step"]) == 1


def test_never_unfreeze():
    c = container(make_model(), unfreeze=-1)
    assert not any(c.pretrained_active(s) for s in (0, 10, 10**6))


def scaled_dense_grads(scale: float):
    """A model and its container after one backward, the dense gradients multiplied by `scale`."""
    model = make_model()
    c = container(model)
    c.zero_grad()
    backward(model)
    with torch.no_grad():
        for p in c.dense_params():
            p.grad.mul_(scale)
    return model, c


def test_clip_dense_leaves_sparse_gradients_alone():
    model, c = scaled_dense_grads(1000)
    sparse_before = model.tables.bags["oov"].weight.grad.coalesce().values().clone()
    norm = c.clip_dense(1.0)
    assert float(norm) > 1.0
    after = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in c.dense_params()])
    )
    assert float(after) == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(model.tables.bags["oov"].weight.grad.coalesce().values(), sparse_before)
    assert float(c.clip_dense(0.0)) == pytest.approx(1.0, rel=1e-4)  # 0 only measures


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1000.0])
def test_clip_dense_is_clip_grad_norm_bit_for_bit(scale):
    _, c = scaled_dense_grads(scale)
    grads = [p.grad.clone() for p in c.dense_params()]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in c.dense_params()]
    for copy, g in zip(copies, grads, strict=True):
        copy.grad = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(copies, 1.0, foreach=True)
    assert torch.equal(c.clip_dense(1.0), expected)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(c.dense_params(), copies, strict=True))


@pytest.mark.parametrize("sparse", ["sparse_adam", "sgd", "adagrad", "rowwise_adagrad"])
def test_state_tensors_named_by_group_and_parameter(sparse):
    model = make_model(delta=False)
    c = container(model, OptimConfig(sparse=sparse))
    c.init_state()
    keys = c.state_tensors()
    assert "dense/dense.head.out.weight/exp_avg" in keys
    assert "dense/dense.head.out.weight/step" in keys
    sparse_keys = {k for k in keys if k.startswith("sparse/")}
    if sparse == "sparse_adam":
        assert {
            "sparse/tables.bags.oov.weight/exp_avg",
            "sparse/tables.bags.oov.weight/exp_avg_sq",
            "sparse/tables.bags.oov.weight/step",
        } <= sparse_keys
    elif sparse in ("adagrad", "rowwise_adagrad"):
        assert "sparse/tables.bags.oov.weight/sum" in sparse_keys
    else:
        assert not sparse_keys  # plain SGD keeps no state
    # one optimizer step with real gradients keeps the same keys (the state was created up front)
    backward(model)
    c.step(0)
    assert set(c.state_tensors()) == set(keys)


@pytest.mark.parametrize("sparse", ["sparse_adam", "rowwise_adagrad"])
def test_sparse_weight_decay_sends_the_mask_towards_one(sparse):
    """The mask multiplies frozen rows, so "no information" is M = 1: it decays towards 1, every other table
    towards 0."""
    model = make_model("masked_bag")
    c = container(model, OptimConfig(sparse=sparse, sparse_weight_decay=0.1))
    centers = {
        id(p): pg["decay_to"] for pg in c.optimizers["sparse"].param_groups for p in pg["params"]
    }
    assert all(pg["weight_decay"] == 0.1 for pg in c.optimizers["sparse"].param_groups)
    bags = model.tables.bags
    assert centers[id(bags["mask"].weight)] == 1.0
    assert {centers[id(bags[n].weight)] for n in ("oov", "bigram", "char")} == {0.0}


def test_sparse_weight_decay_refused_for_optimizers_that_cannot_decay():
    with pytest.raises(ConfigError, match="optim.sparse_weight_decay"):
        OptimConfig(sparse="sgd", sparse_weight_decay=0.1)


def test_warns_when_sgd_would_leave_the_pretrained_correction_still(caplog):
    """The correction uses optim.sparse's type; with sgd at thousands the Adam-scale default lr does nothing."""
    with caplog.at_level("WARNING", logger="trainer.optim"):
        container(make_model(), OptimConfig(sparse="sgd", sparse_lr=3000), unfreeze=5)
    assert "optim.pretrained_lr = 0.001 with optim.sparse = sgd" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="trainer.optim"):
        container(make_model(), OptimConfig(sparse="sgd", sparse_lr=3000, pretrained_lr=30), unfreeze=5)
        container(make_model(), OptimConfig(sparse="sparse_adam", sparse_lr=0.02), unfreeze=5)
    assert "pretrained_lr" not in caplog.text


# ---------------------------------------------------------------- wide & deep (model.wide)
def make_wide_model(deep_chars: bool = False) -> TextClassifier:
    specs = build_table_specs(num_pretrained=2, num_oov=2, dim=3, ngram_buckets=7, char_buckets=5, masked=True,
                              pretrained_trainable=False, init_std=0.5, wide=("words", "bigrams", "chars"),
                              num_classes=3, deep_chars=deep_chars)
    tables = LocalTables(specs, torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), seed=0)
    model = TextClassifier(tables, ModelConfig(encoder="masked_bag", wide="words,bigrams,chars",
                                               deep_chars=deep_chars), 2, 3)
    g = torch.Generator().manual_seed(3)
    for bag in tables.bags.values():  # the wide tables start at zero: give them values to see
        with torch.no_grad():
            bag.weight.copy_(torch.randn(bag.weight.shape, generator=g))
    model.wide_idf = {name: torch.rand(tables.specs[name].num_rows, generator=g) + 0.5 for name in model.wide_tables}
    return model


def wide_batch(texts=("the cat zork the the", "blip the dog dog")):
    f = Featurizer(Tokenizer(DataConfig().token_pattern, True), VOCAB, 7, 5, 3, 3, 100)
    docs = f.encode(list(texts), ["a"] * len(texts))
    return docs, collate(docs, np.arange(len(texts)), 2, False)


def test_wide_tables_are_stepped_by_their_own_sgd():
    model = make_wide_model()
    c = container(model, OptimConfig(sparse="sparse_adam", wide_lr=300))
    wide = {c.names[p] for pg in c.optimizers["wide"].param_groups for p in pg["params"]}
    assert wide == {"tables.bags.wide_word.weight", "tables.bags.wide_bigram.weight", "tables.bags.wide_char.weight"}
    assert type(c.optimizers["wide"]).__name__ == "SparseSGD" and c.base_lr["wide"] == [300]
    assert "tables.bags.char.weight" not in c.names.values()  # deep_chars = false: no deep char table


def test_wide_logits_are_tfidf_weighted_rows_by_hand():
    """Each document's wide logits = sum over blocks (words with bigrams; chars) of the L2-normalised
    (1 + ln tf) x idf weights times the feature rows (sklearn's sublinear TF-IDF, normalised per block)."""
    model = make_wide_model()
    docs, batch = wide_batch()
    got = model.wide_logits(batch)
    rows = {n: model.tables.bags[n].weight.detach() for n in model.wide_tables}
    expected = torch.zeros(2, 3)
    for d in range(2):
        features = {
            "wide_word": [int(i) for i in docs.token_ids[docs.token_offsets[d]:docs.token_offsets[d + 1]] if i >= 0],
            "wide_bigram": docs.bigram_ids[docs.bigram_offsets[d]:docs.bigram_offsets[d + 1]].tolist(),
            "wide_char": docs.char_ids[docs.char_offsets[d]:docs.char_offsets[d + 1]].tolist(),
        }
        for block in (("wide_word", "wide_bigram"), ("wide_char",)):
            weights = {(n, f): (1 + math.log(features[n].count(f))) * float(model.wide_idf[n][f])
                       for n in block for f in set(features[n])}
            norm = math.sqrt(sum(w * w for w in weights.values()))
            for (n, f), w in weights.items():
                expected[d] += w / norm * rows[n][f]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the data thread's lookups (Batch.weighted) give the same logits, and the gradient reaches only the wide rows
    # of the batch's features, sparse
    prepared = model.prepare(wide_batch()[1])
    torch.testing.assert_close(model.wide_logits(prepared), got)
    model.wide_logits(prepared).sum().backward()
    grad = model.tables.bags["wide_bigram"].weight.grad
    assert grad.is_sparse and set(grad.coalesce().indices()[0].tolist()) == set(docs.bigram_ids.tolist())


@pytest.mark.parametrize("wide", ["words,bigrams,chars", "words", "bigrams,chars", "chars"])
def test_wide_lookups_numba_kernel_gives_the_torch_ops_bits(monkeypatch, wide):
    """On CPU the wide part's weighted lookups come from one numba call per block (`_wide_lookups_cpu`); the
    torch ops (what a GPU runs) must give the same features, offsets and weights bit for bit: repeated features,
    a document with no features, pretrained and OOV words in one table, a batch in a shuffled order."""
    from trainer import kernels

    if kernels.numba is None:
        pytest.skip("numba is not installed")
    families = tuple(wide.split(","))
    specs = build_table_specs(num_pretrained=2, num_oov=2, dim=3, ngram_buckets=7, char_buckets=5, masked=True,
                              pretrained_trainable=False, init_std=0.5, wide=families, num_classes=3, deep_chars=False)
    tables = LocalTables(specs, torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), seed=0)
    model = TextClassifier(tables, ModelConfig(encoder="masked_bag", wide=wide, deep_chars=False), 2, 3)
    g = torch.Generator().manual_seed(5)
    model.wide_idf = {name: torch.rand(tables.specs[name].num_rows, generator=g) * 3 for name in model.wide_tables}
    texts = ["the cat zork the the", "", "blip the dog dog dog cat zork zork", "the", "dog cat the blip zork"] * 3
    f = Featurizer(Tokenizer(DataConfig().token_pattern, True), VOCAB, 7, 5, 2, 4, 100)
    docs = f.encode(texts, ["a"] * len(texts))
    rows = np.random.default_rng(0).permutation(len(texts))
    fast = model.wide_lookups(collate(docs, rows, 2, False))
    monkeypatch.setattr(kernels, "numba", None)
    reference = model.wide_lookups(collate(docs, rows, 2, False))
    assert fast.keys() == reference.keys() == set(model.wide_tables)
    for name in reference:
        for got, want in zip(fast[name], reference[name], strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want), name


def test_deep_part_without_chars_pools_over_words_and_bigrams_only():
    """deep_chars = false: the char ids of the batch feed the wide part; the mean of the deep part must not count
    them (it would shrink every document vector by its char n-gram count)."""
    model = make_wide_model(deep_chars=False)
    docs, batch = wide_batch()
    x = model.embed(batch)
    words = torch.tensor([(docs.token_ids[docs.token_offsets[d]:docs.token_offsets[d + 1]] >= 0).sum()
                          for d in range(2)], dtype=torch.float32)
    bigrams = torch.tensor(np.diff(docs.bigram_offsets), dtype=torch.float32)
    model.pooling = "sum"
    summed = model.embed(batch)
    torch.testing.assert_close(x, summed / (words + bigrams).unsqueeze(1))


def test_wide_idf_is_sklearns_smoothed_idf_with_min_df_2():
    from trainer.batch import wide_idf

    texts = ["the cat the", "the dog", "cat zork", "blip"]
    docs = Featurizer(Tokenizer(DataConfig().token_pattern, True), VOCAB, 7, 5, 3, 3, 100).encode(texts, ["a"] * 4)
    idf = wide_idf(docs, {"wide_word": 4, "wide_bigram": 7, "oov": 2})
    assert set(idf) == {"wide_word", "wide_bigram"}
    for word in range(4):
        df = sum(word in docs.token_ids[docs.token_offsets[d]:docs.token_offsets[d + 1]] for d in range(4))
        expected = math.log(5 / (1 + df)) + 1 if df >= 2 else 0.0
        assert float(idf["wide_word"][word]) == pytest.approx(expected, rel=1e-6), (VOCAB.words[word], df)
    assert (idf["wide_word"] > 0).sum() >= 1  # "the" and "cat" occur in two documents each


def test_auto_sharding_and_gradient_sync_consider_only_what_they_act_on():
    """`auto` shards when the tables row_wise would split exceed the threshold: the wide tables, whole on every rank
    under row_wise too, do not count. The sparse-gradient sync runs only with more than one rank."""
    from trainer.config import DistConfig
    from trainer.distributed import DistInfo
    from trainer.sharding import needs_sparse_grad_sync, resolve_sharding

    specs = build_table_specs(num_pretrained=10, num_oov=10, dim=4, ngram_buckets=1000, char_buckets=1000,
                              masked=False, pretrained_trainable=False, init_std=0.1,
                              wide=("words", "bigrams", "chars"), num_classes=40)
    split_bytes = sum(s.num_bytes for s in specs if not s.name.startswith("wide_"))
    assert sum(s.num_bytes for s in specs) > 10 * split_bytes  # the wide tables dominate
    two = DistInfo(0, 0, 2, torch.device("cpu"), "gloo")
    assert resolve_sharding(DistConfig(auto_shard_bytes=split_bytes), specs, two) == "replicated"
    assert resolve_sharding(DistConfig(auto_shard_bytes=split_bytes - 1), specs, two) == "row_wise"
    tables = LocalTables(specs, torch.zeros(10, 4), seed=0)
    assert len(tables.replicated_weights()) == len(tables.bags) == 6  # oov, bigram, char and the 3 wide
    assert needs_sparse_grad_sync(tables, two)
    assert not needs_sparse_grad_sync(tables, DistInfo(0, 0, 1, torch.device("cpu"), "gloo"))


@pytest.mark.parametrize("use_kernel", [True, False])
def test_document_frequency_counts_each_document_once(use_kernel, monkeypatch):
    """The numba pass and the numpy sort it replaced (kept for machines without numba) agree with a plain count:
    repeats inside a document count once, negative ids (unknown words) and empty documents count nothing."""
    from trainer import features

    if use_kernel and features.jit.numba is None:
        pytest.skip("numba not installed")
    if not use_kernel:
        monkeypatch.setattr(features.jit, "numba", None)
    rng = np.random.default_rng(3)
    ids = rng.integers(-1, 40, 3000)
    offsets = np.sort(np.concatenate(([0, 3000, 3000, 0], rng.integers(0, 3001, 60))))  # empty documents too
    df = features.document_frequency(ids, offsets, 40)
    expected = np.zeros(40, dtype=np.int64)
    for d in range(len(offsets) - 1):
        for i in set(ids[offsets[d]:offsets[d + 1]].tolist()) - {-1}:
            expected[i] += 1
    assert np.array_equal(df, expected)
    assert np.array_equal(features.document_frequency(ids[:0], np.zeros(1, dtype=np.int64), 40), np.zeros(40))
