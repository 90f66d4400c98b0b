"""The fast path: the chunk-parallel (dual) form of the memory rule (docs/design.md §1).

Shape legend
    B batch, T tokens, H heads, Dk key/query dim, Dv value dim, L memory depth
    BH = B * H, the batch dim of every matmul here; n tokens in one piece (n <= b, the chunk size)
    q, k: [BH, T, Dk]   v: [BH, T, Dv]   theta, eta, alpha: [BH, T]
    per layer l: W, S [BH, do, di]; the state is kept as WS = [W; S], [BH, 2 do, di], so that
    reading and updating both are one matmul
    a[l]: input of layer l on the key path (a[0] = k), [BH, n, di]
    delta[l]: d loss / d (output of layer l) on the key path, [BH, n, do]

Inside a chunk every gradient u_m is taken at the chunk-start weights, so all of them come
from one forward and one analytic backward of the memory on the chunk's keys, in factored form
u^l_m = delta^l_m a^l_m^T. Each token's own weights
    W_i = beta_i W + g_i S - sum_{m<=i} G_{i,m} u_m
are never built: reading them is a masked matmul, (G * (Hq A^T)) @ Delta. The derivation is in
README.md beside this file. Only the loop over chunks is sequential.

The outer (training) backward is hand-written (chunk_backward.py): it keeps only every K-th
chunk state (K ~ sqrt(number of chunks)), rebuilding the others one segment at a time, and
either recomputes each chunk's internals too or, for large memories, gets them from what the
forward kept (KeptInternals). Memory is O(T + sqrt(T/b) * |W|) instead of O(T/b * |W|).

On CPU with the SiLU memory and fp32 states, piece_forward, advance_state, piece_backward, the
gate products and KeptInternals.expand hand their work to the same math in C++ (native.py,
csrc/chunk_native.cpp; README.md beside this file, section 8); the Python below stays the
definition, the fallback and the tests' twin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from . import blas, native
from .nets import ACTIVATIONS, Activation, normalized_step
from .state import MemoryState

__all__ = ["memory_rule_chunk", "chunk_gates", "ChunkGates", "BF16_MIN_MATRIX"]

# Under bf16 autocast the Python path's matmuls run in bf16 only when every per-head memory matrix
# has at least this many entries. Below it its casts cost more than the faster matmuls save: the
# layer's forward+backward at T=4096 with bf16 matmuls against fp32 ran -13% at 4 heads of 96, -2%
# at 2 heads of 192 and +19% at 1 head of 384 (matrices of 589,824 entries), by
# `python benchmarks/state_ops.py --layers` (with the MKL products of blas.py). The native path
# (native.py) casts in its fused loops and runs bf16 products at every size: at 4 heads of 96 its
# step took 0.38 s against 0.50 s with fp32 products (ad-hoc timing, T=4096, B=1).
BF16_MIN_MATRIX = 2 ** 18

# Without autograd the native path runs the loop over pieces in C++ too (scan_inference; the tests
# switch it off to compare with the Python loop, chunk_backward.scan_forward).
NATIVE_SCAN = True


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


def _raw_gates(theta: Tensor, eta: Tensor, alpha: Tensor):
    """The gate products before _flush, and the segment products they come from."""
    keep = 1 - alpha
    p_beta = _segment_products(keep)            # beta_i / beta_r
    p_eta = _segment_products(eta)              # e_i / e_m
    e = eta.cumprod(-1)
    g = (p_beta @ e.unsqueeze(-1)).squeeze(-1)
    M = p_beta @ p_eta
    G = M * theta.unsqueeze(-2)  # lower-triangular: the causal mask is built in
    gates = ChunkGates(beta=keep.cumprod(-1), g=g, G=G, e_last=e[..., -1], s_last=p_eta[..., -1, :] * theta)
    return gates, p_beta, p_eta, e, M


def chunk_gates(theta: Tensor, eta: Tensor, alpha: Tensor, use_native: bool = False) -> ChunkGates:
    """Gate products for chunks laid out on the last dim. theta, eta, alpha: [..., n].

    use_native: the same products from their recurrences in C++ (native.py; fp32, no autograd).
    """
    if use_native:
        return ChunkGates(*native.module().chunk_gates(theta, eta, alpha))
    return ChunkGates(*(_flush(x) for x in _raw_gates(theta, eta, alpha)[0]))


def _product_grad(P: Tensor, total: Tensor, dP: Tensor, dtotal: Tensor) -> Tensor:
    """d/dx_j of every segment product of x, without dividing by x_j (which may be 0).

    P[i, r] = prod_{r<l<=i} x_l (the _segment_products of x), total_i = prod_{l<=i} x_l, with
    incoming gradients dP [..., n, n] (lower triangle) and dtotal [..., n]. Leaving x_j out of a
    product that contains it leaves P[j-1, r] P[i, j] (total_{j-1} P[i, j] for total_i), so
        dx_j = sum_{i>=j} P[i, j] sum_{r<j} dP[i, r] P[j-1, r]   (r = -1: dtotal_i, total_{j-1}).
    """
    ext = torch.cat([total.unsqueeze(-1), P], dim=-1)              # [..., n, n+1]: column 0 is r = -1
    d_ext = torch.cat([dtotal.unsqueeze(-1), dP.tril()], dim=-1)
    first = torch.zeros_like(ext[..., :1, :])
    first[..., 0, 0] = 1                                           # row j = 0: the empty product
    shifted = torch.cat([first, ext[..., :-1, :]], dim=-2)         # row j: ext[j - 1]
    return (P * (d_ext @ shifted.mT)).sum(-2)


def chunk_gates_backward(theta: Tensor, eta: Tensor, alpha: Tensor, d: ChunkGates, use_native: bool = False
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for theta, eta, alpha [..., n] from those of chunk_gates' outputs (d), by hand:
    the chain rule through the lines of _raw_gates and _flush (a flushed entry passes no
    gradient), with the segment products' derivatives from _product_grad. use_native: as in
    chunk_gates (the chain rule through its recurrences)."""
    if use_native:
        return tuple(native.module().chunk_gates_backward(theta, eta, alpha, *d))
    raw, p_beta, p_eta, e, M = _raw_gates(theta, eta, alpha)
    d = ChunkGates(*(dx.masked_fill(_flushed(x), 0.0) for x, dx in zip(raw, d)))
    dtheta = (d.G * M).sum(-2) + d.s_last * p_eta[..., -1, :]
    dM = d.G * theta.unsqueeze(-2)
    dp_beta = dM @ p_eta.mT + d.g.unsqueeze(-1) * e.unsqueeze(-2)
    dp_eta = p_beta.mT @ dM
    dp_eta[..., -1, :] += d.s_last * theta
    de = (p_beta.mT @ d.g.unsqueeze(-1)).squeeze(-1)
    de[..., -1] += d.e_last
    dkeep = _product_grad(p_beta, raw.beta, dp_beta, d.beta)
    deta = _product_grad(p_eta, e, dp_eta, de)
    return dtheta, deta, -dkeep


