"""The three Titans variants as block mixers: MAC, MAG, MAL (paper section 4, docs/design.md §3).

Shape legend
    B batch, T tokens in this call, dim model width, H attention heads, Dh head dim
    Np persistent tokens, C MAC segment length, t tokens of one segment piece, e = offset + t
    x, y, o: [B, T, dim]   q: [B, H, t, Dh]   segment keys/values: [B, H, e, Dh]

Persistent tokens are shared by a block's attention and memory. In MAG and MAL they are a
prefix of the memory's input (x~ = p || x), written into the memory before the first token;
in MAG and MAC every attention query also sees their keys (position-free, window-free).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import AttentionState, NeuralMemoryState, PersistentMemory, RMSNorm
from ..ops import memory_forward
from ..ops.attention import rotary
from ..ops.features import l2norm
from .blocks import attention_from_config, neural_memory_from_config
from .config import TitansConfig

__all__ = ["MAC", "MAG", "MAL", "MACState", "AttnMemoryState", "BranchGate"]


class BranchGate(nn.Module):
    """o = W_o (RMSNorm_y(y) * sigmoid(RMSNorm_m(m))): the (x) of eq. 25 and 28.

    Each branch is normalised with its own learnable vector weight, then the memory branch
    gates the attention branch through a sigmoid (the paper's "non-linearity"). The gated
    product has RMS about 0.5 whatever the branches' scales; the projection W_o after it is a
    residual-stream writer like every mixer's last linear (initialised small, TitansLM.init_weights),
    so the block starts near the identity as the other blocks do.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm_y, self.norm_m = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, y: Tensor, m: Tensor) -> Tensor:
        return self.wo(self.norm_y(y) * torch.sigmoid(self.norm_m(m)))


def _with_prefix(memory: nn.Module, p: Tensor, x: Tensor, state: NeuralMemoryState | None):
    """Run the memory over p || x when the stream starts (state None), else over x.

    Returns the memory's outputs at the prefix and at x, [B, Np, dim] and [B, T, dim], and its state.
    """
    B = x.shape[0]
    if state is not None:
        y, state = memory(x, state)
        return x.new_zeros(B, 0, x.shape[2]), y, state
    xt = torch.cat([p.to(x.dtype).unsqueeze(0).expand(B, -1, -1), x], dim=1)
    y, state = memory(xt, None)
    return y[:, :p.shape[0]], y[:, p.shape[0]:], state


# --------------------------------------------------------------------------------------------
@dataclass
class AttnMemoryState:
    """State of a MAG or MAL mixer: its attention cache and its memory (None before the start)."""
    attention: AttentionState | None
    memory: NeuralMemoryState | None

    def detach(self) -> "AttnMemoryState":
        return AttnMemoryState(*(s.detach() if s is not None else None for s in (self.attention, self.memory)))


class MAG(nn.Module):
    """Memory as a Gate (eq. 26-28): y = SWA*(p || x), m = LMM(p || x), o = y (x) m."""

    def __init__(self, c: TitansConfig) -> None:
        super().__init__()
        self.attention = attention_from_config(c, window=c.window, n_persistent=c.n_persistent)
        self.memory = neural_memory_from_config(c)
        self.gate = BranchGate(c.dim, c.norm_eps)

    def init_state(self, batch_size: int) -> AttnMemoryState:
        return AttnMemoryState(None, None)

    def _persistent(self, like: Tensor) -> Tensor:
        p = self.attention.persistent
        return p() if p is not None else like.new_zeros(0, like.shape[-1])

    def forward(self, x: Tensor, state: AttnMemoryState | None = None) -> tuple[Tensor, AttnMemoryState]:
        state = state or self.init_state(x.shape[0])
        y, attn = self.attention(x, state.attention)            # persistent keys seen by every query
        _, m, mem = _with_prefix(self.memory, self._persistent(x), x, state.memory)
        return self.gate(y, m), AttnMemoryState(attn, mem)


