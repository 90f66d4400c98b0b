"""The paper-size presets land within 5% of their names for every variant (issue: presets)."""

from __future__ import annotations

import pytest
import torch

from titans import TitansConfig, TitansLM
from titans.models.config import VARIANTS

SIZES = {"170M": 170e6, "340M": 340e6, "400M": 400e6, "760M": 760e6}


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_paper_presets_parameter_counts(size, variant):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = TitansLM(TitansConfig.from_preset(size, variant=variant))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - SIZES[size]) / SIZES[size] <= 0.05, f"{size} {variant}: {n / 1e6:.1f}M"
    assert model.config.vocab_size == 32000
