"""The memory rule for one token, in place: the decode step (docs/design.md §1).

Shape legend
    B batch, H heads, N = B H (heads are the matmul batch), Dk key/query dim, Dv value dim
    q, k: [B, H, Dk]   v: [B, H, Dv]   theta, eta, alpha: [B, H]   y: [B, H, Dv]
    state tensors: [B, H, d_out, d_in] per layer (viewed as [N, d_out, d_in])

`memory_rule` over one token goes through the chunk machinery (plans, gate products, pieces),
whose fixed cost is most of a decode step. Here the same rule for one token is a few direct
small matmuls: the gradient of ||f(k; W_c) - v||^2 at the chunk-start weights W_c by a hand-written
backward through the memory MLP (for a linear memory the rank-1 2 (W_c k - v) k^T), the momentum
and weight updates in place, and the read f(q; W_t). tests/ops/test_step.py holds it to the
reference loop (`memory_rule_ref`) token by token, outputs and states.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .nets import ACTIVATIONS, memory_forward, normalized_step
from .state import MemoryState

__all__ = ["memory_step", "owned_state"]


def owned_state(state: MemoryState | None, weights: Sequence[Tensor], batch_size: int) -> MemoryState:
    """A copy of `state` (None: W_0 and zero momentum) in fresh contiguous tensors, chunk_start
    apart from weights, that `memory_step` may update in place: the state a chunk call returns
    can share tensors with its caller's, and W_0's state is a broadcast view of the parameters."""
    if state is None:
        state = MemoryState.initial(weights, batch_size)
    copy = lambda ts: [t.detach().clone(memory_format=torch.contiguous_format) for t in ts]
    return MemoryState(copy(state.weights), copy(state.momentum), copy(state.chunk_start), state.position)


def memory_step(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor, state: MemoryState,
                *, chunk_size: int, activation: str = "silu", residual: bool = False,
                normalize_step: bool = False) -> tuple[Tensor, MemoryState]:
    """One token of `memory_rule` (same arguments and math, T = 1 and no T axis), in place.

    state must come from `owned_state` (or an earlier memory_step): its tensors are updated in
    place and it is returned, at position + 1. No autograd: this is the inference path.
    """
    B, H, Dk = q.shape
    N = B * H
    W, S, Wc = state.weights, state.momentum, state.chunk_start   # Wc: where this token's gradient is taken
    act = ACTIVATIONS[activation]
    flat = lambda x: x.reshape(N, x.shape[-1])
    kf, vf = flat(k), flat(v)
    # forward of f(k; W_c), keeping each layer's input h and pre-activation z for the backward
    hs, zs, h = [], [], kf
    for l, w in enumerate(Wc):
        hs.append(h)
        z = torch.bmm(w.view(N, *w.shape[2:]), h.unsqueeze(-1)).squeeze(-1)   # [N, d_out]
        zs.append(z)
        h = act.fn(z) if l < len(Wc) - 1 else z
    d = 2 * (h + kf - vf if residual else h - vf)                               # dl/df, [N, Dv]
    # backward: u_l = g_l h_{l-1}^T with g_L = d, g_{l-1} = (W_l^T g_l) * act'(z_{l-1})
    gs = [d]
    for l in range(len(Wc) - 1, 0, -1):
        w = Wc[l].view(N, *Wc[l].shape[2:])
        gs.insert(0, torch.bmm(w.transpose(1, 2), gs[0].unsqueeze(-1)).squeeze(-1) * act.grad(zs[l - 1]))
    step = theta.reshape(N)
    if normalize_step:   # |u_l|^2 = |g_l|^2 |h_{l-1}|^2 for an outer product
        sq = lambda x: x.pow(2).sum(-1)
        u2 = sum(sq(g) * sq(x) for g, x in zip(gs, hs))
        step = step * normalized_step(u2, sq(d), sq(kf), sq(vf))
    keep, decay = eta.reshape(N, 1, 1), (1 - alpha).reshape(N, 1, 1)
    for w, s, g, x in zip(W, S, gs, hs):
        s3, w3 = s.view(N, *s.shape[2:]), w.view(N, *w.shape[2:])
        # S_t = eta S_{t-1} - theta u_t;  W_t = (1 - alpha) W_{t-1} + S_t
        s3.mul_(keep).baddbmm_((g * step[:, None]).unsqueeze(-1), x.unsqueeze(1), alpha=-1)
        w3.mul_(decay).add_(s3)
    y = memory_forward(q.unsqueeze(-2), W, activation, residual).squeeze(-2)   # [B, H, Dv]
    state.position += 1
    if state.position % chunk_size == 0:   # a new chunk starts: its gradients are taken at the weights reached here
        for c, w in zip(Wc, W):
            c.copy_(w)
    return y, state
