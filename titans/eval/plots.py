"""Tables and plots of long-context results: accuracy grids as text, heatmaps and curves (PNG).

matplotlib is optional: it is imported only when a plot is written (the `train` extra has it).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

__all__ = ["format_length", "grid_table", "heatmap", "accuracy_curves", "position_curves"]


def format_length(n: int) -> str:
    """1024 -> "1K", 1048576 -> "1M", 1500 -> "1500" (K = 1024, as RULER)."""
    for unit, size in (("M", 1024 ** 2), ("K", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _label(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int):
        return format_length(v)
    return str(v)


def grid_table(cells: Mapping[tuple[Any, Any], float], *, row_name: str, col_name: str,
               title: str = "") -> str:
    """A text table of values in [0, 1] shown as %, keyed by (row, col), rows and columns
    sorted, with a last "mean" row per column (missing cells are "-")."""
    if not cells:
        raise ValueError("cells is empty")
    rows = sorted({r for r, _ in cells}, key=lambda x: (str(type(x)), x))
    cols = sorted({c for _, c in cells}, key=lambda x: (str(type(x)), x))
    w = max(7, *(len(_label(c)) + 1 for c in cols))
    head = f"{row_name + ' / ' + col_name:>16}" + "".join(f"{_label(c):>{w}}" for c in cols)
    lines = [title] if title else []
    lines.append(head)
    for r in rows:
        vals = [cells.get((r, c)) for c in cols]
        lines.append(f"{_label(r):>16}" + "".join(
            f"{'-':>{w}}" if v is None else f"{100 * v:>{w}.1f}" for v in vals))
    means = []
    for c in cols:
        vs = [cells[(r, c)] for r in rows if (r, c) in cells]
        means.append(sum(vs) / len(vs))
    lines.append(f"{'mean':>16}" + "".join(f"{100 * m:>{w}.1f}" for m in means))
    return "\n".join(lines)


def _pyplot() -> Any:
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib "
                          "(or the titans-lm[train] extra)") from None
    return plt


def heatmap(cells: Mapping[tuple[Any, Any], float], path: str | os.PathLike, *, title: str,
            row_name: str, col_name: str) -> None:
    """Accuracy heatmap PNG: rows (e.g. depth) top to bottom, columns (e.g. length) left to
    right, green = 1, red = 0, each cell annotated with its %."""
    plt = _pyplot()
    rows = sorted({r for r, _ in cells})
    cols = sorted({c for _, c in cells})
    grid = [[cells.get((r, c), float("nan")) for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 + 0.8 * len(cols)), max(3.0, 1.0 + 0.4 * len(rows))))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), [_label(c) for c in cols])
    ax.set_yticks(range(len(rows)), [_label(r) for r in rows])
    ax.set_xlabel(col_name)
    ax.set_ylabel(row_name)
    ax.set_title(title)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_curves(cells: Mapping[tuple[Any, Any], float], path: str | os.PathLike, *,
                    title: str, col_name: str) -> None:
    """One accuracy-vs-column line per row (e.g. per task vs length, log-scale x) as a PNG."""
    plt = _pyplot()
    rows = sorted({r for r, _ in cells})
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        pts = sorted((c, v) for (rr, c), v in cells.items() if rr == r)
        ax.plot([c for c, _ in pts], [100 * v for _, v in pts], marker="o", label=_label(r))
    cols = sorted({c for _, c in cells})
    if all(isinstance(c, int) and c > 0 for c in cols) and len(cols) > 1:
        ax.set_xscale("log", base=2)
        ax.set_xticks(cols, [_label(c) for c in cols])
    ax.set_ylim(-2, 102)
    _finish(fig, ax, path, title=title, xlabel=col_name, ylabel="accuracy (%)")


def _finish(fig: Any, ax: Any, path: str | os.PathLike, *, title: str, xlabel: str, ylabel: str) -> None:
    """Labels, grid and legend of a line plot, then write it and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def position_curves(curves: Mapping[str, list[float]], buckets: list[tuple[int, int]], path: str | os.PathLike, *,
                    title: str) -> None:
    """Loss by position bucket, one line per curve (e.g. "carried", "reset"), as a PNG; the x axis
    is the bucket in multiples of the trained length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(buckets))
    for name, values in curves.items():
        ax.plot(x, values, marker="o", label=name, linestyle="--" if "reset" in name else "-")
    ax.set_xticks(list(x), [f"{lo}-{hi}x" for lo, hi in buckets])
    _finish(fig, ax, path, title=title, xlabel="position (multiples of the trained length)",
            ylabel="loss (nats per token)")
