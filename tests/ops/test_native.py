"""The C++ chunk path (titans/ops/native.py) against the Python one it replaces, and its fallback."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

import titans.ops.chunk as chunk
import titans.ops.chunk_backward as cb
from titans.ops import memory_rule, native

from .test_memory_rule import make_inputs, rel, run_with_grads


def test_built_where_it_should_be():
    # on the machines this project runs on (Linux x86-64 with a C++ compiler) the module must
    # build: a silent fallback would hide a broken build behind passing tests
    if platform.system() == "Linux" and platform.machine() == "x86_64" and shutil.which("c++") \
            and os.environ.get("TITANS_NATIVE", "1") != "0":
        assert native.module() is not None
        assert native.available("silu", torch.zeros(2))
    assert not native.available("gelu", torch.zeros(2))
    assert not native.available("silu", torch.zeros(2, dtype=torch.float64))


def _run(monkeypatch, use_native: bool, tensors, weights, bf16: bool, **kw):
    if not use_native:
        monkeypatch.setattr(native, "available", lambda *a: False)
    calls = []
    real = native.module
    monkeypatch.setattr(native, "module", lambda: calls.append(1) or real())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = run_with_grads("chunk", tensors, weights, **kw)
    monkeypatch.undo()
    assert bool(calls) == use_native, "the native path was (not) taken"
    return out


def _assert_close(a, b, tol):
    (ya, sa, ga), (yb, sb, gb) = a, b
    assert rel(ya, yb) <= tol, f"y: {rel(ya, yb)}"
    for field in ("weights", "momentum", "chunk_start"):
        for x, y in zip(getattr(sa, field), getattr(sb, field)):
            assert rel(x, y) <= tol, f"state.{field}: {rel(x, y)}"
    for i, (x, y) in enumerate(zip(ga, gb)):
        assert torch.isfinite(x).all() and rel(x, y) <= tol, f"grad {i}: {rel(x, y)}"


@pytest.mark.skipif(native.module() is None, reason="the C++ chunk path is not built here (see test above)")
@pytest.mark.parametrize("mode", ["keep-all", "rebuild", "keep-internals"])
@pytest.mark.parametrize("depth,residual,chunk_size,T", [(1, False, 8, 61), (2, False, 8, 61), (2, True, 64, 150),
                                                         (3, True, 5, 37)])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("normalize_step", [False, True], ids=["plain", "normalized"])
def test_native_equals_python(monkeypatch, mode, depth, residual, chunk_size, T, bf16, normalize_step):
    # outputs, final state and every gradient; bf16 matmuls forced at test sizes. Both paths
    # round the same operands to bf16 and use the same products: they differ by fp32 summation
    # order, and under bf16 by the operands that order rounds the other way (bf16 against fp32
    # itself differs by ~1e-2 here)
    tensors, weights = make_inputs(T=T, depth=depth, Dk=16, Dv=16, dtype=torch.float32, seed=depth + T)
    runs = []
    for use_native in (True, False):
        monkeypatch.setattr(chunk, "BF16_MIN_MATRIX", 0)
        monkeypatch.setattr(cb, "KEEP_ALL_BYTES", 2 ** 28 if mode == "keep-all" else 0)
        monkeypatch.setattr(cb, "KEEP_INTERNALS_MIN_MATRIX", 0 if mode == "keep-internals" else 2 ** 62)
        runs.append(_run(monkeypatch, use_native, tensors, weights, bf16, chunk_size=chunk_size, residual=residual,
                         normalize_step=normalize_step))
    _assert_close(*runs, 2e-3 if bf16 else 1e-5)


@pytest.mark.skipif(native.module() is None, reason="the C++ chunk path is not built here")
def test_native_resuming_mid_chunk_equals_python(monkeypatch):
    # a call that starts inside a chunk takes its first piece's gradients at the chunk-start
    # weights (the native backward's Wg_given branch)
    tensors, weights = make_inputs(T=40, depth=2, dtype=torch.float32, seed=9)
    _, state = memory_rule(*(t[:, :3] for t in tensors), weights, chunk_size=8)
    grads = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(native, "available", lambda *a: False)
        a = [t[:, 3:].clone().requires_grad_() for t in tensors]
        st = type(state)([x.clone().requires_grad_() for x in state.weights], list(state.momentum),
                         [x.clone().requires_grad_() for x in state.chunk_start], state.position)
        y, _ = memory_rule(*a, weights, chunk_size=8, state=st)
        grads.append([y] + list(torch.autograd.grad(y.square().sum(), a + st.weights + st.chunk_start)))
        monkeypatch.undo()
    for x, y in zip(*grads):
        assert rel(x, y) <= 1e-5


@pytest.mark.skipif(native.module() is None, reason="the C++ chunk path is not built here")
@pytest.mark.parametrize("depth,residual,chunk_size", [(1, False, 8), (2, False, 8), (2, True, 5), (3, False, 16)])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("normalize_step", [False, True], ids=["plain", "normalized"])
def test_native_inference_scan_equals_python(monkeypatch, depth, residual, chunk_size, bf16, normalize_step):
    # without autograd the loop over pieces runs in C++ (scan_inference): outputs and states as the
    # Python loop gives them, over calls that start and end inside chunks
    tensors, weights = make_inputs(T=61, depth=depth, Dk=16, Dv=16, dtype=torch.float32, seed=depth + chunk_size)
    monkeypatch.setattr(chunk, "BF16_MIN_MATRIX", 0)
    kw = dict(chunk_size=chunk_size, residual=residual, normalize_step=normalize_step)
    runs, calls = [], []
    scan = native.module().scan_inference
    monkeypatch.setattr(native.module(), "scan_inference", lambda *a: calls.append(1) or scan(*a))
    for use_native in (True, False):   # the loop in C++, in Python (both with the native pieces)
        monkeypatch.setattr(chunk, "NATIVE_SCAN", use_native)
        ys, state = [], None
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for lo, hi in ((0, 3), (3, 30), (30, 61)):
                y, state = memory_rule(*(t[:, lo:hi] for t in tensors), weights, state=state, **kw)
                ys.append(y)
        runs.append((torch.cat(ys, 1), state))
        assert len(calls) == 3, "the C++ loop ran for the three calls, the Python loop for none"
    (ya, sa), (yb, sb) = runs
    tol = 2e-3 if bf16 else 1e-6
    assert rel(ya, yb) <= tol
    for field in ("weights", "momentum", "chunk_start"):
        for x, y in zip(getattr(sa, field), getattr(sb, field)):
            assert rel(x, y) <= tol, field


def test_switched_off_by_environment():
    code = "from titans.ops import native; import torch; print(native.available('silu', torch.zeros(1)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TITANS_NATIVE": "0"})
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(native.module() is None, reason="the C++ chunk path is not built here")
def test_native_takes_any_strides(monkeypatch):
    # inputs with a strided last dim, an expanded output gradient (from y.sum()) and a transposed
    # state gradient: the native path must give what the Python path gives
    tensors, weights = make_inputs(T=37, Dk=8, Dv=8, depth=2, dtype=torch.float32, seed=4)
    wide = [torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2) if t.dim() == 4 else t for t in tensors]
    grads = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(native, "available", lambda *a: False)
        xs = [t.clone().requires_grad_() for t in wide]
        ins = [x[..., ::2] if x.dim() == 4 else x for x in xs]  # last-dim stride 2
        y, state = memory_rule(*ins, weights, chunk_size=8)
        loss = y.sum() + (state.weights[0] * torch.randn(state.weights[0].mT.shape, generator=torch.Generator()
                                                         .manual_seed(0)).mT).sum()
        grads.append(torch.autograd.grad(loss, xs))
        monkeypatch.undo()
    for a, b in zip(*grads):
        assert rel(a, b) <= 1e-5


@pytest.mark.skipif(native.module() is None, reason="the C++ chunk path is not built here")
@pytest.mark.parametrize("rows,cols,n", [(385, 97, 64), (7, 33, 5), (1, 16, 1)])
def test_native_state_update_odd_shapes(rows, cols, n):
    # the fp32 update's register tiles (6 rows x 32 columns) with partial tiles on both edges,
    # several batch entries, against chunk.advance_state's Python code
    g = torch.Generator().manual_seed(rows)
    BH = 3
    WS = [torch.randn(BH, 2 * rows, cols, generator=g), torch.randn(BH, 2 * cols, rows, generator=g)]
    a = [torch.randn(BH, n, cols, generator=g), torch.randn(BH, n, rows, generator=g)]
    delta = [torch.randn(BH, n, rows, generator=g), torch.randn(BH, n, cols, generator=g)]
    theta, eta, alpha = torch.rand(3, BH, n, generator=g)
    gates = chunk.chunk_gates(theta * 0.1, 0.5 + 0.5 * eta, 0.01 * alpha)
    setup = chunk.Setup(chunk.ACTIVATIONS["silu"], False, torch.float32, torch.float32)
    want = chunk.advance_state(WS, a, delta, gates, setup)
    got = native.module().advance_state(WS, a, delta, *gates, [torch.empty_like(w) for w in WS], False)
    for x, y in zip(got, want):
        assert rel(x, y) <= 1e-6


@pytest.mark.skipif(native.module() is None, reason="the C++ chunk path is not built here")
@pytest.mark.parametrize("case", ["random", "zeros", "no-decay", "underflow"])
def test_native_gates_equal_python(case):
    # the gate products from their recurrences (C++, fp32) and their hand-written backward
    # against the Python code in fp64 (itself held to autograd in test_memory_rule.py): zeros of
    # eta and 1 - alpha, no decay at all, and products that underflow and get flushed
    g = torch.Generator().manual_seed(11)
    theta, eta, alpha = (torch.rand(3, 2, 37, generator=g, dtype=torch.float64) for _ in range(3))
    if case == "zeros":
        eta[..., 3], alpha[..., 5], theta[..., 2] = 0, 1, 0
    elif case == "no-decay":
        eta.fill_(1), alpha.fill_(0)
    elif case == "underflow":
        eta.fill_(1e-3), alpha.fill_(0.9)
    want = chunk.chunk_gates(theta, eta, alpha)
    got = chunk.chunk_gates(theta.float(), eta.float(), alpha.float(), use_native=True)
    for x, y in zip(got, want):
        assert x.dtype == torch.float32 and x.shape == y.shape
        assert (x.double() - y).abs().max() <= 1e-5 * y.abs().max() + 2.0 ** -80
    d = chunk.ChunkGates(*(torch.randn(x.shape, generator=g, dtype=torch.float64) for x in want))
    want = chunk.chunk_gates_backward(theta, eta, alpha, d)
    got = chunk.chunk_gates_backward(theta.float(), eta.float(), alpha.float(),
                                     chunk.ChunkGates(*(x.float() for x in d)), use_native=True)
    for x, y in zip(got, want):
        assert rel(x.double(), y) <= 1e-5


@pytest.mark.skipif(native.module() is None, reason="the C++ chunk path is not built here")
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_native_equals_python_at_full_size(monkeypatch, bf16):
    # config (a)'s memory (1 head of 384, hidden 1536) on two threads: the sizes at which the C++
    # path splits the state into several cache-sized blocks per thread (the tests above fit in one)
    monkeypatch.setattr(cb, "KEEP_ALL_BYTES", 0)  # the rebuild with kept internals, as at this size
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tensors, weights = make_inputs(B=1, T=70, H=1, Dk=384, Dv=384, expansion=4, dtype=torch.float32, seed=2)
        runs = [_run(monkeypatch, use_native, tensors, weights, bf16, chunk_size=64) for use_native in (True, False)]
    finally:
        torch.set_num_threads(threads)
    _assert_close(*runs, 2e-3 if bf16 else 1e-5)
