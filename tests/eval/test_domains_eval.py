"""The forecasting and DNA harnesses end to end at tiny sizes: learning, skips, leakage, seeds, tables."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from torch import nn

from titans.data.dna import DNAClassificationSet, DNAClassificationTask, FastaSource
from titans.data.timeseries import make_forecast_splits
from titans.eval.dna import format_dna_table, run_dna_classification, run_dna_lm
from titans.eval.forecast import evaluate_forecaster, format_forecast_table, run_forecast

TINY_TITANS = {"titans": dict(dim=16, n_layers=1, heads=2, patch_len=8, stride=8)}
TINY_DNA = dict(dim=32, n_layers=1, heads=2, chunk_size=8, segment_len=16)


def _series(T: int = 400) -> np.ndarray:
    t = np.arange(T, dtype=np.float64)
    rng = np.random.default_rng(0)
    return np.stack([np.sin(2 * np.pi * t / 24), np.cos(2 * np.pi * t / 12) + 0.01 * t], axis=1) \
        + 0.05 * rng.standard_normal((T, 2))


# --- forecasting ---------------------------------------------------------------------------

def test_run_forecast_learns_skips_and_is_seeded():
    # 400 rows at 7:1:2 leave a val split of 40 rows: H = 24 runs, H = 100 is skipped.
    kw = dict(lookback=48, horizons=(24, 100), max_steps=15, batch_size=16, seed=0, progress=False,
              model_kwargs=TINY_TITANS)
    rows = run_forecast(_series(), ("titans", "dlinear"), **kw)
    assert [(r["model"], r["horizon"]) for r in rows] == [("titans", 24), ("dlinear", 24),
                                                          ("titans", 100), ("dlinear", 100)]
    for r in rows[:2]:
        # predicting 0 (the train mean) scores about 1 on this standardised sine
        assert r["mse"] < 0.5 and r["mae"] < r["mse"] ** 0.5 + 1e-9 and r["params"] > 0 and r["note"] == ""
        assert r["dataset"] == "array" and r["steps"] == 15
    assert rows[2]["mse"] is None and rows[2]["note"] == "skipped: horizon 100 is longer than the val split (40 rows)"
    again = run_forecast(_series(), "titans", **{**kw, "horizons": (24,)})
    assert again[0]["mse"] == rows[0]["mse"] and again[0]["val_mse"] == rows[0]["val_mse"]


def test_test_rows_never_reach_training_or_the_scaler():
    # Blow up every test-only row: training (val MSE, steps) must not move, test MSE must.
    values = _series()
    n_test = int(len(values) * 0.2)
    poisoned = values.copy()
    poisoned[-n_test:] *= 1000.0
    kw = dict(lookback=48, horizons=(24,), max_steps=30, eval_every=10, progress=False)
    a = run_forecast(values, "dlinear", **kw)[0]
    b = run_forecast(poisoned, "dlinear", **kw)[0]
    assert a["val_mse"] == b["val_mse"] and a["steps"] == b["steps"]
    assert b["mse"] > 1000 * a["mse"]


def test_evaluate_forecaster_hand_computed():
    # A model that forecasts 0 scores the mean of y^2 over every element of every window.
    class Zero(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 5, x.shape[2])

    sp = make_forecast_splits(_series(), lookback=10, horizon=5)
    ys = torch.stack([sp.test[i][1] for i in range(len(sp.test))]).double()
    got = evaluate_forecaster(Zero(), sp.test, batch_size=7)
    assert got["mse"] == pytest.approx(ys.pow(2).mean().item(), rel=1e-12)
    assert got["mae"] == pytest.approx(ys.abs().mean().item(), rel=1e-12)


def test_csv_ett_protocol_and_bad_arguments(tmp_path):
    # 600 daily rows: the ETT split with 1 step a day is 360 / 120 / 120 rows.
    path = tmp_path / "mini.csv"
    vals = _series(600)
    path.write_text("date,a,b\n" + "".join(f"d{i},{x:.6f},{y:.6f}\n" for i, (x, y) in enumerate(vals)))
    rows = run_forecast(path, "dlinear", lookback=24, horizons=(24,), protocol="ett", steps_per_day=1,
                        max_steps=5, progress=False)
    assert rows[0]["dataset"] == "mini" and rows[0]["mse"] is not None
    with pytest.raises(ValueError, match="steps_per_day is required"):
        run_forecast(path, "dlinear", protocol="ett", progress=False)
    with pytest.raises(ValueError, match="model must be one of"):
        run_forecast(vals, "arima", progress=False)
    with pytest.raises(ValueError, match="neither an example"):
        run_forecast(str(tmp_path / "missing.csv"), progress=False)
    with pytest.raises(ValueError, match=r"columns \['nope'\] not in the header"):
        run_forecast(path, columns=["nope"], progress=False)
    with pytest.raises(ValueError, match="no column names"):
        run_forecast(vals, columns=["a"], progress=False)
    with pytest.raises(RuntimeError, match="training diverged at step 2"):
        run_forecast(vals, "dlinear", lookback=24, horizons=(24,), lr=1e30, max_steps=5, progress=False)


def test_format_forecast_table():
    rows = [dict(dataset="d", model="titans", horizon=96, mse=0.5, mae=0.4, note=""),
            dict(dataset="d", model="dlinear", horizon=96, mse=0.25, mae=0.45, note=""),
            dict(dataset="d", model="titans", horizon=720, mse=None, mae=None, note="skipped: short"),
            dict(dataset="d", model="dlinear", horizon=720, mse=None, mae=None, note="skipped: short")]
    assert format_forecast_table(rows) == (
        "| dataset | H | titans MSE | titans MAE | dlinear MSE | dlinear MAE |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        "| d | 96 | 0.500 | **0.400** | **0.250** | 0.450 |\n"
        "\n"
        "- d, H = 720: skipped: short")


# --- DNA -----------------------------------------------------------------------------------

def _gc_set(n: int, length: int, seed: int) -> DNAClassificationSet:
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([[0.15, 0.35, 0.35, 0.15], [0.35, 0.15, 0.15, 0.35]])
    labels = torch.arange(n) % 2
    return DNAClassificationSet(torch.multinomial(probs[labels], length, replacement=True, generator=g), labels)


def test_run_dna_classification_learns():
    task = DNAClassificationTask(["gc", "at"], _gc_set(64, 32, 0), _gc_set(32, 32, 1), _gc_set(64, 32, 2))
    rows = run_dna_classification(task, steps=25, batch_size=16, lr=3e-3, eval_every=25, config=TINY_DNA,
                                  markov_orders=(0, 1), progress=False)
    titans, markov = rows
    assert titans["model"] == "titans-lmm" and titans["accuracy"] > 0.85 and titans["steps"] == 25
    assert markov["model"].startswith("markov-k") and markov["accuracy"] > 0.9   # composition suffices here
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1"):
        run_dna_classification(task, steps=0, progress=False)
    with pytest.raises(RuntimeError, match="training diverged"):
        run_dna_classification(task, steps=5, lr=1e30, config=TINY_DNA, progress=False)


def test_run_dna_lm_beats_uniform_on_a_markov_source(tmp_path):
    # A genome from an order-1 chain that mostly cycles A -> C -> G -> T: about 0.9 bits per base.
    rng = np.random.default_rng(0)
    n, seq = 6000, [0]
    for _ in range(n - 1):
        seq.append((seq[-1] + 1) % 4 if rng.random() < 0.85 else int(rng.integers(4)))
    path = tmp_path / "g.fa.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(">chr\n" + "".join("ACGT"[i] for i in seq) + "\n")
    kw = dict(seq_len=32, steps=30, batch_size=16, lr=1e-2, config=TINY_DNA, n_eval_windows=16,
              markov_orders=(0, 1, 2), progress=False)
    rows = run_dna_lm([FastaSource(path, "x")], **kw)
    titans, markov = rows
    assert markov["model"] in ("markov-k1", "markov-k2") and markov["bits_per_base"] < 1.2
    assert titans["bits_per_base"] < 1.6 and titans["val_bits_per_base"] < 1.6   # uniform over ACGT is 2
    assert run_dna_lm([FastaSource(path, "x")], **kw)[0]["bits_per_base"] == titans["bits_per_base"]


def test_format_dna_table():
    rows = [dict(task="t", model="titans-lmm", accuracy=0.75, val_accuracy=0.5, params=1234, steps=10,
                 train_time_s=1.5, note="n")]
    assert format_dna_table(rows).splitlines()[2] == "| t | titans-lmm | 0.750 | 0.500 | 1,234 | 10 | 1.5 | n |"
    with pytest.raises(ValueError, match="all come from"):
        format_dna_table(rows + [dict(task="t", model="m", bits_per_base=1.0)])
