"""Memory networks f(x; W) and the activations with the derivatives the chunk path needs.

Shape legend
    B batch, H heads, N tokens (a chunk or a whole sequence), L memory depth
    W^l   layer l weights, [..., d_out, d_in] (leading dims broadcast: [H, ...] or [B, H, ...])
    x     inputs, [..., N, d_in]

A memory of depth L is  z^l = h^{l-1} W^l^T,  h^l = act(z^l) for l < L,  f(x) = z^L
(+ x when residual). Depth 1 is the linear (matrix) memory f(x) = W x.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["ACTIVATIONS", "Activation", "memory_forward", "normalized_step"]


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _silu_grad2(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


def _gelu_pdf(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))


def _gelu_grad(z: Tensor) -> Tensor:
    # exact (erf) GELU: d/dz [z Phi(z)] = Phi(z) + z phi(z)
    return 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2)))) + z * _gelu_pdf(z)


def _gelu_grad2(z: Tensor) -> Tensor:
    return _gelu_pdf(z) * (2 - z * z)


def _tanh_grad(z: Tensor) -> Tensor:
    t = torch.tanh(z)
    return 1 - t * t


def _tanh_grad2(z: Tensor) -> Tensor:
    t = torch.tanh(z)
    return -2 * t * (1 - t * t)


class Activation(NamedTuple):
    fn: Callable[[Tensor], Tensor]
    grad: Callable[[Tensor], Tensor]   # f'(z): the inner (memory) backward
    grad2: Callable[[Tensor], Tensor]  # f''(z): the outer backward of the chunk path runs through f'


ACTIVATIONS: dict[str, Activation] = {
    "silu": Activation(torch.nn.functional.silu, _silu_grad, _silu_grad2),
    "gelu": Activation(torch.nn.functional.gelu, _gelu_grad, _gelu_grad2),
    "tanh": Activation(torch.tanh, _tanh_grad, _tanh_grad2),
}


def memory_forward(x: Tensor, weights: Sequence[Tensor], activation: str = "silu",
                   residual: bool = False) -> Tensor:
    """f(x; W). x: [..., N, d_in]; weights[l]: [..., d_out_l, d_in_l]. Returns [..., N, d_out_L]."""
    act = ACTIVATIONS[activation].fn
    h = x
    for l, w in enumerate(weights):
        h = h @ w.transpose(-1, -2)
        if l < len(weights) - 1:
            h = act(h)
    return h + x if residual else h


def normalized_step(u2: Tensor, d2: Tensor, k2: Tensor, v2: Tensor) -> Tensor:
    """The normalised step's per-token factor (memory_rule's normalize_step) from squared norms:
    u2 of the token's gradient u, d2 of dl/df = 2 (f(k) - v), k2 of its key, v2 of its value:

        s = min(1, d2 k2 / u2,  4 max(|v|, |k|) / |dl/df|)      (a bound is 1 where its denominator is 0)

    The first bound moves f(k) along its error no further than a linear memory at the same theta
    (for which it is 1); the second clips the step of a token whose error |f(k) - v| exceeds twice
    the larger of its value and key norms, which only a memory that has run away has. The
    reference loop takes u2 from autograd, the chunk path from its per-layer factors.
    """
    tiny = torch.finfo(u2.dtype).tiny
    ratio = torch.where(u2 > 0, d2 * k2 / u2.clamp_min(tiny), 1.0)
    clip = torch.where(d2 > 0, (16 * torch.maximum(v2, k2) / d2.clamp_min(tiny)).sqrt(), 1.0)
    return torch.minimum(ratio, clip).clamp(max=1.0)
