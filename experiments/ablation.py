"""The paper's Table 5 at CPU scale: the full LMM, each of its parts removed, and the three
ways to add attention, each scored on language modelling and on recall beyond the window.

    titans data prepare                                  # once: the byte-level project corpus
    python experiments/ablation.py                       # the study (3 seeds), resumable
    python experiments/ablation.py --seeds 0 --rows lmm,linear --lm-steps 50 --mqar-steps 50   # a look
    python experiments/ablation.py --report-only

Rows (the paper's names; the base is the paper's LMM: a depth-2 memory with momentum,
forgetting and the convolution, on the library's step parameterisation, docs/models.md, made
residual, f(x) = x + MLP(x), at theta_init 0.1: the deep-memory setting that trained in the
probes of docs/models.md, where the defaults' theta_init 0.8 leaves it worse than uniform):

    lmm        the base                       linear     memory_depth=1
    no-conv    conv=false                     no-momentum  momentum=false
    no-decay   forgetting=false (no weight decay, alpha = 0)
    no-persistent  MAC without persistent tokens (our LMM has none: compared with +MAC)
    mac, mag, mal  the base memory inside each variant

Metrics per row and seed, every model trained from scratch: (a) validation perplexity on the
project corpus (byte tokens) after --lm-steps x --batch-size x --seq-len training tokens,
scored on the first --val-windows windows of the validation split; (b) MQAR accuracy at 4x the
trained length (4 pairs, queries spread uniformly over the sequence, most beyond the 32-token
window; as in experiments/recall.py). Tiny preset (dim 64, 2 layers): the small preset does
not fit 9 rows x 3 seeds x 2 trainings on 2 cores in a day. Results go to
runs/ablation/results.jsonl; the report to the section "Table 5 at CPU scale" of
docs/RESULTS.md with docs/results/ablation.png.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

from common import ROOT, Store, corpus, cpu_name, run_pending, save_figure, spread, threads, train, write_section
from titans import TitansConfig, TitansLM
from titans.data import EvalWindows, TokenBatches, TokenFile
from titans.data.tasks import evaluate_recall, recall_batches

# the paper's LMM (deep memory, momentum) on top of the library's defaults, at the deep-memory
# setting that trains: at theta_init 0.8 a depth-2 memory ends worse than uniform on language
# modelling (docs/RESULTS.md, "Memory depth against context length"); residual at 0.1 trains
PAPER = dict(memory_depth=2, momentum=True, memory_residual=True, theta_init=0.1)
# name -> (paper's row name, variant, overrides, the row it is compared with)
ROWS = {
    "lmm": ("LMM", "lmm", PAPER, None),
    "linear": ("Linear memory", "lmm", {**PAPER, "memory_depth": 1, "memory_residual": False}, "lmm"),
    "no-conv": ("w/o convolution", "lmm", {**PAPER, "conv": False}, "lmm"),
    "no-momentum": ("w/o momentum", "lmm", {**PAPER, "momentum": False}, "lmm"),
    "no-decay": ("w/o weight decay", "lmm", {**PAPER, "forgetting": False}, "lmm"),
    "no-persistent": ("w/o persistent memory", "mac", {**PAPER, "n_persistent": 0}, "mac"),
    "mac": ("+MAC", "mac", PAPER, "lmm"),
    "mag": ("+MAG", "mag", PAPER, "lmm"),
    "mal": ("+MAL", "mal", PAPER, "lmm"),
}
# the paper's Table 5: perplexity / reasoning / long-context accuracy (Behrouz et al. 2025)
PAPER_TABLE = {"lmm": (27.01, 47.83, 92.68), "linear": (28.49, 46.97, 85.34), "no-conv": (28.73, 45.82, 90.28),
               "no-momentum": (28.98, 45.49, 87.12), "no-decay": (29.04, 45.11, 85.60),
               "no-persistent": (27.63, 46.35, 92.49), "mac": (26.67, 48.65, 97.95),
               "mag": (25.70, 48.60, 96.70), "mal": (25.91, 47.87, 96.91)}
SECTION = "## Table 5 at CPU scale"


def settings(a: argparse.Namespace) -> dict:
    return dict(lm_steps=a.lm_steps, mqar_steps=a.mqar_steps, batch_size=a.batch_size, seq_len=a.seq_len,
                val_windows=a.val_windows, mqar_len=a.mqar_len, lr=a.lr)


def model_for(row: str, seed: int) -> TitansLM:
    _, variant, overrides, _ = ROWS[row]
    torch.manual_seed(seed)
    return TitansLM(TitansConfig.from_preset("tiny", variant=variant, **overrides))


def train_lm(row: str, seed: int, a: argparse.Namespace, out: Path) -> tuple[float, str | None, list[dict]]:
    """A row's language-modelling run (metric a): train() on the project corpus, validated at the end."""
    model = model_for(row, seed)
    data = corpus()
    val = list(EvalWindows(TokenFile(data, split="val"), a.seq_len, batch_size=a.batch_size,
                           max_windows=a.val_windows))
    batches = TokenBatches(TokenFile(data, split="train"), a.batch_size, a.seq_len, seed=seed)
    return train(model, batches, steps=a.lm_steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, seed=seed,
                 out=out, val=val)