def _flushed(x: Tensor) -> Tensor:
    """Where _flush zeroes x."""
    tiny = 2.0 ** -900 if x.dtype == torch.float64 else 2.0 ** -80
    return (x > 0) & (x < tiny)


def _flush(x: Tensor) -> Tensor:
    """Zero gate products in (0, 2^-80) for fp32/bf16 (2^-900 for fp64).

    Gate products decay geometrically, and the terms they scale then fall into the subnormal
    range (below 1.2e-38 in fp32), where x86 arithmetic is much slower (docs/memory_rule.md,
    "Subnormal numbers"). What is dropped
    weighs less than 1e-24 against terms of weight 1. All gate products are >= 0; exact zeros
    are left alone so that their gradients still flow.
    """
    return x.masked_fill(_flushed(x), 0.0)


class Buffers:
    """Recycled state-sized tensors for one call of the op.

    A fresh multi-megabyte tensor is page-faulted in on first touch, which costs more than the
    arithmetic written into it: a pass over a 1536 x 384 state into fresh buffers that stay alive
    took 477 us, into a reused one 59 us (`python benchmarks/state_ops.py`). Every state (and its bf16 copy) that the op stops
    needing goes back here and is handed out again for the next piece.
    """

    def __init__(self) -> None:
        self.free: dict[tuple, list[Tensor]] = {}

    def take(self, shape: Sequence[int], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or like.dtype
        stack = self.free.get((tuple(shape), dtype, like.device))
        return stack.pop() if stack else like.new_empty(shape, dtype=dtype)

    def give(self, tensors: Sequence[Tensor]) -> None:
        for t in tensors:
            self.free.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)

    def clear(self) -> None:
        """Drop the recycled tensors (their memory goes back to the allocator)."""
        self.free.clear()


