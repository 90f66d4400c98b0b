"""TitansForecaster: patches by hand, shapes, channel independence, RevIN, learning, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from titans.layers import NeuralMemory
from titans.models.forecaster import RevIN, TitansForecaster

TINY = dict(dim=16, n_layers=1, heads=2, patch_len=8, stride=4)


def test_patches_hand_computed():
    m = TitansForecaster(8, 3, 1, dim=16, heads=2, patch_len=4, stride=2)
    assert m.n_patches == (8 - 4) // 2 + 2 == 4
    series = torch.arange(8.0).view(1, 8)
    # padded with stride=2 copies of the last value: 0..7, 7, 7
    expect = torch.tensor([[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 7, 7.0]])
    assert torch.equal(m.patches(series)[0], expect)


@pytest.mark.parametrize("mixer", ["lmm", "attn", "mag"])
def test_shapes_and_mixers(mixer):
    torch.manual_seed(0)
    m = TitansForecaster(32, 5, 3, mixer=mixer, **TINY)
    assert m(torch.randn(2, 32, 3)).shape == (2, 5, 3)
    assert [b.kind for b in m.blocks] == [mixer]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"x must be \[B, 32, 3\]"):
        TitansForecaster(32, 5, 3, **TINY)(torch.randn(2, 32, 2))
    with pytest.raises(ValueError, match="patch_len=40 must be <= lookback=32"):
        TitansForecaster(32, 5, 3, dim=16, heads=2, patch_len=40)
    with pytest.raises(ValueError, match="horizon must be an integer >= 1"):
        TitansForecaster(32, 0, 3, **TINY)
    with pytest.raises(ValueError, match="mixer must be one of"):
        TitansForecaster(32, 5, 3, mixer="mamba", **TINY)


def test_config_overrides_reach_the_memory():
    m = TitansForecaster(32, 5, 1, momentum=False, memory_depth=3, max_lr=0.05, **TINY)
    mem = m.blocks[0].mixer
    assert isinstance(mem, NeuralMemory)
    assert mem.momentum is False and len(mem.memory) == 3 and mem.max_lr == 0.05 and mem.chunk_size == 4


def test_channels_are_independent():
    # One set of weights for every channel: changing channel 0's input moves only channel 0.
    torch.manual_seed(0)
    m = TitansForecaster(32, 5, 3, **TINY).eval()
    x = torch.randn(2, 32, 3)
    x2 = x.clone()
    x2[:, :, 0] = torch.randn(2, 32)
    y, y2 = m(x), m(x2)
    assert torch.equal(y[:, :, 1:], y2[:, :, 1:])
    assert not torch.allclose(y[:, :, 0], y2[:, :, 0])
    # ... and a channel gets the same forecast whichever slot it sits in
    perm = torch.tensor([2, 0, 1])
    assert torch.allclose(m(x[:, :, perm]), y[:, :, perm], atol=1e-6)


def test_revin_makes_the_forecast_scale_and_shift_equivariant():
    torch.manual_seed(0)
    m = TitansForecaster(32, 5, 2, **TINY).double().eval()
    x = torch.randn(3, 32, 2, dtype=torch.float64)
    a, b = torch.tensor([3.0, 0.5], dtype=torch.float64), torch.tensor([10.0, -2.0], dtype=torch.float64)
    # equal up to RevIN's eps under the root (1e-5 against a variance of order 1)
    assert torch.allclose(m(a * x + b), a * m(x) + b, rtol=1e-4, atol=1e-4)
    r = RevIN(2, affine=False)
    z = r.normalize(a * x + b)
    assert torch.allclose(z.mean(1), torch.zeros(3, 2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(r.denormalize(z), a * x + b)
    with pytest.raises(RuntimeError, match="call normalize"):
        RevIN(2).denormalize(z)


def test_learns_a_sine_and_is_seeded():
    # Windows of a noiseless sine with random phase: 40 Adam steps must cut the MSE by 5x.
    def run(seed: int, steps: int = 40) -> tuple[float, float, torch.Tensor]:
        torch.manual_seed(seed)
        m = TitansForecaster(32, 8, 1, revin=False, **TINY)
        g = torch.Generator().manual_seed(0)
        phase = torch.rand(64, 1, generator=g) * 2 * math.pi
        t = torch.arange(40.0)
        series = torch.sin(2 * math.pi * t / 10 + phase).unsqueeze(-1)   # [64, 40, 1]
        x, y = series[:, :32], series[:, 32:]
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        losses = []
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses[0], losses[-1], m.head.weight.detach().clone()

    first, last, w = run(0)
    assert last < first / 5, (first, last)
    first2, last2, w2 = run(0)
    assert (first2, last2) == (first, last) and torch.equal(w, w2)
    assert not torch.equal(run(1, steps=1)[2], run(0, steps=1)[2])   # the seed matters