def run_one(row: str, seed: int, a: argparse.Namespace) -> dict:
    out = Path(a.out) / f"{row}-{seed}"
    # (a) language modelling
    lm_s, lm_error, log = train_lm(row, seed, a, out)
    val_loss = next((r["val_loss"] for r in reversed(log) if r.get("val_loss") is not None), math.nan)
    speed = [r["tokens_per_s"] for r in log if r.get("tokens_per_s")]
    # (b) recall beyond the window, at 4x the trained length
    model = model_for(row, seed)
    task = dict(n_pairs=4, power_a=1.0)
    mqar = recall_batches("mqar", 16, model.config.vocab_size, seed=seed, seq_len=a.mqar_len, **task)
    mqar_s, mqar_error, _ = train(model, mqar, steps=a.mqar_steps, batch_size=16, seq_len=a.mqar_len, lr=a.lr,
                                  seed=seed, out=out)
    model.eval()
    with torch.no_grad():
        acc = evaluate_recall(model, "mqar", 8, model.config.vocab_size, n_batches=4, seed=1000 + seed,
                              seq_len=4 * a.mqar_len, **task)
    return dict(row=row, seed=seed, params=sum(p.numel() for p in model.parameters()),
                val_ppl=math.exp(val_loss), recall_4x=acc, lm_s=round(lm_s, 1), mqar_s=round(mqar_s, 1),
                tokens_per_s=round(statistics.mean(speed)) if speed else None, threads=torch.get_num_threads(),
                diverged=lm_error or mqar_error)


def verdict(ours: list[float], ref: list[float], paper_better: bool, higher_is_better: bool) -> str:
    """Does our ordering against the reference row agree with the paper's? "yes"/"no", or
    "within noise" when the seeds' ranges overlap."""
    if not ours or not ref:
        return "-"
    if max(ours) >= min(ref) and max(ref) >= min(ours) and len(ours) > 1:
        return "within noise"
    if statistics.mean(ours) == statistics.mean(ref):
        return "tie"
    better = (statistics.mean(ours) > statistics.mean(ref)) == higher_is_better
    return "yes" if better == paper_better else "no"


