"""The long-horizon forecasting benchmark (paper section 5.6, Table 3) as one function.

run_forecast(data, model=("titans", "dlinear"), horizons=(96, 192, 336, 720)) splits the
series chronologically, standardises it with train statistics (titans.data.timeseries),
trains each model for each horizon with AdamW and early stopping on the validation MSE,
restores the best weights and reports MSE / MAE on the standardised test windows.

Shape legend
    T steps, C channels, L lookback, H horizon, B batch
    windows: x [B, L, C], y [B, H, C]

The loop is deliberately small: shuffled mini-batches, AdamW, a cosine learning-rate decay
over the planned steps, gradient clipping at 1, a validation pass at the end of every epoch
(or every `eval_every` steps), stop after `patience` passes without improvement.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..data.timeseries import (EXAMPLES, ForecastSplits, ForecastWindows, TimeSeries, load_csv, load_example,
                               make_forecast_splits, split_chronological, split_ett)
from ..models.dlinear import DLinear
from ..models.forecaster import TitansForecaster
from .metrics import ErrorAccumulator

__all__ = ["run_forecast", "train_forecaster", "evaluate_forecaster", "build_forecast_model",
           "format_forecast_table", "MODELS", "DEFAULT_LR"]

MODELS = ("titans", "dlinear")
# DLinear's reference runs use lr 5e-3 on most datasets; 3e-3 beat 1e-3 on the sf-temps val split.
DEFAULT_LR = {"titans": 3e-3, "dlinear": 5e-3}


def build_forecast_model(name: str, lookback: int, horizon: int, channels: int, **kwargs: Any) -> nn.Module:
    """"titans" -> TitansForecaster, "dlinear" -> DLinear, with extra constructor kwargs."""
    if name == "titans":
        return TitansForecaster(lookback, horizon, channels, **kwargs)
    if name == "dlinear":
        return DLinear(lookback, horizon, channels, **kwargs)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def _batch(w: ForecastWindows, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Windows idx [B] of a window set -> x [B, L, C], y [B, H, C] (one gather, no loader)."""
    steps = idx[:, None] * w.stride + torch.arange(w.lookback + w.horizon)
    xy = w.data[steps]
    return xy[:, :w.lookback], xy[:, w.lookback:]


@torch.no_grad()
def evaluate_forecaster(model: nn.Module, windows: ForecastWindows, batch_size: int = 256,
                        device: str | torch.device = "cpu") -> dict[str, float]:
    """{"mse", "mae"} over every element of every window (standardised scale), exact."""
    model.eval()
    acc = ErrorAccumulator()
    for s in range(0, len(windows), batch_size):
        x, y = _batch(windows, torch.arange(s, min(s + batch_size, len(windows))))
        acc.update(model(x.to(device)).cpu(), y)
    return acc.compute()


def train_forecaster(model: nn.Module, splits: ForecastSplits, *, epochs: int = 10, max_steps: int | None = None,
                     batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.01, patience: int = 3,
                     eval_every: int | None = None, seed: int = 0, device: str | torch.device = "cpu",
                     log=None) -> dict[str, Any]:
    """Train on splits.train with early stopping on splits.val; the best weights are restored.

    Returns {"steps", "best_val_mse", "stopped_early"}. `log` is a print-like callable or None.
    """
    if epochs < 1 or batch_size < 1 or patience < 1 or lr <= 0:
        raise ValueError(f"epochs, batch_size and patience must be >= 1 and lr > 0, got "
                         f"{epochs}, {batch_size}, {patience}, {lr}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    n = len(splits.train)
    per_epoch = math.ceil(n / batch_size)
    total = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
    every = eval_every or per_epoch
    gen = torch.Generator().manual_seed(seed)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    best, best_state, bad, step, order = math.inf, None, 0, 0, torch.empty(0, dtype=torch.long)
    while step < total:
        if len(order) == 0:
            order = torch.randperm(n, generator=gen)
        idx, order = order[:batch_size], order[batch_size:]
        model.train()
        x, y = _batch(splits.train, idx)
        loss = nn.functional.mse_loss(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(norm)):
            raise RuntimeError(f"training diverged at step {step + 1} (loss {loss.item()}, gradient norm "
                               f"{norm.item()}); try a lower lr")
        opt.step()
        sched.step()
        step += 1
        if step % every == 0 or step == total:
            val = evaluate_forecaster(model, splits.val, device=device)["mse"]
            if log:
                log(f"  step {step}/{total} train {loss.item():.4f} val {val:.4f}")
            if val < best:
                best, best_state, bad = val, copy.deepcopy(model.state_dict()), 0
            else:
                bad += 1
                if bad >= patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"steps": step, "best_val_mse": best, "stopped_early": step < total}


