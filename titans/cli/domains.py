"""The paper's other domains: `titans forecast` and `titans dna classify|lm` (docs/domains.md)."""

from __future__ import annotations

import argparse

import sys

from .common import UserError, nonnegative_int, positive_int, refuse


def _ints(value: str) -> tuple[int, ...]:
    """A comma list of positive integers (--horizons)."""
    out = tuple(positive_int(x) for x in value.split(",") if x)
    if not out:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers >= 1, got {value!r}")
    return out


def cmd_forecast(a: argparse.Namespace) -> None:
    from ..eval.forecast import format_forecast_table, run_forecast

    if bool(a.csv) == bool(a.example):
        raise UserError("give exactly one of --csv PATH or --example NAME")
    if a.protocol != "ett":
        refuse(a, ("steps_per_day",), f"--protocol {a.protocol}", "it is for --protocol ett")
    # progress: a line per evaluation and per finished model on stderr, only on a terminal
    rows = run_forecast(a.csv or a.example, tuple(a.models.split(",")), lookback=a.lookback, horizons=a.horizons,
                        protocol=a.protocol, steps_per_day=a.steps_per_day,
                        columns=a.columns.split(",") if a.columns else None, epochs=a.epochs,
                        max_steps=a.max_steps, batch_size=a.batch_size, seed=a.seed,
                        progress=not a.quiet and sys.stderr.isatty())
    print(format_forecast_table(rows, digits=4))


def cmd_dna(a: argparse.Namespace) -> None:
    from ..eval.dna import format_dna_table, run_dna_classification, run_dna_lm

    if a.task == "lm":
        refuse(a, ("n_train", "n_val", "n_test"), "dna lm", "they are the windows per species of dna classify")
    sources = None
    if a.fasta_dir:  # the user's own genomes: <dir>/<label>/*.fa(sta)(.gz)
        from ..data.dna import find_labeled_files
        sources = find_labeled_files(a.fasta_dir)
    common = dict(sources=sources, data_dir=a.data_dir, preset=a.preset, variant=a.variant, steps=a.steps,
                  batch_size=a.batch_size, seed=a.seed, progress=not a.quiet and sys.stderr.isatty())
    if a.task == "classify":
        rows = run_dna_classification(window=a.window, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test, **common)
    else:
        rows = run_dna_lm(seq_len=a.window, **common)
    print(format_dna_table(rows))


def register(sub, ev) -> None:
    from ..models import VARIANTS

    f = sub.add_parser("forecast", help="long-horizon forecasting: Titans forecaster vs DLinear (MSE/MAE)")
    f.add_argument("--csv", help="a CSV in the ETT/Informer layout (date column, then the variables)")
    f.add_argument("--example", help="a shipped example: sf-temps, seattle-temps, seattle-weather, "
                                     "delhi-climate, btc-15min")
    f.add_argument("--models", default="titans,dlinear")
    f.add_argument("--lookback", type=positive_int, default=96)
    f.add_argument("--horizons", type=_ints, default=(96, 192, 336, 720))
    f.add_argument("--protocol", default="ratio", choices=["ratio", "ett"], help="7:1:2 split, or ETT's 12/4/4 months")
    f.add_argument("--steps-per-day", type=positive_int, help="with --protocol ett: 24 (ETTh) or 96 (ETTm)")
    f.add_argument("--columns", help="comma list of columns to use (default: all numeric)")
    f.add_argument("--epochs", type=positive_int, default=10)
    f.add_argument("--max-steps", type=positive_int, default=None, help="cap on training steps per model and horizon")
    f.add_argument("--batch-size", type=positive_int, default=32)
    f.add_argument("--seed", type=nonnegative_int, default=0)
    f.add_argument("--quiet", action="store_true", help="no progress lines (shown only when stderr is a terminal)")
    f.set_defaults(func=cmd_forecast)

    d = sub.add_parser("dna", help="DNA: species classification or next-base modelling on reference genomes")
    d.add_argument("task", choices=["classify", "lm"])
    d.add_argument("--window", type=positive_int, default=500, help="bases per window (classify) or sequence (lm)")
    d.add_argument("--n-train", type=positive_int, default=1000, help="windows per species (classify)")
    d.add_argument("--n-val", type=positive_int, default=100)
    d.add_argument("--n-test", type=positive_int, default=250)
    d.add_argument("--preset", default="tiny")
    d.add_argument("--variant", default="lmm", choices=sorted(VARIANTS))
    d.add_argument("--steps", type=positive_int, default=200)
    d.add_argument("--batch-size", type=positive_int, default=8)
    d.add_argument("--seed", type=nonnegative_int, default=0)
    d.add_argument("--data-dir", help="download cache (default $TITANS_DATA or ~/.cache/titans)")
    d.add_argument("--fasta-dir", help="your own FASTA files as <dir>/<label>/*.fa (default: the reference genomes)")
    d.add_argument("--quiet", action="store_true", help="no progress lines (shown only when stderr is a terminal)")
    d.set_defaults(func=cmd_dna)
