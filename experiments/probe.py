"""One MQAR training run of a tiny model: a probe for choosing a setting, not a study.

    python experiments/probe.py mac --steps 1500 --set mac_write=y
    python experiments/probe.py mal --steps 1500 --set mal_residual=false --seed 1

Tiny preset of VARIANT with the --set overrides (typed as `titans train --set`), MQAR with 4
pairs and queries spread uniformly over 128 tokens (power_a 1: most beyond the 32-token
window), batch 16, AdamW --lr with 10% warmup and cosine decay. Prints the accuracy at 1x, 4x
and 8x the trained length (4 x 8 held-out sequences each, the recall study's evaluation) and
the training loss at every tenth of the run. One run, one seed: a direction, not a result;
experiments/recall.py runs seeds.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time

import torch

import titans  # noqa: F401  (flush-to-zero before any torch work)
from titans import TitansConfig, TitansLM
from titans.cli.common import parse_overrides
from titans.data.tasks import evaluate_recall, recall_batches
from titans.train import TrainConfig, Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variant")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (repeatable)")
    a = p.parse_args()
    overrides = parse_overrides(a.set)
    task = dict(n_pairs=4, power_a=1.0)
    torch.manual_seed(a.seed)
    config = TitansConfig.from_preset("tiny", variant=a.variant, **overrides)
    model = TitansLM(config)
    out = tempfile.mkdtemp(prefix="probe-")
    cfg = TrainConfig(steps=a.steps, batch_size=16, seq_len=128, lr=a.lr, warmup=a.steps // 10, eval_every=0,
                      eval_batches=2, ckpt_every=0, keep_last=1, out_dir=out, progress=False, seed=a.seed)
    t0 = time.perf_counter()
    error = None
    try:
        Trainer(model, recall_batches("mqar", 16, config.vocab_size, seed=a.seed, seq_len=128, **task), None, cfg,
                config_dict=config.to_dict()).fit()
    except RuntimeError as e:  # the trainer's stop on a diverged run
        error = str(e).splitlines()[0]
    with open(f"{out}/log.csv") as f:
        rows = list(csv.DictReader(f))
    shutil.rmtree(out, ignore_errors=True)
    seconds = time.perf_counter() - t0
    tenth = max(1, len(rows) // 10)
    losses = " ".join(f"{float(r['loss']):.2f}" for r in rows[tenth - 1::tenth])
    model.eval()
    with torch.no_grad():
        acc = {n: evaluate_recall(model, "mqar", 8, config.vocab_size, n_batches=4, seed=1000 + a.seed, seq_len=n,
                                  **task) for n in (128, 512, 1024)}
    print(f"{a.variant} {' '.join(a.set)} steps {a.steps} lr {a.lr} seed {a.seed}: {seconds:.0f}s"
          + (f" DIVERGED ({error})" if error else "") + "  "
          + "  ".join(f"@{n} {v:.3f}" for n, v in acc.items()) + f"  loss by tenths: {losses}", flush=True)


if __name__ == "__main__":
    main()
