"""Causal softmax attention with an optional sliding window and persistent prefix, and RoPE.

Shape legend
    B batch, H heads, Tq queries, Tk keys (Tk >= Tq), D query/key dim, Dv value dim
    Np prefix (persistent-memory) tokens, w window, nb query blocks of w, Bp = B or 1
    q: [B, H, Tq, D]   k: [B, H, Tk, D]   v: [B, H, Tk, Dv]   o: [B, H, Tq, Dv]
    prefix_k: [Bp, H, Np, D]   prefix_v: [Bp, H, Np, Dv]

Key/query alignment: the LAST Tq keys are the queries' own positions; the first Tk - Tq keys
are a cache of earlier positions. Query i therefore sits at key index a_i = Tk - Tq + i and
sees the keys j <= a_i (with a window w: a_i - w < j <= a_i), plus every prefix key.

Two implementations with one signature, chosen by `impl=`:
    "ref"      the literal masked softmax over a full [Tq, Np + Tk] score matrix;
    "blocked"  the fast path. Without a window it is torch's scaled_dot_product_attention.
               With a window, queries are cut into blocks of w; a block can only see its own
               block of keys and the one before, so scores are [nb, w, Np + 2w] per head:
               O(T w) time and memory, no Tq x Tk mask is ever built.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

__all__ = ["attention", "attention_ref", "attention_blocked", "rotary", "ATTENTION_IMPLS"]


def rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (RoPE), rotate-half convention, at absolute positions.

    Channel pairs (c, c + D/2) are rotated by the angle positions * base^(-2c/D), so the
    dot product of a query rotated at m and a key rotated at n depends only on m - n.

    Args:
        x: [B, H, T, D] with D even.
        positions: [T] integer tensor of absolute positions.
        base: the RoPE frequency base (> 0).

    Returns:
        [B, H, T, D] in x's dtype. The rotation is computed in float32 (float64 for float64 x);
        the angles themselves in float64, so large positions keep their precision.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-d tensor [B, H, T, D], got {_shape(x)}")
    T, D = x.shape[2], x.shape[3]
    if D % 2:
        raise ValueError(f"x must have an even last dim D, got D={D}")
    if (not isinstance(positions, Tensor) or positions.dim() != 1 or positions.shape[0] != T
            or positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool):
        raise ValueError(f"positions must be an integer tensor of shape [T={T}], got "
                         f"{_shape(positions)} {getattr(positions, 'dtype', '')}")
    if not (isinstance(base, (int, float)) and base > 0):
        raise ValueError(f"base must be a number > 0, got {base!r}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = _rope_tables(positions, D, float(base), dtype)                               # [T, D/2] each
    xc = x.to(dtype)
    x1, x2 = xc.chunk(2, dim=-1)
    # [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]: the rotate-half form x cos + [-x2, x1] sin,
    # term for term (a + (-b) c rounds as a - b c), without the concatenated copies
    if torch.is_grad_enabled() and xc.requires_grad:
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    if dtype == torch.float32 and xc.stride(-1) == 1 and native.features_available(xc):
        return native.module().rope_forward(xc, cos, sin).to(x.dtype)   # the same, one pass in C++
    out = torch.empty_like(xc)          # without autograd: written in place, half by half
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).sub_(x2 * sin)
    torch.mul(x2, cos, out=o2).add_(x1 * sin)
    return out.to(x.dtype)


# RoPE tables over a range of positions, by (D, base, dtype, device): every block of a model rotates
# the same positions in one forward (MAC twice per segment), a stream moves through them in order,
# and the float64 cos and sin cost more than the rotation (`python benchmarks/inference.py`'s
# prefill spent ~6% of its time in them at batch 1). A call reads its rows out of the table.
_ROPE_CACHE: dict[tuple, tuple[int, Tensor, Tensor]] = {}
_ROPE_RANGE, _ROPE_MAX_RANGE, _ROPE_CACHE_SIZE = 4096, 1 << 16, 8
_ROPE_LOCK = threading.Lock()


def _rope_angles(positions: Tensor, D: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin [T, D/2] of the angles positions * base^(-2c/D), computed in float64, in dtype."""
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64, device=positions.device) / D)  # [D/2]
    angles = positions.to(torch.float64)[:, None] * inv_freq                                       # [T, D/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rope_tables(positions: Tensor, D: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """_rope_angles(positions, ...), through the cached table of a range of positions."""
    if positions.shape[0] == 0 or positions.device.type != "cpu" or torch.compiler.is_compiling():
        return _rope_angles(positions, D, base, dtype)
    lo, hi = positions.aminmax()
    lo, hi = int(lo), int(hi)
    if hi - lo >= _ROPE_MAX_RANGE:
        return _rope_angles(positions, D, base, dtype)
    # an inference-mode table must not reach a graph that autograd saves, nor the reverse
    key = (D, base, dtype, torch.is_inference_mode_enabled())
    start, cos, sin = _ROPE_CACHE.get(key, (0, None, None))
    if cos is None or lo < start or hi >= start + cos.shape[0]:
        start = lo
        cos, sin = _rope_angles(torch.arange(lo, lo + max(_ROPE_RANGE, hi - lo + 1)), D, base, dtype)
        with _ROPE_LOCK:   # callers may rotate from several threads
            if key not in _ROPE_CACHE and len(_ROPE_CACHE) >= _ROPE_CACHE_SIZE:
                del _ROPE_CACHE[next(iter(_ROPE_CACHE))]      # the oldest
            _ROPE_CACHE[key] = (start, cos, sin)
    rows = positions - start
    return cos.index_select(0, rows), sin.index_select(0, rows)