# --------------------------------------------------------------------------------------------
class MAL(nn.Module):
    """Memory as a Layer (eq. 29-31): y = LMM(p || x), o = SWA(RMSNorm(y)); with
    config.mal_residual the memory is a residual layer: o = y + SWA(RMSNorm(p || x + y)).

    The prefix's memory outputs are the first Np positions of y, so the attention sees them
    as the sequence's first tokens (RoPE positions 0..Np-1; x starts at Np), literally eq. 31.
    The memory's output is a residual-stream writer (small at init), so the attention, a layer
    of its own in the paper, gets its own pre-norm.
    """

    def __init__(self, c: TitansConfig) -> None:
        super().__init__()
        self.persistent = PersistentMemory(c.n_persistent, c.dim)
        self.memory = neural_memory_from_config(c)
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.attention = attention_from_config(c, window=c.window)
        self.residual = c.mal_residual

    def init_state(self, batch_size: int) -> AttnMemoryState:
        return AttnMemoryState(None, None)

    def forward(self, x: Tensor, state: AttnMemoryState | None = None) -> tuple[Tensor, AttnMemoryState]:
        state = state or self.init_state(x.shape[0])
        p = self.persistent()
        yp, y, mem = _with_prefix(self.memory, p, x, state.memory)
        if self.residual:  # the memory as a residual layer: the attention sees x + LMM(x), and so does the output
            yp = yp + p.to(x.dtype)[:yp.shape[1]].unsqueeze(0)
            o, attn = self.attention(self.norm(torch.cat([yp, x + y], dim=1)), state.attention)
            return y + o[:, yp.shape[1]:], AttnMemoryState(attn, mem)
        o, attn = self.attention(self.norm(torch.cat([yp, y], dim=1)), state.attention)
        return o[:, yp.shape[1]:], AttnMemoryState(attn, mem)


# --------------------------------------------------------------------------------------------
@dataclass
class MACState:
    """MAC streaming state: the memory, the weights it had at the segment start (read-only
    retrieval for the whole segment), and the segment's rotated attention keys/values so far
    (h then x, at most C of each)."""
    memory: NeuralMemoryState | None
    segment_weights: list[Tensor] | None
    k: Tensor | None            # [B, H, 2 e, Dh]: h keys then x keys of the segment so far
    v: Tensor | None
    position: int

    def detach(self) -> "MACState":
        d = lambda t: None if t is None else t.detach()
        return MACState(None if self.memory is None else self.memory.detach(),
                        None if self.segment_weights is None else [w.detach() for w in self.segment_weights],
                        d(self.k), d(self.v), self.position)


