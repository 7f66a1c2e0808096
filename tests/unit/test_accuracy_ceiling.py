"""Tests for benchmarks/accuracy_ceiling.py: the hand-written SGD gradients against autograd, and that the SGD
learns a separable toy problem with both losses."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location("accuracy_ceiling", ROOT / "benchmarks" / "accuracy_ceiling.py")
ceiling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ceiling)


def crammer_singer(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    true = logits.gather(1, labels[:, None])
    rivals = logits.scatter(1, labels[:, None], float("-inf"))
    return (1 + rivals.max(1, keepdim=True).values - true).clamp_min(0).mean()


@pytest.mark.parametrize("loss", ["softmax", "hinge"])
def test_loss_gradient_matches_autograd(loss):
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(16, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, 5, (16,), generator=gen)
    value = F.cross_entropy(logits, labels) if loss == "softmax" else crammer_singer(logits, labels)
    (expected,) = torch.autograd.grad(value, logits)
    got = ceiling._loss_gradient(logits.detach().numpy().copy(), labels.numpy(), loss)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-12)
    if loss == "hinge":  # some rows inside the margin and some outside, so both branches ran
        assert 0 < (np.abs(got).sum(1) > 0).sum() < 16


@pytest.mark.parametrize("loss,lr", [("softmax", 10.0), ("hinge", 1.0)])
def test_sgd_linear_learns_a_separable_problem(loss, lr):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    # class c's documents use features 10c..10c+9 (plus shared noise features 30..39)
    dense = np.zeros((300, 40), np.float32)
    for i, c in enumerate(labels):
        dense[i, 10 * c + rng.choice(10, 3, replace=False)] = 1
        dense[i, 30 + rng.choice(10, 2, replace=False)] = 1
    x = scipy.sparse.csr_matrix(dense)
    weights, bias = ceiling.sgd_linear(x, labels, 3, loss, lr, epochs=3)
    assert ((x @ weights + bias).argmax(1) == labels).mean() == 1.0
    assert weights.shape == (40, 3)
