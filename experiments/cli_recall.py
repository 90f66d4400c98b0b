"""Recall through the path a user takes: `titans train --task mqar` and `titans eval recall` with
the CLI's own defaults (learning rate, warmup, schedule, clipping, preset init), nothing else set but
the task, the steps, the batch size and the sequence length.

The study in experiments/recall.py trains with its own recipe (a warmup of 10% of the steps); this
one runs the commands themselves, as subprocesses, so that it measures exactly what a user gets.
Grid: LMM and MAC (tiny preset) x pairs 4, 8, 16 x seeds, each evaluated at 1x, 4x and 8x the
trained length (the same pairs spread over a longer sequence); then stress runs of the LMM (the
warmup set to 0, the learning rate set to 1e-2) and the deep memory at the settings docs/models.md
recommends (depth 2, residual, theta_init 0.1).

    python experiments/cli_recall.py                    # the whole study, resumable
    python experiments/cli_recall.py --only lmm-p16     # the runs whose name starts so
    python experiments/cli_recall.py --seeds 5 --pairs 6,12 --only lmm-p,mac-p   # pair counts off the grid
    python experiments/cli_recall.py --report-only      # rewrite the report from the results

Runs go two at a time (--jobs), each with one thread, and are stored in runs/cli_recall/results.jsonl
as they finish; the report is the section "Recall through the CLI's defaults" of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
from pathlib import Path

from common import ROOT, Store, cpu_name, run_parallel, spread, titans_cli, write_section

LENGTHS = (1, 4, 8, 16)   # multiples of the trained length (16x: runs made since the State Passing rows)


def runs(seeds: list[int], grid_pairs: tuple[int, ...] = (16, 8, 4)) -> list[dict]:
    """Every run of the study: name, variant, pairs, seed and the extra flags (stress, deep)."""
    out = []
    for pairs in grid_pairs:   # the hardest first: a default that fails shows early
        for variant in ("lmm", "mac"):
            out += [dict(name=f"{variant}-p{pairs}", variant=variant, pairs=pairs, seed=s, flags=[]) for s in seeds]
    out += [dict(name="lmm-p8-warmup0", variant="lmm", pairs=8, seed=s, flags=["--warmup", "0"]) for s in seeds]
    out += [dict(name="lmm-p8-lr1e-2", variant="lmm", pairs=8, seed=s, flags=["--lr", "1e-2"]) for s in seeds]
    deep = ["--set", "memory_depth=2", "--set", "memory_residual=true", "--set", "theta_init=0.1"]
    out += [dict(name="lmm-deep-res-p8", variant="lmm", pairs=8, seed=s, flags=deep) for s in seeds]
    # State Passing (`--carry-state 8`: a sequence starts from the previous batch's final state)
    for variant in ("lmm", "mac"):
        out += [dict(name=f"{variant}-p8-carry8", variant=variant, pairs=8, seed=s, flags=["--carry-state", "8"])
                for s in seeds]
    # the memory forgets toward W_0 (docs/models.md), at the hardest pairs
    out += [dict(name="lmm-p16-fti", variant="lmm", pairs=16, seed=s, flags=["--set", "forget_to_init=true"])
            for s in seeds]
    return out


def train_args(run: dict, a: argparse.Namespace, out: Path) -> list[str]:
    return ["train", "--task", "mqar", "--task-arg", f"n_pairs={run['pairs']}", "--task-arg", "power_a=1",
            "--preset", "tiny", "--variant", run["variant"], "--steps", str(a.steps), "--batch-size",
            str(a.batch_size), "--seq-len", str(a.seq_len), "--seed", str(run["seed"]), *run["flags"],
            "--out", str(out)]


def one(run: dict, a: argparse.Namespace) -> dict:
    out = Path(a.out) / "runs" / f"{run['name']}-s{run['seed']}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    done = titans_cli(*train_args(run, a, out), check=False)
    seconds = time.perf_counter() - t0
    row = dict(name=run["name"], seed=run["seed"], seconds=round(seconds), error=None, acc={})
    if done.returncode:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
        return row
    for m in LENGTHS:
        ev = titans_cli("eval", "recall", "--model", str(out), "--task-arg", f"seq_len={m * a.seq_len}")
        row["acc"][str(m)] = float(re.search(r"accuracy ([0-9.]+)", ev.stdout).group(1))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # keep log.csv, drop the weights
    return row


def report(store: Store, a: argparse.Namespace) -> None:
    names = list(dict.fromkeys(r["name"] for r in runs(a.seeds, a.pairs)))
    lines = ["## Recall through the CLI's defaults", "",
             f"`python experiments/cli_recall.py` runs, for every row and seed, exactly "
             f"`titans train --task mqar --task-arg n_pairs=P --task-arg power_a=1 --preset tiny --variant V "
             f"--steps {a.steps} --batch-size {a.batch_size} --seq-len {a.seq_len} --seed S [flags]` and "
             f"`titans eval recall --model RUN --task-arg seq_len=N` for N = 1x, 4x, 8x the trained length "
             f"(4 batches of 16 held-out sequences; 16x for the runs made since the State Passing rows). Every other setting is the CLI's default (lr, warmup, "
             f"cosine schedule, clipping, AdamW). Budget per run: {a.steps} steps x {a.batch_size} x {a.seq_len} "
             f"tokens, one thread, two runs at a time on {cpu_name()}. Accuracy: mean (min-max) over the seeds; "
             f"worst: the worst seed at 1x / 8x.", "",
             "| run | flags | seeds | train+eval s | @1x | @4x | @8x | @16x | worst @1x / @8x |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        rows = sorted((r for r in store.rows if r["name"] == name), key=lambda r: r["seed"])
        if not rows:
            continue
        flags = " ".join(next(r for r in runs(a.seeds, a.pairs) if r["name"] == name)["flags"]) or "-"
        ok = [r for r in rows if not r["error"]]
        secs = [r["seconds"] for r in rows]
        cells = [(spread([r["acc"][str(m)] for r in ok]) if all(str(m) in r["acc"] for r in ok) else "-")
                 if ok else "failed" for m in LENGTHS]
        worst = (f"{min(r['acc']['1'] for r in ok):.3f} / {min(r['acc']['8'] for r in ok):.3f}" if ok else "-")
        lines.append(f"| {name} | `{flags}` | {','.join(str(r['seed']) for r in rows)} | {min(secs)}-{max(secs)} | "
                     + " | ".join(cells) + f" | {worst} |")
        for r in rows:
            if r["error"]:
                lines.append(f"|  | seed {r['seed']} failed: {r['error'][:120]} | | | | | | | |")
    write_section(ROOT / "docs" / "RESULTS.md", "## Recall through the CLI's defaults", lines + [""])
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pairs", default="16,8,4", help="the grid's pair counts (the stress and deep runs keep 8)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--only", default="", help="comma list of run-name prefixes, run in that order")
    p.add_argument("--out", default=str(ROOT / "runs" / "cli_recall"))
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args()
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.pairs = tuple(int(s) for s in a.pairs.split(","))
    store = Store(Path(a.out) / "results.jsonl", dict(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len))
    if not a.report_only:
        prefixes = [s for s in a.only.split(",") if s]
        todo = [r for r in runs(a.seeds, a.pairs) if not store.done(name=r["name"], seed=r["seed"])]
        if prefixes:   # in the order given: the runs a decision hangs on first
            todo = [r for p in prefixes for r in todo if r["name"].startswith(p)
                    and not any(r["name"].startswith(q) for q in prefixes[:prefixes.index(p)])]
        run_parallel(store, todo, lambda r: one(r, a), lambda row: f"{row['name']} seed {row['seed']}: "
                     f"{row['seconds']} s " + (row["error"] or " ".join(f"{m}x {v:.3f}" for m, v in row["acc"].items())),
                     jobs=a.jobs)
    report(store, a)


if __name__ == "__main__":
    main()