def _resolve(data: Any, columns: Sequence[str] | None) -> tuple[str, np.ndarray]:
    """(dataset name, values [T, C]) from an array, a TimeSeries, an example name or a CSV path."""
    if isinstance(data, (np.ndarray, Tensor)):
        if columns is not None:
            raise ValueError("columns: values [T, C] have no column names; select the columns yourself")
        return "array", np.asarray(data, dtype=np.float64)
    if isinstance(data, TimeSeries) or (isinstance(data, str) and data in EXAMPLES):
        name, ts = ("series", data) if isinstance(data, TimeSeries) else (data, load_example(data))
        missing = [c for c in columns or () if c not in ts.columns]
        if missing:
            raise ValueError(f"columns {missing} are not in {name!r}, which has {ts.columns}")
        return name, ts.values if columns is None else ts.values[:, [ts.columns.index(c) for c in columns]]
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"data {str(data)!r} is neither an example ({sorted(EXAMPLES)}) nor a CSV file")
        return path.stem, load_csv(path, columns=columns).values
    raise ValueError(f"data must be values [T, C], a TimeSeries, an example name or a CSV path, "
                     f"got {type(data).__name__}")


def _too_short(n: int, lookback: int, horizon: int, protocol: str, ratios: Sequence[float],
               steps_per_day: int | None) -> str:
    """'' if every split has a window at this horizon, else a note saying which does not."""
    if protocol == "ett":
        if steps_per_day is None:
            raise ValueError("steps_per_day is required for protocol 'ett' (24 hourly, 96 for 15 min)")
        sl = split_ett(n, steps_per_day, lookback)
    elif protocol == "ratio":
        sl = split_chronological(n, ratios, lookback)
    else:
        raise ValueError(f"protocol must be 'ratio' or 'ett', got {protocol!r}")
    for name, s in zip(("train", "val", "test"), sl):
        rows = s.stop - s.start
        if name == "train" and rows < lookback + horizon:
            return f"skipped: the train split ({rows} rows) is shorter than lookback + horizon ({lookback + horizon})"
        if name != "train" and rows - lookback < horizon:
            # val / test hold `lookback` rows of the previous split for their first input
            return f"skipped: horizon {horizon} is longer than the {name} split ({rows - lookback} rows)"
    return ""


