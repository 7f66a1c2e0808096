"""The fused table SGD (trainer/fused_sgd.py) trains the same weights as the autograd path, bit for bit, and runs
only where it applies."""

import csv

import numpy as np
import pytest
import torch

from trainer.config import load_config
from trainer.distributed import DistInfo
from trainer.fused_sgd import why_not
from trainer.trainer import Trainer

CPU = DistInfo(0, 0, 1, torch.device("cpu"), "none")

CASES = {
    "masked_bag_bigrams_mean": {"model": {"encoder": "masked_bag"}, "embeddings": {"ngram_buckets": 64}},
    "masked_bag_sqrt": {"model": {"encoder": "masked_bag", "pooling": "sqrt"}},
    "masked_bag_chars_sum": {"model": {"encoder": "masked_bag", "pooling": "sum"},
                             "embeddings": {"ngram_buckets": 64, "char_ngrams": 128}},
    "bag_bigrams_chars": {"model": {"encoder": "bag"}, "embeddings": {"ngram_buckets": 64, "char_ngrams": 128}},
    "bag_unigrams": {"model": {"encoder": "bag"}},
    "bag_no_pretrained": {"model": {"encoder": "bag"}, "embeddings": {"pretrained": "", "dim": 8,
                                                                      "ngram_buckets": 64}},
    "masked_bag_no_pretrained": {"model": {"encoder": "masked_bag"}, "embeddings": {"pretrained": "", "dim": 8}},
    "masked_bag_token_budget_weighted": {"model": {"encoder": "masked_bag", "dropout": 0.2},
                                         "embeddings": {"ngram_buckets": 64},
                                         "train": {"tokens_per_batch": 300, "class_weights": "inverse_log"}},
    # wide & deep: the wide tables' SGD (optim.wide_lr) fused too
    "wide_words_bigrams_chars": {"model": {"encoder": "masked_bag", "wide": "words,bigrams,chars", "deep_chars": False},
                                 "embeddings": {"ngram_buckets": 64, "char_ngrams": 128}, "optim": {"wide_lr": 30.0}},
    "wide_chars_deep_chars": {"model": {"encoder": "bag", "wide": "chars", "pooling": "sum"},
                              "embeddings": {"ngram_buckets": 64, "char_ngrams": 128}, "optim": {"wide_lr": 30.0}},
}


def _add_odd_documents(path) -> None:
    """Documents with no token at all (punctuation), only OOV words, one word, and a long repeat, so that batches
    hold empty bags, words repeated within and across documents, and documents without pretrained words."""
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        for i in range(12):
            w.writerow(["!!! ??? ...", "food"])
            w.writerow(["zorbleball goalzz zorbleball", "sports"])
            w.writerow(["kernel", "tech"])
            w.writerow([" ".join(["pasta cheese"] * (20 + i)), "food"])


def _train(tiny_config, name: str, case: dict, fused: bool, threads: int, steps: int = 8) -> Trainer:
    sections = {k: dict(v) for k, v in case.items()}
    sections.setdefault("optim", {}).update({"sparse": "sgd", "sparse_lr": 20.0, "fused_sgd": fused})
    sections["embeddings"] = {"min_freq": 1, **sections.get("embeddings", {})}
    cfg = load_config(tiny_config(f"{name}-{fused}", **sections),
                      ["--train.threads", str(threads), "--train.max_steps", str(steps), "--checkpoint.enabled", "false",
                       "--metrics.tensorboard", "false", "--metrics.projector_words", "0"])
    trainer = Trainer(cfg, CPU)
    trainer.result = trainer.fit()
    return trainer


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_fused_update_trains_the_same_weights_bit_for_bit(tiny_config, tiny_data, case, threads) -> None:
    _add_odd_documents(tiny_data["train"])
    runs = {fused: _train(tiny_config, case, CASES[case], fused, threads) for fused in (True, False)}
    assert runs[True].model.fused_sgd is not None and runs[False].model.fused_sgd is None
    weights = {fused: dict(t.model.named_parameters()) for fused, t in runs.items()}
    assert weights[True].keys() == weights[False].keys()
    for name, p in weights[True].items():
        assert torch.equal(p, weights[False][name]), name
        if name.startswith("tables."):
            assert p.grad is None, f"{name}: the fused path made a table gradient"
    assert runs[True].result["test"] == runs[False].result["test"]
    assert runs[True].result["valid"] == runs[False].result["valid"]


def test_the_tables_move_and_the_plan_says_fused(tiny_config) -> None:
    case = CASES["masked_bag_bigrams_mean"]
    path = tiny_config("moves", optim={"sparse": "sgd", "sparse_lr": 20.0}, **case)
    overrides = ["--train.threads", "1", "--train.max_steps", "3", "--checkpoint.enabled", "false",
                 "--metrics.tensorboard", "false", "--metrics.projector_words", "0"]
    fresh = Trainer(load_config(path, overrides), CPU)
    fresh.build()
    before = {n: p.detach().clone() for n, p in fresh.model.tables.named_parameters()}
    trainer = Trainer(load_config(path, overrides), CPU)
    trainer.fit()
    after = dict(trainer.model.tables.named_parameters())
    for name in ("bags.mask.weight", "bags.oov.weight", "bags.bigram.weight"):
        assert not torch.equal(before[name], after[name]), name
    assert "fused with the lookups' backward" in trainer.optim.describe()
    assert not trainer.optim._fused.pending, "an applied gradient was kept"


