"""The long-stream study: does training on carried states (`titans train --carry-state K`, TBPTT)
make the memory earn its keep past the trained length on language?

Every model is trained through the CLI on the byte corpus at the same budget, once on random
windows (plain) and once on contiguous streams whose state carries for K windows (carry). Two
more arms follow Buitrago & Gu's post-training recipe: the plain run continued for P more steps
with `--init PLAIN --carry-state K` (post), and, at the same budget, continued for P plain steps
(postctl). Each is scored with `titans eval by-position` on the held-out plays (pieces of the trained length, the
state carried against reset at every piece, buckets 0-1x ... 64-256x). The report puts each
variant's carried loss beside the best short-context loss at the same budget: the lower of the
reset losses of its plain and its carry run (docs/long_context.md, "Loss by position").

    python experiments/long_stream.py                                  # the whole study, resumable
    python experiments/long_stream.py --variants lmm,mac --seeds 0     # a part of it
    python experiments/long_stream.py --report-only

Runs go two at a time (--jobs), one thread each, and are stored in runs/long_stream/results.jsonl;
the report is the section "Long streams: loss by position" of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import time
from pathlib import Path

from common import (ROOT, Store, add_set_option, corpus, cpu_name, plot_seeds, pyplot, results_plot, run_parallel,
                    save_figure, set_flags, titans_cli, write_section)

POST_LR = 5e-4   # the post-training steps continue a trained model: a tenth of the CLI's peak lr


def parse_mode(mode: str) -> tuple[str, int]:
    """("carry", 8) for "carry8": an arm and its --carry-state K ("plain" and "postctl": K = 0)."""
    arm = mode.rstrip("0123456789")
    k = int(mode[len(arm):] or 0)
    if arm not in ("plain", "carry", "post", "postctl") or (k > 1) != (arm in ("carry", "post")):
        raise SystemExit(f"--modes: {mode!r} is not plain, postctl, carryK or postK (K >= 2)")
    return arm, k


def run_dir(a: argparse.Namespace, variant: str, mode: str, seed: int) -> Path:
    """Where the run of a variant, arm and seed lives."""
    return Path(a.out) / "runs" / f"{variant}-{mode}-s{seed}"


def one(key: dict, a: argparse.Namespace) -> dict:
    out = run_dir(a, key["variant"], key["mode"], key["seed"])
    shutil.rmtree(out, ignore_errors=True)
    arm, k = parse_mode(key["mode"])
    carry = ["--carry-state", str(k)] if k else []
    if arm in ("post", "postctl"):   # continue the plain run (it runs beside: wait for its end)
        base = run_dir(a, key["variant"], "plain", key["seed"])
        while not (base / "done").exists():
            time.sleep(5)
        model = ["--init", str(base), "--steps", str(a.post), "--lr", str(a.post_lr)]
    else:
        model = ["--preset", a.preset, "--variant", key["variant"], "--steps", str(a.steps),
                 *(x for kv in a.set for x in ("--set", kv))]   # the post runs keep it through --init
    t0 = time.perf_counter()
    done = titans_cli("train", *model, "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len),
                      "--seed", str(key["seed"]), *carry, "--eval-every", "0", "--ckpt-every", "0",
                      "--out", str(out), check=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "done").touch()   # the post arms wait for it
    row = {**key, "seconds": round(time.perf_counter() - t0), "error": None}
    if done.returncode:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
        return row
    by_position(row, out)
    # short inputs on the whole validation split (780K bytes), windows of the trained length from an
    # empty state: a far less noisy measure than the plays' first bucket (two pieces of 512)
    ppl = titans_cli("eval", "ppl", "--model", str(out), "--seq-len", str(a.seq_len), "--quiet").stdout
    row["val_loss"] = float(re.search(r"loss ([0-9.]+)", ppl).group(1))
    return row


def by_position(row: dict, out: Path) -> dict:
    """Score the run in `out` with `titans eval by-position` into `row` (buckets, carried, reset,
    previous, tokens)."""
    # Transformer++'s state is its whole KV cache: carried over a 150K-byte play it costs time quadratic
    # in the length, and past the trained length its positions are unseen anyway; its reset losses are
    # the short-context baseline
    reset_only = ["--reset-only"] if row["variant"] == "transformer" else []
    titans_cli("eval", "by-position", "--model", str(out), "--json", str(out / "by_position.json"), "--quiet",
               *reset_only)
    rows = json.loads((out / "by_position.json").read_text())["model"]["rows"]
    row.update(buckets=[r["bucket"] for r in rows],
               **{k: [r[k] for r in rows] for k in ("carried", "reset", "previous", "tokens")})
    return row


def rescore(store: Store, a: argparse.Namespace) -> None:
    """Score again the stored runs of --variants, --modes and --seeds that lack the previous losses
    (runs from before `titans eval by-position` gave them), from their run directories; the new row
    supersedes the old."""
    chosen = a.variants.split(","), a.modes.split(","), [int(s) for s in a.seeds.split(",")]
    todo = [r for r in latest(store) if "previous" not in r and r["variant"] != "transformer"
            and all(r[k] in c for k, c in zip(("variant", "mode", "seed"), chosen))
            and run_dir(a, r["variant"], r["mode"], r["seed"]).is_dir()]
    run_parallel(store, todo, lambda r: by_position({k: v for k, v in r.items() if k != "settings"},
                                                    run_dir(a, r["variant"], r["mode"], r["seed"])),
                 lambda r: f"rescored {r['variant']} {r['mode']} seed {r['seed']}", jobs=a.jobs)


def latest(store: Store) -> list[dict]:
    """The stored runs without an error, the newest row of each (a rescore supersedes a run's row)."""
    return list({(r["variant"], r["mode"], r["seed"]): r for r in store.rows if not r.get("error")}.values())


def _fmt(v: float | None, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.3f}" if sign else f"{v:.3f}"


def _order(r: dict) -> tuple:
    arm, k = parse_mode(r["mode"])
    return r["variant"], ("plain", "carry", "postctl", "post").index(arm), k, r["seed"]


def report(store: Store, a: argparse.Namespace) -> None:
    rows = sorted(latest(store), key=_order)
    if not rows:
        return
    buckets = rows[0]["buckets"]
    lines = [f"## {a.title}", "",
             f"`python experiments/long_stream.py --modes {a.modes} --post {a.post}{set_flags(a.set)}`: {a.preset} preset, byte "
             f"corpus, `titans train --preset {a.preset} --variant V --steps {a.steps} --batch-size {a.batch_size} "
             f"--seq-len {a.seq_len} --seed S{set_flags(a.set)}` "
             f"(plain: random windows) and the same with `--carry-state K` (carryK: TBPTT on contiguous streams, "
             f"the state carried for K windows of {a.seq_len}, so 1/K of the steps start empty); every other "
             f"setting the CLI's default; postK and postctl continue the plain run for {a.post} steps at lr "
             f"{a.post_lr} (`--init PLAIN`, with and without `--carry-state K`). Budget per run: "
             f"{a.steps} steps x {a.batch_size} x {a.seq_len} = "
             f"{a.steps * a.batch_size * a.seq_len / 1e6:.1f}M tokens, one thread, two runs at a time on {cpu_name()}. "
             f"Scored with `titans eval by-position` on the two held-out plays (pieces of {a.seq_len}), and with "
             f"`titans eval ppl --seq-len {a.seq_len}` on the whole validation split (val: windows from an empty "
             f"state, 780K bytes). Loss in nats per byte.", "",
             "Carried minus reset of the same run (< 0: the carried memory helps):", "",
             "| variant | training | seed | train s | val | 0-1x loss | " + " | ".join(buckets[1:]) + " |",
             "|---|---|---|---|---|---|" + "---|" * (len(buckets) - 1)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['mode']} | {r['seed']} | {r['seconds']} | {_fmt(r.get('val_loss'))} | "
                     f"{_fmt(r['reset'][0])} | "   # the first piece starts empty: carried = reset (Transformer++: reset only)
                     + " | ".join(_fmt(c - s, True) for c, s in zip(r["carried"][1:], r["reset"][1:])) + " |")
    lines += ["", "Each long-stream arm against its control at the same budget (carryK against plain, "
              f"{a.steps} steps; postK against postctl, {a.steps} + {a.post} steps): the cost on short inputs (arm "
              "minus control: val, and the plays' first bucket 0-1x) and its carried loss minus the best "
              "short-context loss (the lower of the two runs' reset losses) per bucket; < 0: the memory beats "
              "every short-context model of that budget:", "",
              "| arm | variant | seed | val cost | 0-1x cost | " + " | ".join(buckets[1:]) + " |",
              "|---|---|---|---|---|" + "---|" * (len(buckets) - 1)]
    by_key = {(r["variant"], r["mode"], r["seed"]): r for r in rows}
    for x in rows:
        arm, _ = parse_mode(x["mode"])
        c = by_key.get((x["variant"], {"carry": "plain", "post": "postctl"}.get(arm), x["seed"]))
        if c is None:
            continue
        best = [min(u, v) for u, v in zip(x["reset"], c["reset"])]
        val = (x["val_loss"] - c["val_loss"]) if "val_loss" in x and "val_loss" in c else None
        lines.append(f"| {x['mode']} | {x['variant']} | {x['seed']} | {_fmt(val, True)} | "
                     f"{_fmt(x['carried'][0] - c['carried'][0], True)} | "
                     + " | ".join(_fmt(u - b, True) for u, b in zip(x["carried"][1:], best[1:])) + " |")
    far = [r for r in rows if r.get("previous") and r["variant"] != "transformer"]
    if far:
        lines += ["", "What the state carries from more than one piece back: carried minus previous (each piece read "
                  "after the piece before it, from an empty state: the reset loss without its cold start at every "
                  "piece); < 0: the memory brings something from further back than one trained length:", "",
                  "| variant | training | seed | " + " | ".join(buckets[1:]) + " |",
                  "|---|---|---|" + "---|" * (len(buckets) - 1)]
        lines += [f"| {r['variant']} | {r['mode']} | {r['seed']} | "
                  + " | ".join(_fmt(c - v, True) for c, v in zip(r["carried"][1:], r["previous"][1:])) + " |"
                  for r in far]
    lines += ["", plot(rows, by_key, a)]
    write_section(ROOT / "docs" / "RESULTS.md", f"## {a.title}", lines + [""])
    print("\n".join(lines))


