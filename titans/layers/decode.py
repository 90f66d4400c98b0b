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

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import memory_forward, memory_step, native, owned_state
from ..ops.features import RMS_EPS, l2norm
from ..ops.attention import rotary
from .attention import Attention, AttentionState
from .neural_memory import NeuralMemory, NeuralMemoryState

# the memory activations by their index in csrc/step_native.cpp
ACT_CODES = {"silu": 0, "gelu": 1, "tanh": 2}

__all__ = ["MemoryDecoder", "AttentionDecoder", "attend", "dense", "rope", "step_native"]


def step_native(like: Tensor):
    """The compiled decode step (csrc/step_native.cpp) for tensors like `like` (CPU float32 or
    float64), or None: then the decoders run the Python below, which is its definition."""
    return native.step_module() if like.device.type == "cpu" and like.dtype in (torch.float32, torch.float64) else None


def dense(x: Tensor, w: Tensor, native=None, bias: Tensor | None = None) -> Tensor:
    """x W^T (+ bias) for one token per row, x [B, K], W [N, K]. With the compiled step module and
    a few rows, its matrix-vector product: BLAS at M = 1 streams a step's weights at 8-11 GB/s on
    the CPUs we measured, this at ~50 GB/s (docs/benchmarks.md, "Inference")."""
    if native is not None and x.shape[0] <= 8:
        return native.linear_rows(x.contiguous(), w, bias)
    return F.linear(x, w, bias)