@pytest.mark.parametrize(("sections", "reason"), [
    ({"optim": {"sparse": "sparse_adam"}}, "optim.sparse = sparse_adam"),
    ({"optim": {"sparse": "sgd", "fused_sgd": False}}, "optim.fused_sgd = false"),
    ({"optim": {"sparse": "sgd"}, "model": {"encoder": "lstm"}}, "model.encoder = lstm"),
    ({"optim": {"sparse": "sgd"}, "model": {"combine": "concat"}, "embeddings": {"ngram_buckets": 64}},
     "model.combine = concat"),
    ({"optim": {"sparse": "sgd"}, "embeddings": {"freeze_pretrained": False}}, "pretrained correction"),
    ({"optim": {"sparse": "sgd"}, "embeddings": {"unfreeze_after_steps": 2}}, "pretrained correction"),
])
def test_where_the_fused_update_does_not_apply(tiny_config, sections, reason) -> None:
    cfg = load_config(tiny_config("why", **sections), ["--train.threads", "1"])
    trainer = Trainer(cfg, CPU)
    trainer.build()
    found = why_not(cfg, CPU, trainer.model.tables, cfg.model)
    assert found is not None and reason in found, found
    assert trainer.model.fused_sgd is None
    assert "fused" not in trainer.optim.describe()


def test_the_run_says_why_sgd_is_not_fused(tiny_config, caplog) -> None:
    cfg = load_config(tiny_config("why3", optim={"sparse": "sgd"}, model={"combine": "concat"}),
                      ["--train.threads", "1", "--train.max_steps", "1", "--checkpoint.enabled", "false",
                       "--metrics.tensorboard", "false", "--metrics.projector_words", "0"])
    with caplog.at_level("INFO", logger="trainer"):
        Trainer(cfg, CPU).fit()
    assert "optim.fused_sgd: the tables' sgd runs through autograd here (model.encoder = " in caplog.text
    assert "model.combine = concat)" in caplog.text


def test_the_wide_tables_are_fused_and_the_plan_says_so(tiny_config) -> None:
    """model.wide with sgd: the wide tables' update is fused as well (their own optimizer, SparseSGD at wide_lr,
    stays theirs), and a step moves them without a gradient."""
    cfg = load_config(tiny_config("wide-fused", optim={"sparse": "sgd", "wide_lr": 30.0},
                                  model={"wide": "words,bigrams", "encoder": "masked_bag"},
                                  embeddings={"ngram_buckets": 64}),
                      ["--train.threads", "1", "--train.max_steps", "2", "--checkpoint.enabled", "false",
                       "--metrics.tensorboard", "false", "--metrics.projector_words", "0"])
    trainer = Trainer(cfg, CPU)
    trainer.build()
    assert trainer.model.fused_sgd is not None and trainer.model.fused_sgd.wide == ["wide_word", "wide_bigram"]
    described = trainer.optim.describe()
    assert all("fused" in line for line in described.splitlines() if line.strip().startswith(("sparse", "wide")))
    before = {n: trainer.model.tables.bags[n].weight.detach().clone() for n in ("wide_word", "wide_bigram")}
    trainer.fit()
    for name, old in before.items():
        weight = trainer.model.tables.bags[name].weight
        assert weight.grad is None and not torch.equal(weight.detach(), old), name


def test_not_under_several_processes_or_without_the_kernels(tiny_config, monkeypatch) -> None:
    cfg = load_config(tiny_config("why2", optim={"sparse": "sgd"}), ["--train.threads", "1"])
    trainer = Trainer(cfg, CPU)
    trainer.build()
    assert trainer.model.fused_sgd is not None
    assert why_not(cfg, CPU, trainer.model.tables, cfg.model) is None
    two = DistInfo(0, 0, 2, torch.device("cpu"), "gloo")
    assert "more than one process" in why_not(cfg, two, trainer.model.tables, cfg.model)
    monkeypatch.setenv("TRAINER_FUSED_KERNELS", "0")
    assert "kernels are off" in why_not(cfg, CPU, trainer.model.tables, cfg.model)


def test_zero_grad_drops_a_kept_gradient_and_bad_ids_are_refused(tiny_config) -> None:
    """As with the autograd path, zero_grad between a backward and the step discards the tables' gradient; ids past
    a table are refused before any kernel reads them."""
    from trainer.batch import collate

    cfg = load_config(tiny_config("zg", optim={"sparse": "sgd", "sparse_lr": 20.0}, **CASES["masked_bag_bigrams_mean"]),
                      ["--train.threads", "1"])
    trainer = Trainer(cfg, CPU)
    trainer.build()
    trainer.optim.init_state()
    torch.nn.init.normal_(trainer.model.dense.head.out.weight)  # at its zero start no gradient reaches the tables
    _, batch, _ = trainer._make_batch(0)
    before = {n: p.detach().clone() for n, p in trainer.model.tables.named_parameters()}
    loss, *_ = trainer._loss(trainer.train_model(batch), batch, np.arange(batch.num_docs))
    loss.backward()
    assert trainer.optim._fused.pending
    trainer.optim.zero_grad()
    trainer.optim.step(0)
    for name, p in trainer.model.tables.named_parameters():
        assert torch.equal(p, before[name]), f"{name}: a discarded gradient was applied"
    bad = collate(trainer.data.train, np.arange(4), trainer.data.vocab.num_pretrained, False)
    trainer.model.prepare(bad)
    ids, offsets = bad.tables["bigram"]
    distinct, inverse = bad.groups["bigram"]
    bad.groups["bigram"] = (distinct + trainer.model.tables.bags["bigram"].weight.shape[0], inverse)
    with pytest.raises(ValueError, match="for table bigram"):
        trainer.train_model(bad)
