"""What the studies in experiments/ share: one training run at a fixed budget, the store of
finished runs (JSON lines, resumable), the --set config overrides, the CPU's name, and a section
of docs/RESULTS.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import titans  # noqa: F401  (flush-to-zero before any torch work)
from titans.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent


def add_set_option(p: argparse.ArgumentParser, scope: str) -> None:
    """--set KEY=VALUE (repeatable): a config override for every `scope` of a study. A study keeps
    the list in its stored settings (runs with other overrides are never mixed) and in its
    report's command (`set_flags`)."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"a config override for every {scope} (repeatable), typed as `titans train --set`")


def set_flags(sets: list[str]) -> str:
    """The --set options of a report's command line."""
    return "".join(f" --set {kv}" for kv in sets)


def train(model, batches, *, steps: int, batch_size: int, seq_len: int, lr: float, seed: int, out: Path,
          val=None) -> tuple[float, str | None, list[dict]]:
    """Train `model` in place with the studies' schedule (AdamW, 10% warmup, cosine, clip 1.0).

    Returns (seconds, the trainer's one-line stop message of a diverged run or None, the log rows).
    `out` is a scratch directory, removed afterwards."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=steps // 10,
                      eval_every=steps if val is not None else 0, eval_batches=len(val) if val is not None else 2,
                      ckpt_every=0, keep_last=1, out_dir=str(out), progress=False, seed=seed)
    t0 = time.perf_counter()
    error, rows = None, []
    try:
        rows = Trainer(model, batches, val, cfg, config_dict=model.config.to_dict()).fit()
    except RuntimeError as e:  # the trainer's stop on a diverged run: recorded, the study goes on
        error = str(e).splitlines()[0]
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return seconds, error, rows


class Store:
    """Finished runs, one JSON object per line; a run is reused only when its `settings` match."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.path, self.settings = Path(path), settings
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        self.rows = [r for r in map(json.loads, lines) if r.get("settings") == settings]

    def done(self, **key: Any) -> bool:
        return any(all(r.get(k) == v for k, v in key.items()) for r in self.rows)

    def add(self, row: dict) -> None:
        row = {**row, "settings": self.settings}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)


def run_pending(store: Store, keys: list[dict], run: Callable[[dict], dict], describe: Callable[[dict], str]) -> None:
    """Run, in order, every run named by `keys` (e.g. {"model": "lmm", "seed": 0}) that the store
    does not hold yet, storing each as it finishes; one progress line per run."""
    todo = [key for key in keys if not store.done(**key)]
    for i, key in enumerate(todo):
        row = run(key)
        store.add(row)
        print(f"[{i + 1}/{len(todo)}] {describe(row)}" + ("  DIVERGED" if row.get("diverged") else ""), flush=True)


TITANS = [sys.executable, "-m", "titans"]   # the CLI, as a user runs it


def titans_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `titans ARGS...` in a subprocess with one thread (studies run two at a time)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*TITANS, *args], env=env, capture_output=True, text=True, check=check)


def run_parallel(store: Store, todo: list[dict], run: Callable[[dict], dict], describe: Callable[[dict], str],
                 jobs: int = 2) -> None:
    """Like run_pending, `jobs` runs at a time (each a one-thread subprocess), stored as they finish."""
    with ThreadPoolExecutor(jobs) as pool:
        for i, row in enumerate(pool.map(run, todo)):
            store.add(row)
            print(f"[{i + 1}/{len(todo)}] {describe(row)}", flush=True)


def corpus() -> Path:
    """The byte-level project corpus that `titans data prepare` writes (the CLI's default)."""
    from titans.cli.common import default_corpus

    root = default_corpus("byte")
    if not (root / "meta.json").exists():
        raise SystemExit(f"no prepared corpus at {root}: run `titans data prepare` first")
    return root


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001  (no lscpu: fall back to what Python knows)
        return platform.processor() or "unknown CPU"


def threads(rows: list[dict]) -> str:
    """How many torch threads the stored runs used, for a report's set-up line."""
    n = sorted({r.get("threads", "?") for r in rows}, key=str)
    return f"{'/'.join(map(str, n))} torch thread{'s' if n != [1] else ''} per run"


def spread(values: Iterable[float], fmt: str = "{:.3f}") -> str:
    """mean (min-max) over seeds, or the single value."""
    v = list(values)
    if len(v) == 1 or min(v) == max(v):
        return fmt.format(v[0])
    return f"{fmt.format(statistics.mean(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def write_section(report: Path, heading: str, lines: list[str]) -> None:
    """Replace the section headed `heading` (a "## " line, perhaps followed by " (...)") in
    `report`, or append it."""
    text = report.read_text() if report.exists() else "# Results\n\n"
    found = re.search(rf"^{re.escape(heading)}( \(.*\))?$", text, re.M)
    if found:
        start = found.start()
        end = text.find("\n## ", start + 1)
        text = text[:start] + "\n".join(lines) + (text[end:] if end != -1 else "\n")
    else:
        text = text.rstrip() + "\n\n" + "\n".join(lines)
    report.write_text(text)


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_seeds(ax: Any, x: list, runs: list[list[float]], label: str, **style: Any) -> None:
    """One line per arm: the mean over its seeds (`runs`: one list of values per seed), and a
    band from the lowest to the highest seed."""
    cols = list(zip(*runs))
    line, = ax.plot(x, [statistics.mean(c) for c in cols], marker="o", ms=3, label=f"{label} ({len(runs)})", **style)
    if len(runs) > 1:
        ax.fill_between(x, [min(c) for c in cols], [max(c) for c in cols], color=line.get_color(), alpha=0.12)


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write (creating its folder) and close a study's figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def pending_arms(arms: str, seeds: str, known: dict, store: Store) -> list[dict]:
    """The runs {arm, seed} of a study of arms that the store does not hold yet, arm by arm (an arm
    that continues another should not hold a job while its base runs); an unknown arm exits."""
    for arm in arms.split(","):
        if arm not in known:
            raise SystemExit(f"--arms: unknown arm {arm!r}; the arms: {', '.join(known)}")
    todo = [dict(arm=arm, seed=int(s)) for arm in arms.split(",") for s in seeds.split(",")]
    return [k for k in todo if not store.done(**k)]


def results_plot(title: str) -> tuple[Path, str]:
    """(the path of a study's figure under docs/results, the Markdown line that shows it)."""
    name = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") + ".png"
    return ROOT / "docs" / "results" / name, f"![{title}](results/{name})"
