"""RMSNorm, SwiGLU and PersistentMemory against their formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from titans.layers import PersistentMemory, RMSNorm, SwiGLU

F64 = torch.float64


def test_rmsnorm_formula_and_gradient():
    torch.manual_seed(0)
    norm = RMSNorm(6, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(2, 3, 6, dtype=F64)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 7.0, dtype=F64)
    assert torch.allclose(norm(x), want, rtol=1e-13, atol=0)
    # hand value: x = [3, 4] has mean square 12.5
    y = RMSNorm(2, eps=0.0)(torch.tensor([3.0, 4.0]))
    assert torch.allclose(y, torch.tensor([3.0, 4.0]) / 12.5 ** 0.5)
    norm(x).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_rmsnorm_low_precision_computes_in_float32():
    torch.manual_seed(0)
    norm = RMSNorm(8)
    # a bf16 mean of squares would round; the float32 one, cast at the end, gives exactly this
    x = torch.randn(4, 8).mul(300.0).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    want = norm(x.float()).bfloat16()
    assert torch.equal(y, want)


def test_swiglu_formula():
    torch.manual_seed(1)
    mlp = SwiGLU(5, 7).double()
    x = torch.randn(2, 4, 5, dtype=F64)
    gate, up = mlp.w_in.weight[:7], mlp.w_in.weight[7:]
    want = (F.silu(x @ gate.T) * (x @ up.T)) @ mlp.w_out.weight.T
    assert torch.allclose(mlp(x), want, rtol=1e-12, atol=1e-14)
    assert all(m.bias is None for m in (mlp.w_in, mlp.w_out))
    assert sum(p.numel() for p in mlp.parameters()) == 3 * 5 * 7


def test_persistent_memory():
    torch.manual_seed(2)
    pm = PersistentMemory(4000, 8)
    t = pm()
    assert t.shape == (4000, 8) and t.requires_grad
    assert abs(t.std().item() - 0.02) < 0.002
    empty = PersistentMemory(0, 8)()
    assert empty.shape == (0, 8)


def test_bad_inputs():
    with pytest.raises(ValueError, match="dim"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(4, eps=-1.0)
    with pytest.raises(ValueError, match="x must end in dim=4"):
        RMSNorm(4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="hidden"):
        SwiGLU(4, 0)
    with pytest.raises(ValueError, match="x must end in dim=4"):
        SwiGLU(4, 8)(torch.randn(3, 3))
    with pytest.raises(ValueError, match="n_tokens"):
        PersistentMemory(-1, 4)
    with pytest.raises(ValueError, match="dim"):
        PersistentMemory(2, 0)
