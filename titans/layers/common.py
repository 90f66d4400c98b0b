"""Building blocks shared by every Titans block: RMSNorm and the SwiGLU MLP.

Shape legend
    ... any leading dims, dim model width, hidden MLP width
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RMSNorm", "SwiGLU"]


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in float32.

    Half and bfloat16 inputs are normalised in float32 (float64 stays float64) and the result
    is cast back to x's dtype, so the mean of squares never over- or underflows.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        _check_positive("dim", dim)
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        self.dim, self.eps = dim, float(eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., dim] -> [..., dim]."""
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"x must end in dim={self.dim}, got shape {tuple(x.shape)}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x.to(dtype)
        y = xc * torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.to(dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class SwiGLU(nn.Module):
    """The gated MLP of LLaMA-style blocks: down(SiLU(gate(x)) * up(x)), no biases.

    gate and up are one [dim -> 2 hidden] matmul (`w_in`, gate first), down is `w_out`.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        _check_positive("dim", dim)
        _check_positive("hidden", hidden)
        self.dim, self.hidden = dim, hidden
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., dim] -> [..., dim]."""
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"x must end in dim={self.dim}, got shape {tuple(x.shape)}")
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)
