"""Multi-head causal attention with RoPE, an optional sliding window, persistent tokens and a
streaming key/value cache.

Shape legend
    B batch, T tokens in this call, dim model width, H heads, Dh head dim
    Np persistent tokens, n cached tokens, w window
    x, y: [B, T, dim]   q, k, v: [B, H, T, Dh]   state.k, state.v: [B, H, n, Dh]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops.attention import ATTENTION_IMPLS, attention, rotary
from .common import RMSNorm
from .persistent import PersistentMemory

__all__ = ["Attention", "AttentionState"]


@dataclass
class AttentionState:
    """The key/value cache of an Attention layer after `position` tokens.

    k: [B, H, n, Dh] keys of the last n positions, already rotated (RoPE at their positions).
    v: [B, H, n, Dh] their values.
    position: the absolute number of tokens seen; the next token gets RoPE position `position`.

    Full attention keeps every key (n = position). A window w keeps only the n = min(position,
    w - 1) keys the next token can still see, so the cache never grows past w. Persistent
    tokens are not cached: they are recomputed from the parameters at every call.
    """

    k: Tensor
    v: Tensor
    position: int

    def detach(self) -> "AttentionState":
        """The same cache cut from the autograd graph (truncated backprop through time)."""
        return AttentionState(self.k.detach(), self.v.detach(), self.position)

    def to(self, *args, **kwargs) -> "AttentionState":
        return AttentionState(self.k.to(*args, **kwargs), self.v.to(*args, **kwargs), self.position)


class Attention(nn.Module):
    """Causal multi-head attention: y, state = layer(x, state).

    q, k, v, o are bias-free linear maps; q and k (optionally RMS-normalised per head, `qk_norm`)
    get RoPE at their absolute positions. With `window` w a token sees itself and the w - 1
    tokens before it (sliding-window attention, O(T w)); otherwise every earlier token.

    With n_persistent = Np > 0 the layer owns Np learned tokens in the input space (paper
    eq. 19). They pass through this layer's k and v projections (and the k norm) WITHOUT
    RoPE, so they are position-free, and every query sees them whatever the window: the
    "persistent tokens prepended to the attention input" of docs/design.md §2-3, without using up
    positions or window slots. They produce no outputs of their own.

    Args:
        dim: model width.  heads: number of heads H.
        head_dim: Dh (even, for RoPE); default dim // heads (then dim must divide by heads).
        window: None (full causal attention) or w >= 1.
        rope_base: RoPE frequency base.  n_persistent: Np >= 0.
        qk_norm: RMSNorm over Dh on queries and keys (one weight per layer, shared by heads).
        impl: the attention op's implementation, "blocked" (fast) or "ref" (for tests).
    """

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, window: int | None = None,
                 rope_base: float = 10000.0, n_persistent: int = 0, qk_norm: bool = False,
                 impl: str = "blocked") -> None:
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim={dim} must be divisible by heads={heads} when head_dim is None")
            head_dim = dim // heads
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be an even integer >= 2 (RoPE rotates pairs), got {head_dim!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
        if not (isinstance(rope_base, (int, float)) and not isinstance(rope_base, bool) and rope_base > 0):
            raise ValueError(f"rope_base must be a number > 0, got {rope_base!r}")
        if isinstance(n_persistent, bool) or not isinstance(n_persistent, int) or n_persistent < 0:
            raise ValueError(f"n_persistent must be an integer >= 0, got {n_persistent!r}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"impl must be one of {sorted(ATTENTION_IMPLS)}, got {impl!r}")
        self.dim, self.heads, self.head_dim, self.window = dim, heads, head_dim, window
        self.rope_base, self.n_persistent, self.impl = float(rope_base), n_persistent, impl
        inner = heads * head_dim
        self.wq = nn.Linear(dim, inner, bias=False)
        self.wk = nn.Linear(dim, inner, bias=False)
        self.wv = nn.Linear(dim, inner, bias=False)
        self.wo = nn.Linear(inner, dim, bias=False)
        self.q_norm = RMSNorm(head_dim) if qk_norm else None
        self.k_norm = RMSNorm(head_dim) if qk_norm else None
        self.persistent = PersistentMemory(n_persistent, dim) if n_persistent else None

    def init_state(self, batch_size: int) -> AttentionState:
        """An empty cache at position 0, in the layer's dtype and device."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        w = self.wk.weight
        empty = torch.zeros(batch_size, self.heads, 0, self.head_dim, dtype=w.dtype, device=w.device)  # not a DTensor
        return AttentionState(empty, empty.clone(), 0)

    def forward(self, x: Tensor, state: AttentionState | None = None) -> tuple[Tensor, AttentionState]:
        """x: [B, T, dim] the next T tokens -> y: [B, T, dim], and the state after them.

        state=None starts a sequence at position 0. Feeding a sequence in pieces of any
        lengths and carrying the state gives the same y as one call.
        """
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[2] != self.dim:
            raise ValueError(f"x must be [B, T, dim={self.dim}], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B)
        self._check_state(state, B)
        positions = torch.arange(state.position, state.position + T, device=x.device)
        q = rotary(self._heads(self.wq(x), self.q_norm), positions, self.rope_base)   # [B, H, T, Dh]
        k = rotary(self._heads(self.wk(x), self.k_norm), positions, self.rope_base)
        v = self._heads(self.wv(x))
        k = torch.cat([state.k.to(k.dtype), k], dim=2)                              # [B, H, n + T, Dh]
        v = torch.cat([state.v.to(v.dtype), v], dim=2)
        prefix_k = prefix_v = None
        if self.persistent is not None:
            p = self.persistent().to(x.dtype).unsqueeze(0)                            # [1, Np, dim]
            prefix_k = self._heads(self.wk(p), self.k_norm)                           # [1, H, Np, Dh], no RoPE
            prefix_v = self._heads(self.wv(p))
        o = attention(q, k, v, window=self.window, prefix_k=prefix_k, prefix_v=prefix_v, impl=self.impl)
        y = self.wo(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
        keep = k.shape[2] if self.window is None else min(k.shape[2], self.window - 1)
        new_state = AttentionState(k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:], state.position + T)
        return y, new_state

    def _heads(self, x: Tensor, norm: RMSNorm | None = None) -> Tensor:
        """[B, T, H * Dh] -> [B, H, T, Dh], RMS-normalised per head if `norm` is given."""
        x = x.view(*x.shape[:2], self.heads, self.head_dim)
        if norm is not None:
            x = norm(x)
        return x.transpose(1, 2)

    def _check_state(self, state: AttentionState, B: int) -> None:
        if not isinstance(state, AttentionState):
            raise ValueError(f"state must be an AttentionState or None, got {type(state).__name__}")
        pos = state.position
        if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
            raise ValueError(f"state.position must be an integer >= 0, got {pos!r}")
        n = pos if self.window is None else min(pos, self.window - 1)
        for name, t in (("k", state.k), ("v", state.v)):
            if not isinstance(t, Tensor) or tuple(t.shape) != (B, self.heads, n, self.head_dim):
                raise ValueError(f"state.{name} must be [B={B}, H={self.heads}, n={n}, Dh={self.head_dim}] "
                                 f"at position {pos}, got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, window={self.window}, "
                f"n_persistent={self.n_persistent}, qk_norm={self.q_norm is not None}, impl={self.impl!r}")