class MAC(nn.Module):
    """Memory as Context (eq. 21-25), segment by segment (segments of C = segment_len tokens).

    For a segment S with input x (docs/design.md §3):
        h_i = f(q_i; W at the segment start)            read only, q from x     (eq. 21)
        y   = Attn([p || h || x]) at the x positions    row i sees p, h_<=i, x_<=i (eq. 22-23)
        the memory is written with y (keys/values from y), and with W_i its per-token weights
        o_i = y_i (x) f(q'_i; W_i), q' from y           (eq. 24-25)
    config.mac_write chooses the written stream: "y" is eq. 24 literally; "residual" writes
    x + y, the stream after the attention layer with its skip connection; "x" writes the
    block's input (as titans-pytorch does). docs/models.md gives the measurements.
    h_j and x_j share RoPE position j; persistent keys are position-free.
    """

    def __init__(self, c: TitansConfig) -> None:
        super().__init__()
        self.C, self.heads, self.head_dim, self.rope_base = c.segment_len, c.heads, c.attn_head_dim, c.rope_base
        inner = c.heads * c.attn_head_dim
        self.wq, self.wk, self.wv = (nn.Linear(c.dim, inner, bias=False) for _ in range(3))
        self.wo = nn.Linear(inner, c.dim, bias=False)
        self.persistent = PersistentMemory(c.n_persistent, c.dim)
        self.memory = neural_memory_from_config(c)
        self.gate = BranchGate(c.dim, c.norm_eps)
        self.write = c.mac_write

    def init_state(self, batch_size: int) -> MACState:
        return MACState(None, None, None, None, 0)

    def _split(self, x: Tensor) -> Tensor:  # [B, t, H Dh] -> [B, H, t, Dh]
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def retrieve(self, x: Tensor, weights: list[Tensor] | None) -> Tensor:
        """h = f(q; W) with the segment-start weights W, through the memory's output path."""
        mem = self.memory
        B, T, _ = x.shape
        inner = mem.heads * mem.head_dim
        # the convolution belongs to the written stream (y); the retrieval query is pointwise
        q = F.linear(x, mem.wqkv.weight[:inner])
        q = l2norm((F.silu(q) if mem.qk_silu else q).view(B, T, mem.heads, mem.head_dim))  # as the memory's q
        W = weights if weights is not None else [w.unsqueeze(0) for w in mem.memory]   # W_0 before any write
        r = memory_forward(q.transpose(1, 2), W, mem.activation, mem.residual)          # [B, H, T, Dh]
        return mem.read_out(r.transpose(1, 2), x)

    def forward(self, x: Tensor, state: MACState | None = None) -> tuple[Tensor, MACState]:
        B, T, _ = x.shape
        state = state or self.init_state(B)
        # without autograd and with the block's input written, everything but the memory depends
        # on x alone: a call's whole segments go through `_segments` together (prefill, evaluation)
        batch_segments = self.write == "x" and not torch.is_grad_enabled()
        outs, i = [], 0
        while i < T:  # one piece per segment: segments start at absolute multiples of C
            offset = state.position % self.C
            n = (T - i) // self.C if batch_segments and offset == 0 else 0
            if n:
                o, state = self._segments(x[:, i:i + n * self.C], state, n)
                i += n * self.C
            else:
                t = min(T - i, self.C - offset)
                o, state = self._piece(x[:, i:i + t], state, offset)
                i += t
            outs.append(o)
        return (torch.cat(outs, dim=1) if outs else x[:, :0]), state

    def _segments(self, x: Tensor, state: MACState, S: int) -> tuple[Tensor, MACState]:
        """S whole segments at once, x [B, S C, dim] starting at a segment boundary, with
        mac_write="x": the same as S calls of `_piece`, with only the memory run per segment."""
        B, N, _ = x.shape
        C, H, Dh, mem = self.C, self.heads, self.head_dim, self.memory
        ms, seg_ws, mem_state = [], [], state.memory
        for s in range(S):   # the memory, and its weights at each segment start (the retrieval's)
            seg_ws.append(None if mem_state is None else mem_state.memory.weights)
            m, mem_state = mem(x[:, s * C:(s + 1) * C], mem_state)
            ms.append(m)
        # the retrieval of every segment with its start weights, segments in the batch dimension: the
        # math of `retrieve`, with q and r laid out contiguously (through `retrieve` on the segments'
        # [B S, C, dim] view the prefill ran ~15% slower, small MAC, 8K tokens)
        inner = mem.heads * mem.head_dim
        q = F.linear(x, mem.wqkv.weight[:inner])
        q = l2norm((F.silu(q) if mem.qk_silu else q).view(B, S, C, mem.heads, mem.head_dim))
        q = q.permute(0, 1, 3, 2, 4).reshape(B * S, mem.heads, C, mem.head_dim)             # [B S, Hm, C, Dm]
        W = [torch.stack([w[l] if w is not None else p.unsqueeze(0).expand(B, -1, -1, -1) for w in seg_ws], 1)
             .flatten(0, 1) for l, p in enumerate(mem.memory)]                               # [B S, Hm, do, di]
        r = memory_forward(q, W, mem.activation, mem.residual)
        h = mem.read_out(r.view(B, S, mem.heads, C, mem.head_dim).transpose(2, 3).reshape(B, N, mem.heads,
                                                                                      mem.head_dim), x)
        pos = torch.arange(state.position, state.position + N, device=x.device)
        kh, kx = (rotary(self._split(self.wk(t)), pos, self.rope_base) for t in (h, x))       # [B, H, N, Dh]
        vh, vx = self._split(self.wv(h)), self._split(self.wv(x))
        q = rotary(self._split(self.wq(x)), pos, self.rope_base)
        seg = lambda t: t.reshape(B, H, S, C, Dh).transpose(1, 2).reshape(B * S, H, C, Dh)
        p = self.persistent().to(x.dtype).unsqueeze(0)
        pk, pv = self._split(self.wk(p)), self._split(self.wv(p))                            # [1, H, Np, Dh]
        y = _segment_attention(seg(q), pk, pv, seg(kh), seg(vh), seg(kx), seg(vx), 0)        # [B S, H, C, Dh]
        y = self.wo(y.view(B, S, H, C, Dh).permute(0, 1, 3, 2, 4).reshape(B, N, H * Dh))
        o = self.gate(y, torch.cat(ms, dim=1))
        return o, MACState(mem_state, seg_ws[-1], None, None, state.position + N)

    def _piece(self, x: Tensor, state: MACState, offset: int) -> tuple[Tensor, MACState]:
        B, t, _ = x.shape
        if offset == 0:  # a new segment: freeze the memory as it is now for the retrieval
            mem = state.memory.memory if state.memory is not None else None
            seg_w = None if mem is None else mem.weights
            k_seg = v_seg = None
        else:
            seg_w, k_seg, v_seg = state.segment_weights, state.k, state.v
        h = self.retrieve(x, seg_w)                                          # [B, t, dim]
        pos = torch.arange(state.position, state.position + t, device=x.device)
        hx = torch.cat([h, x], dim=1)
        k_new = rotary(self._split(self.wk(hx)), torch.cat([pos, pos]), self.rope_base)
        v_new = self._split(self.wv(hx))
        kh, kx = k_new[:, :, :t], k_new[:, :, t:]
        vh, vx = v_new[:, :, :t], v_new[:, :, t:]
        if k_seg is not None:  # the cache holds [h_0..h_{o-1}, x_0..x_{o-1}]
            kh, kx = torch.cat([k_seg[:, :, :offset], kh], 2), torch.cat([k_seg[:, :, offset:], kx], 2)
            vh, vx = torch.cat([v_seg[:, :, :offset], vh], 2), torch.cat([v_seg[:, :, offset:], vx], 2)
        q = rotary(self._split(self.wq(x)), pos, self.rope_base)
        p = self.persistent().to(x.dtype).unsqueeze(0)
        pk, pv = self._split(self.wk(p)), self._split(self.wv(p))           # [1, H, Np, Dh], no RoPE
        y = _segment_attention(q, pk, pv, kh, vh, kx, vx, offset)           # [B, H, t, Dh]
        y = self.wo(y.transpose(1, 2).reshape(B, t, -1))
        written = y if self.write == "y" else x if self.write == "x" else x + y
        m, mem_state = self.memory(written, state.memory)                    # write, read with W_i
        o = self.gate(y, m)
        end = offset + t
        k_seg, v_seg = (None, None) if end == self.C else (torch.cat([kh, kx], 2), torch.cat([vh, vx], 2))
        return o, MACState(mem_state, seg_w, k_seg, v_seg, state.position + t)


def _segment_attention(q: Tensor, pk: Tensor, pv: Tensor, kh: Tensor, vh: Tensor, kx: Tensor, vx: Tensor,
                       offset: int) -> Tensor:
    """Softmax attention of t queries at segment offsets offset..offset+t-1 over
    [p (all) || h_0..h_{e-1} || x_0..x_{e-1}], where query i sees h_j and x_j for j <= offset + i.

    q: [B, H, t, Dh]; pk, pv: [1, H, Np, Dh]; kh, vh, kx, vx: [B, H, e, Dh]. Returns [B, H, t, Dh].
    """
    B, H, t, Dh = q.shape
    e = kh.shape[2]
    k = torch.cat([pk.expand(B, -1, -1, -1), kh, kx], dim=2)
    v = torch.cat([pv.expand(B, -1, -1, -1), vh, vx], dim=2)
    rows = torch.arange(offset, offset + t, device=q.device)[:, None]
    cols = torch.arange(e, device=q.device)[None, :]
    causal = cols <= rows                                                     # [t, e]
    mask = torch.cat([causal.new_ones(t, pk.shape[2]), causal, causal], dim=1)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
