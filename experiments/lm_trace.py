"""The language-modelling run of one Table 5 row (experiments/ablation.py's run at its default
budget), traced: the mean training loss and the largest gradient norm (before the clip) per 50
steps, and the final validation loss. What docs/RESULTS.md cites for LMM seed 2's gradient spikes.

    python experiments/lm_trace.py lmm 2
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import ablation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("row", choices=list(ablation.ROWS))
    p.add_argument("seed", type=int)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        secs, error, log = ablation.train_lm(a.row, a.seed, ablation.parser().parse_args([]), Path(out) / "run")
    print(f"{a.row} seed {a.seed}: {secs:.0f} s, stopped: {error}")
    for i in range(0, len(log), 50):
        rows = log[i:i + 50]
        print(f"steps {i:4d}-{i + len(rows) - 1:4d}  loss {statistics.mean(r['loss'] for r in rows):.3f}  "
              f"max grad norm {max(r['grad_norm'] for r in rows):.3g}")
    print("val loss", next(r["val_loss"] for r in reversed(log) if r.get("val_loss") is not None))


if __name__ == "__main__":
    main()
