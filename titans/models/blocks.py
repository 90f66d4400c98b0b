"""Blocks: pre-norm residual blocks whose sequence mixer is one of the Titans variants.

Shape legend
    B batch, T tokens in this call, dim model width
    x, y: [B, T, dim]

Every block is  x = x + mixer(norm(x));  x = x + SwiGLU(norm(x))  (docs/design.md §3). The mixers:
    lmm   the neural memory alone                            (paper: Titans LMM)
    attn  full causal attention                              (Transformer++ baseline)
    swa   sliding-window attention                           (SWA baseline)
    mac, mag, mal  memory as context / gate / layer          (variants.py, paper eq. 21-31)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..layers import Attention, NeuralMemory, RMSNorm, SwiGLU
from .config import TitansConfig

__all__ = ["Block", "make_mixer", "neural_memory_from_config"]


def neural_memory_from_config(c: TitansConfig) -> NeuralMemory:
    return NeuralMemory(c.dim, c.mem_heads, c.mem_head_dim, memory_depth=c.memory_depth,
                        expansion=c.memory_expansion, chunk_size=c.chunk_size, activation=c.memory_activation,
                        residual=c.memory_residual, conv=c.conv, conv_kernel=c.conv_kernel, momentum=c.momentum,
                        forgetting=c.forgetting, gate_mode=c.gate_mode, max_lr=c.max_lr,
                        momentum_form=c.momentum_form, normalize_step=c.normalize_step, qk_silu=c.qk_silu,
                        key_shift=c.key_shift, qk_tied_init=c.qk_tied_init, theta_init=c.theta_init,
                        alpha_init=c.alpha_init, forget_to_init=c.forget_to_init)


def attention_from_config(c: TitansConfig, window: int | None, n_persistent: int = 0) -> Attention:
    return Attention(c.dim, c.heads, c.attn_head_dim, window=window, rope_base=c.rope_base,
                     n_persistent=n_persistent, qk_norm=c.qk_norm)


def make_mixer(kind: str, c: TitansConfig) -> nn.Module:
    """The sequence mixer of one block: a module with y, state = mixer(x, state) and init_state(B)."""
    from .variants import MAC, MAG, MAL  # the composite mixers build on the helpers above

    if kind == "lmm":
        return neural_memory_from_config(c)
    if kind == "attn":
        return attention_from_config(c, window=None)
    if kind == "swa":
        return attention_from_config(c, window=c.window)
    if kind == "mac":
        return MAC(c)
    if kind == "mag":
        return MAG(c)
    if kind == "mal":
        return MAL(c)
    raise ValueError(f"unknown block kind {kind!r}")


class Block(nn.Module):
    """x = x + mixer(norm1(x)); x = x + mlp(norm2(x))."""

    def __init__(self, kind: str, config: TitansConfig) -> None:
        super().__init__()
        self.kind = kind
        self.norm1 = RMSNorm(config.dim, config.norm_eps)
        self.mixer = make_mixer(kind, config)
        self.norm2 = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config.dim, config.hidden)

    def init_state(self, batch_size: int) -> Any:
        return self.mixer.init_state(batch_size)

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        h, state = self.mixer(self.norm1(x), state)
        x = x + h
        return x + self.mlp(self.norm2(x)), state
