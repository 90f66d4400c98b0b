"""DLinear (Zeng, Chen, Zhang, Xu, "Are Transformers Effective for Time Series Forecasting?",
AAAI 2023): the linear baseline of the forecasting table.

Shape legend
    B batch, L lookback, H horizon, C channels

The input is split into a trend (a moving average along time, the series edge-padded by
repeating its first and last values so the trend has length L) and a seasonal remainder.
Each part is mapped from L steps to H steps by a linear layer along time, shared by all
channels or one per channel (`individual`), and the two forecasts are added.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DLinear", "moving_average"]


def moving_average(x: Tensor, kernel: int) -> Tensor:
    """Trend of x [B, L, C]: mean over a centred window of odd size `kernel`, edge-padded."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd number, got {kernel}")
    pad = (kernel - 1) // 2
    # Replicating the edge values (not zeros) keeps the trend of a level series flat at the ends.
    xp = torch.cat([x[:, :1].expand(-1, pad, -1), x, x[:, -1:].expand(-1, pad, -1)], dim=1)
    return F.avg_pool1d(xp.transpose(1, 2), kernel_size=kernel, stride=1).transpose(1, 2)


class DLinear(nn.Module):
    """Decomposition + linear forecaster: [B, L, C] -> [B, H, C].

    Args:
        lookback: L, input steps.  horizon: H, output steps.  channels: C.
        kernel: moving-average window (odd; 25 in the paper).
        individual: one pair of linear maps per channel instead of one shared pair.
    """

    def __init__(self, lookback: int, horizon: int, channels: int, kernel: int = 25,
                 individual: bool = False) -> None:
        super().__init__()
        for name, v in (("lookback", lookback), ("horizon", horizon), ("channels", channels)):
            if v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {kernel}")
        self.lookback, self.horizon, self.channels = lookback, horizon, channels
        self.kernel, self.individual = kernel, individual
        g = channels if individual else 1
        # [G, H, L] weights and [G, H] biases; G = 1 is the shared map.
        self.w_seasonal = nn.Parameter(torch.empty(g, horizon, lookback))
        self.w_trend = nn.Parameter(torch.empty(g, horizon, lookback))
        self.b_seasonal = nn.Parameter(torch.empty(g, horizon))
        self.b_trend = nn.Parameter(torch.empty(g, horizon))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init: uniform(-1/sqrt(L), 1/sqrt(L)) for weights and biases."""
        bound = 1.0 / math.sqrt(self.lookback)
        for p in (self.w_seasonal, self.w_trend, self.b_seasonal, self.b_trend):
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, L, C] -> forecast [B, H, C]."""
        if x.ndim != 3 or x.shape[1] != self.lookback or x.shape[2] != self.channels:
            raise ValueError(f"x must be [B, {self.lookback}, {self.channels}], got {tuple(x.shape)}")
        trend = moving_average(x, self.kernel)
        seasonal = x - trend
        eq = "chl,blc->bhc" if self.individual else "hl,blc->bhc"
        ws, wt = (self.w_seasonal, self.w_trend) if self.individual else (self.w_seasonal[0], self.w_trend[0])
        out = torch.einsum(eq, ws, seasonal) + torch.einsum(eq, wt, trend)
        bias = (self.b_seasonal + self.b_trend).transpose(0, 1)  # [H, G]
        return out + bias
