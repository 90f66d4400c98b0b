"""The hand-written outer backward of the chunk path, and the autograd.Function around it.

Shape legend: as in chunk.py (BH = B * H; n tokens in a piece; per layer WS = [W; S],
[BH, 2 do, di]). A leading `d` names the gradient of the outer loss with respect to a tensor.

The forward of a piece (chunk.py, piece_forward) is, per layer l and with R = G * P:
    key path at Wg:   zk = a Wg^T, a' = act(zk); out = a_L; delta_L = 2 (out - v);
                      t = delta_{l+1} Wg_{l+1}, delta_l = t * act'(zk_l)
    query path:       m = h [W; S]^T, P = h a^T, z = beta * m_W + g * m_S - (G * P) delta, h' = act(z)
    chunk end:        WS' = [b_n W + g_n S; e_n S] - [delta G_n, delta s_n]^T a
piece_backward applies the chain rule to exactly these lines, bottom to top. The test suite
checks it against torch.autograd through the literal token loop (naive.py).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import native
from .chunk import (ChunkGates, KeptInternals, PieceCache, Plan, Setup, advance_state, all_gates,
                    checkpoint_interval, chunk_gates_backward, gate_columns, gate_groups, group_inputs, pair,
                    piece_forward)

__all__ = ["ChunkScan", "piece_backward", "scan_forward"]


def _vdot(x: Tensor, y: Tensor) -> Tensor:
    """Per-batch inner product of two [BH, r, c] tensors -> [BH].

    State-sized rows go through torch.dot one row at a time: it allocates nothing, while
    vecdot over [1, N] rows materialises the product first (138 us against 53 us on a 1536 x 384
    state, `python benchmarks/state_ops.py`).
    """
    if x[0].numel() < 2 ** 17:
        return torch.linalg.vecdot(x.flatten(1), y.flatten(1))
    return torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(x, y)])


def piece_backward(c: PieceCache, gates: ChunkGates, WS: list[Tensor], Wg_given: list[Tensor] | None,
                   dy: Tensor, dWS_end: list[Tensor], s: Setup, dgates: ChunkGates | None = None):
    """Gradients of one piece. dy: [BH, n, Dv]; dWS_end: per layer [BH, 2 do, di].
    dgates: zeroed tensors shaped like gates to write the gate gradients into (None: new ones).

    Returns (dq, dk, dv, dgates: ChunkGates, dWS_start per layer, dWg per layer or None).
    """
    if dgates is None:
        dgates = ChunkGates(*(torch.zeros_like(x) for x in gates))
    if s.native:
        scratch = s.scratch([x for ws in WS for x in (ws, ws)])  # per layer: copies of WS and of dWS
        dq, dk, dv, *dWg = native.module().piece_backward(
            c.a, c.zk, c.delta, c.t, c.hq, c.zq, c.P, c.scale, *gates, WS, Wg_given or [], dy, dWS_end, *dgates,
            scratch, s.residual, s.mixed)
        s.buffers.give(scratch)
        return dq, dk, dv, dgates, dWS_end, (dWg if Wg_given is not None else None)
    L = len(WS)
    dos = [ws.shape[1] // 2 for ws in WS]
    WSc = s.cast_states(WS)
    Wgc = [ws[:, :do] for ws, do in zip(WSc, dos)] if Wg_given is None else [s.cast(w) for w in Wg_given]
    beta, g, b_n, g_n, e_n, G_n, s_n = gate_columns(gates)
    G = gates.G
    dgate = dgates._asdict()  # written in place

    # chunk end: WS' = [b_n W + g_n S; e_n S] - coef^T a with coef = [delta G_n, delta s_n].
    # dWS_end is ours to overwrite: after its last reads it becomes the carried gradient.
    ddelta, da, dWS, dEcs = [], [], [], []
    for l in range(L):
        do, dE = dos[l], dWS_end[l]
        W, S = WS[l][:, :do], WS[l][:, do:]
        dWe, dSe = dE[:, :do], dE[:, do:]
        dgate["beta"][..., -1] += _vdot(dWe, W)
        dgate["g"][..., -1] += _vdot(dWe, S)
        dgate["e_last"] += _vdot(dSe, S)
        dEc, = s.cast_states([dE])
        dEcs.append(dEc)
        X = s.mm(c.a[l], dEc.mT)                           # [BH, n, 2 do] = -(d coef)
        XW, XS = X[..., :do], X[..., do:]
        ddelta.append(-(G_n * XW + s_n * XS))
        dgate["G"][..., -1, :] -= (c.delta[l] * XW).sum(-1)
        dgate["s_last"] -= (c.delta[l] * XS).sum(-1)
        da.append(-s.mm(pair(c.delta[l], G_n, s_n), dEc))  # [BH, n, di]
        dSe.mul_(e_n).addcmul_(dWe, g_n)                   # the carry, transposed, in place:
        dWe.mul_(b_n)                                      # [dW; dS] <- [b_n dW; g_n dW + e_n dS]
        dWS.append(dE)

    # query path, top layer down: z = beta * m_W + g * m_S - R delta, R = G * P, P = h a^T
    dz, dh = dy, None  # dh: d (input of layer l + 1) on the query path, from the layer above
    for l in range(L - 1, -1, -1):
        do = dos[l]
        if l < L - 1:
            dz = dh * s.act.grad(c.zq[l])
        # m = h [W; S]^T is not kept: with X = dz W and Y = dz S, d beta_i = X_i . h_i,
        # d g_i = Y_i . h_i and d h = beta X + g Y (the same FLOPs as d m @ [W; S])
        BH, n, _ = dz.shape
        # one bmm over [W; S] viewed as a batch of 2 per head (a bmm with dz expanded took 398 us
        # against 523 us for two mm on the halves at 64 x 1536 x 384, fp32; ad-hoc timing)
        XY = s.mm(dz.unsqueeze(1).expand(BH, 2, n, do).reshape(2 * BH, n, do), WSc[l].reshape(2 * BH, do, -1))
        X, Y = XY.view(BH, 2, n, -1).unbind(1)                 # [BH, n, di] each
        h = c.hq[l]
        dgate["beta"] += (X * h).sum(-1)
        dgate["g"] += (Y * h).sum(-1)
        s.outer_into(dWS[l], pair(dz, beta, g).mT, h)          # d m = [beta dz, g dz]
        dR = -s.mm(dz, c.delta[l].mT)                          # [BH, n, n]
        ddelta[l] -= s.mm((G * c.P[l]).mT, dz)
        dgate["G"] += dR * c.P[l]
        dP = dR * G
        dh = (X.mul_(beta).addcmul_(Y, g)).add_(s.mm(dP, c.a[l]))
        da[l] += s.mm(dP.mT, c.hq[l])
    dq = dh + dy if s.residual else dh

    # key path: gradients wrt Wg go straight into dWS when the piece took them at W itself
    if Wg_given is None:
        dWg = [dws[:, :do] for dws, do in zip(dWS, dos)]
    else:
        dWg = [torch.zeros_like(w) for w in Wg_given]
    # first the analytic inner backward (delta_l = t_l * act'(zk_l), t_l = delta_{l+1} Wg_{l+1})
    dzk, gk = [], [s.act.grad(z) for z in c.zk]
    for l in range(L - 1):
        dt = ddelta[l] * gk[l]
        dzk.append(ddelta[l] * c.t[l] * s.act.grad2(c.zk[l]))
        ddelta[l + 1] += s.mm(dt, Wgc[l + 1].mT)
        s.outer_into(dWg[l + 1], c.delta[l + 1].mT, dt)
    # then delta_L = 2 (out - v) and the memory's forward on the keys. With the normalised step
    # the cache holds scale * delta and scale * t, so ddelta is the gradient of the unscaled
    # delta over scale all the way down (the products with t and delta above come out right)
    dout = 2 * ddelta[L - 1] if c.scale is None else 2 * c.scale.unsqueeze(-1) * ddelta[L - 1]
    dv = -dout
    dzl = dout
    for l in range(L - 1, -1, -1):
        s.outer_into(dWg[l], dzl.mT, c.a[l])
        da[l] += s.mm(dzl, Wgc[l])
        if l > 0:
            dzl = da[l] * gk[l - 1] + dzk[l - 1]
    dk = da[0] + dout if s.residual else da[0]
    s.release_casts(WSc + dEcs)

    dgate["G"].tril_()
    return dq, dk, dv, dgates, dWS, (dWg if Wg_given is not None else None)


def _gate_backward(plan: Plan, theta: Tensor, eta: Tensor, alpha: Tensor, dgates: list[ChunkGates | None],
                   dfull: ChunkGates, use_native: bool):
    """Gradients for theta, eta, alpha [BH, T] from those of every piece's gate products
    (chunk_gates_backward), one group of gate_groups at a time. A chunk's gates depend only on
    its own tokens: each group's gradient is a slice of the result. dfull: the gate gradients of
    all full chunks (fields [BH, n_full, ...]); dgates: those of the other pieces (None for full
    chunks)."""
    dtea = [torch.empty_like(x) for x in (theta, eta, alpha)]
    for lo, hi, ps, batched in gate_groups(plan, theta.shape[1]):
        tea = group_inputs(theta[:, lo:hi], eta[:, lo:hi], alpha[:, lo:hi], len(ps), batched)
        if batched:
            c0 = plan.full_index(ps[0])
            grads = ChunkGates(*(x[:, c0:c0 + len(ps)] for x in dfull))
        else:
            grads = dgates[ps[0]]
        for out, di in zip(dtea, chunk_gates_backward(*tea, grads, use_native=use_native)):
            out[:, lo:hi] = di.flatten(-2) if batched else di
    return dtea


# Below this many bytes of piece internals and states, the forward keeps them all and the
# backward recomputes nothing; above, it keeps every K-th state (sqrt checkpointing).
KEEP_ALL_BYTES = 256 * 2 ** 20
# Above KEEP_ALL_BYTES, with memory matrices of at least this many entries per head and while
# they take at most KEEP_INTERNALS_MAX_BYTES, the forward also keeps every piece's KeptInternals
# (O(T) memory, like any autograd graph) and the backward rebuilds only the states, with no
# matmul but the state update. Large matrices gain the most per byte kept: at T=4096 the layer's
# forward+backward ran 16% faster at 1 head of 384 (3,129 against 2,692 tok/s, peak RSS 709
# against 627 MB: `python benchmarks/vs_titans_pytorch.py --sides ours --configs a --T 4096 --B 1`
# before and after), but only 4-7% at 4 heads of 96 (ad-hoc timing) for +75 MB of peak RSS
# (`python benchmarks/layer_memory.py --config b` with this threshold forced to 0).
KEEP_INTERNALS_MIN_MATRIX = 2 ** 17
KEEP_INTERNALS_MAX_BYTES = 2 ** 30


def _nbytes(obj) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, (PieceCache, KeptInternals)):
        return sum(_nbytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 0


def scan_forward(s: Setup, plan: Plan, q, k, v, theta, eta, alpha, WS0: list[Tensor], Wg0: list[Tensor] | None,
                 track: bool):
    """The loop over pieces. Returns (y, WS_end, WS_last_start, saved) where, with track=True,
    saved is what the backward needs: a list of (WS, PieceCache) per piece when they fit in
    KEEP_ALL_BYTES, else (states, internals): a dict {piece: WS} of every K-th piece-start state
    and, with large memory matrices (KEEP_INTERNALS_MIN_MATRIX), a list of every piece's
    KeptInternals (else None)."""
    pieces = plan.pieces(q.shape[1])
    gates = all_gates(theta, eta, alpha, plan, s.native)
    keep_every = checkpoint_interval(len(pieces))
    keep_all = track
    keep_internals = track and min(ws[0].numel() // 2 for ws in WS0) >= KEEP_INTERNALS_MIN_MATRIX
    saved_all, kept, internals = [], {}, []
    # one output buffer: pieces' outputs held in a list until a final cat were long-lived small
    # blocks among the loop's temporaries (heap fragmentation), and the cat a second copy
    y_all = v.new_empty(v.shape)
    WS = WS_last_start = WS0
    for p, (lo, hi) in enumerate(pieces):
        if track and p % keep_every == 0 and p > 0:
            kept[p] = WS
        WS_last_start = WS
        y, WS_next, cache = piece_forward(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], gates[p], WS,
                                          Wg0 if p == 0 else None, s, keep=keep_all or keep_internals)
        if keep_all:
            saved_all.append((WS, cache))
            if p == 0 and _nbytes(saved_all[0]) * len(pieces) > KEEP_ALL_BYTES:
                keep_all, saved_all = False, []
        if not keep_all:
            if keep_internals:
                internals.append(cache.compact())
                if p == 0 and _nbytes(internals[0]) * len(pieces) > KEEP_INTERNALS_MAX_BYTES:
                    keep_internals, internals = False, []
            if p < len(pieces) - 1 and WS is not WS0 and kept.get(p) is not WS:
                s.buffers.give(WS)  # nobody needs this piece's start state any more
        WS = WS_next
        y_all[:, lo:hi] = y
    s.buffers.clear()  # do not hold recycled buffers between the forward and the backward
    saved = None
    if track:
        saved = saved_all if keep_all else (kept, internals if keep_internals else None)
    return y_all, WS, WS_last_start, saved


def _rebuild_segment(s: Setup, pieces, p0: int, p1: int, WS: list[Tensor], Wg0: list[Tensor] | None, q, k, v,
                     gates: list[ChunkGates], internals: list[KeptInternals | None] | None):
    """The (WS, PieceCache) of pieces p0..p1-1 from the state kept at p0. With the forward's kept
    internals only the states are rebuilt (each piece's internals expanded, and released from
    `internals`); otherwise every piece's forward runs again. The segment's last piece needs no
    end state: it is the next segment's kept start, or the op's output."""
    seg = []
    for p in range(p0, p1):
        lo, hi = pieces[p]
        if internals is not None:
            cache, internals[p] = internals[p].expand(q[:, lo:hi], k[:, lo:hi], s), None
            seg.append((WS, cache))
            if p < p1 - 1:
                WS = advance_state(WS, cache.a, cache.delta, gates[p], s)
        else:
            _, WS_next, cache = piece_forward(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], gates[p], WS,
                                              Wg0 if p == 0 else None, s, keep=True, advance=p < p1 - 1)
            seg.append((WS, cache))
            WS = WS_next
    return seg


class ChunkScan(torch.autograd.Function):
    """The loop over pieces, forward and backward. Inputs are in the flat [BH, ...] layout.

    apply(setup, plan, L, q, k, v, theta, eta, alpha, *WS0, *Wg0) -> (y, *WS_end, *WS_last_start)
    WS_last_start is the state at the start of the last piece (the chunk_start of the result
    when that piece began at a chunk boundary). Wg0 is given only when the call resumes inside
    a chunk. Double backward is not supported.
    """

    @staticmethod
    def forward(ctx, setup: Setup, plan: Plan, L: int, q, k, v, theta, eta, alpha, *states):
        WS0, Wg0 = list(states[:L]), list(states[L:]) or None
        y, WS, WS_last_start, saved = scan_forward(setup, plan, q, k, v, theta, eta, alpha, WS0, Wg0, track=True)
        ctx.setup, ctx.plan, ctx.L, ctx.saved = setup, plan, L, saved
        ctx.save_for_backward(q, k, v, theta, eta, alpha, *states)
        return (y, *WS, *WS_last_start)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *dstates):
        # the precision was fixed in the forward (Setup): a backward called inside autocast must
        # not recast our matmuls (it made the two rebuild paths differ, and both differ from a
        # backward called outside)
        with torch.autocast(dy.device.type, enabled=False):
            return ChunkScan._backward(ctx, dy, *dstates)

    @staticmethod
    def _backward(ctx, dy, *dstates):
        s, plan, L = ctx.setup, ctx.plan, ctx.L
        q, k, v, theta, eta, alpha, *states = ctx.saved_tensors
        WS0, Wg0 = list(states[:L]), list(states[L:]) or None
        pieces = plan.pieces(q.shape[1])
        # the gate products, without a graph while the loop runs (its [BH, chunks, b, b] tensors
        # would stay alive through the whole backward); _gate_backward redoes them at the end
        plain = all_gates(theta, eta, alpha, plan, s.native)
        # copies: the backward updates the carried state gradient in place
        dWS = [d.clone(memory_format=torch.contiguous_format) if d is not None else torch.zeros_like(w)
               for d, w in zip(dstates[:L], WS0)]
        dy = dy.contiguous()  # autograd may hand over an expanded (stride-0) gradient
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        # the gate gradients of the full chunks, allocated once: ~70 KB per chunk at 4 heads, kept
        # to the end; allocated piece by piece among the loop's temporaries they fragmented the
        # heap (peak RSS +36 MB at 4 heads of 96, T=4096: ad-hoc trace of heap in use and RSS)
        BH, b = theta.shape[0], plan.b
        dfull = ChunkGates(*(theta.new_zeros(BH, plan.n_full, *shape) for shape in ((b,), (b,), (b, b), (), (b,))))
        dgates: list[ChunkGates | None] = [None] * len(pieces)  # the head and the tail piece
        dWg0 = None
        # released here: a second backward through the same graph (retain_graph) finds None and
        # recomputes everything from the initial state
        saved, ctx.saved = ctx.saved, None
        keep_all = isinstance(saved, list)  # the forward kept every piece's states and internals
        kept, internals = ({}, None) if saved is None or keep_all else saved
        kept = {**kept, 0: WS0}
        starts = sorted(kept)
        for i in range(len(starts) - 1, -1, -1):
            p0 = starts[i]
            p1 = starts[i + 1] if i + 1 < len(starts) else len(pieces)
            seg = saved if keep_all else _rebuild_segment(s, pieces, p0, p1, kept[p0], Wg0, q, k, v, plain, internals)
            for p in range(p1 - 1, p0 - 1, -1):
                lo, hi = pieces[p]
                WS, cache = seg[p - p0]
                full = plan.full_index(p)
                out = None if full is None else ChunkGates(*(x[:, full] for x in dfull))
                gq, gk, gv, dg, dWS, dWg = piece_backward(cache, plain[p], WS, Wg0 if p == 0 else None,
                                                          dy[:, lo:hi], dWS, s, out)
                if full is None:
                    dgates[p] = dg
                if p == len(pieces) - 1:  # the state at the last piece's start is an output too
                    dWS = [d if e is None else d + e for d, e in zip(dWS, dstates[L:])]
                dq[:, lo:hi], dk[:, lo:hi], dv[:, lo:hi] = gq, gk, gv
                if p == 0:
                    dWg0 = dWg
            if not keep_all:  # the segment's states are done with: recycle them, except
                # the op's input (piece 0) and the last piece's start state, which the op returned
                # (its chunk_start) and the caller may still hold
                s.buffers.give([ws for p, (states, _) in enumerate(seg, p0) if 0 < p < len(pieces) - 1
                                for ws in states])
            del seg
        s.buffers.clear()
        dtea = _gate_backward(plan, theta, eta, alpha, dgates, dfull, s.native)
        return (None, None, None, dq, dk, dv, *dtea, *dWS, *(dWg0 or []))