def run_forecast(data: Any, model: str | Sequence[str] = MODELS, *, lookback: int = 96,
                 horizons: Sequence[int] = (96, 192, 336, 720), protocol: str = "ratio",
                 ratios: Sequence[float] = (0.7, 0.1, 0.2), steps_per_day: int | None = None,
                 columns: Sequence[str] | None = None, epochs: int = 10, max_steps: int | None = None,
                 batch_size: int = 32, lr: float | None = None, weight_decay: float = 0.01, patience: int = 3,
                 eval_every: int | None = None, seed: int = 0, device: str = "cpu",
                 model_kwargs: dict[str, dict[str, Any]] | None = None, dataset: str | None = None,
                 progress: bool = True) -> list[dict[str, Any]]:
    """Train and test each model at each horizon; one result row per (model, horizon).

    Args:
        data: values [T, C] (numpy or torch), a TimeSeries, a shipped example name
            (titans.data.timeseries.EXAMPLES, fetched with pip on first use) or a CSV path in
            the ETT / Informer layout.
        model: "titans", "dlinear" or a sequence of them.
        lookback, horizons: L and the H values (a horizon the val or test split cannot hold
            is skipped: its row has mse = mae = None and a `note`).
        protocol: "ratio" (chronological `ratios`, 7:1:2) or "ett" (12/4/4 months; needs
            steps_per_day, 24 for ETTh*, 96 for ETTm*).
        columns: the variables to use (default all numeric columns).
        epochs, max_steps, batch_size, lr, weight_decay, patience, eval_every: the training
            loop (train_forecaster); lr None takes DEFAULT_LR of the model.
        seed: seeds the model initialisation and the batch order (same seed, same numbers).
        model_kwargs: extra constructor arguments per model name, e.g.
            {"titans": {"dim": 32, "n_layers": 1}, "dlinear": {"individual": True}}.
        dataset: the name in the rows (default: the example name or the file's stem).
        progress: print one line per evaluation and per finished run to stderr.

    Returns:
        rows {dataset, model, horizon, mse, mae, val_mse, steps, train_time_s, params, note}.
    """
    models = [model] if isinstance(model, str) else list(model)
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise ValueError(f"model must be one of {MODELS} or a sequence of them, got {model!r}")
    if lookback < 1 or not horizons or any(h < 1 for h in horizons):
        raise ValueError(f"lookback and horizons must be positive, got {lookback}, {tuple(horizons)}")
    name, values = _resolve(data, columns)
    name = dataset or name
    if values.ndim != 2 or not np.isfinite(values).all():
        raise ValueError(f"data must be finite values [T, C], got shape {values.shape}")
    kwargs = model_kwargs or {}
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else None
    rows: list[dict[str, Any]] = []
    for horizon in horizons:
        note = _too_short(len(values), lookback, horizon, protocol, ratios, steps_per_day)
        if note:
            if log:
                log(f"{name} H={horizon}: {note}")
            rows += [dict(dataset=name, model=m, horizon=horizon, mse=None, mae=None, val_mse=None, steps=0,
                          train_time_s=0.0, params=None, note=note) for m in models]
            continue
        splits = make_forecast_splits(values, lookback, horizon, protocol=protocol, ratios=ratios,
                                      steps_per_day=steps_per_day)
        for m in models:
            torch.manual_seed(seed)
            net = build_forecast_model(m, lookback, horizon, values.shape[1], **kwargs.get(m, {}))
            if log:
                log(f"{name} H={horizon} {m}: {len(splits.train)} train / {len(splits.val)} val / "
                    f"{len(splits.test)} test windows")
            t0 = time.perf_counter()
            info = train_forecaster(net, splits, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                                    lr=lr if lr is not None else DEFAULT_LR[m], weight_decay=weight_decay,
                                    patience=patience, eval_every=eval_every, seed=seed, device=device, log=log)
            took = time.perf_counter() - t0
            test = evaluate_forecaster(net, splits.test, device=device)
            row = dict(dataset=name, model=m, horizon=horizon, mse=test["mse"], mae=test["mae"],
                       val_mse=info["best_val_mse"], steps=info["steps"], train_time_s=round(took, 1),
                       params=sum(p.numel() for p in net.parameters()), note="")
            rows.append(row)
            if log:
                log(f"{name} H={horizon} {m}: test mse {row['mse']:.4f} mae {row['mae']:.4f} "
                    f"({row['steps']} steps, {took:.1f} s)")
    return rows


def format_forecast_table(rows: Sequence[dict[str, Any]], digits: int = 3) -> str:
    """A markdown table in the layout of paper Table 3: one line per (dataset, horizon), an
    MSE and an MAE column per model, the lower of each bold. Skipped horizons are listed
    under the table with their note."""
    if not rows:
        raise ValueError("rows is empty")
    models = list(dict.fromkeys(r["model"] for r in rows))
    keys = list(dict.fromkeys((r["dataset"], r["horizon"]) for r in rows))
    cell = {(r["dataset"], r["horizon"], r["model"]): r for r in rows}
    head = "| dataset | H | " + " | ".join(f"{m} MSE | {m} MAE" for m in models) + " |"
    lines = [head, "|" + " --- |" * (2 + 2 * len(models))]
    notes = []
    for ds, h in keys:
        got = [cell.get((ds, h, m)) for m in models]
        if all(r is None or r["mse"] is None for r in got):
            notes.append(f"- {ds}, H = {h}: " + next(r["note"] for r in got if r is not None))
            continue
        parts = []
        for metric in ("mse", "mae"):
            vals = [r[metric] if r is not None and r[metric] is not None else None for r in got]
            best = min(v for v in vals if v is not None)
            parts.append([("—" if v is None else (f"**{v:.{digits}f}**" if v == best and len(models) > 1
                                                   else f"{v:.{digits}f}")) for v in vals])
        cells = [c for pair in zip(parts[0], parts[1]) for c in pair]
        lines.append(f"| {ds} | {h} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))