def _rms(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dim, weight of that dim's size (the layers' RMSNorm, float32 or float64)."""
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def rope(x: Tensor, position: int, base: float) -> Tensor:
    """ops.attention.rotary of one token per row, x [..., H, Dh] at `position`."""
    return rotary(x.unsqueeze(-2), torch.tensor([position], device=x.device), base).squeeze(-2)


class MemoryDecoder:
    """The neural memory (NeuralMemory) one token at a time: y = step(x), x and y [B, dim].

    One matmul reads x for q, k, v, the three gates and the output gate; the causal conv is a
    window of the last K - 1 projected inputs; the memory rule is `ops.memory_step` (in place).
    """

    def __init__(self, layer: NeuralMemory, state: NeuralMemoryState | None, batch_size: int) -> None:
        self.layer, self.B = layer, batch_size
        self.out_norm = layer.out_norm.detach()
        state = state if state is not None else layer.init_state(batch_size)
        w = layer.wqkv.weight
        self.inner = layer.heads * layer.head_dim
        # x W_qkv, the gate logits and x W_gate_out in one matmul
        self.w_in = torch.cat([w, layer.wgates.weight, layer.wgate_out.weight]).detach()
        self.b_in = torch.cat([w.new_zeros(3 * self.inner), layer.wgates.bias, w.new_zeros(self.inner)]).detach()
        self.split = (3 * self.inner, 3 * layer.heads, self.inner)
        if layer.conv_kernel:
            self.conv_w = layer.conv_weight.detach().squeeze(1).t().contiguous()   # [K, C]: row K - 1 the newest tap
            self.conv_b = layer.conv_bias.detach()
            self.conv = state.conv.detach().transpose(1, 2).contiguous()           # [B, K - 1, C], oldest first
        self.memory = owned_state(state.memory, [p.detach() for p in layer.memory], batch_size)
        self.chunk_gates = None if state.chunk_gates is None else state.chunk_gates.detach().clone()
        self.rule = dict(chunk_size=layer.chunk_size, activation=layer.activation, residual=layer.residual,
                         normalize_step=layer.normalize_step)
        # the C++ step (csrc/step_native.cpp) where it applies: CPU float32 / float64; a memory that
        # forgets toward W_0 takes the Python step (the C++ one has no such rule)
        self.native = step_native(w)
        self.native_rule = self.native is not None and not layer.forget_to_init
        if self.native is not None and not layer.conv_kernel:
            self.conv = self.conv_w = self.conv_b = w.new_zeros(0)
        self.w_read = torch.cat([w[:self.inner], layer.wgate_out.weight]).detach()   # MAC's retrieval: q and gate

    def step(self, x: Tensor) -> Tensor:
        m, B, H = self.layer, self.B, self.layer.heads
        u, logits, g = dense(x, self.w_in, self.native, self.b_in).split(self.split, dim=-1)
        if self.native_rule:
            mem = self.memory
            out = self.native.memory_decode_step(
                u.contiguous(), self._gate_values(logits).reshape(B, 3 * H).contiguous(), g.contiguous(), self.conv,
                self.conv_w, self.conv_b, mem.weights, mem.momentum, mem.chunk_start, self.out_norm, H, m.head_dim,
                ACT_CODES[m.activation], m.residual, m.normalize_step, m.qk_silu, m.max_lr, m.momentum,
                m.momentum_form == "bounded", m.forgetting, (mem.position + 1) % m.chunk_size == 0)
            mem.position += 1
            return dense(out, m.wo.weight, self.native)
        if m.conv_kernel:
            window = torch.cat([self.conv, u.unsqueeze(1)], dim=1)              # [B, K, C]
            s = (window * self.conv_w).sum(1).add_(self.conv_b)
            self.conv = window[:, 1:]
        else:
            s = u.clone()
        s = s.view(B, 3, H, m.head_dim)
        if m.qk_silu:
            F.silu(s, inplace=True)
        else:
            F.silu(s[:, 2], inplace=True)
        q, k, v = l2norm(s[:, :2]).unbind(1) + (s[:, 2],)                    # [B, H, Dh] each
        if not m.forget_to_init:
            y, _ = memory_step(q, k, v, *self._gates(logits), self.memory, **self.rule)
            return self.read_out(y, g)
        # as NeuralMemory.forward: the rule runs on D = W - W_0 with the targets v - k W_0^T
        W0 = m.memory[0].detach()
        base = lambda x: torch.einsum("bhi,hoi->bho", x, W0)
        for ws in (self.memory.weights, self.memory.chunk_start):
            ws[0].sub_(W0)
        y, _ = memory_step(q, k, v - base(k), *self._gates(logits), self.memory, **self.rule)
        for ws in (self.memory.weights, self.memory.chunk_start):
            ws[0].add_(W0)
        return self.read_out(y + base(q), g)

    @property
    def position(self) -> int:
        """Tokens seen: the memory state's own count (ops.memory_step advances it)."""
        return self.memory.position

    def _gate_values(self, logits: Tensor) -> Tensor:
        """The sigmoid of the gate logits [B, 3, H] (theta, eta, alpha before their settings), with
        per-chunk gates those of the chunk's first token."""
        m = self.layer
        g = torch.sigmoid(logits.view(self.B, 3, m.heads))
        if m.gate_mode == "chunk":
            if self.position % m.chunk_size == 0 or self.chunk_gates is None:
                self.chunk_gates = g
            g = self.chunk_gates
        return g

    def _gates(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """theta, eta, alpha [B, H], as NeuralMemory._gates for one token."""
        m = self.layer
        theta, eta, alpha = self._gate_values(logits).unbind(1)
        theta = theta * m.max_lr
        if not m.momentum:
            eta = torch.zeros_like(eta)
        elif m.momentum_form == "bounded":
            theta = theta * (1 - eta)
        if not m.forgetting:
            alpha = torch.zeros_like(alpha)
        return theta, eta, alpha

    def read_out(self, r: Tensor, g: Tensor) -> Tensor:
        """The memory's output path for a read r [B, H, Dh] and the output gate's input g = x W_gate_out."""
        m = self.layer
        r = F.rms_norm(r, r.shape[-1:], None, RMS_EPS).mul_(self.out_norm).view(self.B, self.inner)
        return F.linear(r.mul_(F.silu(g)), m.wo.weight)

    def retrieve(self, x: Tensor, weights: list[Tensor]) -> Tensor:
        """MAC's read of the memory `weights` with a query from x, through the output path."""
        m = self.layer
        q, g = dense(x, self.w_read, self.native).chunk(2, dim=-1)
        if self.native is not None:
            out = self.native.memory_decode_read(q.contiguous(), g.contiguous(), weights, self.out_norm, m.heads,
                                                 m.head_dim, ACT_CODES[m.activation], m.residual, m.qk_silu)
            return dense(out, m.wo.weight, self.native)
        q = l2norm((F.silu(q) if m.qk_silu else q).view(self.B, m.heads, m.head_dim))
        r = memory_forward(q.unsqueeze(-2), weights, m.activation, m.residual).squeeze(-2)
        return self.read_out(r, g)

    def state(self) -> NeuralMemoryState:
        s = self.memory
        copy = lambda ts: [t.clone() for t in ts]
        memory = type(s)(copy(s.weights), copy(s.momentum), copy(s.chunk_start), s.position)
        conv = self.conv.transpose(1, 2).contiguous() if self.layer.conv_kernel else None
        return NeuralMemoryState(memory, conv, None if self.chunk_gates is None else self.chunk_gates.clone(),
                                 self.position)


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
        self.native = step_native(w)
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
        q, k, v = dense(x, self.w_qkv, self.native).view(B, 3, a.heads, a.head_dim).unbind(1)   # [B, H, Dh] each
        if a.q_norm is not None:
            q, k = _rms(q, a.q_norm.weight, a.q_norm.eps), _rms(k, a.k_norm.weight, a.k_norm.eps)
        if a.window is None and self.Np + pos >= self.k.shape[2]:   # full attention: double the buffer
            grow = lambda t: torch.cat([t, torch.zeros_like(t[:, :, self.Np:])], dim=2)
            self.k, self.v = grow(self.k), grow(self.v)
        slot = self._slot(pos)
        n = self.Np + (pos + 1 if a.window is None else min(pos + 1, a.window))
        self.position += 1
        if self.native is not None:
            o = self.native.attend_step(q.contiguous(), k.unsqueeze(2).contiguous(), v.unsqueeze(2).contiguous(),
                                        self.k, self.v, [slot], n, pos, a.rope_base)
            return dense(o, a.wo.weight, self.native)
        self.k[:, :, slot], self.v[:, :, slot] = rope(k, pos, a.rope_base), v
        o = attend(rope(q, pos, a.rope_base), self.k[:, :, :n], self.v[:, :, :n])
        return F.linear(o.reshape(B, -1), a.wo.weight)

    def state(self) -> AttentionState:
        a, pos = self.layer, self.position
        n = pos if a.window is None else min(pos, a.window - 1)
        slots = [self._slot(p) for p in range(pos - n, pos)]
        return AttentionState(self.k[:, :, slots].clone(), self.v[:, :, slots].clone(), pos)


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention of one query per row q [B, H, Dh] over keys k, v [B, H, n, Dh] (all
    visible), scale 1/sqrt(Dh), as ops.attention. Returns [B, H, Dh]."""
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v).squeeze(2)