def plot(rows: list[dict], by_key: dict, a: argparse.Namespace) -> str:
    """Left: carried minus reset per bucket, the plain runs (dashed) and every postK arm (solid) per
    variant. Right: a postK arm's carried loss minus the best short-context loss at its budget.
    Mean over the seeds, band min-max. Returns the Markdown line that shows it."""
    path, markdown = results_plot(a.title)
    buckets = rows[0]["buckets"][1:]
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    colors = dict(zip(("lmm", "mac", "mag", "mal", "swa", "transformer"), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    most = max(sum(1 for r in rows if (r["variant"], r["mode"]) == (x["variant"], x["mode"])) for x in rows)
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows if r["variant"] == variant):
            arm, _ = parse_mode(mode)
            runs = [r for r in rows if r["variant"] == variant and r["mode"] == mode]
            if arm not in ("plain", "post") or len(runs) < most or variant == "transformer":
                continue   # the one-seed probes stay in the table; Transformer++ has no carried loss
            style = dict(color=colors.get(variant), ls="--" if arm == "plain" else "-")
            plot_seeds(ax, buckets, [[c - s for c, s in zip(r["carried"][1:], r["reset"][1:])] for r in runs],
                       f"{variant} {mode}", **style)
            ctl = [by_key.get((variant, "postctl", r["seed"])) for r in runs]
            if arm == "post" and all(ctl):
                plot_seeds(bx, buckets, [[u - min(v, w) for u, v, w in zip(r["carried"][1:], r["reset"][1:], c["reset"][1:])]
                                         for r, c in zip(runs, ctl)], f"{variant} {mode}", **style)
    ax.axhline(0.01, color="grey", ls=":", lw=1)
    bx.axhline(-0.02, color="grey", ls=":", lw=1)
    ax.set_ylabel("carried - reset (nats per byte)")
    bx.set_ylabel("carried - best short-context loss")
    for x in (ax, bx):
        x.axhline(0, color="black", lw=0.5)
        x.set_xlabel(f"position (multiples of the trained length, {a.seq_len})")
        x.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{a.title} (mean over seeds, band min-max; dotted: the issue's lines)", fontsize=9)
    save_figure(fig, path)
    return markdown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="lmm,mac,mag,mal,transformer,swa")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--preset", default="tiny", help="the model size (titans train --preset)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--modes", default="plain,carry8,postctl,post8",
                   help="arms: plain, carryK (--carry-state K), postctl, postK (the plain run continued)")
    p.add_argument("--post", type=int, default=200, help="steps of the post and postctl runs")
    p.add_argument("--post-lr", type=float, default=POST_LR, help="peak lr of the post and postctl runs")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--out", default=str(ROOT / "runs" / "long_stream"))
    add_set_option(p, "plain run (post runs keep the plain run's config)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--rescore", action="store_true",
                   help="score again the stored runs that lack the previous losses, then report")
    p.add_argument("--title", default="Long streams: loss by position", help="the report's section in docs/RESULTS.md")
    a = p.parse_args()
    corpus()  # the byte corpus must be prepared (with its document starts)
    store = Store(Path(a.out) / "results.jsonl", dict(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                                                      post=a.post, init="fan-in", **({"set": a.set} if a.set else {}),
                                                      **({"preset": a.preset} if a.preset != "tiny" else {}),
                                                      **({"post_lr": a.post_lr} if a.post_lr != POST_LR else {})))
    if a.rescore:
        rescore(store, a)
    elif not a.report_only:
        # every plain run first: a post run waits for its plain run, and should not hold a job meanwhile
        keys = [dict(variant=v, mode=m, seed=int(s)) for m in a.modes.split(",") for s in a.seeds.split(",")
                for v in a.variants.split(",")]
        for k in keys:
            parse_mode(k["mode"])
        todo = [k for k in keys if not store.done(**k)]
        run_parallel(store, todo, lambda k: one(k, a),
                     lambda r: f"{r['variant']} {r['mode']} seed {r['seed']}: {r['seconds']} s "
                     + (r["error"] or " ".join(f"{b} {c - s:+.3f}" for b, c, s in
                                                zip(r["buckets"], r["carried"], r["reset"]))), jobs=a.jobs)
    report(store, a)


if __name__ == "__main__":
    main()
