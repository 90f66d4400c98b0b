"""DLinear: decomposition by hand, shapes, per-channel maps, and a tiny fit end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from titans.data.timeseries import make_forecast_splits
from titans.eval.metrics import ErrorAccumulator
from titans.models.dlinear import DLinear, moving_average


def test_moving_average_hand_computed():
    x = torch.tensor([1.0, 2.0, 6.0, 3.0]).view(1, 4, 1)
    # kernel 3, edges repeated: [1, 1, 2, 6, 3, 3] -> means 4/3, 3, 11/3, 4
    got = moving_average(x, 3)[0, :, 0]
    assert torch.allclose(got, torch.tensor([4 / 3, 3.0, 11 / 3, 4.0]))
    with pytest.raises(ValueError, match="kernel must be a positive odd"):
        moving_average(x, 4)


def test_shapes_and_individual():
    B, L, H, C = 3, 16, 5, 2
    x = torch.randn(B, L, C)
    shared = DLinear(L, H, C, kernel=5)
    assert shared(x).shape == (B, H, C)
    ind = DLinear(L, H, C, kernel=5, individual=True)
    assert ind.w_seasonal.shape == (C, H, L)
    # Per channel: channel 1's forecast does not move when only channel 0's input changes.
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    assert torch.equal(ind(x)[:, :, 1], ind(x2)[:, :, 1])
    assert not torch.allclose(ind(x)[:, :, 0], ind(x2)[:, :, 0])
    with pytest.raises(ValueError, match=r"x must be \[B, 16, 2\]"):
        shared(torch.randn(B, L + 1, C))
    with pytest.raises(ValueError, match="horizon must be positive"):
        DLinear(L, 0, C)


def test_matches_explicit_linear_layers():
    torch.manual_seed(0)
    L, H, C = 8, 3, 2
    m = DLinear(L, H, C, kernel=3)
    x = torch.randn(4, L, C, dtype=torch.float64)
    m = m.double()
    trend = moving_average(x, 3)
    seas = x - trend
    ref = (seas.transpose(1, 2) @ m.w_seasonal[0].T + m.b_seasonal[0]
           + trend.transpose(1, 2) @ m.w_trend[0].T + m.b_trend[0]).transpose(1, 2)
    assert torch.allclose(m(x), ref, atol=1e-12)


def test_fits_a_linear_trend_end_to_end():
    # A noiseless line with a small seasonal wave: a linear map of the lookback predicts it
    # exactly, so a few hundred Adam steps must bring the standardised test MSE near 0.
    torch.manual_seed(0)
    t = np.arange(300.0)
    values = np.stack([0.05 * t + np.sin(2 * np.pi * t / 12), -0.02 * t], axis=1)
    sp = make_forecast_splits(values, lookback=24, horizon=6)
    model = DLinear(24, 6, 2, kernel=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(sp.train, batch_size=64, shuffle=True)
    for _ in range(60):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    acc = ErrorAccumulator()
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(sp.test, batch_size=64):
            acc.update(model(x), y)
    scores = acc.compute()
    assert scores["mse"] < 1e-2, scores
