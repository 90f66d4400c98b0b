"""TitansForecaster: long-horizon forecasting with the neural memory as the sequence mixer.

The paper (section 5.6) swaps the Mamba module of a Simba-like model for its memory. Simba
forecasts like PatchTST: every channel is its own sequence of patches. We do the same:

    x [B, L, C] --RevIN--> per channel [B*C, L] --patches--> [B*C, N, P] --linear--> [B*C, N, dim]
    --(+ learned position)--> n_layers x Block(mixer, SwiGLU) --RMSNorm--> flatten [B*C, N*dim]
    --linear--> [B*C, H] --> [B, H, C] --RevIN inverse--> forecast

Shape legend
    B batch, L lookback, H horizon, C channels, P patch length, S patch stride,
    N patches = (L - P) // S + 2 (the series is padded with S copies of its last value, as in
    PatchTST, so the newest steps open a patch of their own), dim model width

Choices (docs/domains.md):
- Channel independence: one set of weights for every channel, channels never mix, so a
  dataset with C variables is C times more training sequences and the model works for any
  C. DLinear (shared mode) makes the same choice.
- RevIN (Kim et al. 2022): each input window is normalised per channel by its own mean and
  std and the forecast is mapped back; it handles level shifts between train and test.
- The blocks are the library's pre-norm residual blocks (titans.models.blocks.Block), so the
  mixer is any block kind: "lmm" (neural memory, the default), or "attn" (full attention,
  a PatchTST-like baseline), "swa", "mag", "mal", "mac". The memory is causal over patches;
  the flatten head reads every patch, so the forecast still sees the whole lookback.
- The memory updates inside the window only if the chunk size b is below the number of
  patches (12 at L = 96): the default chunk_size = 4 gives three chunks per window.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..layers import NeuralMemory, RMSNorm
from .blocks import Block
from .config import BLOCK_KINDS, TitansConfig

__all__ = ["TitansForecaster", "RevIN"]


class RevIN(nn.Module):
    """Reversible instance normalisation over time, per sample and channel.

    normalize(x [B, L, C]) stores the window's mean and std (population std, + eps under the
    root) and returns (x - mean) / std * weight + bias; denormalize(y [B, H, C]) undoes it
    with the stored statistics. weight / bias are per channel (affine=True) or absent.
    """

    def __init__(self, channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))
        self._mean: Tensor | None = None
        self._std: Tensor | None = None

    def normalize(self, x: Tensor) -> Tensor:
        """x [B, L, C] -> normalised [B, L, C]; remembers the statistics for denormalize."""
        self._mean = x.mean(dim=1, keepdim=True).detach()
        self._std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps).detach()
        x = (x - self._mean) / self._std
        return x * self.weight + self.bias if self.affine else x

    def denormalize(self, y: Tensor) -> Tensor:
        """y [B, H, C] in the normalised scale -> the input's scale."""
        if self._mean is None or self._std is None:
            raise RuntimeError("RevIN: call normalize() first")
        if self.affine:
            # the tiny floor keeps a weight driven to 0 from dividing by zero
            y = (y - self.bias) / (self.weight + self.eps * self.eps)
        return y * self._std + self._mean


