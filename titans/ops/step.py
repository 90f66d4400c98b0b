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
    B, H, _ = q.shape
    N = B * H
    W, S, Wc = state.weights, state.momentum, state.chunk_start   # Wc: where this token's gradient is taken
    act = ACTIVATIONS[activation]
    col = lambda x: x.reshape(N, x.shape[-1], 1)                   # [N, d, 1]: a column per (batch, head)
    mat = lambda w: w.view(N, w.shape[-2], w.shape[-1])            # [N, d_out, d_in]
    kc, vc = col(k), col(v)
    # forward of f(k; W_c), keeping each layer's input h and pre-activation z for the backward
    hs, zs, h = [], [], kc
    for l, w in enumerate(Wc):
        hs.append(h)
        z = torch.bmm(mat(w), h)                                    # [N, d_out, 1]
        zs.append(z)
        h = act.fn(z) if l < len(Wc) - 1 else z
    e = h + kc - vc if residual else h - vc                         # f(k) - v; dl/df = 2 e
    # backward: u_l = 2 g_l h_{l-1}^T with g_L = e, g_{l-1} = (W_l^T g_l) * act'(z_{l-1})
    gs = [e]
    for l in range(len(Wc) - 1, 0, -1):
        gs.insert(0, torch.bmm(mat(Wc[l]).transpose(1, 2), gs[0]).mul_(act.grad(zs[l - 1])))
    step = theta.reshape(N, 1, 1) * 2
    if normalize_step:   # |u_l|^2 = 4 |g_l|^2 |h_{l-1}|^2 for an outer product
        sq = lambda x: x.square().sum((1, 2))
        d2 = 4 * sq(e)
        u2 = 4 * sum(sq(g) * sq(x) for g, x in zip(gs, hs)) if len(gs) > 1 else d2 * sq(kc)
        step = step * normalized_step(u2, d2, sq(kc), sq(vc)).view(N, 1, 1)
    keep, decay = eta.reshape(N, 1, 1), (1 - alpha).reshape(N, 1, 1)
    for w, s, g, x in zip(W, S, gs, hs):
        # S_t = eta S_{t-1} - theta u_t;  W_t = (1 - alpha) W_{t-1} + S_t
        s3 = mat(s)
        s3.mul_(keep).baddbmm_(g * step, x.transpose(1, 2), alpha=-1)
        mat(w).mul_(decay).add_(s3)
    y = memory_forward(q.unsqueeze(-2), W, activation, residual).squeeze(-2)   # [B, H, Dv]
    state.position += 1
    if state.position % chunk_size == 0:   # a new chunk starts: its gradients are taken at the weights reached here
        for c, w in zip(Wc, W):
            c.copy_(w)
    return y, state