@dataclass
class Setup:
    """What every piece of one call shares."""
    act: Activation
    residual: bool
    mm_dtype: torch.dtype    # matmul operands (bf16 under autocast)
    acc_dtype: torch.dtype   # everything else: the state's dtype
    mixed: bool = False      # bf16 operands, fp32 results through blas.gemm_into (one pass, no cast)
    native: bool = False     # the per-piece forward, state update and backward run in C++ (native.py)
    normalize: bool = False  # the normalised step: delta scaled per token by step_scale
    buffers: Buffers = field(default_factory=Buffers)

    def cast(self, x: Tensor) -> Tensor:
        """An operand for mm(); cast once and reuse when a tensor feeds several matmuls."""
        return x.to(self.mm_dtype)

    def cast_states(self, states: Sequence[Tensor]) -> list[Tensor]:
        """cast() for state-sized tensors, into recycled buffers (give them back after use)."""
        if self.mm_dtype == self.acc_dtype:
            return list(states)
        return [self.buffers.take(x.shape, x, self.mm_dtype).copy_(x) for x in states]

    def scratch(self, states: Sequence[Tensor]) -> list[Tensor]:
        """Recycled bf16 buffers shaped like these states for the native path's copies (none unless mixed)."""
        return [self.buffers.take(x.shape, x, torch.bfloat16) for x in states] if self.mixed else []

    def release_casts(self, casts: Sequence[Tensor]) -> None:
        if self.mm_dtype != self.acc_dtype:
            self.buffers.give(casts)

    def mm(self, x: Tensor, y: Tensor) -> Tensor:
        """Batched matmul x @ y with operands in mm_dtype, result in acc_dtype.

        A batch of one goes through the 2-D matmul: a bf16 bmm whose second operand is the
        transpose of a row block of [W; S] took 441 us, the same 2-D mm 79 us
        (`python benchmarks/state_ops.py`).
        """
        x, y = self.cast(x), self.cast(y)
        if self.mixed:
            out = torch.empty(max(x.shape[0], y.shape[0]), x.shape[1], y.shape[2], dtype=self.acc_dtype)
            return blas.gemm_into(out, x, y)
        if x.shape[0] == 1:
            return torch.mm(x[0], y[0]).unsqueeze(0).to(self.acc_dtype)
        return torch.bmm(x, y).to(self.acc_dtype)

    def outer_into(self, out: Tensor, x: Tensor, y: Tensor, alpha: float = 1.0) -> Tensor:
        """out += alpha * x @ y for state-sized out ([BH, do, di]) from token factors ([BH, n, .]).

        out (the state or its gradient) stays in acc_dtype and the sum is accumulated in it. With
        `mixed` the factors are rounded to bf16 like every other matmul operand here (3x faster
        at config (a): blas.py); without it, the product runs in acc_dtype even under bf16: a bf16
        matmul plus a separate mixed-dtype add made the layer 3-5% slower than the fp32 baddbmm_
        at config (a) (an A/B of three runs each, benchmarks/vs_titans_pytorch.py-style timing).
        """
        if self.mixed:
            # alpha goes into the small factor: MKL's kernel for alpha = beta = 1 ran 1.5-2x faster
            # than with alpha = -1 on these rank-64 shapes (ad-hoc timing of blas.gemm_into)
            return blas.gemm_into(out, self.cast(x if alpha == 1 else x * alpha), self.cast(y), beta=1.0)
        return out.baddbmm_(x.to(self.acc_dtype), y.to(self.acc_dtype), alpha=alpha)


