"""Persistent memory (paper eq. 19): N_p learned, input-independent tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PersistentMemory"]


class PersistentMemory(nn.Module):
    """N_p learned tokens [n_tokens, dim], initialised N(0, 0.02^2). n_tokens = 0 is allowed.

    They hold task knowledge rather than context: a block prepends them to its attention
    input (their keys and values are seen by every query). This module only owns them.
    """

    def __init__(self, n_tokens: int, dim: int) -> None:
        super().__init__()
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
            raise ValueError(f"n_tokens must be an integer >= 0, got {n_tokens!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        self.n_tokens, self.dim = n_tokens, dim
        self.tokens = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)

    def forward(self) -> Tensor:
        """The tokens, [n_tokens, dim]."""
        return self.tokens

    def extra_repr(self) -> str:
        return f"n_tokens={self.n_tokens}, dim={self.dim}"
