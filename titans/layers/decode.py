"""One-token decode steps of the layers: the neural memory and attention (docs/generation.md).

Shape legend
    B batch, dim model width, H heads, Dh head dim, Np persistent tokens, w window
    x, y: [B, dim] (one token per row)   q, k, v: [B, H, Dh]
    attention buffers: [B, H, Np + capacity, Dh] (persistent keys first, then the cache)

A decoder is made once per generation from a layer and its streaming state. It owns its state
in preallocated tensors that each step updates in place, holds what can be computed once (the
projections that read the same input fused into one matmul, the persistent tokens' keys and
values), and runs each token through direct small matmuls instead of the chunked forward. It
reads the layer's weights as they are when it is made. `state()` gives the layer's ordinary
streaming state (a copy), equal to what the chunked forward reaches over the same tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import memory_forward, memory_step, owned_state
from ..ops.features import NORM_EPS, RMS_EPS
from .attention import Attention, AttentionState
from .neural_memory import NeuralMemory, NeuralMemoryState

__all__ = ["MemoryDecoder", "AttentionDecoder", "attend", "rope", "rope_angles"]


def _rms(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dim (RMSNorm and the memory's per-head output norm)."""
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x if weight is None else x * weight


def rope_angles(position: int, head_dim: int, base: float, dtype: torch.dtype, device: torch.device):
    """cos, sin [Dh] of RoPE at one position, computed as ops.attention.rotary does (float64 angles)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = (position * inv_freq).repeat(2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE (rotate-half) of x [..., Dh] at the angles cos, sin [Dh]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class MemoryDecoder:
    """The neural memory (NeuralMemory) one token at a time: y = step(x), x and y [B, dim].

    One matmul reads x for q, k, v, the three gates and the output gate; the causal conv is a
    window of the last K - 1 projected inputs; the memory rule is `ops.memory_step` (in place).
    """

    def __init__(self, layer: NeuralMemory, state: NeuralMemoryState | None, batch_size: int) -> None:
        self.layer, self.B = layer, batch_size
        state = state if state is not None else layer.init_state(batch_size)
        w = layer.wqkv.weight
        self.inner = layer.heads * layer.head_dim
        # x W_qkv, the gate logits and x W_gate_out in one matmul
        self.w_in = torch.cat([w, layer.wgates.weight, layer.wgate_out.weight]).detach()
        self.b_in = torch.cat([w.new_zeros(3 * self.inner), layer.wgates.bias, w.new_zeros(self.inner)]).detach()
        self.split = (3 * self.inner, 3 * layer.heads, self.inner)
        if layer.conv_kernel:
            self.conv_w = layer.conv_weight.detach().squeeze(1)           # [C, K]: tap K - 1 is the newest
            self.conv_b = layer.conv_bias.detach()
            self.conv = state.conv.detach().clone()                        # [B, C, K - 1]
        self.memory = owned_state(state.memory, [p.detach() for p in layer.memory], batch_size)
        self.chunk_gates = None if state.chunk_gates is None else state.chunk_gates.detach().clone()
        self.position = state.position
        self.rule = dict(chunk_size=layer.chunk_size, activation=layer.activation, residual=layer.residual,
                         normalize_step=layer.normalize_step)

    def step(self, x: Tensor) -> Tensor:
        m, B, H = self.layer, self.B, self.layer.heads
        u, logits, g = F.linear(x, self.w_in, self.b_in).split(self.split, dim=-1)
        if m.conv_kernel:
            s = torch.addcmul(self.conv_b, u, self.conv_w[:, -1]) + (self.conv * self.conv_w[:, :-1]).sum(-1)
            self.conv = torch.cat([self.conv[..., 1:], u.unsqueeze(-1)], dim=-1)
        else:
            s = u
        q, k, v = s.view(B, 3, H, m.head_dim).unbind(1)                  # [B, H, Dh] each
        if m.qk_silu:
            q, k = F.silu(q), F.silu(k)
        q, k, v = (q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + NORM_EPS),
                   k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + NORM_EPS), F.silu(v))
        y, _ = memory_step(q, k, v, *self._gates(logits), self.memory, **self.rule)
        self.position += 1
        return self.read_out(y, g)

    def _gates(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """theta, eta, alpha [B, H], as NeuralMemory._gates for one token."""
        m = self.layer
        g = torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)).view(self.B, 3, m.heads))
        if m.gate_mode == "chunk":   # every token takes the gates of its chunk's first token
            if self.position % m.chunk_size == 0 or self.chunk_gates is None:
                self.chunk_gates = g
            g = self.chunk_gates
        theta = m.max_lr * g[:, 0]
        eta = g[:, 1] if m.momentum else torch.zeros_like(g[:, 1])
        if m.momentum and m.momentum_form == "bounded":
            theta = theta * (1 - eta)
        alpha = g[:, 2] if m.forgetting else torch.zeros_like(g[:, 2])
        return theta, eta, alpha

    def read_out(self, r: Tensor, g: Tensor) -> Tensor:
        """The memory's output path for a read r [B, H, Dh] and the output gate's input g = x W_gate_out."""
        m = self.layer
        r = _rms(r, m.out_norm, RMS_EPS).reshape(self.B, self.inner)
        return F.linear(r * F.silu(g), m.wo.weight)

    def retrieve(self, x: Tensor, weights: list[Tensor]) -> Tensor:
        """MAC's read of the memory `weights` with a query from x, through the output path."""
        m = self.layer
        q = F.linear(x, self.w_in[:self.inner])
        q = (F.silu(q) if m.qk_silu else q).view(self.B, m.heads, m.head_dim)
        q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + NORM_EPS)
        r = memory_forward(q.unsqueeze(-2), weights, m.activation, m.residual).squeeze(-2)
        return self.read_out(r, F.linear(x, m.wgate_out.weight))

    def state(self) -> NeuralMemoryState:
        s = self.memory
        copy = lambda ts: [t.clone() for t in ts]
        memory = type(s)(copy(s.weights), copy(s.momentum), copy(s.chunk_start), s.position)
        return NeuralMemoryState(memory, self.conv.clone() if self.layer.conv_kernel else None,
                                 None if self.chunk_gates is None else self.chunk_gates.clone(), self.position)


