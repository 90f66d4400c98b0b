"""Inference at the machine's limit: prefill and decode speed against what this CPU can do.

One run measures, on the CPU it names (lscpu "Model name"), each case in a fresh subprocess
(so that its peak RSS is its own):

    python benchmarks/inference.py --json docs/results/inference.json --markdown inference.md
    python benchmarks/inference.py --quick          # a short smoke run of every case

- the machine's limits: the fp32 matmul peak (best of a few large square torch.mm, GFLOP/s) and
  the memory bandwidth (best of a few reads of a large fp32 tensor, x.sum(), GB/s; a copy's
  read + write figure beside it);
- the `small` MAC model (`make demo`'s: TitansConfig.from_preset("small", "mac"), random
  weights, which does not change the work): training tokens/s at the trainer's defaults
  (`titans train`: batch 8, 256 tokens, AdamW in the trainer's parameter groups, gradient
  clipping at 1.0, fp32), forward-only prefill tokens/s (batch 1, one long prompt through
  `titans.eval.stream.prefill`, its default piece of 4096 tokens), and greedy decode tokens/s
  through `TitansLM.generate_stream` (temperature 0, the path `titans generate` takes) at batch
  1, 8 and 32;
- the race model against titans-pytorch 0.5.5's `MemoryAsContextTransformer` (PyPI
  `titans-pytorch==0.5.5`, the "bench" extra) at about the same size: ours vocabulary 256, dim
  384, 4 layers, sliding-window attention in layers 1 and 3 and MAC (memory) in layers 2 and 4,
  segment and window 128, everything else at our defaults (9.05M parameters); theirs
  `MemoryAsContextTransformer(num_tokens=256, dim=384, depth=4, segment_len=128,
  neural_memory_layers=(2, 4))`, everything else at its defaults (15.50M parameters). Prefill
  (batch 1, forward under no_grad) and greedy decode at batch 1 with state or cache on both
  sides: theirs through its `sample(..., use_cache=True, temperature=0)` with the min-p filter
  off (less work for it).

Decode tokens/s counts the tokens after the first: ours times the generator from its first
token to its last; theirs is (N - 1) / (time of sample to N new tokens - time of sample to 1),
the prefill and the first token cancelling out. Every timed figure is the best of a few runs
after one warm-up.

Each figure as a fraction of the machine's limit:
- training: model FLOP/s = 6 x parameters x tokens/s, over the matmul peak;
- prefill: model FLOP/s = 2 x parameters x tokens/s, over the matmul peak (the attention's own
  FLOPs and MAC's doubled key/value projections are not counted: the fraction is a lower
  bound of the arithmetic done);
- decode: fp32 weight bytes per step (4 x parameters: every weight read once per step, for the
  whole batch) x steps/s, over the read bandwidth.
Parameters: every parameter once (our head is tied to the embedding).

The machine may be shared: the JSON has the 1-minute load average at each case's start and the
CPU utilisation of the timed runs. Compare speeds as ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Callable

VOCAB = 256
RACE_OURS = dict(variant="mac", vocab_size=VOCAB, dim=384, n_layers=4, segment_len=128, window=128,
                 block_pattern=("swa", "mac"))
RACE_THEIRS = dict(num_tokens=VOCAB, dim=384, depth=4, segment_len=128, neural_memory_layers=(2, 4))

FULL = dict(matmul_n=4096, bandwidth_mb=512, reps=3, train_steps=3, prefill_tokens=8192, race_prefill_tokens=4096,
            prompt=64, new_tokens=256, batches=(1, 8, 32))
QUICK = dict(matmul_n=1024, bandwidth_mb=64, reps=1, train_steps=1, prefill_tokens=1024, race_prefill_tokens=256,
             prompt=16, new_tokens=8, batches=(1, 8, 32))


# ----------------------------------------------------------------------------- the child


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _best(fn: Callable[[], float], reps: int) -> tuple[float, float]:
    """fn() returns a rate; the best over reps runs after one warm-up, and the CPU utilisation
    (process CPU time over wall time and threads) of all the timed runs."""
    import torch
    fn()
    c0, w0 = time.process_time(), time.perf_counter()
    best = max(fn() for _ in range(reps))
    util = (time.process_time() - c0) / ((time.perf_counter() - w0) * torch.get_num_threads())
    return best, util


def _limits(s: dict[str, Any]) -> dict[str, float]:
    import torch
    n = s["matmul_n"]
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)

    def matmul() -> float:
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        return 2 * n ** 3 / (time.perf_counter() - t) / 1e9

    x = torch.ones(s["bandwidth_mb"] * 2 ** 20 // 4)
    y = torch.empty_like(x)

    def read() -> float:
        t = time.perf_counter()
        x.sum()
        return x.numel() * 4 / (time.perf_counter() - t) / 1e9

    def copy() -> float:
        t = time.perf_counter()
        y.copy_(x)
        return 2 * x.numel() * 4 / (time.perf_counter() - t) / 1e9

    reps = max(3, s["reps"])
    gflops, util = _best(matmul, reps)
    return dict(matmul_gflops=gflops, read_gbs=_best(read, reps + 2)[0], copy_gbs=_best(copy, reps + 2)[0],
                cpu_util=util)


def _ours(config: dict[str, Any]):
    import torch
    from titans import TitansConfig, TitansLM
    torch.manual_seed(0)
    if "preset" in config:
        return TitansLM(TitansConfig.from_preset(config["preset"], config["variant"])).eval()
    return TitansLM(TitansConfig(**config)).eval()


def _theirs():
    import torch
    from titans_pytorch import MemoryAsContextTransformer
    torch.manual_seed(0)
    return MemoryAsContextTransformer(**RACE_THEIRS).eval()


def _train(model, s: dict[str, Any]) -> tuple[float, float]:
    """Tokens/s of the trainer's step: batch 8 x 256, AdamW (its groups), clipping at 1.0, fp32."""
    import torch
    from titans.train.optim import build_optimizer
    B, T = 8, 256
    model.train()
    opt = build_optimizer(model, lr=2e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (B, T + 1), generator=g)

    def step() -> float:
        t = time.perf_counter()
        loss = model(data[:, :-1], labels=data[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return B * T / (time.perf_counter() - t)

    return _best(step, s["train_steps"])


def _prefill(model, tokens: int, s: dict[str, Any], side: str) -> tuple[float, float]:
    """Forward-only tokens/s at batch 1: ours through titans.eval.stream.prefill, theirs one forward."""
    import torch
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(1))

    def run() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            if side == "ours":
                from titans.eval.stream import prefill
                prefill(model, ids)
            else:
                model(ids)
        return tokens / (time.perf_counter() - t)

    return _best(run, max(1, s["reps"] - 1))


def _decode(model, B: int, s: dict[str, Any], side: str) -> tuple[float, float]:
    """Greedy decode tokens/s (all rows) over the tokens after the first."""
    import torch
    prompt = torch.randint(0, VOCAB, (B, s["prompt"]), generator=torch.Generator().manual_seed(2))
    n = s["new_tokens"]

    if side == "ours":
        def run() -> float:
            gen = model.generate_stream(prompt, n, temperature=0.0)
            next(gen)  # the prefill and the first token
            t = time.perf_counter()
            for _ in range(n - 1):
                next(gen)
            dt = time.perf_counter() - t
            gen.close()
            return B * (n - 1) / dt
    else:
        def sample(k: int) -> float:
            t = time.perf_counter()
            model.sample(prompt, s["prompt"] + k, temperature=0.0, filter_fn=lambda x, **_: x,
                         show_progress=False, use_cache=True)
            return time.perf_counter() - t

        def run() -> float:
            return B * (n - 1) / (sample(n) - sample(1))

    return _best(run, max(1, s["reps"] - 1))


def run_case(case: dict[str, Any]) -> None:
    """One case in this (fresh) process; prints one JSON line."""
    import titans  # noqa: F401  (its CPU flush-to-zero setting, for both sides)
    import torch
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    s = case["settings"]
    out: dict[str, Any] = dict(case, threads=torch.get_num_threads(), torch=torch.__version__)
    del out["settings"]
    kind = case["kind"]
    if kind == "limits":
        out.update(_limits(s))
    else:
        model = _ours(case["config"]) if case["side"] == "ours" else _theirs()
        out["params"] = sum(p.numel() for p in model.parameters())
        if kind == "train":
            rate, util = _train(model, s)
        elif kind == "prefill":
            rate, util = _prefill(model, case["tokens"], s, case["side"])
        else:
            rate, util = _decode(model, case["B"], s, case["side"])
        out.update(tok_s=rate, cpu_util=util)
    out["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- the parent


def cpu_name() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def spawn(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one case in a subprocess; a crash or timeout becomes a status."""
    result = dict(case, load1=os.getloadavg()[0])
    del result["settings"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)],
                              capture_output=True, text=True, timeout=timeout, env={**os.environ, **case.get("env", {})})
    except subprocess.TimeoutExpired:
        return dict(result, status="timeout")
    result["wall_s"] = time.perf_counter() - t0
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            return dict(result, **json.loads(line), status="ok")
        except json.JSONDecodeError:
            continue
    return dict(result, status="failed", error=proc.stderr.strip()[-800:])


def cases(s: dict[str, Any], peer: bool) -> list[dict[str, Any]]:
    small = dict(preset="small", variant="mac")
    out = [dict(kind="limits", name="limits"),
           dict(kind="train", name="small train", side="ours", config=small),
           dict(kind="prefill", name="small prefill", side="ours", config=small, tokens=s["prefill_tokens"])]
    out += [dict(kind="decode", name=f"small decode B={B}", side="ours", config=small, B=B) for B in s["batches"]]
    sides = ["ours", "theirs"] if peer else ["ours"]
    for kind in ("prefill", "decode"):
        for side in sides:
            extra = dict(tokens=s["race_prefill_tokens"]) if kind == "prefill" else dict(B=1)
            out.append(dict(kind=kind, name=f"race {kind} {side}", side=side, config=RACE_OURS, **extra))
    return [dict(c, settings=s) for c in out]


def add_fractions(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each model figure as a fraction of the measured limits (see the module doc)."""
    limits = next((r for r in results if r["kind"] == "limits" and r["status"] == "ok"), None)
    for r in results:
        if r["kind"] == "limits" or r["status"] != "ok" or limits is None:
            continue
        P = r["params"]
        if r["kind"] in ("train", "prefill"):
            r["model_gflops"] = (6 if r["kind"] == "train" else 2) * P * r["tok_s"] / 1e9
            r["fraction"] = r["model_gflops"] / limits["matmul_gflops"]
        else:
            steps = r["tok_s"] / r["B"]
            r["ms_per_step"] = 1e3 / steps
            r["weight_gbs"] = 4 * P * steps / 1e9
            r["fraction"] = r["weight_gbs"] / limits["read_gbs"]
    return limits or {}


def markdown(results: list[dict[str, Any]], limits: dict[str, Any], cpu: str) -> str:
    lines = [f"CPU: {cpu}; {limits.get('threads', '?')} threads; fp32 matmul peak "
             f"{limits.get('matmul_gflops', float('nan')):,.0f} GFLOP/s; read bandwidth "
             f"{limits.get('read_gbs', float('nan')):,.1f} GB/s (copy {limits.get('copy_gbs', float('nan')):,.1f})", "",
             "| case | params | tok/s | of the limit | what the fraction counts | peak RSS MB |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if r["kind"] == "limits":
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | - | {r['status']} | - | - | - |")
            continue
        if r["kind"] in ("train", "prefill"):
            what = f"{r['model_gflops']:,.1f} GFLOP/s ({6 if r['kind'] == 'train' else 2} x params x tok/s)"
        else:
            what = f"{r['weight_gbs']:,.2f} GB/s of weights ({r['ms_per_step']:,.1f} ms per step)"
        frac = f"{100 * r['fraction']:.1f}%" if "fraction" in r else "-"
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['tok_s']:,.0f} | {frac} | {what} | "
                     f"{r['peak_rss_mb']:,.0f} |")
    by = {r["name"]: r for r in results if r["status"] == "ok"}
    ratios = []
    if "small train" in by and "small prefill" in by:
        ratios.append(f"prefill / training (small): {by['small prefill']['tok_s'] / by['small train']['tok_s']:.2f}x")
    for kind in ("prefill", "decode"):
        a, b = by.get(f"race {kind} ours"), by.get(f"race {kind} theirs")
        if a and b:
            ratios.append(f"race {kind}, ours / theirs: {a['tok_s'] / b['tok_s']:.2f}x")
    return "\n".join(lines + ([""] + ratios if ratios else []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short smoke run of every case")
    p.add_argument("--no-peer", action="store_true", help="skip titans-pytorch (also skipped when not installed)")
    p.add_argument("--only", default=None, help="comma list of case names to run (e.g. 'limits,small prefill')")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each case (default: torch's)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per case")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the table here")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.case:
        run_case(json.loads(a.case))
        return
    s = QUICK if a.quick else FULL
    peer = not a.no_peer
    if peer:
        try:
            import importlib.util
            peer = importlib.util.find_spec("titans_pytorch") is not None
        except (ImportError, ValueError):
            peer = False
        if not peer:
            print("titans-pytorch is not installed: the race runs our side only", file=sys.stderr)
    todo = [dict(c, threads=a.threads) for c in cases(s, peer)]
    if a.only:
        names = set(a.only.split(","))
        todo = [c for c in todo if c["name"] in names or c["kind"] == "limits"]
    cpu = cpu_name()
    results = []
    for c in todo:
        r = spawn(c, a.timeout)
        results.append(r)
        shown = {k: r.get(k) for k in ("tok_s", "matmul_gflops", "read_gbs", "peak_rss_mb", "cpu_util", "wall_s", "status")
                 if r.get(k) is not None}
        print(f"{r['name']}: " + ", ".join(f"{k} {v:,.2f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in shown.items()), flush=True)
        if r["status"] != "ok" and r.get("error"):
            print(r["error"], file=sys.stderr)
    limits = add_fractions(results)
    table = markdown(results, limits, cpu)
    print("\n" + table)
    record = dict(cpu=cpu, settings={k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
                  race_ours=dict(RACE_OURS, block_pattern=list(RACE_OURS["block_pattern"])),
                  race_theirs=dict(RACE_THEIRS, neural_memory_layers=list(RACE_THEIRS["neural_memory_layers"])),
                  time=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), results=results)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
