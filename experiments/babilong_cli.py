"""BABILong-style QA past the trained length, through the commands a user runs: `titans train --task
babilong` and `titans eval babilong`.

Each run fine-tunes a language model of the long-stream study (`experiments/long_stream.py`: tiny,
byte corpus, 1,000 steps at 512 tokens, random windows) on qa1 and qa2 at --seq-len tokens, with the
CLI's defaults but the task, the steps, the batch size, the sequence length and each arm's flags,
then is scored by `titans eval babilong` at --lengths (greedy after a streamed prefill, exact match
of the one-word answer; --samples held-out stories per task and length, distractors from the
held-out documents).

    python experiments/babilong_cli.py --arms lmm,transformer --seeds 0      # a part
    python experiments/babilong_cli.py                                       # every arm, 3 seeds, resumable
    python experiments/babilong_cli.py --report-only

An arm is a variant (its base run: runs/long_stream3/runs/VARIANT-plain-sSEED) and flags; the
-sp8 arms add State Passing (`--carry-state 8`: a sequence starts from the previous batch's final
state, 1 in 8 from an empty one). Runs go two at a time, one thread each, into
runs/babilong_cli/results.jsonl; the report is the section "BABILong through the CLI" of
docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from common import (ROOT, Store, cpu_name, pending_arms, plot_seeds, pyplot, results_plot, run_parallel, save_figure,
                    spread, titans_cli, write_section)

SP8 = ["--carry-state", "8"]
ARMS = {   # name: (variant, flags)
    "lmm": ("lmm", []),
    "mac": ("mac", []),
    "mag": ("mag", []),
    "mal": ("mal", []),
    "lmm-sp8": ("lmm", SP8),
    "mac-sp8": ("mac", SP8),
    "swa": ("swa", []),
    "transformer": ("transformer", []),
}
TASKS = "qa1,qa2"


def one(key: dict, a: argparse.Namespace) -> dict:
    variant, flags = ARMS[key["arm"]]
    base = Path(a.base) / f"{variant}-plain-s{key['seed']}"
    out = Path(a.out) / "runs" / f"{key['arm']}-s{key['seed']}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    done = titans_cli("train", "--task", "babilong", "--babilong-tasks", TASKS, "--init", str(base),
                      "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len),
                      "--seed", str(key["seed"]), *flags, "--eval-every", "0", "--out", str(out), check=False)
    row = {**key, "seconds": round(time.perf_counter() - t0), "error": None, "acc": {}}
    if done.returncode:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
        return row
    ev = titans_cli("eval", "babilong", "--model", str(out), "--tasks", TASKS, "--lengths", a.lengths,
                    "--samples", str(a.samples), "--quiet").stdout
    # the table: a header, then one row per task and "mean", in percent, one column per length
    for line in ev.splitlines():
        cells = line.split()
        if cells and cells[0] in (*TASKS.split(","), "mean"):
            row["acc"][cells[0]] = {n: float(v) / 100 for n, v in zip(a.lengths.split(","), cells[1:])}
    row["seconds_total"] = round(time.perf_counter() - t0)
    shutil.rmtree(out / "checkpoints" / "optimizer", ignore_errors=True)
    return row


def report(store: Store, a: argparse.Namespace) -> None:
    lengths = a.lengths.split(",")
    lines = ["## BABILong through the CLI", "",
             f"`python experiments/babilong_cli.py`: for every arm and seed, `titans train --task babilong "
             f"--babilong-tasks {TASKS} --init runs/long_stream3/runs/V-plain-sS --steps {a.steps} --batch-size "
             f"{a.batch_size} --seq-len {a.seq_len} --seed S [flags]` (the base: the long-stream study's tiny "
             "language model of that variant and seed, 1,000 steps x 8 x 512 bytes), every other setting the CLI's "
             f"default, then `titans eval babilong --tasks {TASKS} --lengths {a.lengths} --samples {a.samples}` "
             f"(greedy after a streamed prefill, exact match of the one-word answer, distractors from the held-out "
             f"documents; chance is 1/6). Budget per run: {a.steps} steps x {a.batch_size} x {a.seq_len} bytes, one "
             f"thread, two runs at a time on {cpu_name()}. Accuracy: mean (min-max) over the seeds.", "",
             "| arm | flags | task | seeds | train s | " + " | ".join(f"@{n}" for n in lengths) + " |",
             "|---|---|---|---|---|" + "---|" * len(lengths)]
    for arm, (variant, flags) in ARMS.items():
        rows = sorted((r for r in store.rows if r["arm"] == arm), key=lambda r: r["seed"])
        ok = [r for r in rows if not r["error"]]
        if not rows:
            continue
        secs = [r["seconds"] for r in rows]
        for task in (*TASKS.split(","), "mean"):
            cells = [spread([r["acc"][task][n] for r in ok], "{:.2f}") if ok else "failed" for n in lengths]
            lines.append(f"| {arm} | `{' '.join(flags) or '-'}` | {task} | {','.join(str(r['seed']) for r in rows)} | "
                         f"{min(secs)}-{max(secs)} | " + " | ".join(cells) + " |")
    lines += ["", plot(store, a)]
    write_section(ROOT / "docs" / "RESULTS.md", "## BABILong through the CLI", lines + [""])
    print("\n".join(lines))


def plot(store: Store, a: argparse.Namespace) -> str:
    """Accuracy against length, one panel per task, one line per arm (mean over seeds, band min-max).
    Returns the Markdown line that shows it."""
    path, markdown = results_plot("BABILong through the CLI")
    lengths, tasks = a.lengths.split(","), TASKS.split(",")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), sharey=True)
    for ax, task in zip(axes, tasks):
        for arm in ARMS:
            ok = [r for r in store.rows if r["arm"] == arm and not r["error"]]
            if ok:
                plot_seeds(ax, lengths, [[r["acc"][task][n] for n in lengths] for r in ok], arm)
        ax.axhline(1 / 6, color="grey", ls=":", lw=1)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel(f"input length (tokens); trained at {a.seq_len}")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("accuracy (dotted: chance, 1/6)")
    save_figure(fig, path)
    return markdown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lengths", default="1K,2K,4K,8K,16K")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--base", default=str(ROOT / "runs" / "long_stream3" / "runs"),
                   help="where the base language models are (VARIANT-plain-sSEED)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--out", default=str(ROOT / "runs" / "babilong_cli"))
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args()
    store = Store(Path(a.out) / "results.jsonl", dict(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                                                      lengths=a.lengths, samples=a.samples, tasks=TASKS))
    if not a.report_only:
        todo = pending_arms(a.arms, a.seeds, ARMS, store)
        run_parallel(store, todo, lambda k: one(k, a), lambda r: f"{r['arm']} seed {r['seed']}: {r['seconds']} s "
                     + (r["error"] or " ".join(f"{n} {v:.2f}" for n, v in r["acc"].get("mean", {}).items())),
                     jobs=a.jobs)
    report(store, a)


if __name__ == "__main__":
    main()
