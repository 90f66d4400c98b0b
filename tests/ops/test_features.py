"""The fused input (conv, SiLU (or linear q and k), L2 norm) and output (RMSNorm, SiLU gate) paths of the memory layer
against the same math through plain autograd: values, every gradient, gradcheck, layout."""

from __future__ import annotations

import pytest
import torch

from titans.ops import features
from titans.ops.features import gated_rms_norm, gated_rms_norm_ref, qkv_features, qkv_features_ref

H, DH = 2, 3
C = 3 * H * DH


def _qkv_args(K: int | None, T: int = 7, seed: int = 0, dtype=torch.float64):
    """[u, past, weight, bias] (past, weight, bias None without conv)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(2, T, C, generator=g, dtype=dtype)
    if K is None:
        return [u, None, None, None]
    return [u, torch.randn(2, K - 1, C, generator=g, dtype=dtype), torch.randn(C, K, generator=g, dtype=dtype),
            torch.randn(C, generator=g, dtype=dtype)]


def _outputs_and_grads(fn, args, extra, seed=1):
    leaves = [a.clone().requires_grad_() if a is not None else None for a in args]
    outs = fn(*leaves, *extra)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    # drawn in fp64 whatever the outputs' dtype, so runs in two dtypes get the same probes
    douts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [x for x in leaves if x is not None], douts)
    return outs, grads


@pytest.mark.parametrize("qk_silu", [True, False])
@pytest.mark.parametrize("block", [256, 3])   # 3: the 7 tokens span three blocks
@pytest.mark.parametrize("K", [None, 1, 4])
def test_qkv_features_match_autograd(K, block, qk_silu, monkeypatch):
    monkeypatch.setattr(features, "BLOCK", block)
    args = _qkv_args(K)
    (outs, grads), (ref_outs, ref_grads) = (_outputs_and_grads(fn, args, (H, qk_silu))
                                            for fn in (qkv_features, qkv_features_ref))
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    q, k, v = outs
    assert q.shape == (2, 7, H, DH)
    assert (q.norm(dim=-1) < 1).all()   # s / sqrt(|s|^2 + eps): never above unit norm
    # q, k, v share one [3, B, H, T, Dh] buffer: the memory rule's [B H, T, Dh] layout is a view
    assert q.transpose(1, 2).is_contiguous() and q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()


@pytest.mark.parametrize("qk_silu", [True, False])
def test_qkv_features_gradcheck_and_zero_rows(qk_silu, monkeypatch):
    monkeypatch.setattr(features, "BLOCK", 3)
    args = [a.requires_grad_() for a in _qkv_args(3, T=4, seed=2)]   # u, past, weight, bias
    assert torch.autograd.gradcheck(lambda *a: qkv_features(*a, H, qk_silu), tuple(args))
    # a row that is exactly zero (the first key under key_shift): a zero key whose gradient is
    # dy / sqrt(eps), bounded, not F.normalize's dy / 1e-12 (the ~1e9 first-step gradient)
    u = torch.zeros(1, 2, C, dtype=torch.float64)
    # seeded, with an entry above 0.5 in every q and k head: unseeded, a head whose entries were all
    # negative went through the SiLU to ~0 and failed the unit-norm check below (about 1 run in 4)
    u[:, 1] = 100 * torch.randn(C, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (o, g), (ro, rg) = (_outputs_and_grads(fn, [u, None, None, None], (H, qk_silu))
                        for fn in (qkv_features, qkv_features_ref))
    for a, b in zip(o + g, ro + rg):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(o[1][:, 0], torch.zeros_like(o[1][:, 0]))
    assert g[0][:, 0, :2 * H * DH].abs().max() <= 4 * features.NORM_EPS ** -0.5
    # a row far above the eps: unit norm
    torch.testing.assert_close(o[0][:, 1].norm(dim=-1), torch.ones(1, H, dtype=u.dtype), rtol=1e-5, atol=0)


def test_qkv_features_causal():
    u, past, w, b = _qkv_args(4, T=6, seed=3)
    q = qkv_features(u, past, w, b, H)[0]
    u2 = u.clone()
    u2[:, 4] += 1.0
    q2 = qkv_features(u2, past, w, b, H)[0]
    assert torch.equal(q[:, :4], q2[:, :4]) and not torch.equal(q[:, 4], q2[:, 4])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gated_rms_norm_matches_autograd(dtype):
    g = torch.Generator().manual_seed(4)
    # r as the memory rule returns it: a [B, T, H, Dh] view of a [B, H, T, Dh] tensor
    args = [torch.randn(2, H, 5, DH, generator=g, dtype=dtype).transpose(1, 2),
            torch.randn(H, DH, generator=g, dtype=dtype), torch.randn(2, 5, H * DH, generator=g, dtype=dtype)]
    (o, gr), (ro, rg) = (_outputs_and_grads(fn, args, ()) for fn in (gated_rms_norm, gated_rms_norm_ref))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(o + gr, ro + rg):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert o[0].shape == (2, 5, H * DH)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(gated_rms_norm, tuple(a.detach().requires_grad_() for a in args))


def test_gated_rms_norm_bf16_inputs_give_fp32():
    r = torch.randn(1, 3, H, DH, dtype=torch.bfloat16, requires_grad=True)
    gate = torch.randn(1, 3, H * DH, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(H, DH, requires_grad=True)
    out = gated_rms_norm(r, w, gate)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert r.grad.dtype == torch.bfloat16 and gate.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    # the reference rounds SiLU(gate) to bf16 (torch's bf16 op), the C++ path keeps it in fp32:
    # they agree to bf16's resolution, and each to the fp64 value of the same inputs
    ref64 = gated_rms_norm_ref(r.double(), w.double(), gate.double())
    for x in (out, gated_rms_norm_ref(r, w, gate)):
        torch.testing.assert_close(x.double(), ref64, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(features.native.module() is None, reason="the C++ path is not built here (tests/ops/test_native.py)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("K", [None, 4])
@pytest.mark.parametrize("qk_silu", [True, False])
def test_native_qkv_features_match_autograd(K, dtype, tol, qk_silu):
    # the C++ input path (fp32 inside) against the fp64 reference; bf16 inputs and outputs round
    # at ~4e-3, so their tolerance is the dtype's, not the arithmetic's
    H4, D4 = 4, 20  # Dh not a multiple of 16: the vector loops' tails
    args = [a.to(dtype) if a is not None else None for a in _qkv_args(K, T=45, seed=3)]
    args[0] = torch.randn(2, 45, 3 * H4 * D4, generator=torch.Generator().manual_seed(4)).to(dtype)
    if K is None:
        args[0][:, 0] = 0  # a zero row: its norms are clamped (F.normalize's eps)
    if K is not None:
        g = torch.Generator().manual_seed(5)
        args[1:] = [torch.randn(2, K - 1, 3 * H4 * D4, generator=g).to(dtype),
                    torch.randn(3 * H4 * D4, K, generator=g).to(dtype), torch.randn(3 * H4 * D4, generator=g).to(dtype)]
    assert features.native.features_available(*args)
    outs, grads = _outputs_and_grads(qkv_features, args, (H4, qk_silu))
    ref_outs, ref_grads = _outputs_and_grads(qkv_features_ref, [a.double() if a is not None else None for a in args],
                                             (H4, qk_silu))
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        assert a.dtype == dtype
        assert ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item() <= tol
