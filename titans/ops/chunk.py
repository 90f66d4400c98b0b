"""The fast path: the chunk-parallel (dual) form of the memory rule (DESIGN.md §1).

Shape legend
    B batch, T tokens, H heads, Dk key/query dim, Dv value dim, L memory depth
    n tokens in one chunk (n <= b, the chunk size), NC number of full chunks
    q, k: [B, T, H, Dk]   v: [B, T, H, Dv]   theta, eta, alpha: [B, T, H]
    inside: [B, H, n, D] for tokens, [B, H, n] for gates, [B, H, n, n] for gate matrices
    weights: L tensors [H, d_out, d_in]; state tensors: [B, H, d_out, d_in]

Inside a chunk every gradient u_m is taken at the chunk-start weights W^0, so all of them come
from one forward and one analytic backward of the memory on the chunk's keys, in factored
form u^l_m = delta^l_m (hk^{l-1}_m)^T. Each token's own weights
    W_i = beta_i W + g_i S - sum_{m<=i} G_{i,m} u_m
are never built: reading them is a masked matmul, (G * (Hq Hk^T)) @ Delta. See README.md
beside this file for the derivation. Only the loop over chunks is sequential. The outer
(training) gradients come from torch.autograd through these ops, second-order terms
included, so they are exact.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .nets import ACTIVATIONS, memory_key_backward
from .state import MemoryState

__all__ = ["memory_rule_chunk"]


class ChunkGates(NamedTuple):
    """The gate products of one chunk (or a batch of chunks: extra leading dims)."""
    beta: Tensor     # [..., n]     beta_i = prod_{j<=i} (1 - alpha_j)
    g: Tensor        # [..., n]     g_i = sum_{r<=i} (beta_i / beta_r) e_r: weight of the carried momentum
    G: Tensor        # [..., n, n]  G_{i,m} = theta_m sum_{r=m..i} (beta_i/beta_r)(e_r/e_m), lower-triangular
    e_last: Tensor   # [...]        e_n = prod_{j<=n} eta_j
    s_last: Tensor   # [..., n]     (e_n / e_m) theta_m: weight of u_m in the chunk-end momentum


def _segment_products(a: Tensor) -> Tensor:
    """P[..., i, r] = prod_{r < j <= i} a_j for r <= i, 0 above the diagonal. a: [..., n].

    A cumulative product along each row, never a ratio of products: gates may be exactly 0 and
    long products underflow, and both must give exact zeros, not NaN, with exact gradients.
    """
    n = a.shape[-1]
    above = torch.ones(n, n, dtype=torch.bool, device=a.device).triu_(1)  # j > r
    x = torch.where(above, a.unsqueeze(-2), torch.ones((), dtype=a.dtype, device=a.device))
    return x.cumprod(-1).transpose(-1, -2).tril()  # [..., i, r]


def chunk_gates(theta: Tensor, eta: Tensor, alpha: Tensor) -> ChunkGates:
    """Gate products for chunks laid out on the last dim. theta, eta, alpha: [..., n]."""
    keep = 1 - alpha
    p_beta = _segment_products(keep)            # beta_i / beta_r
    p_eta = _segment_products(eta)              # e_i / e_m
    e = eta.cumprod(-1)
    g = (p_beta @ e.unsqueeze(-1)).squeeze(-1)
    G = (p_beta @ p_eta) * theta.unsqueeze(-2)  # lower-triangular: the causal mask is built in
    return ChunkGates(beta=keep.cumprod(-1), g=g, G=G, e_last=e[..., -1],
                      s_last=p_eta[..., -1, :] * theta)


def chunk_step(q: Tensor, k: Tensor, v: Tensor, gates: ChunkGates, W: Sequence[Tensor],
               S: Sequence[Tensor], W_grad: Sequence[Tensor], activation: str, residual: bool
               ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One chunk. q, k: [B, H, n, Dk]; v: [B, H, n, Dv]; W, S, W_grad: per layer [B, H, d_out, d_in].

    W, S are the running weights and momentum at the chunk start; W_grad is where this chunk's
    gradients are taken (W itself, except when a stream resumes in the middle of a chunk).
    Returns y [B, H, n, Dv] and the weights and momentum after the chunk's last token.
    """
    act = ACTIVATIONS[activation][0]
    hk, delta = memory_key_backward(k, v, W_grad, activation, residual)  # [B, H, n, d] per layer
    beta, g, G = gates.beta.unsqueeze(-1), gates.g.unsqueeze(-1), gates.G
    L = len(W)
    h = q
    for l in range(L):
        # z_i = beta_i W h_i + g_i S h_i - sum_{m<=i} G_{i,m} (hk_m . h_i) delta_m
        z = beta * (h @ W[l].mT) + g * (h @ S[l].mT) - (G * (h @ hk[l].mT)) @ delta[l]
        h = act(z) if l < L - 1 else z
    y = h + q if residual else h

    # chunk end (i = n): W_n = beta_n W + g_n S - sum_m G_{n,m} u_m,  S_n = e_n S - sum_m (e_n/e_m) theta_m u_m
    b_n, g_n, e_n = (x[..., -1, None, None] for x in (gates.beta, gates.g, gates.e_last.unsqueeze(-1)))
    G_n, s_n = gates.G[..., -1, :].unsqueeze(-1), gates.s_last.unsqueeze(-1)  # [B, H, n, 1]
    W_new, S_new = [], []
    for l in range(L):
        W_new.append(b_n * W[l] + g_n * S[l] - (delta[l] * G_n).mT @ hk[l])
        S_new.append(e_n * S[l] - (delta[l] * s_n).mT @ hk[l])
    return y, W_new, S_new


