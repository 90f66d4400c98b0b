"""The causal depthwise conv: fast path vs F.conv1d, values and every gradient."""

from __future__ import annotations

import pytest
import torch

from titans.ops.conv import causal_conv, causal_conv_ref


@pytest.mark.parametrize("K", [1, 2, 4])
def test_matches_conv1d_with_gradients(K):
    g = torch.Generator().manual_seed(K)
    B, T, C = 2, 9, 5
    args = [torch.randn(B, K - 1 + T, C, generator=g, dtype=torch.float64),
            torch.randn(C, K, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)]
    outs, grads = [], []
    for fn in (causal_conv, causal_conv_ref):
        leaves = [a.clone().requires_grad_() for a in args]
        y = fn(*leaves)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        outs.append(y)
        grads.append(torch.autograd.grad(y, leaves, dy))
    assert outs[0].shape == (B, T, C)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_causal_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    xp = torch.randn(1, 3 + 6, 3, generator=g, dtype=torch.float64)
    w, b = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    y = causal_conv(xp, w, b)
    xp2 = xp.clone()
    xp2[:, 3 + 4] += 1.0  # output token 4 reads xp rows 4..7; earlier outputs must not move
    y2 = causal_conv(xp2, w, b)
    assert torch.equal(y[:, :4], y2[:, :4]) and not torch.equal(y[:, 4], y2[:, 4])
    assert torch.autograd.gradcheck(causal_conv, (xp.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


def test_only_some_inputs_need_gradients():
    xp = torch.randn(2, 7, 4, requires_grad=True)
    w, b = torch.randn(4, 3), torch.randn(4)
    (dxp,) = torch.autograd.grad(causal_conv(xp, w, b).sum(), [xp])
    (ref,) = torch.autograd.grad(causal_conv_ref(xp, w, b).sum(), [xp])
    torch.testing.assert_close(dxp, ref)
