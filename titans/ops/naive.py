"""The reference: docs/design.md §1 as a literal loop over tokens, gradients by torch.autograd.

Shape legend
    B batch, T tokens, H heads, Dk key/query dim, Dv value dim
    q, k: [B, T, H, Dk]   v: [B, T, H, Dv]   theta, eta, alpha: [B, T, H]
    weights: L tensors [H, d_out, d_in]; state tensors: [B, H, d_out, d_in]

Slow on purpose and written to be read against the paper, not to be fast. It is the
definition the chunk-parallel path (chunk.py) is tested against.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .nets import memory_forward, normalized_step
from .state import MemoryState

__all__ = ["memory_rule_ref"]


def memory_rule_ref(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor,
                    weights: Sequence[Tensor], *, chunk_size: int = 64, activation: str = "silu",
                    residual: bool = False, normalize_step: bool = False, state: MemoryState | None = None
                    ) -> tuple[Tensor, MemoryState]:
    """Same contract as `titans.ops.memory_rule` (inputs are assumed valid)."""
    B, T = q.shape[:2]
    if state is None:
        state = MemoryState.initial(weights, B)
    W, S, W_grad, pos = list(state.weights), list(state.momentum), list(state.chunk_start), state.position
    outer_grad = torch.is_grad_enabled()

    def f(x: Tensor, ws: Sequence[Tensor]) -> Tensor:  # x: [B, H, Dk] -> [B, H, Dv]
        return memory_forward(x.unsqueeze(-2), ws, activation, residual).squeeze(-2)

    ys = []
    for t in range(T):
        if pos % chunk_size == 0:
            W_grad = W  # a new chunk: its gradients are all taken at the weights reached here
        with torch.enable_grad():
            # autograd needs a graph to W_grad; when none exists (no outer training), make leaves
            at = [w if w.requires_grad else w.detach().requires_grad_() for w in W_grad]
            losses = (f(k[:, t], at) - v[:, t]).pow(2).sum(-1)   # [B, H]
            # summed over (B, H): each (b, h) has its own weights, so the gradients stay apart
            u = torch.autograd.grad(losses.sum(), at, create_graph=outer_grad)  # u_t = grad l_t(W_{c(t)})
        th, et, al = (g[:, t, :, None, None] for g in (theta, eta, alpha))  # [B, H, 1, 1]
        if normalize_step:
            # theta_t times the factor of nets.normalized_step, with |u_t|^2 from autograd and
            # |dl/df|^2 = 4 l_t: a constant for the outer gradient
            with torch.no_grad():
                u2 = sum(x.pow(2).sum((-1, -2)) for x in u)
                scale = normalized_step(u2, 4 * losses, k[:, t].pow(2).sum(-1), v[:, t].pow(2).sum(-1))
            th = th * scale[..., None, None]
        S = [et * s - th * ut for s, ut in zip(S, u)]             # eq. 10/14
        W = [(1 - al) * w + s for w, s in zip(W, S)]              # eq. 13
        ys.append(f(q[:, t], W))                                  # eq. 15
        pos += 1
    y = torch.stack(ys, dim=1) if ys else q.new_zeros(B, 0, q.shape[2], v.shape[-1])
    chunk_start = W if pos % chunk_size == 0 else W_grad
    return y, MemoryState(weights=W, momentum=S, chunk_start=chunk_start, position=pos)
