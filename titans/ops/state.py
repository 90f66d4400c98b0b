"""The streaming state of the memory rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["MemoryState"]


@dataclass
class MemoryState:
    """State of the memory after `position` tokens (docs/design.md §1, contract 3).

    weights:     W_t, the current memory, one [B, H, d_out, d_in] tensor per layer.
    momentum:    S_t, the surprise with momentum, same shapes.
    chunk_start: the weights at the last chunk boundary at or before `position`, i.e. the
                 point where the gradients of the chunk in progress are taken. When
                 `position` is a multiple of the chunk size this is `weights` itself.
    position:    the absolute number of tokens seen, which fixes where chunks start.

    A state only continues a sequence run with the same chunk size, activation and residual
    setting; the op checks the shapes and the position, not those settings.
    """

    weights: list[Tensor]
    momentum: list[Tensor]
    chunk_start: list[Tensor]
    position: int

    @classmethod
    def initial(cls, weights: Sequence[Tensor], batch_size: int) -> "MemoryState":
        """W_0 (shared over the batch, [H, d_out, d_in] per layer) broadcast to a batch, S_0 = 0."""
        w = [p.unsqueeze(0).expand(batch_size, *p.shape) for p in weights]
        s = [torch.zeros_like(p) for p in w]
        return cls(weights=w, momentum=s, chunk_start=w, position=0)

    def detach(self) -> "MemoryState":
        """The same state cut from the autograd graph (truncated backprop through time)."""
        return MemoryState([w.detach() for w in self.weights], [s.detach() for s in self.momentum],
                           [c.detach() for c in self.chunk_start], self.position)

    def to(self, *args, **kwargs) -> "MemoryState":
        return MemoryState([w.to(*args, **kwargs) for w in self.weights],
                           [s.to(*args, **kwargs) for s in self.momentum],
                           [c.to(*args, **kwargs) for c in self.chunk_start], self.position)
