"""blas.gemm_into (bf16 operands, fp32 accumulation) against torch, and the op's use of it."""

from __future__ import annotations

import platform

import pytest
import torch

import titans.ops.blas as blas
import titans.ops.chunk as chunk
from titans.ops import memory_rule, native

from .test_memory_rule import make_inputs, rel

# the PyTorch x86-64 Linux wheels ship MKL: there the fast path must not silently go missing
ON_MKL_WHEEL = platform.system() == "Linux" and platform.machine() == "x86_64"
needs_mkl = pytest.mark.skipif(not blas.AVAILABLE, reason="cblas_gemm_bf16bf16f32 not in this torch build, "
                                                          "or turned off by TITANS_MKL_GEMM=0")


def test_available_on_x86_64_linux(monkeypatch):
    if not ON_MKL_WHEEL:
        pytest.skip("MKL ships with the x86-64 Linux wheels only")
    monkeypatch.delenv("TITANS_MKL_GEMM", raising=False)
    assert blas._load() is not None
    monkeypatch.setenv("TITANS_MKL_GEMM", "0")  # the documented switch turns it off
    assert blas._load() is None


def _bf16(*shape, gen):
    return torch.randn(*shape, generator=gen).bfloat16()


@needs_mkl
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("N_a,N_b", [(3, 3), (1, 3), (3, 1)])
def test_gemm_into_matches_fp32_product_of_the_bf16_operands(trans_a, trans_b, N_a, N_b):
    gen = torch.Generator().manual_seed(0)
    N, m, k, n = 3, 37, 19, 45
    a = _bf16(N_a, k, m, gen=gen).mT if trans_a else _bf16(N_a, m, k, gen=gen)
    b = _bf16(N_b, n, k, gen=gen).mT if trans_b else _bf16(N_b, k, n, gen=gen)
    c0 = torch.randn(N, m, n, generator=gen)
    want = -0.5 * (a.double() @ b.double()) + 0.25 * c0.double()  # exact products of the bf16 values
    got = blas.gemm_into(c0.clone(), a, b, alpha=-0.5, beta=0.25)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() <= 1e-5   # fp32 accumulation, not bf16 rounding
    # beta = 0 never reads out: NaNs in it must not leak
    got0 = blas.gemm_into(torch.full((N, m, n), float("nan")), a, b)
    assert torch.allclose(got0.double(), a.double() @ b.double(), atol=1e-5, rtol=0)


@needs_mkl
def test_gemm_into_strided_views_and_sliced_out():
    gen = torch.Generator().manual_seed(1)
    ws = _bf16(2, 12, 7, gen=gen)                       # a [W; S]-like state: row blocks are views
    h = _bf16(2, 5, 7, gen=gen)
    out = torch.zeros(2, 5, 20)[..., 3:9]               # rows with unit stride, leading stride 20
    blas.gemm_into(out, h, ws[:, 6:].mT)
    assert torch.allclose(out.double(), h.double() @ ws[:, 6:].mT.double(), atol=1e-5, rtol=0)
    # neither dim has unit stride: copied first, same result
    odd = _bf16(2, 14, 10, gen=gen)[:, ::2, ::2]        # [2, 7, 5]
    got = blas.gemm_into(torch.empty(2, 5, 5), h, odd)
    assert torch.allclose(got.double(), h.double() @ odd.double(), atol=1e-5, rtol=0)


@needs_mkl
def test_gemm_into_rejects_bad_input():
    a, b = torch.zeros(1, 2, 3, dtype=torch.bfloat16), torch.zeros(1, 3, 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bf16"):
        blas.gemm_into(torch.zeros(1, 2, 4), a.float(), b)
    with pytest.raises(TypeError, match="fp32"):
        blas.gemm_into(torch.zeros(1, 2, 4, dtype=torch.float64), a, b)
    with pytest.raises(ValueError, match="shapes"):
        blas.gemm_into(torch.zeros(1, 2, 5), a, b)
    with pytest.raises(ValueError, match="unit-stride"):
        blas.gemm_into(torch.zeros(1, 4, 2).mT, a, b)


@needs_mkl
def test_op_uses_mixed_gemm_under_autocast_and_agrees_with_torch_matmuls(monkeypatch):
    # the op's bf16 path through gemm_into against the same path through torch's bf16 matmuls
    # (blas unavailable): both round the same operands to bf16, so they agree far inside the
    # documented bf16 tolerance, forward and backward. The Python path: the C++ one (native.py)
    # calls MKL itself and is compared with this one in test_native.py
    monkeypatch.setattr(native, "available", lambda *a: False)
    monkeypatch.setattr(chunk, "BF16_MIN_MATRIX", 0)
    tensors, weights = make_inputs(T=70, Dk=16, Dv=16, depth=2, dtype=torch.float32, seed=3)
    calls = []
    real = blas.gemm_into
    monkeypatch.setattr(blas, "gemm_into", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = {}
    for available in (True, False):
        monkeypatch.setattr(blas, "AVAILABLE", available)
        xs = [t.clone().requires_grad_() for t in tensors + weights]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, state = memory_rule(*xs[:6], xs[6:], chunk_size=8)
        grads = torch.autograd.grad(y.square().sum(), xs)
        out[available] = (y, state, grads)
        assert bool(calls) == available
        calls.clear()
    (y1, s1, g1), (y0, s0, g0) = out[True], out[False]
    assert all(w.dtype == torch.float32 for w in s1.weights + s1.momentum)
    assert rel(y1, y0) <= 1e-2
    assert all(rel(a, b) <= 2e-2 for a, b in zip(s1.weights + s1.momentum, s0.weights + s0.momentum))
    assert all(rel(a, b) <= 2e-2 for a, b in zip(g1, g0))
