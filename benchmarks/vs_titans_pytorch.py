"""Side-by-side benchmark: titans.NeuralMemory against titans_pytorch.NeuralMemory (0.5.5).

One run, both layers at matched configs, alternating ours/theirs case by case (and which of
the two goes first), every case in a fresh subprocess so that its peak RSS is its own:

    pip install titans-pytorch==0.5.5                      # the peer (extra "bench")
    python benchmarks/vs_titans_pytorch.py --json vs.json --markdown vs.md    # full grid
    python benchmarks/vs_titans_pytorch.py --quick         # one tiny case (b, T=256, B=1, fp32)

Configs (model dim 384, depth-2 MLP memory, expansion 4, chunk 64, momentum on, on both sides):
    a: 1 head of 384        b: 4 heads of 96
Grid: T in {1024, 4096, 16384} x B in {1, 4} x {fp32, bf16 autocast}. Measured per case and
side: forward tokens/s (under no_grad), forward+backward tokens/s (loss mean(y^2), gradients
for x and every parameter), peak RSS (ru_maxrss) after the forward and after forward+backward,
and the RSS before the first call (imports + layer + input). Timing: one warm-up (the peer's
first call also pays its einx / torch.func tracing), then the best of up to 3 runs within
--budget seconds. The JSON also has the 1-minute load average at each case's start and the
CPU utilisation of each best run: the machine is shared, so read a case with load1 above the
core count or cpu_util well below 1 as disturbed, and rerun it (--configs/--T/--B/--dtypes). Ratios in the table: speed ours/theirs, memory
theirs/ours (both > 1 means we are better).

Fairness:
- Both children `import titans` before any torch work. titans sets the CPU flush-to-zero mode
  for subnormals at import (gate products underflow; subnormal arithmetic is ~15x slower), so
  the peer gets it too. Same threads (torch default), same input, same loss.
- Peer options: `chunk_size=64, batch_size=64, heads=H, dim_head=D, momentum=True,
  default_model_kwargs=dict(depth=2, expansion_factor=4.), mem_model_norm_add_residual=False`,
  everything else at its default. Why:
  * batch_size=64: without it the peer takes every gradient at the sequence-start weights
    (never refreshes the point of the gradient inside a call); with it, gradients are taken at
    the chunk-start weights, the paper's rule and ours. The price is the peer's: it then loops
    over the chunks in Python and re-concatenates all per-chunk weights at every step, so its
    copying grows as (T/64)^2. `--peer-batch-size none` runs the library default instead.
  * mem_model_norm_add_residual=False: the peer's default memory is LayerNorm(MLP(x)) + x; off,
    its memory is the plain 2-layer MLP (GELU) that ours is (SiLU). This removes work from
    the peer side only.
  * momentum on and weight decay (always on in the peer); per-token learning rates (the
    peer's step size is per token). The peer's momentum and decay gates are per chunk
    (from mean-pooled inputs) with no option for per token; ours are per token.
- Work that differs and is not switchable: the peer reads every token of a chunk with the
  weights of the last chunk boundary (one weight set per chunk; a token does not see the
  earlier tokens of its own chunk), ours reads with the per-token weights W_t (the dual form,
  extra n x n products per chunk). The peer materialises per-chunk gradients, momenta and
  weights for the whole sequence (memory grows as T/64 copies of the memory parameters),
  ours carries one state. Ours also does the depthwise conv, q/k L2 norm, per-head output
  RMSNorm and SiLU output gate of docs/design.md §2; the peer pre-RMSNorms its input and (H > 1)
  gates and projects its heads.
- The peer's per-head initial memories are stride-0 views of one tensor (all heads start
  equal; an in-place optimizer step on them fails). Left as shipped: it does not change the
  amount of work in a forward or backward.

Safety on a shared machine: each child caps its address space (RLIMIT_AS) at
min(--mem-limit-gb, MemAvailable - 1 GB), recorded per case; a MemoryError, an allocator
failure or a SIGKILL is reported as OOM, a timeout (--timeout, per case) as "timeout", any
other crash as "failed". The peer is expected to run out of memory at T=16384, B=4.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from typing import Any, Callable

from grid import add_grid_args, choices, ints, parse_grid  # benchmarks/grid.py

DIM, DEPTH, EXPANSION, CHUNK = 384, 2, 4, 64
CONFIGS = {"a": dict(heads=1, head_dim=384), "b": dict(heads=4, head_dim=96)}
SIDES = ("ours", "theirs")
OOM_MARKERS = ("can't allocate memory", "out of memory", "not enough memory", "bad_alloc",
               "cannot allocate memory")


# ----------------------------------------------------------------------------- the child


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn: Callable[[], None], budget: float, max_reps: int = 3) -> tuple[float, float]:
    """Best of up to max_reps runs after one warm-up, within a time budget (at least one run).

    Returns (wall seconds, process CPU seconds) of the best run; CPU / (wall * threads) well
    below 1 means the machine was busy with something else.
    """
    fn()
    runs: list[tuple[float, float]] = []
    while len(runs) < max_reps and sum(w for w, _ in runs) < budget:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - t0, time.process_time() - c0))
    return min(runs)


def _build(case: dict[str, Any]) -> Any:
    """The layer for one side: ours from --ours-class, theirs from titans_pytorch."""
    heads, head_dim = case["heads"], case["head_dim"]
    if case["side"] == "ours":
        module, _, name = case["ours_class"].partition(":")
        mod = importlib.import_module(module)
        if not hasattr(mod, name) and module == "titans":  # not re-exported yet
            mod = importlib.import_module("titans.layers")
        cls = getattr(mod, name)
        # momentum on as the peer's (our default is off); the rest at our defaults (bounded
        # momentum, the normalised step)
        return cls(DIM, heads, head_dim, memory_depth=DEPTH, expansion=EXPANSION, chunk_size=CHUNK, momentum=True)
    from titans_pytorch import NeuralMemory
    return NeuralMemory(DIM, chunk_size=CHUNK, batch_size=case["peer_batch_size"], heads=heads,
                        dim_head=head_dim, momentum=True, mem_model_norm_add_residual=False,
                        default_model_kwargs=dict(depth=DEPTH, expansion_factor=float(EXPANSION)))


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(m in str(e).lower() for m in OOM_MARKERS)


def run_case(case: dict[str, Any]) -> None:
    """Run one side of one case in this (fresh) process; print a JSON line after each phase."""
    limit = int(case["mem_limit_gb"] * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import titans  # noqa: F401  (flush-to-zero before any torch work, for both sides)
    import torch

    out: dict[str, Any] = dict(case, threads=torch.get_num_threads(), torch=torch.__version__)

    def emit() -> None:
        print(json.dumps(out), flush=True)

    B, T, bf16 = case["B"], case["T"], case["dtype"] == "bf16"
    try:
        torch.manual_seed(0)
        layer = _build(case)
        x = torch.randn(B, T, DIM, requires_grad=True)
    except Exception as e:  # noqa: BLE001  (report, do not crash the run)
        out.update(fwd_status="OOM" if _is_oom(e) else "failed", error=repr(e)[-500:])
        emit()
        return
    out["base_rss_mb"] = _rss_mb()

    def fwd() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            layer(x)

    def fwd_bwd() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y, _ = layer(x)
        y.float().square().mean().backward()

    for phase, fn, rss_key in (("fwd", fwd, "fwd_peak_rss_mb"), ("fwd_bwd", fwd_bwd, "peak_rss_mb")):
        try:
            seconds, cpu = _timed(fn, case["budget"])
        except Exception as e:  # noqa: BLE001
            out.update({f"{phase}_status": "OOM" if _is_oom(e) else "failed", "error": repr(e)[-500:],
                        rss_key: _rss_mb()})
            emit()
            return
        out.update({f"{phase}_status": "ok", f"{phase}_s": seconds, f"{phase}_tok_s": B * T / seconds,
                    f"{phase}_cpu_util": cpu / (seconds * out["threads"]), rss_key: _rss_mb()})
        emit()


# ----------------------------------------------------------------------------- the parent


def _mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float("inf")


def spawn(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one side of one case in a subprocess; turn crashes, kills and timeouts into statuses."""
    stdout, stderr, rc, status = "", "", 0, None
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)],
                              capture_output=True, text=True, timeout=timeout)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:  # subprocess.run kills the child
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        status = "timeout"
    result = dict(case)
    for line in reversed(stdout.strip().splitlines()):
        try:
            result = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    if status is None and rc != 0:
        killed = rc in (-signal.SIGKILL, -signal.SIGABRT, -signal.SIGSEGV)
        status = "OOM" if rc == -signal.SIGKILL or (killed and any(m in stderr.lower() for m in OOM_MARKERS)) \
            else "failed"
        result["error"] = f"exit {rc}: {stderr[-500:]}"
    for phase in ("fwd", "fwd_bwd"):
        if f"{phase}_status" not in result:
            result[f"{phase}_status"] = status or ("failed" if result.get("fwd_status") == "ok" else "skipped")
    if result["fwd_status"] != "ok" and result["fwd_bwd_status"] == "skipped":
        result["fwd_bwd_status"] = result["fwd_status"]
    return result