def memory_rule_chunk(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor,
                      weights: Sequence[Tensor], *, chunk_size: int = 64, activation: str = "silu",
                      residual: bool = False, state: MemoryState | None = None
                      ) -> tuple[Tensor, MemoryState]:
    """Same contract as `titans.ops.memory_rule` (inputs are assumed valid)."""
    B, T, H = q.shape[:3]
    b = chunk_size
    if state is None:
        state = MemoryState.initial(weights, B)
    W, S, W_grad, pos = list(state.weights), list(state.momentum), list(state.chunk_start), state.position
    # [B, T, H, D] -> [B, H, T, D] and [B, T, H] -> [B, H, T]: heads become a batch dim of the matmuls
    q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    theta, eta, alpha = (x.transpose(1, 2).contiguous() for x in (theta, eta, alpha))

    # Pieces of [0, T) aligned to absolute chunk boundaries: the rest of a chunk a previous call
    # left open, then full chunks, then an open tail.
    head = min(T, (-pos) % b)
    n_full = (T - head) // b
    ys = []

    def run(lo: int, hi: int, gates: ChunkGates, W_grad: list[Tensor]) -> None:
        nonlocal W, S
        y, W, S = chunk_step(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], gates, W, S, W_grad,
                             activation, residual)
        ys.append(y)

    if head:
        run(0, head, chunk_gates(theta[..., :head], eta[..., :head], alpha[..., :head]), W_grad)
    if n_full:
        # gate products of all full chunks at once: [B, H, NC, b] -> fields [B, H, NC, ...]
        hi = head + n_full * b
        split = [x[..., head:hi].unflatten(-1, (n_full, b)) for x in (theta, eta, alpha)]
        all_gates = chunk_gates(*split)
        for c in range(n_full):
            lo = head + c * b
            run(lo, lo + b, ChunkGates(*(x[:, :, c] for x in all_gates)), W)
    if head + n_full * b < T:
        lo = head + n_full * b
        W_grad = W
        run(lo, T, chunk_gates(theta[..., lo:], eta[..., lo:], alpha[..., lo:]), W_grad)

    pos += T
    if pos % b == 0:
        W_grad = W
    y = torch.cat(ys, dim=2) if ys else q.new_zeros(B, H, 0, v.shape[-1])
    return y.transpose(1, 2), MemoryState(weights=W, momentum=S, chunk_start=W_grad, position=pos)
