"""Memory depth against context length: does a deeper memory help more the longer the context,
and what does it cost in throughput? (the paper's section 5.5 / Figure 7 claim, at CPU scale)

    titans data prepare                  # once: the byte-level project corpus
    python experiments/depth.py          # depths 1-4, 2 seeds, resumable
    python experiments/depth.py --depths 1,2 --seeds 0 --steps 50 --streams 2    # a look
    python experiments/depth.py --depths 2 --set memory_residual=true --report /tmp/probe.md    # a setting
    python experiments/depth.py --depths 1,2 --reset      # the same, every piece from a fresh state
    python experiments/depth.py --report-only

Each depth trains a tiny LMM (library defaults but `memory_depth` and the --set overrides) from
scratch on the project corpus for --steps x --batch-size x --seq-len tokens, then streams --streams
held-out stretches of --stream-len tokens from the validation split through the model in pieces of
--seq-len (the state carried, nothing cut; `titans.eval.stream.token_logprobs`) and reports the
mean loss of the tokens by position bucket: within the trained length, up to 4x and up to 16x it.
With --reset every piece is scored from a fresh state instead (the control: each bucket holds
different text, so the carried state's worth at a position is the loss with --reset minus the
loss without, same seeds and settings; the reset run has a section and plot of its own).
Training tokens/s per depth come from the trainer's log (compare them within one study: they depend
on the threads per run, which the report gives). Results go to runs/depth/results.jsonl; the report
to the section "Memory depth against context length" of docs/RESULTS.md with
docs/results/depth.png.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from common import (ROOT, Store, add_set_option, corpus, cpu_name, run_pending, save_figure,
                    set_flags, spread, threads, train, write_section)
from titans import TitansConfig, TitansLM
from titans.cli.common import UserError, parse_overrides
from titans.data import TokenBatches, TokenFile
from titans.eval.stream import token_logprobs

SECTION = "## Memory depth against context length"


def settings(a: argparse.Namespace) -> dict:
    return dict(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, streams=a.streams,
                stream_len=a.stream_len, lr=a.lr, **({"set": a.set} if a.set else {}),
                **({"reset": True} if a.reset else {}))


def buckets(a: argparse.Namespace) -> list[tuple[int, int]]:
    """[0, L), [L, 4L), [4L, 16L) and so on up to the stream length (L = the trained length)."""
    edges, e = [0, a.seq_len], a.seq_len
    while e < a.stream_len:
        e = min(4 * e, a.stream_len)
        edges.append(e)
    return list(zip(edges, edges[1:]))


def run_one(depth: int, seed: int, a: argparse.Namespace) -> dict:
    torch.manual_seed(seed)
    model = TitansLM(TitansConfig.from_preset("tiny", variant="lmm", **parse_overrides(a.set), memory_depth=depth))
    data = corpus()
    batches = TokenBatches(TokenFile(data, split="train"), a.batch_size, a.seq_len, seed=seed)
    secs, error, log = train(model, batches, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr,
                             seed=seed, out=Path(a.out) / f"depth{depth}-{seed}")
    speed = [r["tokens_per_s"] for r in log if r.get("tokens_per_s")]
    val = torch.from_numpy(TokenFile(data, split="val").tokens.astype("int64"))
    if len(val) < a.streams * a.stream_len:
        raise SystemExit(f"the validation split has {len(val):,} tokens, fewer than --streams x --stream-len")
    model.eval()
    nll = torch.zeros(a.stream_len - 1, dtype=torch.float64)
    with torch.no_grad():
        for i in range(a.streams):  # evenly spaced stretches of the validation split
            start = i * (len(val) - a.stream_len) // max(1, a.streams - 1)
            ids = val[start:start + a.stream_len]
            if a.reset:  # every piece from a fresh state, its previous token as the only context
                logp = torch.cat([token_logprobs(model, ids[max(0, s - 1):s + a.seq_len], piece=a.seq_len)[0]
                                  for s in range(0, a.stream_len, a.seq_len)])
            else:
                logp = token_logprobs(model, ids, piece=a.seq_len)[0]
            nll -= logp.double()
    nll /= a.streams  # position t scores token t + 1: bucket [lo, hi) holds targets lo + 1 .. hi
    loss = {f"{lo}-{hi}": nll[max(0, lo - 1):hi - 1].mean().item() for lo, hi in buckets(a)}
    return dict(depth=depth, seed=seed, params=sum(p.numel() for p in model.parameters()), train_s=round(secs, 1),
                tokens_per_s=round(statistics.mean(speed)) if speed else None, threads=torch.get_num_threads(), loss=loss,
                diverged=error)


def write_report(store: Store, depths: list[int], seeds: list[int], a: argparse.Namespace) -> None:
    runs = {d: [x for x in store.rows if x["depth"] == d and x["seed"] in seeds] for d in depths}
    runs = {d: xs for d, xs in runs.items() if xs}
    names = [f"{lo}-{hi}" for lo, hi in buckets(a)]
    table = ["| depth | params | seeds | train tokens/s | " + " | ".join(f"loss @ {n}" for n in names)
             + " | gain, first to last bucket |", "|" + "---|" * (5 + len(names))]
    for d, xs in runs.items():
        gain = [x["loss"][names[0]] - x["loss"][names[-1]] for x in xs]
        table.append(f"| {d} | {xs[0]['params'] / 1e3:.0f}K | {','.join(str(x['seed']) for x in xs)} | "
                     f"{spread([x['tokens_per_s'] for x in xs], '{:,.0f}')} | "
                     + " | ".join(spread([x['loss'][n] for x in xs]) for n in names)
                     + f" | {spread(gain)} |")
    # a run with --set overrides is a section and a plot of its own
    heading = SECTION + "".join(f", {kv}" for kv in a.set) + (", state reset at every piece" if a.reset else "")
    plot = Path(a.report).parent / "results" / ("depth" + "".join(f"-{kv.replace('=', '-')}" for kv in a.set)
                                                + ("-reset" if a.reset else "") + ".png")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw=dict(width_ratios=[2, 1]))
    for d, xs in runs.items():
        ax.plot(range(len(names)), [statistics.mean(x["loss"][n] for x in xs) for n in names], marker="o",
                label=f"depth {d}")
        bx.bar(d, statistics.mean(x["tokens_per_s"] for x in xs), color="C0")
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel(f"token position in the stream (trained at {a.seq_len})")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.legend(fontsize=8)
    bx.set_xlabel("memory depth")
    bx.set_ylabel("training tokens/s")
    save_figure(fig, plot)
    cmd = (f"python experiments/depth.py --depths {','.join(map(str, runs))} --seeds {','.join(map(str, seeds))} "
           f"--steps {a.steps} --batch-size {a.batch_size} --seq-len {a.seq_len} --streams {a.streams} "
           f"--stream-len {a.stream_len} --lr {a.lr}" + set_flags(a.set)
           + (" --reset" if a.reset else ""))
    section = [heading + " (tiny LMM)", "",
               f"Made by `{cmd}` on 2 cores ({cpu_name()}), {threads([x for xs in runs.values() for x in xs])}. Tiny LMM (dim 64, 2 layers, "
               f"library defaults but `memory_depth`{''.join(f', `{kv}`' for kv in a.set)}), {a.steps} x {a.batch_size} x {a.seq_len} training tokens "
               f"of the byte-level project corpus, AdamW {a.lr}, cosine. Loss: mean over {a.streams} held-out "
               f"streams of {a.stream_len} validation tokens, streamed in pieces of {a.seq_len}"
               f"{' with the state reset at every piece (the control: what the carried state is worth)' if a.reset else ''}; mean (min-max) "
               f"over seeds.", "", *table, "", f"![loss by position and throughput per depth](results/{plot.name})",
               ""]
    write_section(Path(a.report), heading, section)
    print(f"wrote {a.report} and {plot}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", default="1,2,3,4")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--stream-len", type=int, default=8192)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default=str(ROOT / "runs" / "depth"))
    p.add_argument("--report", default=str(ROOT / "docs" / "RESULTS.md"))
    add_set_option(p, "depth")
    p.add_argument("--reset", action="store_true",
                   help="score every piece from a fresh state: the control for what the carried state is worth")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args()
    try:
        if "memory_depth" in parse_overrides(a.set):
            p.error("--set memory_depth: choose depths with --depths")
    except UserError as e:
        p.error(str(e))
    depths, seeds = [int(d) for d in a.depths.split(",")], [int(s) for s in a.seeds.split(",")]
    if any(not 1 <= d <= 4 for d in depths):
        p.error("--depths must lie in 1-4")
    store = Store(Path(a.out) / "results.jsonl", settings(a))
    if not a.report_only:
        run_pending(store, [dict(depth=d, seed=s) for s in seeds for d in depths],
                    lambda k: run_one(k["depth"], k["seed"], a),
                    lambda x: f"depth {x['depth']} seed {x['seed']}  {x['tokens_per_s']} tok/s  "
                              + "  ".join(f"{k}: {v:.3f}" for k, v in x["loss"].items()))
    write_report(store, depths, seeds, a)


if __name__ == "__main__":
    main()