def _cell(r: dict[str, Any], key: str, phase: str, fmt: str) -> str:
    return format(r[key], fmt) if r.get(f"{phase}_status") == "ok" and key in r else r.get(f"{phase}_status", "?")


def _ratio(num: dict[str, Any], den: dict[str, Any], key: str, phase: str) -> str:
    ok = all(r.get(f"{phase}_status") == "ok" and key in r for r in (num, den))
    return f"{num[key] / den[key]:.2f}x" if ok else "-"


def table(rows: list[dict[str, dict[str, Any]]]) -> str:
    """Markdown: one line per case; speed ratios ours/theirs, memory ratio theirs/ours."""
    lines = ["| config | dtype | B | T | fwd tok/s ours | theirs | ratio | fwd+bwd tok/s ours | theirs "
             "| ratio | peak RSS MB ours | theirs | theirs/ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        o, t = row["ours"], row["theirs"]
        cfg = f"{o['config']} ({o['heads']}x{o['head_dim']})"
        # peak RSS of a phase that failed is still the peak the process reached
        rss_o = o.get("peak_rss_mb", o.get("fwd_peak_rss_mb"))
        rss_t = t.get("peak_rss_mb", t.get("fwd_peak_rss_mb"))
        mem_ok = o.get("fwd_bwd_status") == "ok" and t.get("fwd_bwd_status") == "ok"
        lines.append(
            f"| {cfg} | {o['dtype']} | {o['B']} | {o['T']} "
            f"| {_cell(o, 'fwd_tok_s', 'fwd', ',.0f')} | {_cell(t, 'fwd_tok_s', 'fwd', ',.0f')} "
            f"| {_ratio(o, t, 'fwd_tok_s', 'fwd')} "
            f"| {_cell(o, 'fwd_bwd_tok_s', 'fwd_bwd', ',.0f')} | {_cell(t, 'fwd_bwd_tok_s', 'fwd_bwd', ',.0f')} "
            f"| {_ratio(o, t, 'fwd_bwd_tok_s', 'fwd_bwd')} "
            f"| {f'{rss_o:,.0f}' if mem_ok else _cell(o, 'peak_rss_mb', 'fwd_bwd', ',.0f')} "
            f"| {f'{rss_t:,.0f}' if mem_ok else _cell(t, 'peak_rss_mb', 'fwd_bwd', ',.0f')} "
            f"| {f'{rss_t / rss_o:.2f}x' if mem_ok else '-'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one tiny case (config b, T=256, B=1, fp32)")
    add_grid_args(p, "comma list: a (1 head of 384), b (4 heads of 96)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (rewritten after every case)")
    p.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per side per case (default 900)")
    p.add_argument("--budget", type=float, default=30.0, help="timing budget per phase, seconds (default 30)")
    p.add_argument("--mem-limit-gb", type=float, default=20.0,
                   help="address-space cap per child, lowered to MemAvailable - 1 GB (default 20)")
    p.add_argument("--peer-batch-size", default=str(CHUNK),
                   help="titans_pytorch batch_size: an int, or 'none' for the library default (default 64)")
    p.add_argument("--ours-class", default="titans:NeuralMemory", help="MODULE:NAME of our layer")
    p.add_argument("--sides", default="ours,theirs", help="comma list: ours, theirs (default both)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one side of one case here
    args = p.parse_args()
    if args.case:
        run_case(json.loads(args.case))
        return

    configs, dtypes, Bs, Ts = parse_grid(args, tuple(CONFIGS))
    sides = choices(args.sides, SIDES, "sides")
    if args.quick:
        Ts, Bs = [256], [1]
    if args.quick:
        configs, dtypes = ["b"], ["fp32"]
    peer_bs = None if args.peer_batch_size.lower() == "none" else ints(args.peer_batch_size, "peer-batch-size")[0]
    if peer_bs is not None and peer_bs % CHUNK:
        raise ValueError(f"--peer-batch-size must be a multiple of {CHUNK} or 'none', got {peer_bs}")
    if ":" not in args.ours_class:
        raise ValueError(f"--ours-class must be MODULE:NAME, got {args.ours_class!r}")

    try:
        from importlib.metadata import version
        peer_version = version("titans-pytorch")
    except Exception:  # noqa: BLE001
        peer_version = "not installed"
    meta = dict(dim=DIM, depth=DEPTH, expansion=EXPANSION, chunk=CHUNK, peer_version=peer_version,
                peer_batch_size=peer_bs, python=sys.version.split()[0], cpus=os.cpu_count(),
                started=time.strftime("%Y-%m-%d %H:%M:%S"))
    grid = [(c, dt, B, T) for c in configs for dt in dtypes for B in Bs for T in Ts]
    rows: list[dict[str, dict[str, Any]]] = []
    for i, (config, dtype, B, T) in enumerate(grid):
        row: dict[str, dict[str, Any]] = {side: dict(CONFIGS[config], config=config, dtype=dtype, B=B, T=T,
                                                     fwd_status="skipped", fwd_bwd_status="skipped")
                                          for side in SIDES if side not in sides}
        for side in (sides if i % 2 == 0 else sides[::-1]):  # alternate which side goes first
            limit = max(1.0, min(args.mem_limit_gb, _mem_available_gb() - 1.0))
            case = dict(config=config, dtype=dtype, B=B, T=T, side=side, **CONFIGS[config],
                        peer_batch_size=peer_bs, ours_class=args.ours_class, budget=args.budget,
                        mem_limit_gb=round(limit, 2), load1=round(os.getloadavg()[0], 2))
            r = spawn(case, args.timeout)
            row[side] = r
            print(f"  {config} {dtype} B={B} T={T} {side:6s}: fwd {_cell(r, 'fwd_tok_s', 'fwd', ',.0f')} tok/s, "
                  f"fwd+bwd {_cell(r, 'fwd_bwd_tok_s', 'fwd_bwd', ',.0f')} tok/s, "
                  f"peak RSS {r.get('peak_rss_mb', r.get('fwd_peak_rss_mb', 0)):,.0f} MB"
                  + (f"  [{r['error'][:200]!r}]" if "error" in r else ""), flush=True)
        rows.append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(meta, results=rows), f, indent=1)
    threads = next((r["threads"] for row in rows for r in row.values() if "threads" in r), "?")
    header = (f"titans vs titans_pytorch {peer_version} (batch_size={peer_bs}); dim {DIM}, depth {DEPTH}, "
              f"expansion {EXPANSION}, chunk {CHUNK}; torch threads {threads}. "
              "Speed ratio ours/theirs, memory ratio theirs/ours.")
    md = header + "\n\n" + table(rows)
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
