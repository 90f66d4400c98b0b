"""Causal depthwise convolution over time, in the [B, T, C] layout (docs/design.md §2: the q, k, v conv).

Shape legend
    B batch, T output tokens, C channels, K kernel taps
    xp: [B, K - 1 + T, C], the input with its K - 1 past tokens in front (zeros or a streaming state)
    weight: [C, K] (tap K - 1 multiplies the newest token), bias: [C]
    out: [B, T, C], out[:, t] = bias + sum_j weight[:, j] * xp[:, t + j]

`causal_conv` is the fast path: a sum of K shifted, per-channel scaled copies with a
hand-written backward that accumulates into one gradient buffer. F.conv1d wants [B, C, T],
and the transposes there and back cost more than the convolution (T=4096, C=1152,
forward+backward: 79 ms through conv1d, 18 ms here; `python benchmarks/state_ops.py`); autograd through the shifted sum
would allocate a full-size gradient per tap (memory). `causal_conv_ref` is F.conv1d, for the tests.
`conv_forward` / `conv_backward` are the two halves, shared with the fused q, k, v path (features.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["causal_conv", "causal_conv_ref", "conv_forward", "conv_backward"]


def conv_forward(xp: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """out = causal conv of xp (see the module doc). xp: [B, K - 1 + T, C] -> [B, T, C]."""
    K = weight.shape[1]
    T = xp.shape[1] - (K - 1)
    w = weight.t().contiguous()  # [K, C]: a strided tap vector made each addcmul 4x slower
    out = torch.addcmul(bias, xp[:, :T], w[0])
    for j in range(1, K):
        out.addcmul_(xp[:, j:j + T], w[j])
    return out


def conv_backward(dout: Tensor, xp: Tensor, weight: Tensor, needs: tuple[bool, bool, bool]):
    """Gradients (dxp, dweight, dbias) of conv_forward for dout [B, T, C]; None where not needed."""
    K = weight.shape[1]
    T = dout.shape[1]
    w = weight.t().contiguous()
    dxp = dw = dbias = None
    if needs[0]:
        dxp = xp.new_zeros(xp.shape)
        for j in range(K):
            dxp[:, j:j + T].addcmul_(dout, w[j])
    if needs[1]:
        dw = torch.stack([torch.linalg.vecdot(dout, xp[:, j:j + T], dim=1).sum(0) for j in range(K)], dim=1)
    if needs[2]:
        dbias = dout.sum((0, 1))
    return dxp, dw, dbias


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(xp, weight)
        return conv_forward(xp, weight, bias)

    @staticmethod
    def backward(ctx, dout: Tensor):
        xp, weight = ctx.saved_tensors
        return conv_backward(dout, xp, weight, ctx.needs_input_grad)


def causal_conv(xp: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """xp: [B, K - 1 + T, C]; weight: [C, K]; bias: [C] -> [B, T, C] (see the module doc)."""
    return _CausalConv.apply(xp, weight, bias)


def causal_conv_ref(xp: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The same through F.conv1d (the reference for the tests)."""
    C = xp.shape[-1]
    return F.conv1d(xp.transpose(1, 2), weight.unsqueeze(1), bias, groups=C).transpose(1, 2)