def write_report(store: Store, rows: list[str], seeds: list[int], a: argparse.Namespace) -> None:
    runs = {r: [x for x in store.rows if x["row"] == r and x["seed"] in seeds] for r in rows}
    runs = {r: xs for r, xs in runs.items() if xs}
    table = ["| row | paper ppl / long-context | ours: val ppl | ours: MQAR @4x | seeds | ordering vs "
             "reference (ppl; recall) | train s (LM + MQAR) |", "|---|---|---|---|---|---|---|"]
    for r, xs in runs.items():
        name, _, _, ref = ROWS[r]
        p = PAPER_TABLE[r]
        ppl, acc = [x["val_ppl"] for x in xs], [x["recall_4x"] for x in xs]
        if ref is None:
            order = "reference"
        else:
            refs = runs.get(ref, [])
            paper_ppl_better, paper_acc_better = p[0] < PAPER_TABLE[ref][0], p[2] > PAPER_TABLE[ref][2]
            order = (f"vs {ROWS[ref][0]}: {verdict(ppl, [x['val_ppl'] for x in refs], paper_ppl_better, False)}; "
                     f"{verdict(acc, [x['recall_4x'] for x in refs], paper_acc_better, True)}")
        secs = spread([x["lm_s"] + x["mqar_s"] for x in xs], "{:.0f}")
        diverged = sum(1 for x in xs if x["diverged"])
        table.append(f"| {name} | {p[0]:.2f} / {p[2]:.2f} | {spread(ppl, '{:.2f}')} | {spread(acc)} | "
                     f"{','.join(str(x['seed']) for x in xs)}{f' ({diverged} diverged)' if diverged else ''} | "
                     f"{order} | {secs} |")
    plot = Path(a.report).parent / "results" / "ablation.png"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    names = [ROWS[r][0] for r in runs]
    for ax, key, label in ((axes[0], "val_ppl", "validation perplexity (lower is better)"),
                           (axes[1], "recall_4x", "MQAR accuracy at 4x (higher is better)")):
        for i, xs in enumerate(runs.values()):
            vals = [x[key] for x in xs]
            ax.scatter([i] * len(vals), vals, s=12, color="grey")
            ax.scatter([i], [statistics.mean(vals)], marker="_", s=300, color="C0")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
    save_figure(fig, plot)
    cmd = (f"python experiments/ablation.py --rows {','.join(runs)} --seeds {','.join(map(str, seeds))} "
           f"--lm-steps {a.lm_steps} --mqar-steps {a.mqar_steps} --batch-size {a.batch_size} --seq-len {a.seq_len} "
           f"--val-windows {a.val_windows} --mqar-len {a.mqar_len} --lr {a.lr}")
    section = [SECTION + " (tiny models)", "",
               f"Made by `{cmd}` on 2 cores ({cpu_name()}), {threads([x for xs in runs.values() for x in xs])}. The base (LMM) is the paper's "
               f"memory: `memory_depth=2, momentum=true` with forgetting and the convolution, on the library's "
               f"step parameterisation, residual (`memory_residual=true`) at `theta_init=0.1` (the deep setting "
               f"that trains, docs/models.md); each row changes one thing (experiments/ablation.py lists them). "
               f"Tiny preset (dim 64, 2 layers, window 32). Val ppl: byte-level project corpus after "
               f"{a.lm_steps} x {a.batch_size} x {a.seq_len} training tokens, first {a.val_windows} validation "
               f"windows of {a.seq_len}. MQAR: {a.mqar_steps} steps x 16 x {a.mqar_len}, 4 pairs, queries spread "
               f"over the sequence, accuracy at {4 * a.mqar_len} tokens on 4 x 8 held-out sequences. AdamW "
               f"{a.lr}, cosine. Mean (min-max) over seeds. The paper's numbers (its 400M-token-scale models: "
               f"Wikitext perplexity and S-NIAH long-context accuracy) are beside ours for the ordering only. "
               f"\"within noise\": the seeds' ranges of the two rows overlap.", "", *table, "",
               f"![Table 5 at CPU scale: per-seed values and means](results/{plot.name})", ""]
    write_section(Path(a.report), SECTION, section)
    print(f"wrote {a.report} and {plot}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lm-steps", type=int, default=1000)
    p.add_argument("--mqar-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8, help="language-modelling batch")
    p.add_argument("--seq-len", type=int, default=256, help="language-modelling sequence length")
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--mqar-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default=str(ROOT / "runs" / "ablation"))
    p.add_argument("--report", default=str(ROOT / "docs" / "RESULTS.md"))
    p.add_argument("--report-only", action="store_true")
    return p


def main() -> None:
    p = parser()
    a = p.parse_args()
    rows = a.rows.split(",")
    if set(rows) - set(ROWS):
        p.error(f"unknown row(s) {sorted(set(rows) - set(ROWS))}; choose from {', '.join(ROWS)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    store = Store(Path(a.out) / "results.jsonl", settings(a))
    if not a.report_only:
        run_pending(store, [dict(row=r, seed=s) for s in seeds for r in rows], lambda k: run_one(k["row"], k["seed"], a),
                    lambda x: f"{x['row']:14s} seed {x['seed']}  val ppl {x['val_ppl']:.2f}  MQAR@4x "
                              f"{x['recall_4x']:.3f}  {x['lm_s'] + x['mqar_s']:.0f}s")
    write_report(store, rows, seeds, a)


if __name__ == "__main__":
    main()