class TitansForecaster(nn.Module):
    """Patch-based, channel-independent forecaster whose sequence mixer is the neural memory.

    forecast = model(x): x [B, L, C] -> [B, H, C], like DLinear.

    Args:
        lookback: L.  horizon: H.  channels: C (fixes RevIN's affine parameters only).
        dim: model width.  n_layers: blocks.  heads: memory (and attention) heads.
        patch_len: P.  stride: S (patches overlap when S < P).
        mixer: the block kind (see titans.models.config.BLOCK_KINDS); "lmm" is Titans' memory.
        revin: use reversible instance normalisation.
        dropout: on the patch embeddings and before the head (PatchTST uses some on small data).
        chunk_size: the memory's chunk size b (see the module doc).
        **config: any other TitansConfig field for the blocks (memory_depth, momentum,
            forgetting, max_lr, window, n_persistent, ...): the ablations of paper Table 5.
    """

    def __init__(self, lookback: int, horizon: int, channels: int, dim: int = 64, n_layers: int = 2,
                 heads: int = 4, patch_len: int = 16, stride: int = 8, *, mixer: str = "lmm",
                 revin: bool = True, dropout: float = 0.0, chunk_size: int = 4, **config: Any) -> None:
        super().__init__()
        for name, v in (("lookback", lookback), ("horizon", horizon), ("channels", channels),
                        ("patch_len", patch_len), ("stride", stride)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if patch_len > lookback:
            raise ValueError(f"patch_len={patch_len} must be <= lookback={lookback}")
        if mixer not in BLOCK_KINDS:
            raise ValueError(f"mixer must be one of {BLOCK_KINDS}, got {mixer!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.lookback, self.horizon, self.channels = lookback, horizon, channels
        self.patch_len, self.stride, self.mixer = patch_len, stride, mixer
        self.n_patches = (lookback - patch_len) // stride + 2
        # vocab_size is unused (no embedding table); window / segment defaults must only be valid
        seg = config.pop("segment_len", chunk_size * max(1, -(-self.n_patches // chunk_size)))
        self.config = TitansConfig(variant="lmm", vocab_size=1, dim=dim, n_layers=n_layers, heads=heads,
                                   chunk_size=chunk_size, segment_len=seg, block_pattern=(mixer,), **config)
        self.revin = RevIN(channels) if revin else None
        self.embed = nn.Linear(patch_len, dim)
        self.pos = nn.Parameter(torch.empty(self.n_patches, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(kind, self.config) for kind in self.config.layer_kinds)
        self.norm = RMSNorm(dim, self.config.norm_eps)
        self.head = nn.Linear(self.n_patches * dim, horizon)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """All initialisation in one place.

        Patch embedding and head: nn.Linear's default (uniform +-1/sqrt(fan_in)), as in
        PatchTST; positions ~ N(0, 0.02^2); block linears ~ N(0, 0.02^2) with the residual
        output projections scaled by 1/sqrt(2 n_layers) (as TitansLM); the neural memory keeps
        its own documented initialisation (NeuralMemory.reset_memory_parameters).
        """
        self.embed.reset_parameters()
        self.head.reset_parameters()
        nn.init.normal_(self.pos, std=0.02)
        std = self.config.init_std
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.blocks.named_parameters():
            if name.endswith(("wo.weight", "mlp.w_out.weight")):
                nn.init.normal_(p, std=std / (2 * self.config.n_layers) ** 0.5)
        for m in self.blocks.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            if isinstance(m, NeuralMemory):
                m.reset_memory_parameters()

    def patches(self, x: Tensor) -> Tensor:
        """Per-channel series [B*C, L] -> overlapping patches [B*C, N, P] (end padded by S)."""
        x = torch.cat([x, x[:, -1:].expand(-1, self.stride)], dim=1)
        return x.unfold(1, self.patch_len, self.stride)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, L, C] -> forecast [B, H, C]."""
        if x.ndim != 3 or x.shape[1] != self.lookback or x.shape[2] != self.channels:
            raise ValueError(f"x must be [B, {self.lookback}, {self.channels}], got {tuple(x.shape)}")
        B, L, C = x.shape
        if self.revin is not None:
            x = self.revin.normalize(x)
        series = x.transpose(1, 2).reshape(B * C, L)                # channel independence
        h = self.drop(self.embed(self.patches(series)) + self.pos)   # [B*C, N, dim]
        for block in self.blocks:
            h, _ = block(h)
        h = self.drop(self.norm(h).flatten(1))                        # [B*C, N*dim]
        y = self.head(h).view(B, C, self.horizon).transpose(1, 2)    # [B, H, C]
        return self.revin.denormalize(y) if self.revin is not None else y
