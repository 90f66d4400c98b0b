"""Where the memory layer's memory goes: one forward+backward of titans.NeuralMemory.

    python benchmarks/layer_memory.py                  # config (b): 4 heads of 96, T=4096, B=1, fp32
    python benchmarks/layer_memory.py --config a --saved 20 --timeline 30

Prints, for one forward+backward (loss mean(y^2), as in vs_titans_pytorch.py):
- the tensors autograd saves for the backward (torch.autograd.graph.saved_tensors_hooks),
  deduplicated by storage, largest first, with the line of titans code that saved them; the
  op's own kept states are not among them (they live on its autograd context);
- the C heap's bytes in use (glibc mallinfo2: what the process has allocated and not freed)
  and the resident set (titans.eval.stream.current_rss) after every aten operation, through a
  TorchDispatchMode: their peaks, the forward's end, and with --timeline the operations where
  the resident set grew by more than 3 MB at once. The gap between the two is memory that
  the allocator holds but that no tensor uses (freed holes it cannot hand back).
Linux with glibc only. The dispatch hook slows the run; it does not change what is allocated.
"""

from __future__ import annotations

import argparse
import ctypes
import traceback

import torch

import titans
from titans.eval.stream import current_rss, peak_rss

CONFIGS = {"a": dict(heads=1, head_dim=384), "b": dict(heads=4, head_dim=96)}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2
MB = 2 ** 20


def heap_in_use_mb() -> float:
    m = _libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / MB   # heap chunks in use + mmapped chunks


def rss_mb() -> float:
    return current_rss() / MB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="b")
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--saved", type=int, default=12, help="how many saved tensors to list")
    ap.add_argument("--timeline", type=int, default=0, help="list up to this many >3 MB RSS jumps")
    ap.add_argument("--warmup", action="store_true",
                    help="one untraced forward+backward first (default: trace the first, which sets the "
                         "process's high-water mark in a fresh benchmark child)")
    args = ap.parse_args()
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    layer = titans.NeuralMemory(384, memory_depth=2, expansion=4, chunk_size=64, **CONFIGS[args.config])
    x = torch.randn(args.B, args.T, 384, requires_grad=True)

    def step() -> torch.Tensor:
        y, _ = layer(x)
        return y.float().pow(2).mean()

    if args.warmup:
        step().backward()
        x.grad = None
        layer.zero_grad(set_to_none=True)

    saved: dict[int, tuple[float, tuple, str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in saved:
            ours = [f for f in traceback.extract_stack() if "/titans/" in f.filename]
            where = f"{ours[-1].filename.split('/titans/')[-1]}:{ours[-1].lineno}" if ours else "?"
            saved[key] = (t.untyped_storage().nbytes() / MB, tuple(t.shape), where)
        return t

    trace: list[tuple[float, float, str]] = []

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            trace.append((heap_in_use_mb(), rss_mb(), str(func)))
            return out

    heap0, rss0 = heap_in_use_mb(), rss_mb()
    with Trace():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step()
        fwd_end = len(trace)
        loss.backward()

    print(f"NeuralMemory config ({args.config}) {CONFIGS[args.config]}, B={args.B}, T={args.T}, fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"\nsaved for the backward: {sum(v[0] for v in saved.values()):.1f} MB in {len(saved)} storages")
    for mb, shape, where in sorted(saved.values(), reverse=True)[:args.saved]:
        print(f"  {mb:7.1f} MB  {str(shape):22}  {where}")
    heap_peak = max(range(len(trace)), key=lambda i: trace[i][0])
    rss_peak = max(range(len(trace)), key=lambda i: trace[i][1])
    print(f"\nbefore the step: heap in use {heap0:.0f} MB, RSS {rss0:.0f} MB")
    print(f"end of forward:  heap in use {trace[fwd_end - 1][0]:.0f} MB, RSS {trace[fwd_end - 1][1]:.0f} MB")
    print(f"peak heap in use {trace[heap_peak][0]:.0f} MB (op {heap_peak} of {len(trace)}, {trace[heap_peak][2]})")
    print(f"peak RSS         {trace[rss_peak][1]:.0f} MB (op {rss_peak}, {trace[rss_peak][2]}); "
          f"process peak {peak_rss() / MB:.0f} MB")
    if args.timeline:
        print("\nRSS jumps > 3 MB: op index, heap in use, RSS, +jump, op")
        jumps = [(i, *trace[i], trace[i][1] - trace[i - 1][1]) for i in range(1, len(trace))
                 if trace[i][1] - trace[i - 1][1] > 3]
        for i, heap, rss, op, jump in jumps[:args.timeline]:
            phase = "fwd" if i < fwd_end else "bwd"
            print(f"  {i:6d} {phase} {heap:6.0f} {rss:6.0f} +{jump:4.1f}  {op}")


if __name__ == "__main__":
    main()
