"""Benchmark of the memory-rule op (titans.ops.memory_rule, chunk path).

Forward and forward+backward tokens/s, peak RSS and achieved GFLOP/s, next to fp32 and bf16
matmul peaks measured in the same run. Every case runs in a fresh subprocess so that its peak
RSS is its own.

    python benchmarks/memory_op.py                  # the full grid (a few minutes)
    python benchmarks/memory_op.py --quick          # one small case
    python benchmarks/memory_op.py --json out.json  # also write the results

FLOPs: the forward count is the matmuls the chunk path performs (per chunk and layer: key
forward, inner backward, the read of W and S, the two n x n products, the state update); the
forward+backward count is 3x the forward, the usual model-FLOPs convention (the backward's
recomputation is not counted).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from grid import add_grid_args, parse_grid  # benchmarks/grid.py

CONFIGS = {"a": dict(H=1, D=384), "b": dict(H=4, D=96)}
EXPANSION, DEPTH, CHUNK = 4, 2, 64


def forward_flops(B: int, T: int, H: int, D: int, chunk: int = CHUNK) -> float:
    dims = [D] + [D * EXPANSION] * (DEPTH - 1) + [D]
    total = 0.0
    for l in range(DEPTH):
        di, do = dims[l], dims[l + 1]
        per_token = 2 * di * do * (1 + 2 + 2 + (1 if l > 0 else 0))  # key, read [W;S], update [W;S], inner bwd
        per_token += 2 * chunk * (di + do)                           # P = h a^T and (G * P) @ delta
        total += per_token
    return total * B * T * H


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 10) -> float:
    import torch
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def _timed(fn, budget: float = 10.0, max_reps: int = 3) -> float:
    """Best of up to max_reps runs after one warm-up, within a time budget."""
    fn()
    times = []
    while len(times) < max_reps and sum(times) < budget:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_case(case: dict) -> dict:
    import torch
    import titans.ops  # noqa: F401  (sets flush-to-zero before the thread pool starts)
    from titans.ops import memory_rule

    B, T, H, D, bf16 = case["B"], case["T"], case["H"], case["D"], case["bf16"]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, D, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1)
    v = torch.randn(B, T, H, D, generator=gen)
    theta = torch.rand(B, T, H, generator=gen) * 0.01
    eta = torch.rand(B, T, H, generator=gen)
    alpha = torch.rand(B, T, H, generator=gen) * 0.01
    hidden = D * EXPANSION
    weights = [torch.randn(H, hidden, D, generator=gen) / D ** 0.5,
               torch.randn(H, D, hidden, generator=gen) / hidden ** 0.5]
    inputs = [q, k, v, theta, eta, alpha]
    for t in inputs + weights:
        t.requires_grad_()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def fwd():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            memory_rule(*inputs, weights, chunk_size=CHUNK)

    def fwd_bwd():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y, _ = memory_rule(*inputs, weights, chunk_size=CHUNK)
        y.float().square().mean().backward()

    t_fwd = _timed(fwd)
    rss_fwd = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t_both = _timed(fwd_bwd)
    rss_both = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    flops = forward_flops(B, T, H, D)
    return dict(case, fwd_s=t_fwd, fwd_bwd_s=t_both, fwd_tok_s=B * T / t_fwd, fwd_bwd_tok_s=B * T / t_both,
                fwd_gflops=flops / t_fwd / 1e9, fwd_bwd_gflops=3 * flops / t_both / 1e9,
                base_rss_mb=base_rss, peak_rss_fwd_mb=rss_fwd, peak_rss_mb=rss_both,
                op_mem_mb=rss_both - base_rss, threads=torch.get_num_threads())


def table(results: list[dict], peak32: float, peak16: float) -> str:
    lines = [f"fp32 matmul peak (2048^3, measured in this run): {peak32:.0f} GFLOP/s; "
             f"bf16: {peak16:.0f} GFLOP/s; threads: {results[0]['threads'] if results else '?'}", "",
             "| config | dtype | B | T | fwd tok/s | fwd GFLOP/s (% fp32 peak) | fwd+bwd tok/s "
             "| fwd+bwd GFLOP/s (% fp32 peak) | peak RSS MB | op memory MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['config']} (H={r['H']}, D={r['D']}) | {'bf16' if r['bf16'] else 'fp32'} | {r['B']} | {r['T']} "
            f"| {r['fwd_tok_s']:,.0f} | {r['fwd_gflops']:.0f} ({100 * r['fwd_gflops'] / peak32:.0f}%) "
            f"| {r['fwd_bwd_tok_s']:,.0f} | {r['fwd_bwd_gflops']:.0f} ({100 * r['fwd_bwd_gflops'] / peak32:.0f}%) "
            f"| {r['peak_rss_mb']:,.0f} | {r['op_mem_mb']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one small case (config b, T=1024, B=1, fp32)")
    add_grid_args(p, "comma list of configs: a (H=1, D=384), b (H=4, D=96)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    if args.quick:
        grid = [("b", 1, 1024, False)]
    else:
        configs, dtypes, Bs, Ts = parse_grid(args, tuple(CONFIGS))
        grid = [(c, B, T, dt == "bf16") for c in configs for dt in dtypes for B in Bs for T in Ts]
    import titans.ops  # noqa: F401
    peak32, peak16 = matmul_peak("float32"), matmul_peak("bfloat16")
    results = []
    for config, B, T, bf16 in grid:
        case = dict(config=config, B=B, T=T, bf16=bf16, **CONFIGS[config])
        out = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"case {case} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"  {config} {'bf16' if bf16 else 'fp32'} B={B} T={T}: fwd {r['fwd_tok_s']:,.0f} tok/s, "
              f"fwd+bwd {r['fwd_bwd_tok_s']:,.0f} tok/s, peak RSS {r['peak_rss_mb']:,.0f} MB", flush=True)
    print(table(results, peak32, peak16))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(fp32_matmul_peak_gflops=peak32, bf16_matmul_peak_gflops=peak16, results=results), f, indent=1)


if __name__ == "__main__":
    main()
