"""The decode step of a whole model: one token per sequence per call (docs/generation.md).

Shape legend
    B batch, V vocabulary, dim model width, H heads, Dh head dim, C MAC segment length
    tokens: [B]   logits: [B, V]   x: [B, dim]
    MAC segment buffers: [B, H, Np + 2 C, Dh] (persistent keys, then h_j and x_j interleaved)

`Decoder` is made from a model and the state its prefill reached (`TitansLM.decoder`); each
`step(tokens)` runs one token per row through every block's decoder (titans/layers/decode.py for
the memory and attention; MAC, MAG and MAL below compose them) and returns the next-token
logits. `state()` is the model's ordinary ModelState, equal to what the chunked forward reaches
over the same tokens (tests/models/test_decode.py checks logits and state at every step).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import Attention, NeuralMemory, RMSNorm
from ..layers.decode import AttentionDecoder, MemoryDecoder, attend, dense, rope, step_native
from .variants import MAC, MAG, MAL, AttnMemoryState, BranchGate, MACState

__all__ = ["Decoder"]


class MACDecoder:
    """Memory as Context (variants.MAC) one token at a time.

    At a segment start the memory's weights are copied for the segment's read-only retrieval;
    the segment's keys and values (h_j and x_j, rotated at position j) go into a buffer of
    2 C slots after the persistent ones, so a token attends to one contiguous run of it.
    """

    def __init__(self, mac: MAC, state: MACState, batch_size: int) -> None:
        self.mac, self.B = mac, batch_size
        self.memory = MemoryDecoder(mac.memory, state.memory, batch_size)
        self.w_x = torch.cat([mac.wq.weight, mac.wk.weight, mac.wv.weight]).detach()   # x -> q, k, v
        self.w_h = self.w_x[mac.heads * mac.head_dim:]                                 # h -> k, v
        self.Np = mac.persistent.n_tokens
        w = mac.wk.weight
        self.k = torch.zeros(batch_size, mac.heads, self.Np + 2 * mac.C, mac.head_dim, dtype=w.dtype, device=w.device)
        self.v = torch.zeros_like(self.k)
        self.native = step_native(w)
        if self.Np:
            p = mac.persistent().detach().to(w.dtype)
            kv = F.linear(p, self.w_h).view(self.Np, 2, mac.heads, mac.head_dim).permute(1, 2, 0, 3)  # [2, H, Np, Dh]
            self.k[:, :, :self.Np], self.v[:, :, :self.Np] = kv[0], kv[1]
        self.position = state.position
        offset = state.position % mac.C
        if offset:   # the segment so far: state.k holds h_0..h_{e-1} then x_0..x_{e-1}
            for buf, t in ((self.k, state.k), (self.v, state.v)):
                buf[:, :, self.Np:self.Np + 2 * offset] = (
                    t.detach().view(batch_size, mac.heads, 2, offset, mac.head_dim).transpose(2, 3)
                    .reshape(batch_size, mac.heads, 2 * offset, mac.head_dim))
        # the segment's retrieval weights: None until a segment starts after the first write (W_0)
        self.segment_weights = (None if state.segment_weights is None
                                else [w.detach().clone() for w in state.segment_weights])

    def step(self, x: Tensor) -> Tensor:
        mac, B, H, Dh = self.mac, self.B, self.mac.heads, self.mac.head_dim
        offset = self.position % mac.C
        if offset == 0:   # a new segment: the retrieval reads the memory as it is now
            self.segment_weights = [w.clone() for w in self.memory.memory.weights]
        weights = self.segment_weights
        if weights is None:
            weights = [w.detach().unsqueeze(0) for w in mac.memory.memory]
        h = self.memory.retrieve(x, weights)                                        # [B, dim]
        q, kx, vx = dense(x, self.w_x, self.native).view(B, 3, H, Dh).unbind(1)
        kh, vh = dense(h, self.w_h, self.native).view(B, 2, H, Dh).unbind(1)
        slot = self.Np + 2 * offset
        if self.native is not None:
            o = self.native.attend_step(q.contiguous(), torch.stack([kh, kx], 2), torch.stack([vh, vx], 2), self.k,
                                        self.v, [slot, slot + 1], slot + 2, self.position, mac.rope_base)
        else:
            pos, base = self.position, mac.rope_base
            self.k[:, :, slot], self.k[:, :, slot + 1] = rope(kh, pos, base), rope(kx, pos, base)
            self.v[:, :, slot], self.v[:, :, slot + 1] = vh, vx
            o = attend(rope(q, pos, base), self.k[:, :, :slot + 2], self.v[:, :, :slot + 2])
        y = dense(o.reshape(B, -1), mac.wo.weight, self.native)
        written = y if mac.write == "y" else x if mac.write == "x" else x + y
        m = self.memory.step(written)
        self.position += 1
        return branch_gate(mac.gate, y, m, self.native)

    def state(self) -> MACState:
        mac, B = self.mac, self.B
        e = self.position % mac.C
        k = v = None
        if e:   # interleaved h_j, x_j -> h_0..h_{e-1}, x_0..x_{e-1}
            k, v = (t[:, :, self.Np:self.Np + 2 * e].reshape(B, mac.heads, e, 2, mac.head_dim).transpose(2, 3)
                    .reshape(B, mac.heads, 2 * e, mac.head_dim).clone() for t in (self.k, self.v))
        seg = None if self.segment_weights is None else [w.clone() for w in self.segment_weights]
        return MACState(self.memory.state(), seg, k, v, self.position)


class MAGDecoder:
    """Memory as a Gate (variants.MAG): y = attention(x), m = memory(x), o = gate(y, m)."""

    def __init__(self, mag: MAG, state: AttnMemoryState, batch_size: int) -> None:
        self.gate = mag.gate
        self.attention = AttentionDecoder(mag.attention, state.attention, batch_size)
        self.memory = MemoryDecoder(mag.memory, state.memory, batch_size)

    def step(self, x: Tensor) -> Tensor:
        return branch_gate(self.gate, self.attention.step(x), self.memory.step(x), self.memory.native)

    def state(self) -> AttnMemoryState:
        return AttnMemoryState(self.attention.state(), self.memory.state())


class MALDecoder:
    """Memory as a Layer (variants.MAL): the memory, then attention over its output."""

    def __init__(self, mal: MAL, state: AttnMemoryState, batch_size: int) -> None:
        self.mal = mal
        self.attention = AttentionDecoder(mal.attention, state.attention, batch_size)
        self.memory = MemoryDecoder(mal.memory, state.memory, batch_size)

    def step(self, x: Tensor) -> Tensor:
        y = self.memory.step(x)
        if self.mal.residual:
            return y + self.attention.step(rms_norm(self.mal.norm, x + y, self.memory.native))
        return self.attention.step(rms_norm(self.mal.norm, y, self.memory.native))

    def state(self) -> AttnMemoryState:
        return AttnMemoryState(self.attention.state(), self.memory.state())


def rms_norm(norm: RMSNorm, x: Tensor, native=None) -> Tensor:
    """An RMSNorm module applied to one token per row, x [B, dim] (`native`: the compiled step module)."""
    if native is not None:
        return native.rms_norm(x.contiguous(), norm.weight, norm.eps)
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)


def branch_gate(gate: BranchGate, y: Tensor, m: Tensor, native=None) -> Tensor:
    """variants.BranchGate, o = W_o (RMSNorm_y(y) * sigmoid(RMSNorm_m(m))), for one token per row."""
    if native is not None:
        g = native.branch_gate(y.contiguous(), m.contiguous(), gate.norm_y.weight, gate.norm_m.weight,
                               gate.norm_y.eps, gate.norm_m.eps)
    else:
        g = rms_norm(gate.norm_y, y).mul_(torch.sigmoid(rms_norm(gate.norm_m, m)))
    return dense(g, gate.wo.weight, native)


def mixer_decoder(mixer: nn.Module, state: Any, batch_size: int):
    """The decoder of one block's mixer, from the mixer's streaming state."""
    if isinstance(mixer, NeuralMemory):
        return MemoryDecoder(mixer, state, batch_size)
    if isinstance(mixer, Attention):
        return AttentionDecoder(mixer, state, batch_size)
    if isinstance(mixer, MAC):
        return MACDecoder(mixer, state, batch_size)
    if isinstance(mixer, MAG):
        return MAGDecoder(mixer, state, batch_size)
    if isinstance(mixer, MAL):
        return MALDecoder(mixer, state, batch_size)
    raise TypeError(f"no decoder for a {type(mixer).__name__} mixer")


class Decoder:
    """A model's decode step: logits = decoder.step(tokens), tokens [B] -> logits [B, V].

    Made by `TitansLM.decoder(state)` from the state a prefill of at least one token reached (MAG
    and MAL write their persistent tokens into the memory at the stream's start, which the
    forward does). Runs under torch.no_grad; reads the model's weights as they are when made.
    """

    def __init__(self, model: nn.Module, state: Any) -> None:
        self.model, self.B = model, state.batch_size
        self.shape = state.shape
        self.position = state.position
        self.blocks = [mixer_decoder(b.mixer, state.layers[f"blocks.{i}"], self.B) for i, b in enumerate(model.blocks)]
        self.native = step_native(model.embed.weight)

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """tokens [B] (one next token per sequence) -> the logits of the token after it, [B, V]."""
        m = self.model
        x = F.embedding(tokens, m.embed.weight)
        for block, dec in zip(m.blocks, self.blocks):
            x = x + dec.step(rms_norm(block.norm1, x, self.native))
            gate, up = dense(rms_norm(block.norm2, x, self.native), block.mlp.w_in.weight, self.native).chunk(2, dim=-1)
            x = x + dense(F.silu(gate).mul_(up), block.mlp.w_out.weight, self.native)
        self.position += 1
        return dense(rms_norm(m.norm, x, self.native), m.head.weight, self.native).float()

    def state(self):
        """The model's ModelState after the tokens so far (a copy: decoding on does not change it)."""
        from .lm import ModelState
        return ModelState({f"blocks.{i}": d.state() for i, d in enumerate(self.blocks)}, self.position, self.B,
                          self.shape)