def attention(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
              prefix_k: Tensor | None = None, prefix_v: Tensor | None = None,
              impl: str = "blocked") -> Tensor:
    """Causal (optionally sliding-window) softmax attention with a persistent prefix.

    Args:
        q: [B, H, Tq, D] queries.
        k: [B, H, Tk, D] keys, Tk >= Tq; the last Tq are the queries' own positions, the
            first Tk - Tq a cache of earlier ones.  v: [B, H, Tk, Dv] values.
        window: None for full causal attention, or w >= 1: query at key index a sees only
            the keys a - w < j <= a (itself and the w - 1 before it).
        prefix_k, prefix_v: [B or 1, H, Np, D] / [B or 1, H, Np, Dv], extra keys and values
            every query sees regardless of causality and window (the persistent memory tokens,
            paper eq. 19), broadcast over the batch. Both or neither.
        impl: "blocked" (fast, O(T w) for a window) or "ref" (the literal masked softmax).

    Returns:
        o: [B, H, Tq, Dv]. The softmax scale is 1/sqrt(D). Scores and softmax are computed in
        float32 for half/bfloat16/float32 inputs (float64 for float64).
    """
    _check(q, k, v, window, prefix_k, prefix_v, impl)
    return ATTENTION_IMPLS[impl](q, k, v, window=window, prefix_k=prefix_k, prefix_v=prefix_v)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                  prefix_k: Tensor | None = None, prefix_v: Tensor | None = None) -> Tensor:
    """The reference: one [Tq, Np + Tk] score matrix, masked, softmax, weighted sum."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out_dtype, dtype = q.dtype, _compute_dtype(q)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if prefix_k is not None:
        k = torch.cat([prefix_k.to(dtype).expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([prefix_v.to(dtype).expand(B, -1, -1, -1), v], dim=2)
    Np = k.shape[2] - Tk
    own = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)   # [Tq, 1] key index of query i
    j = torch.arange(Tk, device=q.device)[None, :]                  # [1, Tk]
    allowed = j <= own
    if window is not None:
        allowed = allowed & (j > own - window)
    allowed = torch.cat([allowed.new_ones(Tq, Np), allowed], dim=1)  # the prefix is always visible
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)               # [B, H, Tq, Np + Tk]
    p = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (p @ v).to(out_dtype)


def attention_blocked(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                      prefix_k: Tensor | None = None, prefix_v: Tensor | None = None) -> Tensor:
    """The fast path: fused SDPA for full attention, query blocks of w for a window."""
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq == 0:
        return q.new_zeros(*q.shape[:3], v.shape[3])
    # the oldest query (key index Tk - Tq) sees keys > Tk - Tq - w: with w >= Tk the window
    # cuts nothing, and the full path is both exact and faster
    if window is None or window >= Tk:
        return _full(q, k, v, prefix_k, prefix_v)
    return _windowed(q, k, v, window, prefix_k, prefix_v)


ATTENTION_IMPLS = {"ref": attention_ref, "blocked": attention_blocked}


def _full(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None) -> Tensor:
    """Full causal attention through scaled_dot_product_attention."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    Np = 0
    if prefix_k is not None:
        Np = prefix_k.shape[2]
        k = torch.cat([prefix_k.expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([prefix_v.expand(B, -1, -1, -1), v], dim=2)
    if Tq == Tk:
        # is_causal aligns query row r with key column r (top-left). Putting Np dummy zero
        # queries in front makes row Np + i see keys 0 .. Np + i = the prefix and keys <= i,
        # which is exactly our mask, and keeps the fused kernel (no mask tensor at all).
        if Np:
            q = torch.cat([q.new_zeros(B, H, Np, D), q], dim=2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, Np:]
    # with a cache (Tq < Tk, typically decoding a few tokens) the mask is lower-right
    # aligned; it is [Tq, Np + Tk], the size of the scores themselves
    own = torch.arange(Tq, device=q.device)[:, None] + (Np + Tk - Tq)
    allowed = torch.arange(Np + Tk, device=q.device)[None, :] <= own
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _windowed(q: Tensor, k: Tensor, v: Tensor, w: int, prefix_k: Tensor | None,
              prefix_v: Tensor | None) -> Tensor:
    """Sliding-window attention in query blocks of w, each seeing its own key block and the previous.

    After trimming and padding, key index w + i is query i's own position, so query block b
    (queries b*w .. b*w + w - 1) only needs key blocks b and b + 1 of the padded keys.
    """
    B, H, Tq, D = q.shape
    Dv = v.shape[3]
    out_dtype, dtype = q.dtype, _compute_dtype(q)
    # keys before Tk - Tq - (w - 1) are outside every query's window
    k = k[:, :, max(0, k.shape[2] - Tq - (w - 1)):].to(dtype)
    v = v[:, :, max(0, v.shape[2] - Tq - (w - 1)):].to(dtype)
    q = q.to(dtype)
    n_left = w - (k.shape[2] - Tq)          # left padding so that exactly w keys precede query 0
    nb = -(-Tq // w)
    n_right = nb * w - Tq                   # right padding to whole blocks (only padded queries see it)
    q = F.pad(q, (0, 0, 0, n_right)).view(B, H, nb, w, D)
    k = F.pad(k, (0, 0, n_left, n_right)).view(B, H, nb + 1, w, D)
    v = F.pad(v, (0, 0, n_left, n_right)).view(B, H, nb + 1, w, Dv)
    k = torch.cat([k[:, :, :-1], k[:, :, 1:]], dim=3)   # [B, H, nb, 2w, D]  previous + own block
    v = torch.cat([v[:, :, :-1], v[:, :, 1:]], dim=3)   # [B, H, nb, 2w, Dv]
    # query r of block b is at padded index (b+1)w + r, key c at b*w + c: the window is r < c <= w + r
    r = torch.arange(w, device=q.device)[:, None]
    c = torch.arange(2 * w, device=q.device)[None, :]
    allowed = (c > r) & (c <= w + r)                                        # [w, 2w]
    # the left padding lies in block 0's "previous" half; mask it (every row keeps itself)
    real = torch.ones(nb, 1, 2 * w, dtype=torch.bool, device=q.device)
    real[0, 0, :n_left] = False
    allowed = allowed & real                                                # [nb, w, 2w]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, prefix_k, prefix_v) if t is not None)):
        o = _blocks_sdpa(q, k, v, allowed, prefix_k, prefix_v)
        return o.reshape(B, H, nb * w, Dv)[:, :, :Tq].to(out_dtype)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)   # [B, H, nb, w, 2w]
    scores = scores.masked_fill(~allowed, float("-inf"))
    if prefix_k is None:
        o = scores.softmax(dim=-1) @ v
    else:
        pk, pv = prefix_k.to(dtype).unsqueeze(2), prefix_v.to(dtype).unsqueeze(2)  # [Bp, H, 1, Np, .]
        pscores = (q @ pk.transpose(-1, -2)) / math.sqrt(D)                         # [B, H, nb, w, Np]
        p = torch.cat([pscores, scores], dim=-1).softmax(dim=-1)
        Np = pk.shape[3]
        o = p[..., :Np] @ pv + p[..., Np:] @ v
    return o.reshape(B, H, nb * w, Dv)[:, :, :Tq].to(out_dtype)


def _blocks_sdpa(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, prefix_k: Tensor | None,
                 prefix_v: Tensor | None) -> Tensor:
    """_windowed's blocks through the fused scaled_dot_product_attention, without autograd: the
    blocks become batch rows, the prefix keys are put in front of every block's keys.
    q: [B, H, nb, w, D]; k, v: [B, H, nb, 2w, .]; allowed: [nb, w, 2w]. Returns [B, H, nb, w, Dv].

    The same softmax; it differs from the explicit path by fp32 rounding (~3e-7 relative) and
    ran 1.3-1.6x faster at w=128, 4 heads of 64-96 (one thread, ad-hoc timing), with no score
    tensor [B, H, nb, w, 2w] in memory.
    """
    B, H, nb, w, D = q.shape
    if prefix_k is not None:
        Np = prefix_k.shape[2]
        k = torch.cat([prefix_k.to(k.dtype).unsqueeze(2).expand(B, H, nb, Np, D), k], dim=3)
        v = torch.cat([prefix_v.to(v.dtype).unsqueeze(2).expand(B, H, nb, Np, v.shape[-1]), v], dim=3)
        allowed = torch.cat([allowed.new_ones(nb, w, Np), allowed], dim=2)
    rows = lambda t: t.transpose(1, 2).reshape(B * nb, H, t.shape[3], t.shape[4])      # [B nb, H, ., .]
    mask = allowed.unsqueeze(1).expand(nb, 1, w, allowed.shape[2])
    mask = mask if B == 1 else mask.repeat(B, 1, 1, 1)
    o = F.scaled_dot_product_attention(rows(q), rows(k), rows(v), attn_mask=mask)   # [B nb, H, w, Dv]
    return o.view(B, nb, H, w, -1).transpose(1, 2)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _check(q, k, v, window, prefix_k, prefix_v, impl) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl must be one of {sorted(ATTENTION_IMPLS)}, got {impl!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [B, H, T, D], got {_shape(x)}")
    B, H, Tq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or k.shape[2] < Tq:
        raise ValueError(f"k must be [B={B}, H={H}, Tk >= Tq={Tq}, D={D}], got {_shape(k)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B={B}, H={H}, Tk={k.shape[2]}, Dv], got {_shape(v)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together")
    if prefix_k is not None:
        if (not isinstance(prefix_k, Tensor) or prefix_k.dim() != 4 or prefix_k.shape[0] not in (1, B)
                or prefix_k.shape[1] != H or prefix_k.shape[3] != D):
            raise ValueError(f"prefix_k must be [B={B} or 1, H={H}, Np, D={D}], got {_shape(prefix_k)}")
        if (not isinstance(prefix_v, Tensor) or prefix_v.dim() != 4
                or prefix_v.shape[:3] != prefix_k.shape[:3] or prefix_v.shape[3] != v.shape[3]):
            raise ValueError(f"prefix_v must be [{', '.join(map(str, prefix_k.shape[:3]))}, "
                             f"Dv={v.shape[3]}], got {_shape(prefix_v)}")
        if prefix_k.dtype != q.dtype or prefix_v.dtype != q.dtype:
            raise ValueError(f"prefix_k and prefix_v must have q's dtype {q.dtype}, "
                             f"got {prefix_k.dtype}, {prefix_v.dtype}")
