"""Micro-timings behind the chunk path's design decisions (docs/memory_rule.md, docs/benchmarks.md).

    python benchmarks/state_ops.py            # the state-matrix timings (seconds)
    python benchmarks/state_ops.py --layers   # + NeuralMemory fwd+bwd, fp32 vs bf16 autocast (a minute)
    python benchmarks/state_ops.py --ops      # + operations per chunk at config (b), and 1 vs 2 threads

Each line is the median of repeated calls on 2-D state matrices of config (a) (1536 x 384 fp32,
one layer of a depth-2, expansion-4 memory over head dim 384) and rank-64 factors (chunk 64):
- a pass over the matrix (scale into a reused buffer), and the same into a fresh buffer;
- a rank-64 fp32 update (addmm_), the same as a bf16 matmul plus a mixed-dtype add, and as
  one MKL bf16 x bf16 -> fp32 product accumulated into the state (titans/ops/blas.py);
- the bf16 batched matmul with the transposed row block of [W; S] vs the same 2-D mm;
- the inner product of two matrices by vecdot and by dot;
- the layer's causal depthwise conv (titans/ops/conv.py) against F.conv1d, forward+backward.
--layers times the layer's forward+backward at T=4096, B=1 for 1 head of 384, 2 of 192 and
4 of 96, with and without bf16 autocast, with the op's bf16 threshold forced to 0 (so the
bf16 matmuls run at every size): the measurement behind BF16_MIN_MATRIX.
--ops counts the top-level torch operations of one 64-token piece at config (b) (4 heads of
96) in the forward and the backward (torch.profiler), and times the layer's forward+backward
there with 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import titans  # noqa: F401  (flush-to-zero, as in every other benchmark)


def median_us(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def state_timings() -> None:
    from titans.ops import blas
    do, di, n = 1536, 384, 64
    W, S, out = torch.randn(do, di), torch.randn(do, di), torch.empty(do, di)
    coef, a = torch.randn(n, do), torch.randn(n, di)
    coef16, a16 = coef.bfloat16(), a.bfloat16()
    u16 = torch.empty(do, di, dtype=torch.bfloat16)
    WS16 = torch.randn(1, 2 * do, di).bfloat16()
    h16 = torch.randn(1, n, di).bfloat16()
    alive: list[torch.Tensor] = []
    rows = [
        ("pass over the state (scale into a reused buffer)", lambda: torch.mul(W, 0.9, out=out)),
        ("the same into fresh buffers that stay alive (as states kept for a backward)", lambda: alive.append(W * 0.9)
         if len(alive) < 16 else alive.clear()),
        ("rank-64 fp32 update (addmm_)", lambda: out.addmm_(coef.mT, a)),
        ("rank-64 bf16 matmul into a reused buffer", lambda: torch.mm(coef16.mT, a16, out=u16)),
        ("mixed-dtype add of it into fp32", lambda: out.add_(u16)),
        *([("rank-64 bf16 update accumulated in fp32 (blas.gemm_into, MKL)",
            lambda: blas.gemm_into(out[None], coef16.mT[None], a16[None], beta=1.0))] if blas.AVAILABLE else []),
        ("bf16 bmm, second operand = transposed row block of [W; S]", lambda: torch.bmm(h16, WS16[:, :do].mT)),
        ("the same as a 2-D mm", lambda: torch.mm(h16[0], WS16[0, :do].mT)),
        ("inner product of two states, vecdot over [1, N] rows (as before)",
         lambda: torch.linalg.vecdot(W.view(1, -1), S.view(1, -1))),
        ("inner product of two states, dot", lambda: torch.dot(W.view(-1), S.view(-1))),
    ]
    for name, fn in rows:
        print(f"{median_us(fn):8.0f} us  {name}")
    from titans.ops.conv import causal_conv, causal_conv_ref
    xp = torch.randn(1, 3 + 4096, 1152, requires_grad=True)   # the layer's q, k, v conv at config (a)
    w, b = torch.randn(1152, 4, requires_grad=True), torch.randn(1152, requires_grad=True)
    for name, conv in (("causal_conv", causal_conv), ("causal_conv_ref (F.conv1d)", causal_conv_ref)):
        print(f"{median_us(lambda: conv(xp, w, b).sum().backward(), reps=10):8.0f} us  depthwise conv "
              f"T=4096, C=1152, forward+backward: {name}")


def layer_timings() -> None:
    import titans.ops.chunk as chunk
    from titans import NeuralMemory
    chunk.BF16_MIN_MATRIX = 0
    x = torch.randn(1, 4096, 384, requires_grad=True)
    for heads, head_dim in ((1, 384), (2, 192), (4, 96)):
        layer = NeuralMemory(384, heads, head_dim, memory_depth=2, expansion=4, chunk_size=64)
        speed = {}
        for bf16 in (False, True):
            def step():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    y, _ = layer(x)
                y.float().square().mean().backward()
            speed[bf16] = 4096 / (median_us(step, reps=3) / 1e6)
        print(f"{heads} x {head_dim}: fwd+bwd fp32 {speed[False]:,.0f} tok/s, bf16 matmuls {speed[True]:,.0f} tok/s "
              f"({100 * (speed[True] / speed[False] - 1):+.0f}%)")


def op_counts() -> None:
    from torch.profiler import profile

    from titans import NeuralMemory
    from titans.ops.chunk import ACTIVATIONS, Setup, chunk_gates, piece_forward
    from titans.ops.chunk_backward import piece_backward
    BH, n, D = 4, 64, 96
    q, k, v = (torch.randn(BH, n, D) for _ in range(3))
    gates = chunk_gates(torch.rand(BH, n) * 0.01, torch.rand(BH, n), torch.rand(BH, n) * 0.01)
    WS = [torch.randn(BH, 8 * D, D) / D ** 0.5, torch.randn(BH, 2 * D, 4 * D) / (4 * D) ** 0.5]
    s = Setup(ACTIVATIONS["silu"], False, torch.float32, torch.float32)
    _, _, cache = piece_forward(q, k, v, gates, WS, None, s, keep=True)
    dWS = [w.clone() for w in WS]  # the backward overwrites its state gradient
    for name, fn in (("forward", lambda: piece_forward(q, k, v, gates, WS, None, s)),
                     ("backward", lambda: piece_backward(cache, gates, WS, None, v, dWS, s))):
        with profile() as prof:
            fn()
        ops = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
        print(f"config (b), one piece, {name}: {len(ops)} top-level torch operations")
    x = torch.randn(1, 4096, 384, requires_grad=True)
    layer = NeuralMemory(384, 4, 96, memory_depth=2, expansion=4, chunk_size=64)

    def step():
        y, _ = layer(x)
        y.square().mean().backward()
    threads = torch.get_num_threads()
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        print(f"config (b) layer fwd+bwd, T=4096, {t} thread(s): {4096 / (median_us(step, reps=3) / 1e6):,.0f} tok/s")
    torch.set_num_threads(threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", action="store_true", help="also time the layer, fp32 vs bf16 matmuls")
    p.add_argument("--ops", action="store_true", help="also count operations per piece at config (b)")
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    state_timings()
    if args.layers:
        layer_timings()
    if args.ops:
        op_counts()


if __name__ == "__main__":
    main()