def carry(W: Tensor, S: Tensor, b_n: Tensor, g_n: Tensor, e_n: Tensor, out: Tensor) -> Tensor:
    """out = [b_n W + g_n S; e_n S] (stacked on dim 1). W, S: [BH, r, c]; gates: [BH, 1, 1]; out: [BH, 2r, c].

    The chunk-end carry of the state, without temporaries: these tensors are the largest in the op.
    """
    r = W.shape[1]
    torch.mul(W, b_n, out=out[:, :r]).addcmul_(S, g_n)
    torch.mul(S, e_n, out=out[:, r:])
    return out


@dataclass
class PieceCache:
    """A piece's internals, kept by the backward (chunk_backward.py)."""
    a: list[Tensor]       # key-path inputs per layer, a[0] = k            [BH, n, di]
    zk: list[Tensor]      # key-path pre-activations of layers 0..L-2      [BH, n, do]
    delta: list[Tensor]   # d loss / d output of layer l                  [BH, n, do]
    t: list[Tensor]       # delta[l+1] @ Wg[l+1], layers 0..L-2            [BH, n, do]
    hq: list[Tensor]      # query-path inputs per layer, hq[0] = q         [BH, n, di]
    zq: list[Tensor]      # query-path pre-activations of layers 0..L-2    [BH, n, do]
    P: list[Tensor]       # hq[l] @ a[l]^T                                 [BH, n, n]
    scale: Tensor | None = None  # the normalised step's per-token scale (delta, t hold it)  [BH, n]

    def compact(self) -> "KeptInternals":
        return KeptInternals(self.zk, self.t, self.delta[-1], self.zq, self.P, self.scale)


@dataclass
class KeptInternals:
    """What a PieceCache cannot rebuild without a matmul: the rest (a, delta, hq) follows from
    these, q and k by elementwise ops (expand), bit for bit as the forward computed them."""
    zk: list[Tensor]
    t: list[Tensor]
    delta_last: Tensor
    zq: list[Tensor]
    P: list[Tensor]
    scale: Tensor | None

    def expand(self, q: Tensor, k: Tensor, s: Setup) -> PieceCache:
        """The full PieceCache; q, k: this piece's [BH, n, Dk] (as piece_forward got them)."""
        if s.native:
            a, delta, hq = native.module().expand(self.zk, self.t, self.zq)
        else:
            a = [s.act.fn(z) for z in self.zk]
            delta = [t * s.act.grad(z) for t, z in zip(self.t, self.zk)]
            hq = [s.act.fn(z) for z in self.zq]
        return PieceCache([k] + a, self.zk, delta + [self.delta_last], self.t, [q] + hq, self.zq, self.P,
                          self.scale)


def step_scale(a: Sequence[Tensor], delta: Sequence[Tensor], v: Tensor) -> Tensor:
    """The normalised step's per-token factor [BH, n] (nets.normalized_step) from the key path at
    the chunk-start weights: |u_m|^2 = sum_l |delta^l_m|^2 |a^l_m|^2 and dl/df = delta^L.
    A constant for the outer gradient (not differentiated), in the reference loop too.
    """
    sq = lambda x: (x * x).sum(-1)
    u2 = sum(sq(d) * sq(x) for d, x in zip(delta, a))
    return normalized_step(u2, sq(delta[-1]), sq(a[0]), sq(v))


