"""The memory layer's elementwise input and output paths, fused, with backwards that recompute.

Shape legend
    B batch, T tokens, H heads, Dh head dim, C = 3 H Dh (q, k and v channels), K conv taps
    u: [B, T, C], the projected input x W_qkv   past: [B, K - 1, C], the K - 1 inputs before it
    q, k, v: [B, T, H, Dh]   r: [B, T, H, Dh] (a memory read)   g, out: [B, T, H Dh]

Input path (docs/design.md §2):  q, k, v = SiLU(causal depthwise conv(x W_qkv)), q and k L2-normalised
per head; with qk_silu=False q and k skip the SiLU (linear features, centred: docs/models.md). Output path: out = RMSNorm(r) * weight * SiLU(g), per head.

Through autograd, every elementwise step keeps its own full-size input until the backward:
at T=4096 and dim 384, 54 MB on the input path (the conv's input and output, the SiLU output)
and 30 MB on the output path, and the memory rule copied q, k, v into its own layout again
(`python benchmarks/layer_memory.py` lists what is saved). These two functions keep only their inputs
(and per-token norms) and recompute the rest in the backward, where it costs a few elementwise
passes; the input path also works in blocks of tokens, so that its temporaries stay small. `qkv_features` also writes q, k, v into one [3, B, H, T, Dh] buffer, so that the memory
rule's [B H, T, Dh] layout is a view of it, not a copy. The `_ref` twins are the same math through
plain autograd, for the tests.

On CPU with fp32 or bf16 tensors both functions run their forward and backward in C++ instead
(native.py; one pass per token, fp32 inside; 1.7-5x faster at T=4096, ad-hoc timing), with the torch code below as
the fallback; the tests hold both to the `_ref` twins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .conv import causal_conv_ref, conv_backward, conv_forward

__all__ = ["qkv_features", "qkv_features_ref", "gated_rms_norm", "gated_rms_norm_ref", "l2norm"]

# q and k are normalised as s / sqrt(|s|^2 + NORM_EPS), the eps inside the root (as
# flash-linear-attention's l2norm, which uses 1e-6). The eps bounds the normalisation's gradient
# by 1 / sqrt(NORM_EPS) = 10 where a key is zero: with key_shift the first token's key reads the
# conv's empty (zero) past, and F.normalize's max(|s|, 1e-12) turned that zero key into an outer
# gradient of ~1e9 at the first step (docs/models.md, "The first step's gradient"). Typical
# |s| is ~1 at init (0.9 at the tiny preset), so an ordinary key keeps ~99.5% of its unit norm.
NORM_EPS = 1e-2
RMS_EPS = 1e-6


# Tokens per block: both passes of the input path run over blocks of the sequence, so that their
# temporaries (the conv output, its SiLU, the sigmoid, ...) are block-sized, not [B, T, 3 H Dh].
BLOCK = 256


def _split(s: Tensor, heads: int) -> Tensor:
    """[B, T, 3 H Dh] -> [3, B, H, T, Dh] (a view)."""
    B, T, C = s.shape
    return s.view(B, T, 3, heads, C // (3 * heads)).permute(2, 0, 3, 1, 4)


def _blocks(T: int):
    return [(t0, min(T, t0 + BLOCK)) for t0 in range(0, T, BLOCK)]


def _rows(past: Tensor | None, u: Tensor, lo: int, hi: int) -> Tensor:
    """Rows lo..hi-1 of xp = [past; u] without building xp: a view of u except near the start."""
    P = 0 if past is None else past.shape[1]
    if lo >= P:
        return u[:, lo - P:hi - P]
    return torch.cat([past[:, lo:], u[:, :hi - P]], dim=1)


def _qkv_forward(u: Tensor, past: Tensor | None, weight: Tensor | None, bias: Tensor | None, heads: int,
                 qk_silu: bool) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, bool]:
    """The input path's forward: ((q, k, v) [B, T, H, Dh] each, the q and k norms [2, B, H, T, 1], native?)."""
    if native.features_available(u, past, weight, bias) and u.stride(-1) == 1:
        # the same math in one C++ pass per token (native.py), in fp32 inside
        out, norm = native.module().qkv_forward(u, _rows_contiguous(past), *_native_conv(weight, bias), heads, qk_silu)
        return tuple(o.transpose(1, 2) for o in out), norm, True
    B, T, C = u.shape
    K = 1 if weight is None else weight.shape[1]
    out = u.new_empty(3, B, heads, T, C // (3 * heads))  # contiguous: [B H, T, Dh] is a view
    norm = u.new_empty(2, B, heads, T, 1)
    for t0, t1 in _blocks(T):
        # a block of our own (the conv's output, or a copy of u), so that the SiLU runs in place
        s = u[:, t0:t1].clone() if weight is None else conv_forward(_rows(past, u, t0, t1 + K - 1), weight, bias)
        s = _split(s, heads)                                        # [3, B, H, n, Dh]
        F.silu(s if qk_silu else s[2], inplace=True)
        norm[:, :, :, t0:t1] = torch.linalg.vector_norm(s[:2], dim=-1, keepdim=True).square_().add_(NORM_EPS).sqrt_()
        torch.div(s[:2], norm[:, :, :, t0:t1], out=out[:2, :, :, t0:t1])
        out[2, :, :, t0:t1] = s[2]
    return tuple(o.transpose(1, 2) for o in out), norm, False                   # each [B, T, H, Dh]


class _QKVFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, past: Tensor | None, weight: Tensor | None, bias: Tensor | None, heads: int,
                qk_silu: bool):
        ctx.heads, ctx.qk_silu = heads, qk_silu
        out, norm, ctx.native = _qkv_forward(u, past, weight, bias, heads, qk_silu)
        ctx.save_for_backward(u, past, weight, bias, norm)
        return out

    @staticmethod
    def backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor):
        u_in, past, weight, bias, norm = ctx.saved_tensors
        if ctx.native:
            return _native_backward(ctx, u_in, past, weight, bias, norm, dq, dk, dv)
        B, T, C = u_in.shape
        K = 1 if weight is None else weight.shape[1]
        P = K - 1
        needs = ctx.needs_input_grad[:4]
        # the gradient of xp = [past; u], one buffer: du and dpast are views of it
        dxp = u_in.new_zeros(B, P + T, C) if needs[0] or needs[1] else None
        dw = db = None
        for t0, t1 in _blocks(T):
            xp = None if weight is None else _rows(past, u_in, t0, t1 + P)
            u = u_in[:, t0:t1] if weight is None else conv_forward(xp, weight, bias)
            sig = torch.sigmoid(u)
            du = torch.empty_like(u)
            d = _split(du, ctx.heads)
            nb = norm[:, :, :, t0:t1]
            # q and k: y = s / n, n = sqrt(|s|^2 + eps)  ->  ds = (dy - y <y, dy>) / n
            y = _split(u * sig, ctx.heads)[:2].div_(nb) if ctx.qk_silu else _split(u, ctx.heads)[:2] / nb
            for i, dy in enumerate((dq, dk)):
                dy = dy[:, t0:t1].transpose(1, 2)                       # [B, H, n, Dh]
                dot = torch.linalg.vecdot(y[i], dy).unsqueeze(-1)
                torch.sub(dy, y[i] * dot, out=d[i]).div_(nb[i])
            d[2] = dv[:, t0:t1].transpose(1, 2)
            silu_grad = sig.neg().add_(1).mul_(u).add_(1).mul_(sig)    # SiLU'(u) = sig (1 + u (1 - sig))
            if ctx.qk_silu:
                du.mul_(silu_grad)
            else:
                d[2].mul_(_split(silu_grad, ctx.heads)[2])
            if weight is None:
                if dxp is not None:
                    dxp[:, t0:t1] = du
                continue
            gx, gw, gb = conv_backward(du, xp, weight, (dxp is not None, needs[2], needs[3]))
            if gx is not None:
                dxp[:, t0:t1 + P] += gx
            dw = gw if dw is None or gw is None else dw + gw
            db = gb if db is None or gb is None else db + gb
        du_in = dxp[:, P:] if dxp is not None and needs[0] else None
        dpast = dxp[:, :P] if dxp is not None and needs[1] else None
        return du_in, dpast, dw, db, None, None


