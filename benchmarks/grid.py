"""The case grid both benchmark scripts take: configs x dtypes x B x T, given as comma lists."""

from __future__ import annotations

import argparse

DTYPES = ("fp32", "bf16")


def ints(s: str, name: str) -> list[int]:
    """A comma list of integers >= 1 (the value of --name)."""
    try:
        vals = [int(v) for v in s.split(",")]
    except ValueError:
        raise ValueError(f"--{name} must be a comma list of integers, got {s!r}") from None
    if any(v < 1 for v in vals):
        raise ValueError(f"--{name} values must be >= 1, got {s!r}")
    return vals


def choices(s: str, allowed: tuple[str, ...], name: str) -> list[str]:
    """A comma list of values from `allowed` (the value of --name)."""
    vals = s.split(",")
    bad = [v for v in vals if v not in allowed]
    if bad:
        raise ValueError(f"--{name} must be a comma list of {', '.join(allowed)}, got {bad}")
    return vals


def add_grid_args(p: argparse.ArgumentParser, configs_help: str) -> None:
    p.add_argument("--configs", default="a,b", help=configs_help)
    p.add_argument("--T", default="1024,4096,16384", help="comma list of sequence lengths")
    p.add_argument("--B", default="1,4", help="comma list of batch sizes")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list: fp32, bf16 (autocast)")


def parse_grid(args: argparse.Namespace, configs: tuple[str, ...]) -> tuple[list[str], list[str], list[int], list[int]]:
    """(configs, dtypes, Bs, Ts) from the arguments add_grid_args added, checked."""
    return (choices(args.configs, configs, "configs"), choices(args.dtypes, DTYPES, "dtypes"),
            ints(args.B, "B"), ints(args.T, "T"))
