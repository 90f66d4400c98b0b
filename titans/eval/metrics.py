"""Metrics for the paper's tables: forecasting errors, language-model perplexity, accuracy.

Shape legend
    pred, target: any matching shape (forecasting: [B, H, C], on the standardised scale)
    logits: [..., K] class scores, labels: [...] integer classes

Forecast errors are means over every element (all windows, steps and channels), as in
the Informer / Autoformer / DLinear protocol. To average over many batches use
ErrorAccumulator, which sums errors and counts: a mean of per-batch means would weight
a short last batch like a full one.
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["mse", "mae", "accuracy", "perplexity", "bits_per_token", "ErrorAccumulator"]


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.numel() == 0:
        raise ValueError("pred is empty")


def mse(pred: Tensor, target: Tensor) -> float:
    """Mean squared error over all elements, computed in float64."""
    _check_pair(pred, target)
    return (pred.double() - target.double()).pow(2).mean().item()


def mae(pred: Tensor, target: Tensor) -> float:
    """Mean absolute error over all elements, computed in float64."""
    _check_pair(pred, target)
    return (pred.double() - target.double()).abs().mean().item()


def accuracy(logits_or_pred: Tensor, labels: Tensor) -> float:
    """Fraction of correct predictions.

    Pass logits [..., K] (argmax over the last axis is taken) or predicted classes with the
    same shape as `labels`.
    """
    pred = logits_or_pred
    if pred.shape != labels.shape:
        if pred.shape[:-1] != labels.shape:
            raise ValueError(f"logits_or_pred {tuple(pred.shape)} must be labels' shape "
                             f"{tuple(labels.shape)} or that plus a class axis")
        pred = pred.argmax(dim=-1)
    if labels.numel() == 0:
        raise ValueError("labels is empty")
    return (pred == labels).double().mean().item()


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood in nats per token)."""
    if not math.isfinite(mean_nll) or mean_nll < 0:
        raise ValueError(f"mean_nll must be a finite number >= 0, got {mean_nll}")
    return math.exp(mean_nll)


def bits_per_token(mean_nll: float) -> float:
    """Mean NLL converted from nats to bits (bits per base for DNA, per byte for bytes)."""
    if not math.isfinite(mean_nll) or mean_nll < 0:
        raise ValueError(f"mean_nll must be a finite number >= 0, got {mean_nll}")
    return mean_nll / math.log(2)


class ErrorAccumulator:
    """Running MSE and MAE over many batches, exact (sums in float64 over element counts)."""

    def __init__(self) -> None:
        self.sq = 0.0
        self.abs = 0.0
        self.count = 0

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch of predictions and targets (same shape)."""
        _check_pair(pred, target)
        d = pred.detach().double() - target.detach().double()
        self.sq += d.pow(2).sum().item()
        self.abs += d.abs().sum().item()
        self.count += d.numel()

    def compute(self) -> dict[str, float]:
        """{"mse": ..., "mae": ...} over everything seen so far."""
        if self.count == 0:
            raise RuntimeError("ErrorAccumulator: no batch was added")
        return {"mse": self.sq / self.count, "mae": self.abs / self.count}
