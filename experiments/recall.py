"""The recall study: does the memory recall what the attention window no longer sees, and does
it hold past the trained length?

Every model is trained from scratch with the same budget on multi-query associative recall
(MQAR) whose queries are spread uniformly over the sequence, so most of them sit beyond the
32-token window of the tiny preset, then evaluated at 1x, 2x, 4x, 8x and 16x the trained
length (the pairs lie further and further back). Models: LMM (the default, a linear memory),
LMM with a deep (2-layer MLP) memory at the defaults and in its residual form at theta_init 0.1,
MAC, MAG, MAL, SWA and Transformer++, each over several seeds.

    python experiments/recall.py                         # the full study, resumable
    python experiments/recall.py --models lmm,swa --seeds 0 --steps 200    # a quick look
    python experiments/recall.py --report-only           # rewrite the report from the results

Each finished run is appended to --out/results.jsonl and skipped when the study is run again
(same settings), so an interrupted study continues where it stopped. Writes the section
"Recall beyond the attention window" of docs/RESULTS.md and docs/results/recall.png.

Same budget: the same steps, batch, sequence length, learning-rate schedule and seeds for every
model; parameter counts differ by design (the variants add a memory to attention) and are
reported with the wall time of each run.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from common import (ROOT, Store, add_set_option, cpu_name, run_pending, save_figure, set_flags, spread, train,
                    write_section)
from titans import TitansConfig, TitansLM
from titans.cli.common import parse_overrides
from titans.data.tasks import evaluate_recall, recall_batches

# name -> (variant, config overrides)
MODELS = {
    "lmm": ("lmm", {}),
    "lmm-deep": ("lmm", {"memory_depth": 2}),
    # the deep memory in the setting that trained on language (docs/models.md, "A deep memory that trains")
    "lmm-deep-res": ("lmm", {"memory_depth": 2, "memory_residual": True, "theta_init": 0.1}),
    "mac": ("mac", {}),
    "mag": ("mag", {}),
    "mal": ("mal", {}),
    "swa": ("swa", {}),
    "transformer": ("transformer", {}),
}
SECTION = "## Recall beyond the attention window"


def settings(args: argparse.Namespace) -> dict:
    """What makes two runs comparable (a stored run is reused only when these match)."""
    return dict(steps=args.steps, batch_size=args.batch_size, train_len=args.train_len, pairs=args.pairs,
                lr=args.lr, eval_lens=args.eval_lens, **({"set": args.set} if args.set else {}))


def run_one(name: str, seed: int, args: argparse.Namespace) -> dict:
    variant, overrides = MODELS[name]
    task = dict(n_pairs=args.pairs, power_a=1.0)  # power_a = 1: query slots uniform, mostly far away
    torch.manual_seed(seed)
    config = TitansConfig.from_preset("tiny", variant=variant, **{**overrides, **parse_overrides(args.set)})
    model = TitansLM(config)
    batches = recall_batches("mqar", args.batch_size, config.vocab_size, seed=seed, seq_len=args.train_len, **task)
    train_s, error, _ = train(model, batches, steps=args.steps, batch_size=args.batch_size, seq_len=args.train_len,
                              lr=args.lr, seed=seed, out=Path(args.out) / f"{name}-{seed}")
    model.eval()
    with torch.no_grad():
        acc = {str(n): evaluate_recall(model, "mqar", 8, config.vocab_size, n_batches=4, seed=1000 + seed,
                                       seq_len=n, **task) for n in args.lens}
    return dict(model=name, seed=seed, params=sum(p.numel() for p in model.parameters()),
                train_s=round(train_s, 1), tokens=args.steps * args.batch_size * args.train_len,
                diverged=error, accuracy=acc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-len", type=int, default=128)
    p.add_argument("--eval-lens", default="1,2,4,8,16", help="multiples of --train-len")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default=str(ROOT / "runs" / "recall"))
    p.add_argument("--report", default=str(ROOT / "docs" / "RESULTS.md"))
    p.add_argument("--report-only", action="store_true", help="rewrite the report from --out/results.jsonl")
    add_set_option(p, "model")
    args = p.parse_args()
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.lens = [int(m) * args.train_len for m in args.eval_lens.split(",")]
    store = Store(Path(args.out) / "results.jsonl", settings(args))
    if not args.report_only:
        run_pending(store, [dict(model=m, seed=s) for s in seeds for m in models],
                    lambda k: run_one(k["model"], k["seed"], args),
                    lambda r: f"{r['model']:12s} seed {r['seed']}  {r['train_s']:5.0f}s  "
                              + "  ".join(f"{n}: {a:.3f}" for n, a in r["accuracy"].items()))
    rows = [r for r in store.rows if r["model"] in models and r["seed"] in seeds]
    if rows:
        write_report(rows, models, args)


def write_report(rows: list[dict], models: list[str], args: argparse.Namespace) -> None:
    report = Path(args.report)
    plot = report.parent / "results" / "recall.png"
    lens = [str(n) for n in args.lens]
    by_model = {m: sorted((r for r in rows if r["model"] == m), key=lambda r: r["seed"]) for m in models}
    by_model = {m: rs for m, rs in by_model.items() if rs}

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m, rs in by_model.items():
        accs = [[r["accuracy"][n] for r in rs] for n in lens]
        mean = [statistics.mean(a) for a in accs]
        line, = ax.plot(args.lens, mean, marker="o", label=f"{m} ({len(rs)} seeds)")
        ax.fill_between(args.lens, [min(a) for a in accs], [max(a) for a in accs], color=line.get_color(),
                        alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.lens, lens)
    ax.axvline(args.train_len, color="grey", ls=":", lw=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"evaluation length (trained at {args.train_len}; attention window 32)")
    ax.set_ylabel("MQAR accuracy (mean; band: min-max over seeds)")
    ax.legend(fontsize=8, loc="best")
    save_figure(fig, plot)

    header = ("| model | params | seeds | train time per run | "
              + " | ".join(f"@ {int(n) // args.train_len}x ({n})" for n in lens) + " |")
    lines = [header, "|" + "---|" * (4 + len(lens))]
    for m, rs in by_model.items():
        cells = [spread(r["accuracy"][n] for r in rs) for n in lens]
        times = [r["train_s"] for r in rs]
        diverged = sum(1 for r in rs if r["diverged"])
        lines.append(f"| {m} | {rs[0]['params'] / 1e3:.0f}K | {','.join(str(r['seed']) for r in rs)}"
                     + (f" ({diverged} diverged)" if diverged else "")
                     + f" | {min(times):.0f}-{max(times):.0f} s | " + " | ".join(cells) + " |")
    cmd = (f"python experiments/recall.py --models {','.join(by_model)} --seeds {args.seeds} --steps {args.steps} "
           f"--batch-size {args.batch_size} --train-len {args.train_len} --eval-lens {args.eval_lens} "
           f"--pairs {args.pairs} --lr {args.lr}" + set_flags(args.set))
    section = [f"{SECTION} (MQAR, tiny models)", "",
               f"Made by `{cmd}` on 2 cores ({cpu_name()}); train time per run as measured (how many "
               f"threads and runs at a time: the notes below). Tiny preset (dim 64, "
               f"2 layers, window 32, memory chunk 16, segment 32, 4 persistent tokens; `lmm-deep` is "
               f"LMM with `memory_depth=2`, `lmm-deep-res` adds `memory_residual=true theta_init=0.1`), library defaults otherwise; {args.pairs} key-value pairs, queries "
               f"spread uniformly over the sequence (most beyond the window). Same budget for every model "
               f"and seed: {args.steps} steps x {args.batch_size} x {args.train_len} tokens "
               f"({args.steps * args.batch_size * args.train_len / 1e6:.1f}M tokens), AdamW {args.lr}, "
               f"cosine, clip 1.0. Accuracy on 4 x 8 held-out sequences per length (mean over seeds, "
               f"min-max in brackets); chance is 1/128.", "", *lines, "",
               f"![MQAR accuracy against evaluation length, per model](results/{plot.name})", ""]
    write_section(report, SECTION, section)
    print(f"wrote {report} and {plot}")


if __name__ == "__main__":
    main()