def _rows_contiguous(x: Tensor | None) -> Tensor | None:
    """x with unit-stride rows (the C++ path reads token rows; the conv state arrives transposed)."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _native_conv(weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The conv's taps as [K, C] fp32 and its bias as fp32, as the C++ input path takes them."""
    if weight is None:
        return None, None
    return weight.t().float().contiguous(), bias.float()


def _native_backward(ctx, u, past, weight, bias, norm, dq, dk, dv):
    """_QKVFeatures.backward through the C++ input path; gradients in their inputs' dtypes."""
    grads = [None if g is None else g.to(u.dtype) for g in (dq, dk, dv)]
    dxp, dw, db, _ = native.module().qkv_backward(u, _rows_contiguous(past), *_native_conv(weight, bias), norm,
                                                  *grads, ctx.heads, ctx.qk_silu)
    needs = ctx.needs_input_grad
    if weight is None:
        return (dxp.to(u.dtype) if needs[0] else None), None, None, None, None, None
    P = weight.shape[1] - 1
    return ((dxp[:, P:].to(u.dtype) if needs[0] else None), (dxp[:, :P].to(past.dtype) if needs[1] else None),
            (dw.to(weight.dtype) if needs[2] else None), (db.to(bias.dtype) if needs[3] else None), None, None)


