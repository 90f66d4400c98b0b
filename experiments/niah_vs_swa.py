"""Small study: can the memory recall what the attention window no longer sees?

Every variant (LMM, MAC, MAG, MAL) and the two baselines (SWA, Transformer++) is trained
from scratch with the same budget on multi-query associative recall (MQAR) whose queries are
spread uniformly over the sequence, so most of them sit beyond the 32-token window of the
tiny preset. Then each model is evaluated at growing lengths (longer than it was trained on:
the needles lie further and further back). Writes docs/RESULTS.md and its plot.

    python experiments/niah_vs_swa.py                 # ~10 minutes on 2 CPU cores
    python experiments/niah_vs_swa.py --steps 50      # a quick look

Same budget: the same steps, batch, sequence length, learning-rate schedule and seed for
every model; parameter counts differ by design (the paper's variants add a memory to
attention) and are reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import titans  # noqa: F401  (flush-to-zero before any torch work)
from titans import TitansConfig, TitansLM
from titans.data.tasks import evaluate_recall, recall_batches
from titans.train import TrainConfig, Trainer

VARIANTS = ["lmm", "mac", "mag", "mal", "swa", "transformer"]
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-len", type=int, default=128)
    p.add_argument("--eval-lens", default="128,256,512,1024")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=str(ROOT / "runs" / "niah_vs_swa"))
    p.add_argument("--report", default=str(ROOT / "docs" / "RESULTS.md"))
    p.add_argument("--report-only", action="store_true", help="rewrite the report from --out/results.json")
    args = p.parse_args()
    task = dict(n_pairs=args.pairs, power_a=1.0)  # power_a = 1: query slots uniform, mostly far away
    eval_lens = [int(x) for x in args.eval_lens.split(",")]
    if args.report_only:
        rows = json.loads((Path(args.out) / "results.json").read_text())
        for r in rows:
            r["accuracy"] = {int(n): a for n, a in r["accuracy"].items()}
        return write_report(rows, eval_lens, args)
    rows = []
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        config = TitansConfig.from_preset("tiny", variant=variant)
        model = TitansLM(config)
        out = Path(args.out) / variant
        shutil.rmtree(out, ignore_errors=True)  # a fresh run every time
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.train_len, lr=args.lr,
                          warmup=args.steps // 10, eval_every=0, eval_batches=2, ckpt_every=0, keep_last=1,
                          out_dir=str(out), progress=False)
        batches = recall_batches("mqar", args.batch_size, config.vocab_size, seed=0, seq_len=args.train_len, **task)
        t0 = time.perf_counter()
        Trainer(model, batches, None, cfg, config_dict=config.to_dict()).fit()
        train_s = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            acc = {n: evaluate_recall(model, "mqar", 8, config.vocab_size, n_batches=4, seed=1, seq_len=n, **task)
                   for n in eval_lens}
        params = sum(p.numel() for p in model.parameters())
        rows.append(dict(variant=variant, params=params, train_s=train_s, accuracy=acc))
        print(f"{variant:12s} {params / 1e3:7.0f}K params  train {train_s:5.0f}s  "
              + "  ".join(f"{n}: {a:.3f}" for n, a in acc.items()), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1))
    write_report(rows, eval_lens, args)


def write_report(rows: list[dict], eval_lens: list[int], args: argparse.Namespace) -> None:
    report = Path(args.report)
    plot = report.parent / "results" / "niah_vs_swa.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = [[r["accuracy"][n] for n in eval_lens] for r in rows]  # models x lengths
    fig, ax = plt.subplots(figsize=(1.2 * len(eval_lens) + 2, 0.45 * len(rows) + 1.5))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(eval_lens)), [str(n) for n in eval_lens])
    ax.set_yticks(range(len(rows)), [r["variant"] for r in rows])
    for i, row in enumerate(grid):
        for j, a in enumerate(row):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel(f"sequence length (trained at {args.train_len}; attention window 32)")
    ax.set_title("MQAR accuracy, queries beyond the window")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(plot, dpi=120)
    header = "| model | params | train time | " + " | ".join(f"acc @ {n}" for n in eval_lens) + " |"
    lines = [header, "|" + "---|" * (3 + len(eval_lens))]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['params'] / 1e3:.0f}K | {r['train_s']:.0f}s | "
                     + " | ".join(f"{r['accuracy'][n]:.3f}" for n in eval_lens) + " |")
    cmd = (f"python experiments/niah_vs_swa.py --steps {args.steps} --batch-size {args.batch_size} "
           f"--train-len {args.train_len} --eval-lens {args.eval_lens} --pairs {args.pairs} --lr {args.lr}")
    section = ["## Recall beyond the attention window (MQAR, tiny models)", "",
               f"Made by `{cmd}` on 2 CPU cores. Tiny preset (dim 64, 2 layers, window 32, chunk 16, "
               f"segment 32, 4 persistent tokens), {args.pairs} key-value pairs, queries spread uniformly "
               f"over the sequence (most beyond the window), same training budget for every model "
               f"({args.steps} steps x {args.batch_size} x {args.train_len} tokens, AdamW {args.lr}, "
               f"cosine, clip 1.0, seed 0); accuracy on 4 x 8 held-out sequences per length; chance is "
               f"1/128.", "", *lines, "", f"![accuracy heatmap: model x length](results/{plot.name})", ""]
    text = report.read_text() if report.exists() else "# Results\n\n"
    marker = "## Recall beyond the attention window"
    if marker in text:  # replace this study's section, keep the others
        start = text.index(marker)
        end = text.find("\n## ", start + 1)
        text = text[:start] + "\n".join(section) + (text[end + 1:] if end != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + "\n".join(section)
    report.write_text(text)
    print(f"wrote {report} and {plot}")


if __name__ == "__main__":
    main()
