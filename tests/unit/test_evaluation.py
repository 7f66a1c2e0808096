"""Metrics from a confusion matrix, by hand; unseen labels count as errors; evaluate() over a real model."""

import numpy as np
import pytest
import torch

from trainer.config import DataConfig, ModelConfig
from trainer.distributed import DistInfo
from trainer.embeddings import LocalTables, build_table_specs
from trainer.evaluation import confusion_image, evaluate, metrics_from_confusion, per_class_table
from trainer.features import Featurizer
from trainer.model import TextClassifier
from trainer.vocab import Tokenizer, Vocabulary

CONFUSION = np.array([[3, 1, 0], [0, 2, 2], [1, 0, 1]], dtype=np.float64)  # rows: true, columns: predicted


def test_accuracy_and_macro_f1_by_hand():
    m = metrics_from_confusion(CONFUSION)
    assert m["accuracy"] == pytest.approx(6 / 10)
    f1 = [0.75, 2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2), 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)]
    assert m["per_class"]["f1"] == pytest.approx(f1)
    assert m["per_class"]["precision"] == pytest.approx([3 / 4, 2 / 3, 1 / 3])
    assert m["per_class"]["recall"] == pytest.approx([3 / 4, 1 / 2, 1 / 2])
    assert m["per_class"]["support"] == [4, 4, 2]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["n"] == 10 and m["unseen_label_docs"] == 0
    assert m["confusion"] == CONFUSION.astype(int).tolist()


def test_unseen_label_documents_count_as_errors_and_false_positives():
    """Documents of labels never seen in training are wrong; their predictions are false positives of the
    predicted class, as sklearn counts them (here with the unseen label outside the averaged labels)."""
    m = metrics_from_confusion(CONFUSION, unseen_pred=np.array([2, 0, 0]))
    assert m["n"] == 12 and m["unseen_label_docs"] == 2
    assert m["accuracy"] == pytest.approx(6 / 12)
    assert m["per_class"]["precision"][0] == pytest.approx(3 / 6)
    # class 0: precision 3/6, recall 3/4 -> 0.6; classes 1 and 2 as before (sklearn.metrics.f1_score of the same
    # documents with labels=[0, 1, 2] gives the same mean)
    assert m["macro_f1"] == pytest.approx((0.6 + 4 / 7 + 0.4) / 3)


def test_macro_f1_matches_sklearn_when_a_class_is_only_predicted():
    """A class with no true documents that was predicted scores F1 0 and is averaged (sklearn's macro F1 over the
    labels in y_true and y_pred); a class neither present nor predicted is left out."""
    y_true, y_pred = [0, 0, 1, 1, 2, 2], [0, 3, 1, 1, 2, 0]
    confusion = np.zeros((5, 5))
    np.add.at(confusion, (y_true, y_pred), 1)
    m = metrics_from_confusion(confusion)
    # f1 per class 0.5, 1, 2/3, 0 (class 3: predicted once, never true); class 4 is left out. sklearn's
    # f1_score(y_true, y_pred, average="macro") = 0.5417
    assert m["macro_f1"] == pytest.approx((0.5 + 1 + 2 / 3 + 0) / 4)
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_empty_and_all_unseen():
    m = metrics_from_confusion(np.zeros((2, 2)))
    assert (m["accuracy"], m["macro_f1"], m["n"]) == (0.0, 0.0, 0)
    m = metrics_from_confusion(np.zeros((2, 2)), unseen_pred=np.array([3, 0]))
    assert (m["accuracy"], m["n"], m["macro_f1"]) == (0.0, 3, 0.0)


def test_per_class_table_and_image():
    m = metrics_from_confusion(CONFUSION)
    text = per_class_table(m, ["alpha", "b", "c"])
    lines = text.splitlines()
    assert lines[0].split() == ["label", "precision", "recall", "f1", "support"]
    assert lines[1].split() == ["alpha", "0.750", "0.750", "0.750", "4"]
    assert "accuracy 0.6000" in lines[-1] and "n 10" in lines[-1]
    image = confusion_image(CONFUSION, cell=2)
    assert image.shape == (6, 6, 3) and image.dtype == np.uint8
    assert image[0, 0, 0] == int(255 * (1 - 0.75))


def test_evaluate_over_a_model():
    """A model that always predicts class `c` by construction: accuracy = share of label c among all docs."""
    vocab = Vocabulary(
        words=["x", "y"],
        num_pretrained=1,
        pretrained_rows=np.array([0]),
        counts=np.array([1, 1]),
        labels=["a", "b", "c"],
    )
    specs = build_table_specs(
        num_pretrained=1,
        num_oov=1,
        dim=2,
        ngram_buckets=0,
        char_buckets=0,
        masked=False,
        pretrained_trainable=False,
        init_std=0.1,
    )
    model = TextClassifier(LocalTables(specs, torch.ones(1, 2), seed=0), ModelConfig(), 1, 3)
    with torch.no_grad():
        model.dense.head.out.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    f = Featurizer(Tokenizer(DataConfig().token_pattern, True), vocab, 0, 0, 3, 3, 100)
    labels = ["a", "c", "c", "zzz", "b", "c"]  # "zzz" never seen in training
    docs = f.encode(["x y", "x", "", "y", "x x", "y"], labels)
    info = DistInfo(0, 0, 1, torch.device("cpu"), "none")
    m = evaluate(model, docs, 1, False, 3, info)
    assert m["n"] == 6 and m["unseen_label_docs"] == 1
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["confusion"] == [[0, 0, 1], [0, 0, 1], [0, 0, 3]]
    probs = torch.softmax(torch.tensor([0.0, 0.0, 5.0]), 0)
    assert m["loss"] == pytest.approx(
        float(-(torch.log(probs[0]) + torch.log(probs[1]) + 3 * torch.log(probs[2])) / 5), rel=1e-5
    )
    assert model.training  # evaluate restores the mode
