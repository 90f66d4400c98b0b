"""The training run's log on disk: log.csv (one row per logged step), TensorBoard scalars (when
tensorboard is installed) and loss.png (when matplotlib is installed), all on rank 0."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

__all__ = ["LOG_COLUMNS", "RunLog"]

LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_ppl")


class RunLog:
    """log.csv (+ TensorBoard, + loss.png at the end) on rank 0; nothing on other ranks.

    On resume at step s, rows after s (written by the killed run after its checkpoint) are
    dropped so the CSV reads as one uninterrupted run.
    """

    def __init__(self, out_dir: Path, start_step: int, enabled: bool) -> None:
        self.enabled, self.out_dir, self.tb = enabled, out_dir, None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = out_dir / "log.csv"
        kept = [r for r in _read_csv(self.csv_path) if int(r["step"]) <= start_step]
        self.file = open(self.csv_path, "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_COLUMNS)
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.file.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            print("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)",
                  file=sys.stderr)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.writer.writerow({k: ("" if row[k] is None else repr(row[k])) for k in LOG_COLUMNS})
        self.file.flush()
        if self.tb is not None:
            for k in LOG_COLUMNS[1:]:
                if row[k] is not None:
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("val") else f"val/{k}",
                                       row[k], row["step"])

    def close(self) -> None:
        if not self.enabled or self.file.closed:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        _plot(self.csv_path, self.out_dir / "loss.png")


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r.get("step")]


def _plot(csv_path: Path, png: Path) -> None:
    """Train (and validation) loss against step, from log.csv."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss.png (pip install matplotlib)", file=sys.stderr)
        return
    rows = _read_csv(csv_path)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], label="train")
    val = [r for r in rows if r["val_loss"]]
    if val:
        ax.plot([int(r["step"]) for r in val], [float(r["val_loss"]) for r in val], "o-",
                label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