class AttentionDecoder:
    """Attention (full or sliding-window, persistent tokens, RoPE) one token at a time.

    Keys and values live in a preallocated buffer after the persistent tokens' ones: a ring of w
    slots for a window (softmax does not care about the order of keys already rotated at their
    own positions), or a buffer that doubles when full for full attention.
    """

    def __init__(self, layer: Attention, state: AttentionState | None, batch_size: int, reserve: int = 256) -> None:
        self.layer, self.B = layer, batch_size
        state = state if state is not None else layer.init_state(batch_size)
        layer._check_state(state, batch_size)
        H, Dh = layer.heads, layer.head_dim
        self.w_qkv = torch.cat([layer.wq.weight, layer.wk.weight, layer.wv.weight]).detach()
        self.Np = layer.n_persistent
        self.position = state.position
        cap = layer.window if layer.window is not None else state.position + reserve
        w = layer.wk.weight
        self.k = torch.zeros(batch_size, H, self.Np + cap, Dh, dtype=w.dtype, device=w.device)
        self.v = torch.zeros_like(self.k)
        if self.Np:   # persistent keys: no RoPE, position-free
            p = layer.persistent().detach().to(w.dtype)                        # [Np, dim]
            self.k[:, :, :self.Np] = self._heads(F.linear(p, layer.wk.weight), layer.k_norm).transpose(0, 1)
            self.v[:, :, :self.Np] = self._heads(F.linear(p, layer.wv.weight)).transpose(0, 1)
        n = state.k.shape[2]
        slots = [self._slot(p) for p in range(state.position - n, state.position)]
        self.k[:, :, slots], self.v[:, :, slots] = state.k.detach(), state.v.detach()

    def _heads(self, x: Tensor, norm=None) -> Tensor:
        """[..., H Dh] -> [..., H, Dh], RMS-normalised per head with the layer's `norm` if given."""
        x = x.view(*x.shape[:-1], self.layer.heads, self.layer.head_dim)
        return x if norm is None else _rms(x, norm.weight, norm.eps)

    def _slot(self, position: int) -> int:
        w = self.layer.window
        return self.Np + (position % w if w is not None else position)

    def step(self, x: Tensor) -> Tensor:
        a, B, pos = self.layer, self.B, self.position
        q, k, v = F.linear(x, self.w_qkv).view(B, 3, a.heads, a.head_dim).unbind(1)   # [B, H, Dh] each
        if a.q_norm is not None:
            q, k = _rms(q, a.q_norm.weight, a.q_norm.eps), _rms(k, a.k_norm.weight, a.k_norm.eps)
        cos, sin = rope_angles(pos, a.head_dim, a.rope_base, q.dtype, q.device)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if a.window is None and self.Np + pos >= self.k.shape[2]:   # full attention: double the buffer
            grow = lambda t: torch.cat([t, torch.zeros_like(t[:, :, self.Np:])], dim=2)
            self.k, self.v = grow(self.k), grow(self.v)
        slot = self._slot(pos)
        self.k[:, :, slot], self.v[:, :, slot] = k, v
        n = self.Np + (pos + 1 if a.window is None else min(pos + 1, a.window))
        o = attend(q, self.k[:, :, :n], self.v[:, :, :n])
        self.position += 1
        return F.linear(o.reshape(B, -1), a.wo.weight)

    def state(self) -> AttentionState:
        a, pos = self.layer, self.position
        n = pos if a.window is None else min(pos, a.window - 1)
        slots = [self._slot(p) for p in range(pos - n, pos)]
        return AttentionState(self.k[:, :, slots].clone(), self.v[:, :, slots].clone(), pos)


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention of one query per row q [B, H, Dh] over keys k, v [B, H, n, Dh] (all
    visible), scale 1/sqrt(Dh), in float32 at least (as ops.attention). Returns [B, H, Dh]."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(k.to(dtype), q.to(dtype).unsqueeze(-1)).squeeze(-1) / math.sqrt(q.shape[-1])  # [B, H, n]
    return torch.matmul(scores.softmax(-1).unsqueeze(-2), v.to(dtype)).squeeze(-2).to(q.dtype)
