"""Entry point of the memory rule: input checks and the choice of implementation.

Shape legend
    B batch, T tokens, H heads, Dk key/query dim, Dv value dim, L memory depth
    q, k: [B, T, H, Dk]   v: [B, T, H, Dv]   theta, eta, alpha: [B, T, H]   y: [B, T, H, Dv]
    weights: L tensors [H, d_out, d_in] (W_0, shared over the batch)
    state tensors: [B, H, d_out, d_in] per layer
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .chunk import memory_rule_chunk
from .naive import memory_rule_ref
from .nets import ACTIVATIONS
from .state import MemoryState

__all__ = ["memory_rule", "IMPLS"]

IMPLS = {"ref": memory_rule_ref, "chunk": memory_rule_chunk}


def memory_rule(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor,
                weights: Sequence[Tensor], *, chunk_size: int = 64, activation: str = "silu",
                residual: bool = False, normalize_step: bool = False, state: MemoryState | None = None,
                impl: str = "chunk") -> tuple[Tensor, MemoryState]:
    """The Titans neural-memory update and read (docs/design.md §1, paper eq. 13-16).

    For each batch element and head, token t (absolute position, chunks of `chunk_size`
    counted from the start of the sequence) does

        u_t = grad_W ||f(k_t; W_{c(t)}) - v_t||^2      (gradient at the chunk-start weights)
        S_t = eta_t S_{t-1} - theta_t s_t u_t        (s_t = 1 unless normalize_step)
        W_t = (1 - alpha_t) W_{t-1} + S_t
        y_t = f(q_t; W_t)

    Args:
        q, k: [B, T, H, Dk] queries and keys.  v: [B, T, H, Dv] values.
        theta: [B, T, H] step sizes (>= 0).  eta: [B, T, H] momentum in [0, 1].
        alpha: [B, T, H] forget rates in [0, 1]. A NaN in a gate is not an argument error: it
            propagates to y (a training step that diverged is then skipped by the trainer).
        weights: the learned initial memory W_0, L tensors of shape [H, d_out, d_in];
            layer 1 takes Dk, layer L gives Dv. L = 1 is the linear memory; for L >= 2 every
            layer but the last is followed by `activation`.
        chunk_size: b, the number of tokens whose gradients share one point (>= 1).
        activation: one of "silu", "gelu" (exact erf), "tanh".
        residual: f(x) = x + MLP(x) (requires Dk == Dv).
        normalize_step: the normalised step, s_t = min(1, ||dl_t/df||^2 ||k_t||^2 / ||u_t||^2,
            4 max(||v_t||, ||k_t||) / ||dl_t/df||) (chunk.step_scale), at the chunk-start weights like
            u_t and a constant for the outer gradient. The first bound moves f(k_t) along its error
            no further than a linear memory at the same theta (for which it is 1); the second clips
            the step of a token whose error exceeds twice its value or key norm, so a memory that
            runs away takes bounded steps instead of diverging (docs/models.md, "The inner loop's
            parameterisation").
        state: a MemoryState to continue from; None starts at W_0, zero momentum, position 0.
        impl: "chunk" (the chunk-parallel dual form) or "ref" (the literal token loop).

    Returns:
        y: [B, T, H, Dv], and the MemoryState after the last token. Feeding a sequence in
        pieces and carrying the state gives the same y and state as one call.
    """
    _check(q, k, v, theta, eta, alpha, weights, chunk_size, activation, residual, state, impl)
    return IMPLS[impl](q, k, v, theta, eta, alpha, weights, chunk_size=chunk_size,
                       activation=activation, residual=residual, normalize_step=normalize_step, state=state)


def _check(q, k, v, theta, eta, alpha, weights, chunk_size, activation, residual, state, impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {sorted(IMPLS)}, got {impl!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [B, T, H, D], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    B, T, H, Dk = q.shape
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, Dv] = [{B}, {T}, {H}, Dv], got {tuple(v.shape)}")
    Dv = v.shape[3]
    for name, x in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if not isinstance(x, Tensor) or x.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError("weights must be a non-empty list of [H, d_out, d_in] tensors")
    d_in = Dk
    for l, w in enumerate(weights):
        if not isinstance(w, Tensor) or w.dim() != 3 or w.shape[0] != H or w.shape[2] != d_in:
            raise ValueError(f"weights[{l}] must be [H={H}, d_out, d_in={d_in}], got "
                             f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
        d_in = w.shape[1]
    if d_in != Dv:
        raise ValueError(f"the last memory layer must output Dv={Dv}, got d_out={d_in}")
    if residual and Dk != Dv:
        raise ValueError(f"residual memory needs Dk == Dv, got Dk={Dk}, Dv={Dv}")
    # NaN is let through on purpose: inside training it is a diverging step's value, which must
    # reach the trainer's non-finite handling (skip the update) rather than stop the run here
    if T:
        # one reduction and one read-back for the three gates (at batch 1 the layer's call is short,
        # and six reductions with three read-backs cost ~0.1 ms of it); NaN is read as a valid 0.5
        if theta.dtype == eta.dtype == alpha.dtype:
            gates = torch.stack([theta, eta, alpha]).view(3, -1).nan_to_num(0.5, math.inf, -math.inf)
            lo, hi = (x.tolist() for x in gates.aminmax(dim=1))
        else:
            lo = [float(x.nan_to_num(0.5).min()) for x in (theta, eta, alpha)]
            hi = [float(x.nan_to_num(0.5, math.inf, -math.inf).max()) for x in (theta, eta, alpha)]
        if lo[0] < 0 or hi[0] == math.inf:
            raise ValueError("theta must be finite and >= 0")
        for i, name in ((1, "eta"), (2, "alpha")):
            if lo[i] < 0 or hi[i] > 1:
                raise ValueError(f"{name} must lie in [0, 1]")
    if state is not None:
        _check_state(state, weights, B)


def _check_state(state: MemoryState, weights: Sequence[Tensor], B: int) -> None:
    if not isinstance(state, MemoryState):
        raise ValueError(f"state must be a MemoryState or None, got {type(state).__name__}")
    if isinstance(state.position, bool) or not isinstance(state.position, int) or state.position < 0:
        raise ValueError(f"state.position must be an integer >= 0, got {state.position!r}")
    for field in ("weights", "momentum", "chunk_start"):
        tensors = getattr(state, field)
        if len(tensors) != len(weights):
            raise ValueError(f"state.{field} has {len(tensors)} layers, the memory has {len(weights)}")
        for l, (t, w) in enumerate(zip(tensors, weights)):
            if tuple(t.shape) != (B, *w.shape):
                raise ValueError(f"state.{field}[{l}] must be {(B, *w.shape)}, got {tuple(t.shape)}")
