"""Pass keys far past the trained length, through the commands a user runs: `titans train --task
niah` and `titans eval niah --task pk`, nothing set but the task, the steps, the batch size, the
sequence length and each arm's flags (the recipe under test).

    python experiments/passkey_cli.py --arms lmm-ck8-sp8 --seeds 0        # one arm, one seed
    python experiments/passkey_cli.py                                     # every arm, 3 seeds, resumable
    python experiments/passkey_cli.py --report-only
    python experiments/passkey_cli.py --far lmm-j-1k-li15k               # an arm's runs at 64K, 256K and 1M

An arm is a variant and flags (ARMS below), or a run of another arm continued with other flags
(`--init`: the length curriculum). Each run trains from scratch at --seq-len tokens and is
scored by `titans eval niah` (greedy decoding after a streamed prefill, exact match of the 5-digit
key) at --lengths with --depths needle depths and --samples held-out needles per cell. Runs go two
at a time, one thread each, into runs/passkey_cli/results.jsonl; the report is the section
"Pass keys through the CLI" of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
from pathlib import Path

from common import (ROOT, Store, cpu_name, pending_arms, plot_seeds, pyplot, results_plot, run_parallel, save_figure,
                    spread, titans_cli, write_section)

CK8 = ["--set", "conv_kernel=8"]   # the memory's key sees "key is " apart from the noise's "sky is "
SP8 = ["--carry-state", "8"]       # State Passing: a sequence starts from the previous batch's final state
SP32 = ["--carry-state", "32"]     # ... for 32 batches: states of up to 32K tokens in the 1K stage
# every answer at one place in the row: task niah's rows before its jitter default (the arms with it ran then)
FIXED = ["--task-arg", "jitter=0"]
J31 = ["--task-arg", "jitter=31"]   # the default's value at 256 (MAC's segments of 32: every phase)
# a length curriculum: the arm's run of the same seed continued at 1K tokens (flags given last win)
AT_1K = ["--seq-len", "1024", "--steps", "1000"]
# then 600 steps at 1K with a lead-in: each row one sample of up to L + 1K tokens (1K trained, the
# first P <= L streamed without gradient): the states of samples 4x, 8x, 16x the trained length
LI3K = ["--seq-len", "1024", "--steps", "600", "--task-arg", "lead_in=3072"]
LI7K = ["--seq-len", "1024", "--steps", "600", "--task-arg", "lead_in=7168"]
LI15K = ["--seq-len", "1024", "--steps", "600", "--task-arg", "lead_in=15360"]
FTI = ["--set", "forget_to_init=true"]   # the memory forgets toward W_0 (the later stages keep it through --init)
ARMS = {   # name: (variant, flags, the arm whose run this one continues with --init, or None)
    "lmm": ("lmm", FIXED, None),
    "lmm-ck8": ("lmm", FIXED + CK8, None),
    "lmm-sp8": ("lmm", FIXED + SP8, None),
    "lmm-ck8-sp8": ("lmm", FIXED + CK8 + SP8, None),
    "mag-ck8-sp8": ("mag", FIXED + CK8 + SP8, None),
    "mac-ck8-sp8": ("mac", FIXED + CK8 + SP8, None),
    "mag": ("mag", FIXED, None),
    "lmm-1k": ("lmm", FIXED + AT_1K, "lmm"),
    "mag-1k": ("mag", FIXED + AT_1K, "mag"),
    "lmm-ck8-sp8-1k": ("lmm", FIXED + SP8 + AT_1K, "lmm-ck8-sp8"),
    "mag-ck8-sp8-1k": ("mag", FIXED + SP8 + AT_1K, "mag-ck8-sp8"),
    "lmm-1k-2k": ("lmm", FIXED + AT_1K, "lmm-1k"),     # the 1K stage twice as long (1,000 more steps)
    "mag-1k-2k": ("mag", FIXED + AT_1K, "mag-1k"),
    "lmm-1k-sp32": ("lmm", FIXED + SP32 + AT_1K, "lmm"),
    "mag-1k-sp32": ("mag", FIXED + SP32 + AT_1K, "mag"),
    "mac": ("mac", FIXED, None),
    "mac-1k": ("mac", FIXED + AT_1K, "mac"),
    "swa": ("swa", FIXED, None),
    "swa-1k": ("swa", FIXED + AT_1K, "swa"),
    "transformer": ("transformer", FIXED, None),
    "transformer-1k": ("transformer", FIXED + AT_1K, "transformer"),
    # the answer's place drawn per row (the CLI's default since; J31 is its value at 256)
    "mac-j": ("mac", J31, None),
    "mac-j-1k": ("mac", J31 + AT_1K, "mac-j"),
    "lmm-j": ("lmm", [], None),
    "lmm-j-1k": ("lmm", AT_1K, "lmm-j"),
    "mag-j": ("mag", [], None),
    "mag-j-1k": ("mag", AT_1K, "mag-j"),
    "transformer-j": ("transformer", [], None),
    "transformer-j-1k": ("transformer", AT_1K, "transformer-j"),
    "lmm-j-1k-li3k": ("lmm", LI3K, "lmm-j-1k"),
    "mag-j-1k-li3k": ("mag", LI3K, "mag-j-1k"),
    "lmm-j-1k-li7k": ("lmm", LI7K, "lmm-j-1k"),
    "lmm-j-1k-li15k": ("lmm", LI15K, "lmm-j-1k"),
    "mag-j-1k-li15k": ("mag", LI15K, "mag-j-1k"),
    "lmm-j-1k-li3k2": ("lmm", LI3K, "lmm-j-1k-li3k"),    # the 3K lead-in stage twice (600 more steps)
    "mag-j-1k-li3k2": ("mag", LI3K, "mag-j-1k-li3k"),
    "lmm-j-fti": ("lmm", FTI, None),
    "lmm-j-fti-1k": ("lmm", AT_1K, "lmm-j-fti"),
    "lmm-j-fti-1k-li15k": ("lmm", LI15K, "lmm-j-fti-1k"),
}


def accuracies(table: str, lengths: str) -> dict:
    """{length: accuracy} from `titans eval niah`'s table, whose last line is "mean  a  b ..." in
    percent, one column per length."""
    means = next(line for line in table.splitlines() if line.strip().startswith("mean")).split()[1:]
    return {n: float(v) / 100 for n, v in zip(lengths.split(","), means)}


def one(key: dict, a: argparse.Namespace) -> dict:
    variant, flags, base = ARMS[key["arm"]]
    out = Path(a.out) / "runs" / f"{key['arm']}-s{key['seed']}"
    shutil.rmtree(out, ignore_errors=True)
    if base:   # continue the base arm's run (it may run beside: wait for its end)
        base_out = Path(a.out) / "runs" / f"{base}-s{key['seed']}"
        while not (base_out / "done").exists():
            time.sleep(5)
    model = ["--init", str(base_out)] if base else ["--preset", "tiny", "--variant", variant]
    t0 = time.perf_counter()
    done = titans_cli("train", "--task", "niah", *model, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
                      "--seq-len", str(a.seq_len), "--seed", str(key["seed"]), *flags, "--eval-every", "0",
                      "--out", str(out), check=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "done").touch()   # the arms that continue this run wait for it
    row = {**key, "seconds": round(time.perf_counter() - t0), "error": None, "acc": {}}
    if done.returncode:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
        return row
    ev = titans_cli("eval", "niah", "--model", str(out), "--task", "pk", "--lengths", a.lengths, "--depths",
                    str(a.depths), "--samples", str(a.samples), "--quiet", "--plot", str(out / "niah-pk.png")).stdout
    row["acc"] = accuracies(ev, a.lengths)
    shutil.rmtree(out / "checkpoints" / "optimizer", ignore_errors=True)
    return row


def far(key: dict, a: argparse.Namespace) -> dict:
    """An arm's finished run scored at --far-lengths (streamed: the state's size is constant)."""
    out = Path(a.out) / "runs" / f"{key['arm']}-s{key['seed']}"
    t0 = time.perf_counter()
    done = titans_cli("eval", "niah", "--model", str(out), "--task", "pk", "--lengths", a.far_lengths, "--depths",
                      str(a.far_depths), "--samples", str(a.samples), "--quiet", check=False)
    row = {**key, "seconds": round(time.perf_counter() - t0), "error": None, "acc": {}}
    if done.returncode:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
        return row
    row["acc"] = accuracies(done.stdout, a.far_lengths)
    return row


def far_table(store: Store, a: argparse.Namespace) -> list[str]:
    if not store.rows:
        return []
    lengths = a.far_lengths.split(",")
    lines = ["", f"Far past the trained length: `titans eval niah --task pk --lengths {a.far_lengths} --depths "
                 f"{a.far_depths} --samples {a.samples}` on an arm's runs ({a.far_depths} depths x {a.samples} "
                 "held-out needles per length, the prefill streamed in constant memory).", "",
             "| arm | seed | eval s | " + " | ".join(f"@{n}" for n in lengths) + " |",
             "|---|---|---|" + "---|" * len(lengths)]
    for r in sorted(store.rows, key=lambda r: (list(ARMS).index(r["arm"]), r["seed"])):
        cells = [f"{r['acc'][n]:.2f}" for n in lengths] if not r["error"] else ["failed"] * len(lengths)
        lines.append(f"| {r['arm']} | {r['seed']} | {r['seconds']} | " + " | ".join(cells) + " |")
    return lines


def report(store: Store, far_store: Store, a: argparse.Namespace) -> None:
    lengths = a.lengths.split(",")
    lines = ["## Pass keys through the CLI", "",
             f"`python experiments/passkey_cli.py`: for every arm and seed, `titans train --task niah --preset tiny "
             f"--variant V --steps {a.steps} --batch-size {a.batch_size} --seq-len {a.seq_len} --seed S [flags]`, "
             f"every other setting the CLI's default, then `titans eval niah --task pk --lengths {a.lengths} "
             f"--depths {a.depths} --samples {a.samples}` (greedy, exact match of the 5-digit key after a streamed "
             f"prefill; {a.depths} depths x {a.samples} held-out needles per length). Budget per run: {a.steps} "
             f"steps x {a.batch_size} x {a.seq_len} tokens, one thread, two runs at a time on {cpu_name()}. "
             "Accuracy: mean (min-max) over the seeds.", "",
             "| arm | variant | flags | seeds | train+eval s | " + " | ".join(f"@{n}" for n in lengths) + " |",
             "|---|---|---|---|---|" + "---|" * len(lengths)]
    for arm, (variant, flags, base) in ARMS.items():
        rows = sorted((r for r in store.rows if r["arm"] == arm), key=lambda r: r["seed"])
        ok = [r for r in rows if not r["error"]]
        if not rows:
            continue
        secs = [r["seconds"] for r in rows]
        cells = [spread([r["acc"][n] for r in ok]) if ok else "failed" for n in lengths]
        flags = (["--init", base] if base else []) + flags
        lines.append(f"| {arm} | {variant} | `{' '.join(flags) or '-'}` | {','.join(str(r['seed']) for r in rows)} | "
                     f"{min(secs)}-{max(secs)} | " + " | ".join(cells) + " |")
    lines += far_table(far_store, a)
    lines += ["", plot(store, far_store, a)]
    write_section(ROOT / "docs" / "RESULTS.md", "## Pass keys through the CLI", lines + [""])
    print("\n".join(lines))


def plot(store: Store, far_store: Store, a: argparse.Namespace) -> str:
    """Accuracy against length per arm (mean over seeds, band min-max), in three panels: the arms
    trained at --seq-len, the curriculum (continued at 1K), and the curriculum's lead-in stage with
    its --far lengths where they were scored. Returns the Markdown line that shows it."""
    path, markdown = results_plot("Pass keys through the CLI")
    lengths = a.lengths.split(",")
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for arm, (variant, flags, base) in ARMS.items():
        ok = sorted((r for r in store.rows if r["arm"] == arm and not r["error"]), key=lambda r: r["seed"])
        if not ok:
            continue
        panel = 0 if base is None else 2 if any(f.startswith("lead_in=") for f in flags) else 1
        far = {r["seed"]: r["acc"] for r in far_store.rows if r["arm"] == arm and not r["error"]}
        x = lengths + (a.far_lengths.split(",") if far and set(far) >= {r["seed"] for r in ok} else [])
        runs = [[{**r["acc"], **far.get(r["seed"], {})}[n] for n in x] for r in ok]
        plot_seeds(axes[panel], x, runs, arm, color=f"C{len(axes[panel].lines) % 10}",
                   ls="-" if variant == "lmm" else "--")
    for ax, what in zip(axes, (f"trained at {a.seq_len}", "continued at 1K (the curriculum)",
                               "then 600 steps with a lead-in")):
        ax.axhline(0.9, color="grey", ls=":", lw=1)
        ax.set_xlabel(f"input length (tokens); {what}")
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("pass-key accuracy (mean over seeds)")
    fig.suptitle("Pass keys through the CLI (tiny models; band: min-max over seeds; solid: LMM, dashed: others; "
                 "dotted: the 0.9 target)", fontsize=9)
    save_figure(fig, path)
    return markdown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lengths", default="256,1K,4K,16K")
    p.add_argument("--depths", type=int, default=5)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--out", default=str(ROOT / "runs" / "passkey_cli"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--far", metavar="ARM", help="score this arm's finished runs (--seeds) at --far-lengths")
    p.add_argument("--far-lengths", default="64K,256K,1M")
    p.add_argument("--far-depths", type=int, default=5)
    a = p.parse_args()
    store = Store(Path(a.out) / "results.jsonl", dict(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                                                      lengths=a.lengths, depths=a.depths, samples=a.samples))
    far_store = Store(Path(a.out) / "far.jsonl", dict(lengths=a.far_lengths, depths=a.far_depths, samples=a.samples))
    if a.far:
        todo = pending_arms(a.far, a.seeds, ARMS, far_store)
        run_parallel(far_store, todo, lambda k: far(k, a), lambda r: f"{r['arm']} seed {r['seed']} far: "
                     f"{r['seconds']} s " + (r["error"] or " ".join(f"{n} {v:.2f}" for n, v in r["acc"].items())),
                     jobs=a.jobs)
    elif not a.report_only:
        todo = pending_arms(a.arms, a.seeds, ARMS, store)
        run_parallel(store, todo, lambda k: one(k, a), lambda r: f"{r['arm']} seed {r['seed']}: {r['seconds']} s "
                     + (r["error"] or " ".join(f"{n} {v:.2f}" for n, v in r["acc"].items())), jobs=a.jobs)
    report(store, far_store, a)


if __name__ == "__main__":
    main()