def qkv_features(u: Tensor, past: Tensor | None, weight: Tensor | None, bias: Tensor | None, heads: int,
                 qk_silu: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [B, T, H, Dh] from the projected input u [B, T, 3 H Dh].

    past: the K - 1 projected inputs before u, [B, K - 1, 3 H Dh] (zeros at the sequence start);
    weight [C, K], bias [C]: the depthwise conv. weight None: no convolution (past and bias
    None too). qk_silu: False leaves q and k linear before their L2 norm (v keeps its SiLU).
    q, k, v are views of one [3, B, H, T, Dh] buffer (see the module doc).
    """
    if not _needs_grad(u, past, weight, bias):   # inference: no autograd node, nothing saved
        return _qkv_forward(u, past, weight, bias, heads, qk_silu)[0]
    return _QKVFeatures.apply(u, past, weight, bias, heads, qk_silu)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def qkv_features_ref(u: Tensor, past: Tensor | None, weight: Tensor | None, bias: Tensor | None, heads: int,
                     qk_silu: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The same through plain autograd (the reference for the tests)."""
    if weight is not None:
        u = causal_conv_ref(torch.cat([past, u], dim=1), weight, bias)
    B, T, C = u.shape
    q, k, v = u.view(B, T, 3, heads, C // (3 * heads)).unbind(2)
    q, k, v = (F.silu(q), F.silu(k), F.silu(v)) if qk_silu else (q, k, F.silu(v))
    return l2norm(q), l2norm(k), v


def l2norm(s: Tensor) -> Tensor:
    """s / sqrt(|s|^2 + NORM_EPS) over the last dim: the memory's q and k normalisation."""
    return s * torch.rsqrt(s.pow(2).sum(-1, keepdim=True) + NORM_EPS)


def _rms_forward(r: Tensor, weight: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, bool]:
    """The output path's forward: (out, and what the backward keeps: r in fp32 at least, weight,
    g, rstd; native?). In-place steps throughout: every temporary here is [B, T, H Dh]."""
    B, T, H, Dh = r.shape
    r = r.to(torch.promote_types(r.dtype, torch.float32))
    if r.dtype == torch.float32 and weight.dtype == torch.float32 and native.features_available(r, weight, g):
        r, weight, g = r.contiguous(), weight.contiguous(), g.contiguous()
        out, rstd = native.module().rms_forward(r, weight, g)   # the same math in one C++ pass per token
        return out, r, weight, g, rstd, True
    rms = torch.linalg.vector_norm(r, dim=-1, keepdim=True)             # [B, T, H, 1]
    rstd = rms.square_().div_(Dh).add_(RMS_EPS).rsqrt_()
    out = r.new_empty(B, T, H, Dh)
    torch.mul(r, rstd, out=out).mul_(weight)
    out = out.view(B, T, H * Dh).mul_(F.silu(g))
    return out, r, weight, g, rstd, False


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r: Tensor, weight: Tensor, g: Tensor):
        out, *kept, ctx.native = _rms_forward(r, weight, g)
        ctx.save_for_backward(*kept)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        r, weight, g, rstd = ctx.saved_tensors
        if ctx.native:
            dr, dweight, dg = native.module().rms_backward(r, weight, g, rstd, dout.float().contiguous())
            return dr, dweight, dg.to(g.dtype)
        B, T, H, Dh = r.shape
        sig = torch.sigmoid(g)
        rn = torch.mul(r, rstd, out=r.new_empty(B, T, H, Dh))                # the normalised read
        dg = (rn * weight).view(B, T, H * Dh).mul_(dout)
        dsilu = torch.rsub(sig, 1).mul_(g).add_(1).mul_(sig)               # SiLU'(g) = sig (1 + g (1 - sig))
        dg.mul_(dsilu)
        dn = dsilu.copy_(g).mul_(sig).mul_(dout).view(B, T, H, Dh)          # d (rn * weight) = dout SiLU(g)
        del sig
        prod = dn * rn
        dweight = prod.sum((0, 1))
        dnw = dn.mul_(weight)
        mean = torch.mul(dnw, rn, out=prod).mean(-1, keepdim=True)
        del prod
        dr = dnw.sub_(rn.mul_(mean)).mul_(rstd)
        return dr, dweight, dg.to(g.dtype)


def gated_rms_norm(r: Tensor, weight: Tensor, g: Tensor) -> Tensor:
    """RMSNorm(r) * weight * SiLU(g) per head. r: [B, T, H, Dh]; weight: [H, Dh]; g: [B, T, H Dh]
    -> [B, T, H Dh], in r's dtype promoted to at least fp32."""
    if not _needs_grad(r, weight, g):   # inference: no autograd node, nothing saved
        return _rms_forward(r, weight, g)[0]
    return _GatedRMSNorm.apply(r, weight, g)


def gated_rms_norm_ref(r: Tensor, weight: Tensor, g: Tensor) -> Tensor:
    """The same through plain autograd (the reference for the tests)."""
    B, T = r.shape[:2]
    r = r.to(torch.promote_types(r.dtype, torch.float32))
    r = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + RMS_EPS) * weight
    return r.reshape(B, T, -1) * F.silu(g)
