"""Interleaved A/B of the layer's forward+backward step between code trees or settings.

Each side is a source tree (put first on PYTHONPATH) and optional environment variables; each
round runs every side once in a fresh process (the order alternates between rounds), and a
process reports the best and the median of --steps timed steps after one warm-up. Per side the
script prints the best step over all rounds and the median over rounds of each process's best,
the figure docs/benchmarks.md quotes: on this shared machine a single run moves by a few per
cent, an interleaved median much less.

    git worktree add /tmp/old 322ae49
    python benchmarks/ab_step.py --side /tmp/old --side . --config a --dtype fp32 --rounds 4
    python benchmarks/ab_step.py --side .:TITANS_NATIVE=0 --side . --config b --dtype bf16 --rounds 2

A side is PATH[:NAME=VALUE[,NAME=VALUE...]]. Configs as in vs_titans_pytorch.py: a is 1 head of
384, b is 4 heads of 96 (model dim 384, depth-2 MLP memory, expansion 4, chunk 64).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {"a": (1, 384), "b": (4, 96)}


def child(config: str, dtype: str, B: int, T: int, steps: int) -> None:
    """Time the step in this process; print {"best": s, "median": s} as one JSON line."""
    import torch
    from titans.layers import NeuralMemory

    heads, head_dim = CONFIGS[config]
    torch.manual_seed(0)
    layer = NeuralMemory(384, heads, head_dim, memory_depth=2, expansion=4, chunk_size=64)
    x = torch.randn(B, T, 384, requires_grad=True)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            y, _ = layer(x)
        y.float().square().mean().backward()

    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"best": min(times), "median": statistics.median(times)}))


def parse_side(text: str) -> tuple[Path, dict[str, str]]:
    path, _, assignments = text.partition(":")
    env = {}
    for item in filter(None, assignments.split(",")):
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ValueError(f"--side {text!r}: expected PATH[:NAME=VALUE,...]")
        env[name] = value
    root = Path(path).resolve()
    if not (root / "titans" / "__init__.py").is_file():
        raise ValueError(f"--side {text!r}: {root} has no titans package")
    return root, env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", action="append", default=[], help="PATH[:NAME=VALUE,...]; give two or more")
    p.add_argument("--config", choices=sorted(CONFIGS), default="a")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--steps", type=int, default=6, help="timed steps per process")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.config, args.dtype, args.B, args.T, args.steps)
        return
    if len(args.side) < 2 or min(args.B, args.T, args.steps, args.rounds) < 1:
        p.error("give at least two --side, and B, T, steps, rounds >= 1")
    try:
        sides = [parse_side(s) for s in args.side]
    except ValueError as e:
        p.error(str(e))
    results: list[list[dict[str, float]]] = [[] for _ in sides]
    for r in range(args.rounds):
        order = list(range(len(sides))) if r % 2 == 0 else list(reversed(range(len(sides))))
        for i in order:
            root, env = sides[i]
            cmd = [sys.executable, __file__, "--child", "--config", args.config, "--dtype", args.dtype,
                   "--B", str(args.B), "--T", str(args.T), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=root,
                                 env={**os.environ, **env, "PYTHONPATH": str(root)})
            if out.returncode != 0:
                sys.exit(f"side {args.side[i]!r} failed:\n{out.stderr[-2000:]}")
            results[i].append(json.loads(out.stdout.strip().splitlines()[-1]))
    tokens = args.B * args.T
    print(f"config {args.config}, {args.dtype}, B={args.B}, T={args.T}: forward+backward tokens/s, "
          f"{args.rounds} rounds of {args.steps} steps")
    for text, runs in zip(args.side, results):
        best = min(run["best"] for run in runs)
        median = statistics.median(run["best"] for run in runs)
        print(f"  {text:40s} best {tokens / best:8,.0f}   median of bests {tokens / median:8,.0f}")


if __name__ == "__main__":
    main()
