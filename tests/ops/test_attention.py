"""Attention op: blocked == ref (outputs and gradients), ref == a per-query loop, causality, RoPE."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from titans.ops.attention import attention, rotary

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against the reference b (norm of difference over norm of b)."""
    a, b = a.double(), b.double()
    n = b.norm().item()
    return (a - b).norm().item() / n if n > 0 else (a - b).norm().item()


def make(B=2, H=2, Tq=9, Tk=9, D=4, Dv=6, Np=0, prefix_batch=1, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(dtype)
    q, k, v = r(B, H, Tq, D), r(B, H, Tk, D), r(B, H, Tk, Dv)
    if Np == 0:
        return q, k, v, None, None
    return q, k, v, r(prefix_batch, H, Np, D), r(prefix_batch, H, Np, Dv)


def loop_attention(q, k, v, window, pk, pv):
    """The definition, one query at a time: softmax over the prefix and the allowed keys."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out = torch.zeros(B, H, Tq, v.shape[3], dtype=q.dtype)
    for i in range(Tq):
        a = Tk - Tq + i
        lo = 0 if window is None else max(0, a - window + 1)
        keys, vals = k[:, :, lo:a + 1], v[:, :, lo:a + 1]
        if pk is not None:
            keys = torch.cat([pk.expand(B, -1, -1, -1), keys], dim=2)
            vals = torch.cat([pv.expand(B, -1, -1, -1), vals], dim=2)
        s = (keys @ q[:, :, i, :, None]).squeeze(-1) / math.sqrt(D)
        out[:, :, i] = (s.softmax(-1)[..., None] * vals).sum(2)
    return out


def run(impl, tensors, window, seed=1):
    """Output and gradients of a random linear probe of it w.r.t. every tensor input."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    o = attention(*leaves[:3], window=window, prefix_k=leaves[3], prefix_v=leaves[4], impl=impl)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype)).sum()
    inputs = [t for t in leaves if t is not None]
    return o.detach(), torch.autograd.grad(loss, inputs)


# (Tq, Tk, window, Np, prefix batch): square and cached, T not a multiple of w, w = 1, w >= T
CASES = [
    (13, 13, None, 0, 1), (13, 13, None, 3, 1), (13, 13, None, 3, 2), (5, 13, None, 2, 1),
    (1, 8, None, 2, 2), (13, 13, 4, 0, 1), (13, 13, 4, 3, 1), (13, 13, 4, 3, 2),
    (12, 12, 4, 2, 1), (5, 17, 4, 2, 1), (1, 17, 5, 1, 2), (13, 13, 1, 0, 1), (13, 13, 1, 2, 1),
    (13, 13, 13, 2, 1), (13, 13, 40, 2, 1), (6, 9, 3, 0, 1), (3, 3, 2, 1, 1),
]


@pytest.mark.parametrize("Tq,Tk,window,Np,pb", CASES)
def test_blocked_equals_ref_with_gradients(Tq, Tk, window, Np, pb):
    tensors = make(Tq=Tq, Tk=Tk, Np=Np, prefix_batch=pb, seed=Tq * 7 + Tk + Np)
    oa, ga = run("blocked", tensors, window)
    ob, gb = run("ref", tensors, window)
    assert rel(oa, ob) <= 1e-10
    assert len(ga) == len(gb) == (5 if Np else 3)
    for name, a, b in zip(["q", "k", "v", "prefix_k", "prefix_v"], ga, gb):
        assert a.shape == b.shape, name
        assert rel(a, b) <= 1e-10, f"grad {name}: {rel(a, b)}"


@pytest.mark.parametrize("Tq,Tk,window,Np,pb", CASES)
@pytest.mark.parametrize("B", [1, 2])
def test_blocked_without_autograd_equals_ref(Tq, Tk, window, Np, pb, B):
    # without autograd the windowed blocks go through the fused scaled_dot_product_attention
    tensors = make(B=B, Tq=Tq, Tk=Tk, Np=Np, prefix_batch=min(pb, B), seed=Tq * 5 + Tk + Np)
    with torch.no_grad():
        o = attention(*tensors[:3], window=window, prefix_k=tensors[3], prefix_v=tensors[4])
    assert rel(o, attention(*tensors[:3], window=window, prefix_k=tensors[3], prefix_v=tensors[4], impl="ref")) <= 1e-10
    f32 = [t.float() if t is not None else None for t in tensors]
    with torch.no_grad():
        o32 = attention(*f32[:3], window=window, prefix_k=f32[3], prefix_v=f32[4])
    assert rel(o32, o) <= 1e-5


@pytest.mark.parametrize("Tq,Tk,window,Np,pb", [(9, 9, None, 0, 1), (9, 9, 3, 2, 2), (4, 11, 3, 2, 1),
                                                (4, 11, None, 1, 1), (7, 7, 1, 0, 1)])
def test_ref_equals_per_query_loop(Tq, Tk, window, Np, pb):
    tensors = make(Tq=Tq, Tk=Tk, Np=Np, prefix_batch=pb, seed=3)
    o = attention(*tensors[:3], window=window, prefix_k=tensors[3], prefix_v=tensors[4], impl="ref")
    assert rel(o, loop_attention(*tensors[:3], window, tensors[3], tensors[4])) <= 1e-12


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_close_to_float64(window, dtype, tol):
    tensors = make(Tq=21, Tk=21, Np=2, dtype=dtype, seed=5)
    o = attention(*tensors[:3], window=window, prefix_k=tensors[3], prefix_v=tensors[4])
    ref = attention(*[t.double() for t in tensors[:3]], window=window, prefix_k=tensors[3].double(),
                    prefix_v=tensors[4].double(), impl="ref")
    assert o.dtype == dtype
    assert rel(o, ref) <= tol


@pytest.mark.parametrize("impl", ["blocked", "ref"])
@pytest.mark.parametrize("window", [None, 3])
def test_causality_and_window_by_perturbation(impl, window):
    Tq = Tk = 12
    q, k, v, pk, pv = make(Tq=Tq, Tk=Tk, Np=2, seed=9)
    base = attention(q, k, v, window=window, prefix_k=pk, prefix_v=pv, impl=impl)
    for j in (0, 5, 11):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, j] += 1.0
        v2[:, :, j] += 1.0
        o = attention(q, k2, v2, window=window, prefix_k=pk, prefix_v=pv, impl=impl)
        changed = (o - base).abs().amax(dim=(0, 1, 3)) > 1e-12        # [Tq]
        sees = torch.tensor([j <= i and (window is None or j > i - window) for i in range(Tq)])
        assert torch.equal(changed, sees), (j, changed, sees)


