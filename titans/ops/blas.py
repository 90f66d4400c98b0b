"""Mixed-precision matrix products for the op's bf16 path: bf16 operands, fp32 accumulation and result.

Shape legend
    out: [N, m, n] fp32   a: [N, m, k] bf16   b: [N, k, n] bf16   (N: the batch, e.g. B * H)

PyTorch's CPU matmul returns its operands' dtype. Under bf16 the op wants fp32 results (its state
and everything elementwise stay fp32), so each bf16 product came back rounded to bf16 and was
cast to fp32 in a second pass; and a rank-n update of an fp32 state ran as an fp32 matmul
(baddbmm_), at fp32 speed. Intel MKL's `cblas_gemm_bf16bf16f32` computes C = alpha A B + beta C
with A, B in bf16 and C in fp32, accumulating in fp32, in one call (on AMX where the CPU has it).
The PyTorch x86-64 Linux wheels link MKL into libtorch_cpu and export that symbol; we call it
through ctypes. Updating a 1536 x 384 fp32 state by a rank-64 product took 73 us this way,
238 us as an fp32 addmm_, and 90 + 101 us as a bf16 matmul plus a mixed-dtype add
(`python benchmarks/state_ops.py`). MKL runs alpha = beta = 1 fastest on these rank-64 shapes
(1.5-2x against alpha = -1; ad-hoc timing): callers fold scales into the small factor.

Where the symbol is missing (other platforms or builds), or with TITANS_MKL_GEMM=0, `AVAILABLE`
is False and the op uses torch's matmuls as before.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor

__all__ = ["AVAILABLE", "gemm_into"]

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS_LAYOUT / CBLAS_TRANSPOSE values


def _load():
    if os.environ.get("TITANS_MKL_GEMM", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        fn = lib.cblas_gemm_bf16bf16f32
    except (OSError, AttributeError):
        return None
    i, p = ctypes.c_int, ctypes.c_void_p  # MKL_INT is 32-bit in the LP64 interface this symbol belongs to
    fn.argtypes = [i, i, i, i, i, i, ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]
    fn.restype = None
    return fn


_gemm = _load()
AVAILABLE = _gemm is not None


def _operand(x: Tensor) -> tuple[int, int, Tensor]:
    """(transpose flag, leading dimension, x) for a [N, r, c] bf16 operand: MKL reads a matrix
    with unit stride along either dim; anything else is copied to contiguous first."""
    r, c = x.shape[-2:]
    if x.stride(-1) == 1 and x.stride(-2) >= max(1, c):
        return _NO_TRANS, x.stride(-2), x
    if x.stride(-2) == 1 and x.stride(-1) >= max(1, r):
        return _TRANS, x.stride(-1), x
    x = x.contiguous()
    return _NO_TRANS, max(1, c), x


def gemm_into(out: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """out = alpha * a @ b + beta * out, batched over dim 0, accumulated in fp32; returns out.

    out: [N, m, n] fp32 with unit-stride rows; a: [N, m, k], b: [N, k, n], bf16, either dim of
    each may have unit stride (transposed views need no copy); a batch dim of size 1 broadcasts.
    With beta = 0 out's old values are never read (it may be uninitialised).
    """
    if _gemm is None:
        raise RuntimeError("cblas_gemm_bf16bf16f32 is not available (check titans.ops.blas.AVAILABLE)")
    if out.dtype != torch.float32 or a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        raise TypeError(f"gemm_into wants fp32 out and bf16 operands, got {out.dtype}, {a.dtype}, {b.dtype}")
    if out.device.type != "cpu" or a.device.type != "cpu" or b.device.type != "cpu":
        raise ValueError("gemm_into runs on CPU tensors only")
    N, m, n = out.shape
    k = a.shape[-1]
    if a.shape[-2] != m or b.shape[-2:] != (k, n) or a.shape[0] not in (1, N) or b.shape[0] not in (1, N):
        raise ValueError(f"gemm_into shapes do not match: out {tuple(out.shape)}, a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}")
    if out.stride(-1) != 1 or out.stride(-2) < max(1, n):
        raise ValueError("gemm_into needs out with unit-stride rows")
    ta, lda, a = _operand(a)
    tb, ldb, b = _operand(b)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.mul_(beta) if beta else out.zero_()
    # pointers by stride arithmetic (indexing a[i] would build a view per call); a size-1 batch
    # dim broadcasts with step 0
    step = lambda x: x.stride(0) * x.element_size() if x.shape[0] > 1 else 0  # bytes per batch entry
    pa, pb, pc = a.data_ptr(), b.data_ptr(), out.data_ptr()
    sa, sb, sc = step(a), step(b), step(out)
    for i in range(N):
        _gemm(_ROW_MAJOR, ta, tb, m, n, k, alpha, pa + i * sa, lda, pb + i * sb, ldb, beta, pc + i * sc,
              out.stride(-2))
    return out
