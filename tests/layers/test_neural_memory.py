"""NeuralMemory layer: streaming == one pass, causality, gradients, errors, bf16."""

from __future__ import annotations

import random

import pytest
import torch

from titans import NeuralMemory, NeuralMemoryState

OPTIONS = {
    "default": {},
    "no_conv": dict(conv=False),
    "no_momentum": dict(momentum=False),
    "no_forgetting": dict(forgetting=False),
    "linear": dict(memory_depth=1),
    "deep": dict(memory_depth=3, expansion=2),
    "residual": dict(residual=True),
    "chunk_gates": dict(gate_mode="chunk"),
    "gelu": dict(activation="gelu"),
}


def make(seed=0, **kw) -> NeuralMemory:
    torch.manual_seed(seed)
    args = dict(dim=24, heads=3, head_dim=8, chunk_size=8, memory_depth=2, expansion=2)
    args.update(kw)
    layer = NeuralMemory(**args).double()
    with torch.no_grad():  # data-dependent gates, so the tests see them vary token by token
        layer.wgates.weight.normal_(std=0.3)
    return layer


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_streaming_pieces_equal_one_pass(option):
    layer = make(**OPTIONS[option])
    x = torch.randn(2, 45, 24, dtype=torch.float64)
    y_full, s_full = layer(x)
    rng = random.Random(option)
    ys, state, i = [], None, 0
    while i < 45:
        n = min(rng.choice([1, 1, 3, 7, 8, 13]), 45 - i)
        y, state = layer(x[:, i:i + n], state)
        ys.append(y)
        i += n
    assert rel(torch.cat(ys, 1), y_full) < 1e-10
    assert state.position == s_full.position == 45
    for a, b in zip(state.memory.weights + state.memory.momentum, s_full.memory.weights + s_full.memory.momentum):
        assert rel(a, b) < 1e-10


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_causal(option):
    layer = make(**OPTIONS[option])
    x = torch.randn(1, 40, 24, dtype=torch.float64)
    y, _ = layer(x)
    for j in (0, 9, 17, 39):
        x2 = x.clone()
        x2[:, j] += torch.randn(24, dtype=torch.float64)
        y2, _ = layer(x2)
        assert torch.equal(y2[:, :j], y[:, :j]), f"output before {j} changed"
        assert not torch.allclose(y2[:, j:], y[:, j:])


@pytest.mark.parametrize("option", ["default", "linear", "chunk_gates"])
def test_gradients_reach_every_parameter(option):
    layer = make(**OPTIONS[option])
    y, _ = layer(torch.randn(2, 30, 24, dtype=torch.float64))
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_adamw_step_updates_every_parameter_and_heads_stay_independent():
    # the best-known peer's per-head parameters alias one another; ours must not
    layer = make(heads=4, head_dim=6).float()
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    y, _ = layer(torch.randn(2, 30, 24))
    y.square().mean().backward()
    opt.step()
    for n, p in layer.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not move"
    for w, w0 in zip(layer.memory, (before[f"memory.{l}"] for l in range(len(layer.memory)))):
        step = w.detach() - w0
        assert all(not torch.allclose(step[0], step[h]) for h in range(1, 4)), "heads share their update"
        assert w.data_ptr() not in {v.data_ptr() for v in layer.memory if v is not w}


def test_bf16_autocast_stays_close_and_state_fp32():
    layer = make().float()
    x = torch.randn(2, 64, 24)
    y32, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, state = layer(x)
    assert rel(y16.float(), y32) < 5e-2  # documented tolerance (docs/memory_rule.md)
    assert all(t.dtype == torch.float32 for t in state.memory.weights + state.memory.momentum)


def test_init_state_equals_none():
    layer = make()
    x = torch.randn(2, 20, 24, dtype=torch.float64)
    y0, _ = layer(x)
    y1, _ = layer(x, layer.init_state(2))
    assert torch.equal(y0, y1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="heads"):
        NeuralMemory(24, 0)
    with pytest.raises(ValueError, match="divisible"):
        NeuralMemory(25, 3)
    with pytest.raises(ValueError, match="activation"):
        NeuralMemory(24, 3, activation="relu6")
    with pytest.raises(ValueError, match="gate_mode"):
        NeuralMemory(24, 3, gate_mode="segment")
    with pytest.raises(ValueError, match="chunk_size"):
        NeuralMemory(24, 3, chunk_size=0)
    layer = make()
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 5, 23, dtype=torch.float64))
    with pytest.raises(ValueError, match="NeuralMemoryState"):
        layer(torch.randn(2, 5, 24, dtype=torch.float64), state={"memory": None})
    assert isinstance(layer(torch.randn(1, 3, 24, dtype=torch.float64))[1], NeuralMemoryState)
