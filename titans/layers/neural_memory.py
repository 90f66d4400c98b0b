"""The neural long-term memory layer (paper section 3 and 4.4; docs/design.md §2).

Shape legend
    B batch, T tokens in this call, dim model width, H memory heads, Dh head dim
    x, y: [B, T, dim]   q, k, v: [B, T, H, Dh]   theta, eta, alpha: [B, T, H]
    conv state: [B, 3 H Dh, K - 1] (the last K - 1 projected inputs; K the conv kernel)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import ACTIVATIONS, MemoryState, memory_rule
from ..ops.features import gated_rms_norm, qkv_features

__all__ = ["NeuralMemory", "NeuralMemoryState"]


@dataclass
class NeuralMemoryState:
    """Streaming state of a NeuralMemory layer.

    memory: the memory rule's state (None: the learned W_0, nothing seen yet).
    conv: the last K - 1 inputs of the causal convolution, [B, 3 H Dh, K - 1] (None without conv).
    chunk_gates: with per-chunk gates, the gates of the chunk in progress, [B, 3, H]
        (theta, eta, alpha), taken at its first token; None otherwise.
    position: tokens seen.
    """

    memory: MemoryState | None
    conv: Tensor | None
    chunk_gates: Tensor | None
    position: int

    def detach(self) -> "NeuralMemoryState":
        return NeuralMemoryState(self.memory.detach() if self.memory is not None else None,
                                 None if self.conv is None else self.conv.detach(),
                                 None if self.chunk_gates is None else self.chunk_gates.detach(), self.position)


def _shifted(state: MemoryState | None, w0: Tensor, sign: int) -> MemoryState | None:
    """A linear memory's state with sign * W_0 added to its weights and chunk-start weights (the
    momentum is a difference of weights: unchanged); None stays None."""
    if state is None:
        return None
    move = lambda ws: [w + sign * w0.to(w.dtype) for w in ws]
    return MemoryState(move(state.weights), state.momentum, move(state.chunk_start), state.position)


def _inv_sigmoid(p: float) -> float:
    return math.log(p / (1 - p))


class NeuralMemory(nn.Module):
    """Neural memory as a sequence mixer: y, state = layer(x, state).

    q, k, v = causal depthwise Conv1d(x W_{q,k,v}), q and k L2-normalised per head (after a SiLU with
    qk_silu=True, the paper's form), v through a SiLU; per
    token and head the step size theta = max_lr * sigmoid(.), momentum eta = sigmoid(.) and
    forget rate alpha = sigmoid(.) are linear maps of x. Each head has its own memory, an MLP
    (depth >= 2) or a matrix (depth 1) with learned initial weights W_0, written and read by
    `titans.ops.memory_rule`. The read is RMS-normalised per head, gated by SiLU(x W_g) and
    projected back to dim.

    Args:
        dim: model width.  heads: memory heads H.  head_dim: Dh (default dim // heads).
        memory_depth: layers of the memory MLP (1 = linear memory).  expansion: hidden width
            of the memory MLP as a multiple of Dh.  chunk_size: b of the memory rule.
        activation: the memory MLP's activation ("silu", "gelu", "tanh").
        residual: memory f(x) = x + MLP(x).
        conv: use the causal depthwise convolution (kernel conv_kernel) on q, k, v.
        momentum: False fixes eta = 0 (no momentum: the ablation of paper Table 5).
        forgetting: False fixes alpha = 0 (no weight decay).
        gate_mode: "token" (a gate per token) or "chunk" (each chunk uses the gates computed
            at its first token, so the gates stay causal).
        max_lr: the largest step size theta.
        momentum_form: "bounded" (default): S_t = eta S_{t-1} - (1 - eta) theta u_t, momentum as
            an average, so a write's total step is theta whatever eta; "plain": paper eq. 10,
            S_t = eta S_{t-1} - theta u_t (total step theta / (1 - eta)).
        normalize_step: scale each token's step so a deep memory moves f(k) no further than a
            linear memory at the same theta, and clip the step of a token whose error has run
            away (memory_rule).
        qk_silu: q and k through the SiLU before their L2 norm (the paper); False: linear q and k,
            whose directions are not confined to the positive orthant (v keeps its SiLU).
        key_shift: the keys' convolution starts on the previous token instead of the current one,
            so from the first step a write stores (previous token -> current token) and a read
            with the current token recalls what followed it before. No effect without the
            convolution (conv=False or conv_kernel=1).
        qk_tied_init: the query projection starts equal to the key projection (an initialisation;
            they train apart), so with key_shift a token seen again reads back, from the first
            step, what followed it before: the memory starts as an induction head (on MQAR it
            removed the runs that stall at half accuracy, docs/models.md).
        theta_init: the initial theta as a fraction of max_lr (the gate biases).
        alpha_init: (low, high) initial forget rates, spread log-uniformly over the heads.
        forget_to_init: the forget gate decays the memory toward its learned initial weights W_0
            instead of toward zero: W_t = W_0 + (1 - alpha_t) (W_{t-1} - W_0) + S_t (fast weights
            on slow weights). Without it a long stream forgets W_0 itself, and its state drifts
            where a model trained on short windows never was (docs/long_context.md). Linear
            memory (memory_depth=1) only.

    Initialisation (all here, see reset_memory_parameters): the gate maps start at zero weight,
    so every token starts with the same gates, set by the biases: theta = theta_init * max_lr
    (0.4: a pair written once is stored, tests/layers/test_neural_memory.py), eta = 0.9 and
    alpha from alpha_init[0] on the first head to alpha_init[1] on the last (every head its
    own time scale, the way Mamba and Gated DeltaNet spread their decays). W_0 ~ N(0, 1/d_in).
    The query projection starts as a copy of the key projection (qk_tied_init).

    Stability: inside a chunk every gradient is taken at the chunk-start weights, so with
    correlated keys a chunk of b tokens acts on W with a gain growing towards theta * b. The
    defaults keep it alive: chunks of 16 (a linear memory at theta 0.4 diverges in chunks of 64
    on random inputs) and the normalised step, whose clip bounds a memory that runs away. The
    paper's exact rule is memory_depth=2, momentum=True, momentum_form="plain",
    normalize_step=False, qk_silu=True, key_shift=False, qk_tied_init=False with a small max_lr
    (docs/models.md, "The inner loop's parameterisation", has what was tried with its numbers).
    """

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, memory_depth: int = 1,
                 expansion: int = 4, chunk_size: int = 16, activation: str = "silu", residual: bool = False,
                 conv: bool = True, conv_kernel: int = 4, momentum: bool = False, forgetting: bool = True,
                 gate_mode: str = "token", max_lr: float = 0.5, momentum_form: str = "bounded",
                 normalize_step: bool = True, qk_silu: bool = False, key_shift: bool = True,
                 qk_tied_init: bool = True, theta_init: float = 0.8,
                 alpha_init: tuple[float, float] = (1e-4, 3e-3), forget_to_init: bool = False) -> None:
        super().__init__()
        for name, value, lo in (("dim", dim, 1), ("heads", heads, 1), ("memory_depth", memory_depth, 1),
                                ("expansion", expansion, 1), ("chunk_size", chunk_size, 1),
                                ("conv_kernel", conv_kernel, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim={dim} must be divisible by heads={heads} when head_dim is None")
            head_dim = dim // heads
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if gate_mode not in ("token", "chunk"):
            raise ValueError(f"gate_mode must be 'token' or 'chunk', got {gate_mode!r}")
        if not max_lr > 0:
            raise ValueError(f"max_lr must be > 0, got {max_lr!r}")
        if momentum_form not in ("bounded", "plain"):
            raise ValueError(f"momentum_form must be 'bounded' or 'plain', got {momentum_form!r}")
        if not 0 < theta_init < 1:
            raise ValueError(f"theta_init must lie in (0, 1), got {theta_init!r}")
        if len(alpha_init) != 2 or not 0 < alpha_init[0] <= alpha_init[1] < 1:
            raise ValueError(f"alpha_init must be (low, high) with 0 < low <= high < 1, got {alpha_init!r}")
        if forget_to_init and memory_depth != 1:
            raise ValueError(f"forget_to_init needs a linear memory (memory_depth=1), got memory_depth={memory_depth}")
        self.momentum_form, self.theta_init, self.alpha_init = momentum_form, theta_init, tuple(alpha_init)
        self.forget_to_init = forget_to_init
        self.normalize_step, self.qk_silu, self.key_shift = normalize_step, qk_silu, key_shift
        self.qk_tied_init = qk_tied_init
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.chunk_size, self.activation, self.residual = chunk_size, activation, residual
        self.momentum, self.forgetting, self.gate_mode, self.max_lr = momentum, forgetting, gate_mode, max_lr
        inner = heads * head_dim
        self.wqkv = nn.Linear(dim, 3 * inner, bias=False)
        self.conv_kernel = conv_kernel if conv else 0
        if conv:
            self.conv_weight = nn.Parameter(torch.empty(3 * inner, 1, conv_kernel))
            self.conv_bias = nn.Parameter(torch.empty(3 * inner))
        self.wgates = nn.Linear(dim, 3 * heads)  # theta, eta, alpha logits per head
        dims = [head_dim] + [head_dim * expansion] * (memory_depth - 1) + [head_dim]
        self.memory = nn.ParameterList(nn.Parameter(torch.empty(heads, dims[l + 1], dims[l]))
                                       for l in range(memory_depth))
        self.out_norm = nn.Parameter(torch.empty(heads, head_dim))
        self.wgate_out = nn.Linear(dim, inner, bias=False)
        self.wo = nn.Linear(inner, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Stand-alone initialisation: fan-in scaled projections, then reset_memory_parameters.

        Inside TitansLM the model re-initialises the projections (TitansLM.init_weights)."""
        for lin in (self.wqkv, self.wgate_out, self.wo):
            nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """The memory's own parameters: conv, gates, W_0 and the output norm (see the class doc),
        and with qk_tied_init the query projection set equal to the key projection."""
        if self.qk_tied_init:
            inner = self.heads * self.head_dim
            with torch.no_grad():
                self.wqkv.weight[:inner] = self.wqkv.weight[inner:2 * inner]   # rows: q, k, v
        if self.conv_kernel:
            # start as the identity on the current token (weight 1 on the newest tap); with
            # key_shift the keys start on the previous token: the memory stores "previous -> current"
            nn.init.zeros_(self.conv_weight)
            with torch.no_grad():
                self.conv_weight[..., -1] = 1.0
                if self.key_shift and self.conv_kernel >= 2:
                    k = self.conv_weight[self.heads * self.head_dim:2 * self.heads * self.head_dim]
                    k[..., -1], k[..., -2] = 0.0, 1.0
            nn.init.zeros_(self.conv_bias)
        nn.init.zeros_(self.wgates.weight)
        with torch.no_grad():
            bias = self.wgates.bias.view(3, self.heads)
            bias[0] = _inv_sigmoid(self.theta_init)
            bias[1] = _inv_sigmoid(0.9)
            # forget rates spread log-uniformly over the heads: every head a different time scale
            lo, hi = (math.log(a) for a in self.alpha_init)
            spread = torch.linspace(lo, hi, self.heads) if self.heads > 1 else torch.tensor([lo])
            bias[2] = torch.logit(spread.exp())
        for w in self.memory:  # fan-in scaling keeps the memory's output O(1) for unit-norm keys
            nn.init.normal_(w, std=w.shape[-1] ** -0.5)
        nn.init.ones_(self.out_norm)

    def init_state(self, batch_size: int) -> NeuralMemoryState:
        """The state before the first token: W_0, zero momentum, an empty (zero) conv window."""
        conv = None
        if self.conv_kernel:
            w = self.wqkv.weight   # torch.zeros, not w.new_zeros: under FSDP w is a sharded DTensor here
            conv = torch.zeros(batch_size, self.wqkv.out_features, self.conv_kernel - 1, dtype=w.dtype, device=w.device)
        return NeuralMemoryState(memory=None, conv=conv, chunk_gates=None, position=0)

    def _gates(self, x: Tensor, state: NeuralMemoryState) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """theta, eta, alpha [B, T, H] in fp32 (gate products are sensitive to rounding)."""
        B, T, _ = x.shape
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.wgates.weight.to(dtype), self.wgates.bias.to(dtype))
        g = torch.sigmoid(logits.view(B, T, 3, self.heads))  # [B, T, 3, H]
        carry = None
        if self.gate_mode == "chunk":
            # every token takes the gates of its chunk's first token (absolute chunk positions)
            pos = state.position + torch.arange(T, device=x.device)
            first = pos - pos % self.chunk_size - state.position   # index of the chunk start in this call
            prev = state.chunk_gates if state.chunk_gates is not None else g[:, 0]
            g = torch.where((first >= 0).view(1, T, 1, 1), g[:, first.clamp(min=0)], prev.unsqueeze(1))
            carry = g[:, -1] if T else state.chunk_gates
        theta = self.max_lr * g[:, :, 0]
        eta = g[:, :, 1] if self.momentum else torch.zeros_like(g[:, :, 1])
        if self.momentum and self.momentum_form == "bounded":
            # S_t = eta S_{t-1} - (1 - eta) theta u_t: momentum as an average, the total step stays theta
            theta = theta * (1 - eta)
        alpha = g[:, :, 2] if self.forgetting else torch.zeros_like(g[:, :, 2])
        return theta, eta, alpha, carry

    def _qkv(self, x: Tensor, state: NeuralMemoryState) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """q, k, v [B, T, H, Dh] from x [B, T, dim], and the new conv state (None without conv)."""
        u = self.wqkv(x)                                                  # [B, T, C]
        if not self.conv_kernel:
            return *qkv_features(u, None, None, None, self.heads, self.qk_silu), None
        B, T, C = u.shape
        P = self.conv_kernel - 1
        past = state.conv.transpose(1, 2).to(u.dtype) if state.conv is not None else u.new_zeros(B, P, C)
        q, k, v = qkv_features(u, past, self.conv_weight.to(u.dtype).squeeze(1), self.conv_bias.to(u.dtype),
                               self.heads, self.qk_silu)
        # the last P rows of [past; u], as a copy: the state must not keep all of u alive
        tail = torch.cat([past[:, T:], u[:, max(0, T - P):]], dim=1)
        return q, k, v, tail.transpose(1, 2).contiguous()

    def forward(self, x: Tensor, state: NeuralMemoryState | None = None) -> tuple[Tensor, NeuralMemoryState]:
        """x: [B, T, dim] -> y: [B, T, dim], and the state after the last token."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, dim={self.dim}], got {tuple(x.shape)}")
        own = self.wqkv.weight.dtype
        autocast = x.dtype == torch.bfloat16 and torch.is_autocast_enabled(x.device.type)
        if not x.is_floating_point() or (x.dtype != own and not autocast):
            raise ValueError(f"x must be a floating-point tensor matching the layer's {own} (bfloat16 under "
                             f"autocast), got {x.dtype}; convert x, or the layer with .to(dtype)")
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B)
        elif not isinstance(state, NeuralMemoryState):
            raise ValueError(f"state must be a NeuralMemoryState or None, got {type(state).__name__}")
        else:
            held = {t.shape[0] for t in (state.conv, *(state.memory.weights if state.memory else ())) if t is not None}
            if held and held != {B}:
                raise ValueError(f"state holds a batch of {held.pop()} sequences, x has {B}")
        q, k, v, conv = self._qkv(x, state)
        theta, eta, alpha, chunk_gates = self._gates(x, state)
        rule = dict(chunk_size=self.chunk_size, activation=self.activation, residual=self.residual,
                    normalize_step=self.normalize_step)
        if self.forget_to_init:
            # W = W_0 + D and f(x; W) = f(x; D) + x W_0^T (a linear memory): the rule runs on D from zero,
            # whose forgetting decays W toward W_0, with the targets v - k W_0^T (the same errors, so
            # the same gradients); the state keeps W itself
            W0 = self.memory[0]
            base = lambda x: torch.einsum("bthi,hoi->btho", x, W0.to(x.dtype))   # [B, T, H, Dh]
            y, delta = memory_rule(q, k, v - base(k), theta, eta, alpha, [torch.zeros_like(W0)], **rule,
                                   state=_shifted(state.memory, W0, -1))
            y, memory = y + base(q), _shifted(delta, W0, 1)
        else:
            y, memory = memory_rule(q, k, v, theta, eta, alpha, list(self.memory), **rule, state=state.memory)
        return self.read_out(y, x), NeuralMemoryState(memory, conv, chunk_gates, state.position + T)

    def read_out(self, r: Tensor, x: Tensor) -> Tensor:
        """The output path of a memory read r [B, T, H, Dh]: per-head RMSNorm, SiLU gate from
        x [B, T, dim], output projection -> [B, T, dim]."""
        return self.wo(gated_rms_norm(r, self.out_norm, self.wgate_out(x)))