def key_path(k: Tensor, v: Tensor, Wg: Sequence[Tensor], s: Setup):
    """Forward of the memory on the keys at Wg, then the analytic backward of ||f(k) - v||^2.

    Wg: per layer [BH, do, di], already in mm_dtype. Returns (a, zk, delta, t, scale): the gradient
    of token m for layer l is delta[l]_m a[l]_m^T; t[l] = delta[l+1] @ Wg[l+1] (kept for the
    backward). With s.normalize delta and t come multiplied by the per-token
    step_scale, returned as scale [BH, n] (else None): scaling u_m is scaling theta_m.
    """
    L = len(Wg)
    a, zk, t = [k], [], []
    for l in range(L - 1):
        z = s.mm(a[l], Wg[l].mT)
        zk.append(z)
        a.append(s.act.fn(z))
    out = s.mm(a[L - 1], Wg[L - 1].mT)
    delta = [2 * (out + k - v if s.residual else out - v)]
    for l in range(L - 2, -1, -1):
        t.insert(0, s.mm(delta[0], Wg[l + 1]))
        delta.insert(0, t[0] * s.act.grad(zk[l]))
    scale = None
    if s.normalize:
        scale = step_scale(a, delta, v)
        col = scale.unsqueeze(-1)
        delta, t = [d * col for d in delta], [x * col for x in t]
    return a, zk, delta, t, scale


def gate_columns(gates: ChunkGates):
    """The gates shaped for broadcasting: beta, g [BH, n, 1]; b_n, g_n, e_n [BH, 1, 1]; G_n, s_n [BH, n, 1]."""
    last = lambda x: x[..., None, None]
    return (gates.beta.unsqueeze(-1), gates.g.unsqueeze(-1), last(gates.beta[..., -1]), last(gates.g[..., -1]),
            last(gates.e_last), gates.G[..., -1, :].unsqueeze(-1), gates.s_last.unsqueeze(-1))


def pair(x: Tensor, gx: Tensor, gy: Tensor) -> Tensor:
    """[gx * x, gy * x] concatenated on the last dim, in one op. x: [BH, n, d]; gx, gy: [BH, n, 1] -> [BH, n, 2d]."""
    return (x.unsqueeze(-2) * torch.stack([gx, gy], dim=-2)).flatten(-2)


