"""The Attention layer: a literal reference, streaming == one pass, cache bounds, causality."""

from __future__ import annotations

import math
import random

import pytest
import torch

from titans.layers import Attention, AttentionState
from titans.ops.attention import rotary

F64 = torch.float64
DIM, HEADS = 12, 3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).norm().item() / b.norm().item()


def make_layer(window=None, n_persistent=0, qk_norm=False, seed=0, **kw) -> Attention:
    torch.manual_seed(seed)
    layer = Attention(DIM, HEADS, window=window, n_persistent=n_persistent, qk_norm=qk_norm, **kw).double()
    if qk_norm:   # move the norm weights off 1 so that a wrong wiring shows
        with torch.no_grad():
            layer.q_norm.weight.uniform_(0.5, 1.5)
            layer.k_norm.weight.uniform_(0.5, 1.5)
    return layer


def inputs(B=2, T=11, seed=1) -> torch.Tensor:
    return torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(seed), dtype=F64)


def literal(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """The layer written out: every query's softmax over the persistent tokens (un-rotated)
    and the rotated keys in its causal window."""
    B, T, _ = x.shape
    H, Dh, w = layer.heads, layer.head_dim, layer.window
    split = lambda t: t.view(t.shape[0], -1, H, Dh).transpose(1, 2)
    q, k, v = split(layer.wq(x)), split(layer.wk(x)), split(layer.wv(x))
    p = layer.persistent.tokens[None] if layer.persistent is not None else x.new_zeros(1, 0, DIM)
    pk, pv = split(layer.wk(p)), split(layer.wv(p))
    if layer.q_norm is not None:
        q, k, pk = layer.q_norm(q.transpose(1, 2)).transpose(1, 2), layer.k_norm(k), layer.k_norm(pk)
    pos = torch.arange(T)
    q, k = rotary(q, pos), rotary(k, pos)
    out = []
    for i in range(T):
        lo = 0 if w is None else max(0, i - w + 1)
        keys = torch.cat([pk.expand(B, -1, -1, -1), k[:, :, lo:i + 1]], dim=2)
        vals = torch.cat([pv.expand(B, -1, -1, -1), v[:, :, lo:i + 1]], dim=2)
        s = (keys @ q[:, :, i, :, None]).squeeze(-1) / math.sqrt(Dh)
        out.append((s.softmax(-1)[..., None] * vals).sum(2))            # [B, H, Dh]
    o = torch.stack(out, dim=2).transpose(1, 2).reshape(B, T, H * Dh)
    return layer.wo(o)


CONFIGS = [dict(), dict(window=4), dict(window=4, n_persistent=3), dict(n_persistent=2, qk_norm=True),
           dict(window=1, n_persistent=2), dict(window=3, n_persistent=2, qk_norm=True)]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("impl", ["blocked", "ref"])
def test_equals_literal_reference(cfg, impl):
    layer = make_layer(impl=impl, **cfg)
    x = inputs()
    y, state = layer(x)
    assert y.shape == x.shape and isinstance(state, AttentionState) and state.position == x.shape[1]
    assert rel(y, literal(layer, x)) <= 1e-12


@pytest.mark.parametrize("cfg", CONFIGS)
def test_prefill_then_decode_equals_full_forward(cfg):
    layer = make_layer(**cfg)
    x = inputs(T=13)
    y_full, s_full = layer(x)
    y, state = layer(x[:, :5])
    ys = [y]
    for t in range(5, 13):
        y, state = layer(x[:, t:t + 1], state)
        ys.append(y)
    assert rel(torch.cat(ys, dim=1), y_full) <= 1e-12
    assert state.position == s_full.position == 13
    assert torch.allclose(state.k, s_full.k, rtol=0, atol=1e-13)
    assert torch.allclose(state.v, s_full.v, rtol=0, atol=1e-13)


@pytest.mark.parametrize("cfg", CONFIGS[:3])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_pieces_equal_one_pass(cfg, seed):
    layer = make_layer(**cfg)
    x = inputs(T=23, seed=seed)
    y_full, _ = layer(x)
    rng = random.Random(seed)
    ys, state, t = [], layer.init_state(x.shape[0]), 0
    while t < x.shape[1]:
        n = rng.choice([0, 1, 2, 3, 5, 7, 9])
        y, state = layer(x[:, t:t + n], state)
        assert y.shape == (x.shape[0], min(n, x.shape[1] - t), DIM)
        ys.append(y)
        t += n
    assert state.position == x.shape[1]
    assert rel(torch.cat(ys, dim=1), y_full) <= 1e-12


@pytest.mark.parametrize("window", [1, 3, 5])
def test_sliding_window_cache_never_exceeds_window(window):
    layer = make_layer(window=window, n_persistent=2)
    x = inputs(T=16)
    state = None
    for t, n in [(0, 1), (1, 2), (3, 7), (10, 1), (11, 5)]:
        _, state = layer(x[:, t:t + n], state)
        assert state.k.shape[2] == state.v.shape[2] == min(t + n, window - 1) <= window
    full = make_layer()
    _, state = full(x)
    assert state.k.shape[2] == 16       # full attention keeps everything


@pytest.mark.parametrize("cfg", [dict(n_persistent=2), dict(window=3, n_persistent=2)])
def test_causality_by_perturbation(cfg):
    layer = make_layer(**cfg)
    x = inputs(T=12)
    y, _ = layer(x)
    for j in (0, 6, 11):
        x2 = x.clone()
        x2[:, j] += 1.0
        y2, _ = layer(x2)
        changed = (y2 - y).abs().amax(dim=(0, 2)) > 1e-12
        # earlier positions never change; j itself always does (it sees its own key)
        assert not changed[:j].any() and changed[j], (j, changed)


def test_gradients_reach_every_parameter():
    layer = make_layer(window=3, n_persistent=2, qk_norm=True)
    x = inputs(T=9).requires_grad_()
    y, _ = layer(x[:, :4])
    y2, _ = layer(x[:, 4:], _)                 # through the cache too
    (y.square().sum() + y2.square().sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad[:, 0].abs().sum() > 0


def test_init_state_and_low_precision():
    layer = make_layer(window=4, n_persistent=2)
    x = inputs(T=6)
    y_none, _ = layer(x)
    y_init, _ = layer(x, layer.init_state(2))
    assert torch.equal(y_none, y_init)
    lf = make_layer(window=4, n_persistent=2).bfloat16()
    yb, sb = lf(x.bfloat16())
    assert yb.dtype == sb.k.dtype == torch.bfloat16
    assert rel(yb.double(), y_none) <= 3e-2


def test_bad_inputs():
    layer = make_layer(window=3)
    x = inputs(T=5)
    with pytest.raises(ValueError, match="x must be"):
        layer(x[..., :5])
    with pytest.raises(ValueError, match="x must be"):
        layer(x[0])
    with pytest.raises(ValueError, match="state must be"):
        layer(x, state=(x, x, 0))
    _, state = layer(x)
    with pytest.raises(ValueError, match="state.k must be"):
        layer(x, AttentionState(state.k[:, :, :1], state.v, state.position))
    with pytest.raises(ValueError, match="state.k must be"):
        layer(x[:1], state)                               # batch size changed
    with pytest.raises(ValueError, match="state.position"):
        layer(x, AttentionState(state.k, state.v, -1))
    with pytest.raises(ValueError, match="heads"):
        Attention(12, 0)
    with pytest.raises(ValueError, match="divisible"):
        Attention(12, 5)
    with pytest.raises(ValueError, match="head_dim"):
        Attention(12, 4)                                   # head_dim 3 is odd
    with pytest.raises(ValueError, match="window"):
        Attention(12, 3, window=0)
    with pytest.raises(ValueError, match="n_persistent"):
        Attention(12, 3, n_persistent=-1)
    with pytest.raises(ValueError, match="rope_base"):
        Attention(12, 3, rope_base=0)
    with pytest.raises(ValueError, match="impl"):
        Attention(12, 3, impl="flash")
    with pytest.raises(ValueError, match="batch_size"):
        layer.init_state(0)
