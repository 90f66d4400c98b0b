"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from titans.eval.metrics import ErrorAccumulator, accuracy, bits_per_token, mae, mse, perplexity


def test_mse_mae_hand_computed():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 2.0], [5.0, 1.0]])
    # errors 1, 0, -2, 3: squares 1 + 0 + 4 + 9 = 14, absolutes 1 + 0 + 2 + 3 = 6, over 4
    assert mse(pred, target) == pytest.approx(3.5)
    assert mae(pred, target) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="same shape"):
        mse(pred, target[0])


def test_accumulator_weights_by_elements_not_batches():
    acc = ErrorAccumulator()
    acc.update(torch.zeros(3, 2), torch.ones(3, 2))       # 6 errors of 1
    acc.update(torch.zeros(1, 2), torch.full((1, 2), 4.0))  # 2 errors of 4
    out = acc.compute()
    assert out["mse"] == pytest.approx((6 * 1 + 2 * 16) / 8)   # 4.75, a mean of batch means gives 8.5
    assert out["mae"] == pytest.approx((6 * 1 + 2 * 4) / 8)
    with pytest.raises(RuntimeError, match="no batch"):
        ErrorAccumulator().compute()


def test_accuracy_logits_and_classes():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0], [1.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 2, 0, 1])
    assert accuracy(logits, labels) == pytest.approx(0.5)
    assert accuracy(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="logits_or_pred"):
        accuracy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_perplexity_and_bits():
    assert perplexity(math.log(4.0)) == pytest.approx(4.0)
    assert bits_per_token(math.log(4.0)) == pytest.approx(2.0)   # uniform over 4 bases: 2 bits
    assert perplexity(0.0) == 1.0
    with pytest.raises(ValueError, match="mean_nll"):
        perplexity(-0.1)
    with pytest.raises(ValueError, match="mean_nll"):
        bits_per_token(float("nan"))
