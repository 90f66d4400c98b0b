"""The outer gradient is of ordinary size from the first step (docs/design.md §6.4): with the
CLI's optimiser settings, step 1's gradient norm before clipping is no outlier against steps
2-20, for every Titans variant and memory depths 1-2. Under key_shift the first token's key is
exactly zero, and an L2 normalisation that divides by a tiny eps made step 1's norm ~1e9."""

from __future__ import annotations

import statistics

import pytest

from titans import TitansConfig, TitansLM
from titans.data.tasks import recall_batches
from titans.train import TrainConfig, Trainer, seed_everything


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("variant", ["lmm", "mac", "mag", "mal"])
def test_step_one_gradient_is_not_an_outlier(variant, depth, tmp_path):
    seed_everything(0)
    config = TitansConfig.from_preset("tiny", variant=variant, memory_depth=depth)
    model = TitansLM(config)
    batches = recall_batches("mqar", 8, config.vocab_size, seed=0, seq_len=64, n_pairs=4, power_a=1.0)
    cfg = TrainConfig(steps=20, batch_size=8, seq_len=64, lr=2e-3, warmup=20, eval_every=0, ckpt_every=0,
                      out_dir=str(tmp_path), progress=False)   # titans train's lr and warmup
    norms = [row["grad_norm"] for row in Trainer(model, batches, None, cfg, config_dict=config.to_dict()).fit()]
    median = statistics.median(norms[1:])
    assert all(n == n and n < float("inf") for n in norms), norms
    assert norms[0] <= 100 * median, f"step 1's gradient norm {norms[0]:.3g} against a median of {median:.3g}"