def test_windowed_memory_is_linear_in_length():
    """No intermediate of the windowed path is as large as a T x T matrix."""

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    T, w, Np = 2048, 8, 2
    q, k, v, pk, pv = make(B=1, H=1, Tq=T, Tk=T, D=2, Dv=2, Np=Np, dtype=torch.float32)
    q.requires_grad_()
    with Largest() as probe:
        o = attention(q, k, v, window=w, prefix_k=pk, prefix_v=pv)
        o.sum().backward()
    assert probe.numel <= T * (2 * w + Np)      # the [T/w, w, Np + 2w] scores
    assert probe.numel < T * T // 50


def test_rotary_relative_positions():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 1, 8, generator=gen, dtype=F64), torch.randn(1, 2, 1, 8, generator=gen, dtype=F64)
    at = lambda x, p: rotary(x, torch.tensor([p]))
    dot = lambda m, n: (at(q, m) * at(k, n)).sum(-1)
    for m, n, s in [(5, 2, 7), (0, 9, 100), (3, 3, 1000), (40000, 39990, 12345)]:
        assert torch.allclose(dot(m, n), dot(m + s, n + s), rtol=0, atol=1e-10)
    assert not torch.allclose(dot(5, 2), dot(2, 5))     # it does depend on m - n
    assert torch.equal(at(q, 0), q)                     # position 0 is the identity
    assert torch.allclose(at(q, 1234).norm(dim=-1), q.norm(dim=-1))


def test_rotary_hand_computed():
    """D = 4: pairs (0, 2) at frequency 1 and (1, 3) at frequency base^(-1/2) = 0.01."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64).view(1, 1, 1, 4)
    y = rotary(x, torch.tensor([3]), base=10000.0).flatten()
    a, b = 3.0, 0.03
    want = [1 * math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
            3 * math.cos(a) + 1 * math.sin(a), 4 * math.cos(b) + 2 * math.sin(b)]
    assert torch.allclose(y, torch.tensor(want, dtype=F64), atol=1e-14)
    assert rotary(x.bfloat16(), torch.tensor([3])).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_rotary_paths_agree_bit_for_bit(dtype):
    # with autograd (torch operations), without (C++ for fp32 on CPU, else torch in place), and the
    # rotate-half form it replaces; on a strided view as MAC's heads are, at positions past the
    # cached table's first range, and the gradient of the autograd path against the rotate-half's
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 300, 3, 16, generator=gen).to(dtype).transpose(1, 2)
    pos = torch.arange(4000, 4300)
    angles = pos.to(F64)[:, None] * 10000.0 ** (-torch.arange(0, 16, 2, dtype=F64) / 16)
    angles = torch.cat([angles, angles], -1)
    work = F64 if dtype == F64 else torch.float32
    xc = x.to(work)
    half = lambda t: torch.cat([-t[..., 8:], t[..., :8]], -1)
    ref = lambda t: (t * angles.cos().to(work) + half(t) * angles.sin().to(work)).to(dtype)
    with torch.no_grad():
        fast = rotary(x, pos)
    xg = x.detach().clone().requires_grad_()
    slow = rotary(xg, pos)
    assert torch.equal(fast, ref(xc)) and torch.equal(slow.detach(), fast)
    slow.float().square().sum().backward()
    xr = x.detach().clone().requires_grad_()
    ref(xr.to(work)).float().square().sum().backward()
    assert torch.equal(xg.grad, xr.grad)


def test_bad_inputs():
    q, k, v, pk, pv = make(Tq=4, Tk=6, Np=2)
    with pytest.raises(ValueError, match="impl"):
        attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=2.0)
    with pytest.raises(ValueError, match="q must"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="k must"):
        attention(q, k[:, :, :3], v[:, :, :3])          # fewer keys than queries
    with pytest.raises(ValueError, match="k must"):
        attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="v must"):
        attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="dtype"):
        attention(q, k.float(), v)
    with pytest.raises(ValueError, match="together"):
        attention(q, k, v, prefix_k=pk)
    with pytest.raises(ValueError, match="prefix_k"):
        attention(q, k, v, prefix_k=pk.expand(3, -1, -1, -1), prefix_v=pv.expand(3, -1, -1, -1))
    with pytest.raises(ValueError, match="prefix_v"):
        attention(q, k, v, prefix_k=pk, prefix_v=pv[:, :, :1])
    with pytest.raises(ValueError, match="D must|even"):
        rotary(q[..., :3], torch.arange(4))
    with pytest.raises(ValueError, match="positions"):
        rotary(q, torch.arange(4.0))
    with pytest.raises(ValueError, match="positions"):
        rotary(q, torch.arange(5))
    with pytest.raises(ValueError, match="base"):
        rotary(q, torch.arange(4), base=0.0)