def piece_forward(q: Tensor, k: Tensor, v: Tensor, gates: ChunkGates, WS: Sequence[Tensor],
                  Wg: Sequence[Tensor] | None, s: Setup, keep: bool = False, advance: bool = True):
    """One piece of n <= b tokens that lies inside one chunk.

    WS: per layer [BH, 2 do, di], the running weights and momentum at the piece start.
    Wg: where the piece's gradients are taken; None means W itself (the piece starts a chunk).
    advance=False skips the state update (the caller already has the next state).
    Returns (y [BH, n, Dv], WS after the piece or None, PieceCache or None).
    """
    if s.native:
        out = [s.buffers.take(ws.shape, ws) for ws in WS] if advance else []
        scratch = s.scratch(WS)
        y, WS_new, *internals = native.module().piece_forward(q, k, v, *gates, list(WS), list(Wg or []), out,
                                                              scratch, s.residual, s.mixed, s.normalize)
        s.buffers.give(scratch)
        return y, (WS_new if advance else None), (PieceCache(*internals) if keep else None)
    L = len(WS)
    dos = [ws.shape[1] // 2 for ws in WS]
    WSc = s.cast_states(WS)
    Wgc = [ws[:, :do] for ws, do in zip(WSc, dos)] if Wg is None else [s.cast(w) for w in Wg]
    a, zk, delta, t, scale = key_path(k, v, Wgc, s)
    beta, g, *_ = gate_columns(gates)

    hq, zq, Ps = [q], [], []
    for l in range(L):
        # z_i = beta_i W h_i + g_i S h_i - sum_{m<=i} G_{i,m} (a_m . h_i) delta_m
        m = s.mm(hq[l], WSc[l].mT)                       # [BH, n, 2 do]: W h and S h at once
        P = s.mm(hq[l], a[l].mT)                         # [BH, n, n]
        z = beta * m[..., :dos[l]] + g * m[..., dos[l]:] - s.mm(gates.G * P, delta[l])
        zq.append(z)
        Ps.append(P)
        if l < L - 1:
            hq.append(s.act.fn(z))
    y = zq[-1] + q if s.residual else zq[-1]
    s.release_casts(WSc)

    WS_new = advance_state(WS, a, delta, gates, s) if advance else None
    # the last layer's pre-activation is not needed by the backward
    cache = PieceCache(a, zk, delta, t, hq, zq[:-1], Ps, scale) if keep else None
    return y, WS_new, cache


def advance_state(WS: Sequence[Tensor], a: Sequence[Tensor], delta: Sequence[Tensor], gates: ChunkGates,
                  s: Setup) -> list[Tensor]:
    """The state after a piece, into recycled buffers. WS: per layer [BH, 2 do, di]; a, delta: the key path.

    W_n = beta_n W + g_n S - sum_m G_{n,m} u_m,  S_n = e_n S - sum_m (e_n/e_m) theta_m u_m
    """
    if s.native:
        out = [s.buffers.take(ws.shape, ws) for ws in WS]
        return native.module().advance_state(list(WS), list(a), list(delta), *gates, out, s.mixed)
    _, _, b_n, g_n, e_n, G_n, s_n = gate_columns(gates)
    out = []
    for ws, a_l, d_l in zip(WS, a, delta):
        do = ws.shape[1] // 2
        new = carry(ws[:, :do], ws[:, do:], b_n, g_n, e_n, out=s.buffers.take(ws.shape, ws))
        # [delta G_n, delta s_n]^T @ a: both factored updates in one matmul
        out.append(s.outer_into(new, pair(d_l, G_n, s_n).mT, a_l, alpha=-1.0))
    return out


class Plan(NamedTuple):
    """How [0, T) splits into pieces aligned to absolute chunk boundaries."""
    head: int      # tokens that finish the chunk a previous call left open (0 if aligned)
    n_full: int    # full chunks after the head
    b: int         # chunk size

    def pieces(self, T: int) -> list[tuple[int, int]]:
        out = [(0, self.head)] if self.head else []
        out += [(self.head + c * self.b, self.head + (c + 1) * self.b) for c in range(self.n_full)]
        if self.head + self.n_full * self.b < T:
            out.append((self.head + self.n_full * self.b, T))
        return out

    def full_index(self, p: int) -> int | None:
        """Which full chunk piece p is, or None for the head and the tail."""
        c = p - (1 if self.head else 0)
        return c if 0 <= c < self.n_full else None


# Full chunks whose gate products are computed in one batch. One batch over all chunks made
# [BH, chunks, b, b] temporaries at every step (4 MB each at 4 heads, T=4096), and through the
# backward's autograd graph they stayed alive at once (the last 89 MB of the layer's peak RSS at
# 4 heads of 96, T=4096: docs/benchmarks.md, "Memory").
GATE_GROUP = 8


def gate_groups(plan: Plan, T: int) -> list[tuple[int, int, list[int], bool]]:
    """The pieces in groups for the gate products: (lo, hi, pieces, batched). The head and tail
    pieces are groups of their own; the full chunks come GATE_GROUP at a time (batched)."""
    groups, full = [], []
    for p, (lo, hi) in enumerate(plan.pieces(T)):
        if plan.full_index(p) is None:
            groups.append((lo, hi, [p], False))
            continue
        full.append(p)
        if len(full) == GATE_GROUP or plan.full_index(p) == plan.n_full - 1:
            groups.append((hi - len(full) * plan.b, hi, full, True))
            full = []
    return groups


def group_inputs(theta: Tensor, eta: Tensor, alpha: Tensor, n: int, batched: bool) -> list[Tensor]:
    """One group's gates ([BH, tokens]) laid out for chunk_gates: batched, n chunks of equal length
    as [BH, n, tokens / n] (the gate products' fields then [BH, n, ...]); else as they are."""
    xs = [theta, eta, alpha]
    return [x.unflatten(-1, (n, x.shape[-1] // n)) for x in xs] if batched else xs


def all_gates(theta: Tensor, eta: Tensor, alpha: Tensor, plan: Plan, use_native: bool = False) -> list[ChunkGates]:
    """Gate products of every piece."""
    out = []
    for lo, hi, ps, batched in gate_groups(plan, theta.shape[1]):
        gates = chunk_gates(*group_inputs(theta[:, lo:hi], eta[:, lo:hi], alpha[:, lo:hi], len(ps), batched),
                            use_native=use_native)
        out += [ChunkGates(*(x[:, i] for x in gates)) for i in range(len(ps))] if batched else [gates]
    return out


def memory_rule_chunk(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor,
                      weights: Sequence[Tensor], *, chunk_size: int = 64, activation: str = "silu",
                      residual: bool = False, normalize_step: bool = False, state: MemoryState | None = None
                      ) -> tuple[Tensor, MemoryState]:
    """Same contract as `titans.ops.memory_rule` (inputs are assumed valid)."""
    from .chunk_backward import ChunkScan, scan_forward  # the loop over pieces and its autograd wrapper

    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    L = len(weights)
    if state is None:
        state = MemoryState.initial(weights, B)
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), state
    pos, b = state.position, chunk_size
    head = min(T, (-pos) % b)
    plan = Plan(head=head, n_full=(T - head) // b, b=b)

    # [B, T, H, D] -> [BH, T, D]: heads become part of the matmul batch
    flat = lambda x: x.transpose(1, 2).reshape(B * H, T, *x.shape[3:])
    state_flat = lambda x: x.reshape(B * H, *x.shape[2:])
    WS0 = [torch.cat([state_flat(w), state_flat(s)], dim=1) for w, s in zip(state.weights, state.momentum)]
    resumes = head > 0  # this call starts inside a chunk: its first piece takes gradients at chunk_start
    Wg0 = [state_flat(c) for c in state.chunk_start] if resumes else []

    acc_dtype = mm_dtype = WS0[0].dtype
    can_mix = blas.AVAILABLE and q.device.type == "cpu" and acc_dtype == torch.float32
    use_native = native.available(activation, WS0[0])
    if torch.is_autocast_enabled(q.device.type) and ((use_native and can_mix)
                                                     or min(w[0].numel() for w in weights) >= BF16_MIN_MATRIX):
        mm_dtype = torch.get_autocast_dtype(q.device.type)
    mixed = can_mix and mm_dtype == torch.bfloat16
    use_native = use_native and (mixed or mm_dtype == acc_dtype)
    setup = Setup(ACTIVATIONS[activation], residual, mm_dtype, acc_dtype, mixed, use_native,
                  normalize=normalize_step)
    inputs = [flat(x).to(acc_dtype) for x in (q, k, v, theta, eta, alpha)]
    # the native path reads token rows with unit stride (a view of the features' buffer has it)
    inputs[:3] = [x if x.stride(-1) == 1 else x.contiguous() for x in inputs[:3]]
    with torch.autocast(q.device.type, enabled=False):
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs + WS0 + Wg0):
            y, *outs = ChunkScan.apply(setup, plan, L, *inputs, *WS0, *Wg0)
            WS_end, WS_last_start = outs[:L], outs[L:]
        elif use_native and NATIVE_SCAN:  # inference, the loop over pieces in C++ too
            y, WS_end, WS_last_start = native.module().scan_inference(*inputs, WS0, Wg0, head, b, residual, mixed,
                                                                       normalize_step)
        else:  # inference: nothing to keep for a backward
            y, WS_end, WS_last_start, _ = scan_forward(setup, plan, *inputs, WS0, Wg0 or None, track=False)

    unflat = lambda x: x.reshape(B, H, *x.shape[1:])
    dos = [w.shape[1] for w in weights]
    W_end = [unflat(ws[:, :do]) for ws, do in zip(WS_end, dos)]
    S_end = [unflat(ws[:, do:]) for ws, do in zip(WS_end, dos)]
    end = pos + T
    if end % b == 0:
        chunk_start = W_end
    elif end - (end % b) >= pos:  # the last piece started at a chunk boundary inside this call
        chunk_start = [unflat(ws[:, :do]) for ws, do in zip(WS_last_start, dos)]
    else:
        chunk_start = list(state.chunk_start)
    y = y.reshape(B, H, T, Dv).transpose(1, 2)
    return y, MemoryState(weights=W_end, momentum=S_end, chunk_start=chunk_start, position=end)


def checkpoint_interval(n_pieces: int) -> int:
    """Keep every K-th piece state in the forward: K ~ sqrt(pieces) balances kept vs rebuilt states."""
    return max(1, math.isqrt(max(n_pieces - 1, 0)) + 1) if n_pieces > 4 else 1
