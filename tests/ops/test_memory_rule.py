"""The memory rule against docs/design.md §1: chunk path == reference loop, streaming == one call."""

from __future__ import annotations

import random

import pytest
import torch

import titans.ops.chunk as chunk
from titans.ops import MemoryState, memory_rule, native

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against the reference b (norm of difference over norm of b)."""
    a, b = a.double(), b.double()
    d = (a - b).norm().item()
    n = b.norm().item()
    return d / n if n > 0 else d


def make_inputs(B=2, T=37, H=2, Dk=8, Dv=8, depth=2, expansion=2, dtype=F64, seed=0,
                theta_max=0.1, gates=None):
    """Inputs in a stable regime: unit-norm keys, small steps (larger ones make the ref diverge)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    u = lambda *s: torch.rand(*s, generator=gen, dtype=dtype)
    q = r(B, T, H, Dk)
    k = torch.nn.functional.normalize(r(B, T, H, Dk), dim=-1)
    v = r(B, T, H, Dv)
    theta, eta, alpha = u(B, T, H) * theta_max, u(B, T, H), u(B, T, H) * 0.3
    if gates is not None:
        theta, eta, alpha = gates(theta, eta, alpha)
    dims = [Dk] + [Dk * expansion] * (depth - 1) + [Dv]
    weights = [r(H, dims[i + 1], dims[i]) / dims[i] ** 0.5 for i in range(depth)]
    return [q, k, v, theta, eta, alpha], weights


def run_with_grads(impl, tensors, weights, seed=1, **kw):
    """Run the op; return y, state, and grads of a scalar loss of y and the final state wrt every input."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    weights = [w.detach().clone().requires_grad_() for w in weights]
    y, state = memory_rule(*tensors, weights, impl=impl, **kw)
    gen = torch.Generator().manual_seed(seed)
    # the probes are drawn in float64 so a float32 run and its float64 reference see the same loss
    probe = lambda x: torch.randn(x.shape, generator=gen, dtype=F64).to(x.dtype)
    loss = (y * probe(y)).sum()
    for w, s, c in zip(state.weights, state.momentum, state.chunk_start):
        loss = loss + (w * probe(w)).sum() + (s * probe(s)).sum() + (c * probe(c)).sum()
    grads = torch.autograd.grad(loss, tensors + weights)
    return y.detach(), state.detach(), grads


NAMES = ["q", "k", "v", "theta", "eta", "alpha"]


def assert_match(impl_a, impl_b, tensors, weights, tol, **kw):
    ya, sa, ga = run_with_grads(impl_a, tensors, weights, **kw)
    tb = [t.double() for t in tensors]
    wb = [w.double() for w in weights]
    yb, sb, gb = run_with_grads(impl_b, tb, wb, **kw)
    assert torch.isfinite(ya).all()
    assert rel(ya, yb) <= tol, f"y: {rel(ya, yb)}"
    assert sa.position == sb.position
    for field in ("weights", "momentum", "chunk_start"):
        for l, (a, b) in enumerate(zip(getattr(sa, field), getattr(sb, field))):
            assert rel(a, b) <= tol, f"state.{field}[{l}]: {rel(a, b)}"
    names = NAMES + [f"weights[{l}]" for l in range(len(weights))]
    for name, a, b in zip(names, ga, gb):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) <= tol, f"grad {name}: {rel(a, b)}"


@pytest.mark.parametrize("chunk_size,T", [(1, 23), (16, 53), (64, 150)])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("residual", [False, True])
def test_chunk_equals_reference_float64(chunk_size, T, depth, residual):
    tensors, weights = make_inputs(T=T, depth=depth, seed=depth * 10 + chunk_size)
    assert_match("chunk", "ref", tensors, weights, 1e-9, chunk_size=chunk_size, residual=residual)


@pytest.mark.parametrize("chunk_size,T", [(1, 23), (16, 53), (64, 150)])
@pytest.mark.parametrize("depth,residual", [(1, False), (2, False), (3, True)])
def test_normalized_step_chunk_equals_reference_float64(chunk_size, T, depth, residual):
    # large steps, where the scale is far from 1 (and the plain rule would diverge)
    tensors, weights = make_inputs(T=T, depth=depth, seed=depth * 7 + chunk_size, theta_max=0.5)
    assert_match("chunk", "ref", tensors, weights, 1e-9, chunk_size=chunk_size, residual=residual,
                 normalize_step=True)


def test_normalized_step_is_the_plain_step_for_a_linear_memory_and_smaller_for_a_deep_one():
    no_momentum = lambda th, et, al: (th, et * 0, al)   # keeps every error below the clip
    for depth in (1, 2):
        tensors, weights = make_inputs(T=40, depth=depth, seed=2, theta_max=0.2, gates=no_momentum)
        y_n, _ = memory_rule(*tensors, weights, chunk_size=8, normalize_step=True, impl="ref")
        y_p, _ = memory_rule(*tensors, weights, chunk_size=8, impl="ref")
        assert (rel(y_n, y_p) <= 1e-12) == (depth == 1)


def test_normalized_step_keeps_a_runaway_memory_bounded():
    """Steps too large for the chunk (theta 0.9 of 1, momentum, chunks of 32 over correlated keys):
    the plain rule blows up, the normalised step's clip keeps the memory finite and bounded."""
    gen = torch.Generator().manual_seed(4)
    B, T, H, D = 1, 2048, 2, 8
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=gen, dtype=F64) + 2.0, dim=-1)
    v = torch.randn(B, T, H, D, generator=gen, dtype=F64)
    gates = [torch.full((B, T, H), x, dtype=F64) for x in (0.9, 0.9, 0.001)]
    weights = [torch.randn(H, D, D, generator=gen, dtype=F64) / D ** 0.5]
    _, plain = memory_rule(k, k, v, *gates, weights, chunk_size=32)
    _, normed = memory_rule(k, k, v, *gates, weights, chunk_size=32, normalize_step=True)
    assert not torch.isfinite(plain.weights[0]).all() or plain.weights[0].norm() > 1e6
    assert torch.isfinite(normed.weights[0]).all() and normed.weights[0].norm() < 1e5   # 3.2e3 here


@pytest.mark.parametrize("chunk_size,T", [(16, 53), (64, 150)])
@pytest.mark.parametrize("depth", [1, 2])
def test_chunk_float32_against_float64_reference(chunk_size, T, depth):
    tensors, weights = make_inputs(T=T, depth=depth, seed=3)
    tensors = [t.float() for t in tensors]
    weights = [w.float() for w in weights]
    assert_match("chunk", "ref", tensors, weights, 1e-4, chunk_size=chunk_size)


@pytest.mark.parametrize("activation", ["gelu", "tanh"])
def test_other_activations(activation):
    tensors, weights = make_inputs(T=29, depth=2, seed=5)
    assert_match("chunk", "ref", tensors, weights, 1e-9, chunk_size=8, activation=activation)


def test_value_dim_differs_from_key_dim():
    tensors, weights = make_inputs(T=21, Dk=8, Dv=5, depth=2, seed=6)
    assert_match("chunk", "ref", tensors, weights, 1e-9, chunk_size=4)


EXTREMES = {
    "alpha=0": lambda th, et, al: (th, et, torch.zeros_like(al)),
    "alpha=1": lambda th, et, al: (th, et, torch.ones_like(al)),
    "eta=0": lambda th, et, al: (th, torch.zeros_like(et), al),
    "eta=1": lambda th, et, al: (th * 0.2, torch.ones_like(et), al),
    "theta=0": lambda th, et, al: (torch.zeros_like(th), et, al),
    # every gate jumps between its two ends, token by token
    "mixed": lambda th, et, al: (th * (th > 0.05), (et > 0.5).to(et.dtype), (al > 0.15).to(al.dtype)),
}


@pytest.mark.parametrize("case", sorted(EXTREMES))
@pytest.mark.parametrize("depth", [1, 2])
def test_gates_at_their_extremes(case, depth):
    tensors, weights = make_inputs(T=45, depth=depth, seed=7, gates=EXTREMES[case])
    assert_match("chunk", "ref", tensors, weights, 1e-9, chunk_size=16)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gate_products_underflow_without_nan(dtype):
    # eta and 1 - alpha ~ 1e-30 (fp64) or 1e-6 (fp32): products over a chunk fall below the
    # smallest normal number, which log-ratio forms turn into 0/0.
    tiny = 1e-30 if dtype == F64 else 1e-6
    gates = lambda th, et, al: (th, et * tiny, 1 - torch.rand_like(al) * tiny)
    tensors, weights = make_inputs(T=700, B=1, depth=2, seed=8, dtype=dtype, gates=gates)
    y, state, grads = run_with_grads("chunk", tensors, weights, chunk_size=64)
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(t).all() for t in state.weights + state.momentum)
    assert all(torch.isfinite(g).all() for g in grads)
    ref_inputs = [t.double() for t in tensors]
    y_ref, _ = memory_rule(*ref_inputs[:6], [w.double() for w in weights], chunk_size=64, impl="ref")
    assert rel(y, y_ref) <= (1e-9 if dtype == F64 else 1e-4)


def stream(tensors, weights, lengths, impl="chunk", state=None, **kw):
    ys, pos = [], 0
    for n in lengths:
        y, state = memory_rule(*(t[:, pos:pos + n] for t in tensors), weights, state=state, impl=impl, **kw)
        ys.append(y)
        pos += n
    return torch.cat(ys, dim=1), state


def split_randomly(T, rng, max_piece):
    lengths = []
    while sum(lengths) < T:
        lengths.append(min(rng.randint(1, max_piece), T - sum(lengths)))
    return lengths


@pytest.mark.parametrize("impl", ["chunk", "ref"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_in_random_pieces_equals_one_call(impl, seed):
    T = 90 if impl == "chunk" else 40
    tensors, weights = make_inputs(T=T, depth=2, seed=seed)
    y_full, s_full = memory_rule(*tensors, weights, chunk_size=16, impl=impl)
    lengths = split_randomly(T, random.Random(seed), 37)
    y, s = stream(tensors, weights, lengths, impl=impl, chunk_size=16)
    assert rel(y, y_full) <= 1e-12
    assert s.position == s_full.position == T
    for a, b in zip(s.weights + s.momentum + s.chunk_start, s_full.weights + s_full.momentum + s_full.chunk_start):
        assert rel(a, b) <= 1e-12


def test_token_by_token_equals_one_call():
    tensors, weights = make_inputs(T=40, depth=3, seed=4)
    y_full, s_full = memory_rule(*tensors, weights, chunk_size=8)
    y, s = stream(tensors, weights, [1] * 40, chunk_size=8)
    assert rel(y, y_full) <= 1e-12
    for a, b in zip(s.weights + s.momentum, s_full.weights + s_full.momentum):
        assert rel(a, b) <= 1e-12


def test_streaming_gradients_equal_one_call():
    tensors, weights = make_inputs(T=50, depth=2, seed=9)
    a = [t.clone().requires_grad_() for t in tensors + weights]
    y_full, _ = memory_rule(*a[:6], a[6:], chunk_size=16)
    g_full = torch.autograd.grad(y_full.square().sum(), a)
    b = [t.clone().requires_grad_() for t in tensors + weights]
    y, _ = stream(b[:6], b[6:], [5, 20, 1, 24], chunk_size=16)
    g = torch.autograd.grad(y.square().sum(), b)
    for x, ref in zip(g, g_full):
        assert rel(x, ref) <= 1e-12


def test_chunk_stream_matches_reference_stream():
    # the chunk path resumes mid-chunk with the gradient point the reference kept
    tensors, weights = make_inputs(T=30, depth=2, seed=11)
    y_ref, s_ref = stream(tensors, weights, [7, 13, 10], impl="ref", chunk_size=8)
    y, s = stream(tensors, weights, [3, 11, 16], impl="chunk", chunk_size=8)
    assert rel(y, y_ref) <= 1e-12
    for a, b in zip(s.chunk_start + s.weights, s_ref.chunk_start + s_ref.weights):
        assert rel(a, b) <= 1e-12


def test_gradcheck_tiny():
    tensors, weights = make_inputs(B=1, T=7, H=2, Dk=3, Dv=3, depth=2, expansion=1, seed=12)
    inputs = [t.requires_grad_() for t in tensors + weights]

    def fn(*xs):
        y, state = memory_rule(*xs[:6], list(xs[6:]), chunk_size=3)
        return y, state.weights[0], state.momentum[1]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_no_grad_matches_grad_mode():
    tensors, weights = make_inputs(T=33, depth=2, seed=13)
    with torch.no_grad():
        y0, _ = memory_rule(*tensors, weights, chunk_size=8)
        y1, _ = memory_rule(*tensors, weights, chunk_size=8, impl="ref")
    assert not y0.requires_grad and not y1.requires_grad
    assert rel(y0, y1) <= 1e-12


@pytest.mark.parametrize("bf16_min_matrix", [0, None])
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "python"])
def test_bf16_autocast_close_to_fp32_and_state_stays_fp32(monkeypatch, bf16_min_matrix, use_native):
    # 0 forces the Python path's bf16 matmuls at this small size; None keeps its default (fp32
    # matmuls here). The native path runs bf16 products at every size.
    if bf16_min_matrix is not None:
        monkeypatch.setattr(chunk, "BF16_MIN_MATRIX", bf16_min_matrix)
    if not use_native:
        monkeypatch.setattr(native, "available", lambda *a: False)
    elif native.module() is None:
        pytest.skip("the C++ chunk path is not built here (tests/ops/test_native.py checks where it must be)")
    tensors, weights = make_inputs(T=128, Dk=32, Dv=32, depth=2, seed=14, dtype=torch.float32)
    for t in tensors + weights:
        t.requires_grad_()
    y32, _ = memory_rule(*tensors, weights, chunk_size=16)
    g32 = torch.autograd.grad(y32.square().sum(), tensors + weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, s16 = memory_rule(*tensors, weights, chunk_size=16)
    g16 = torch.autograd.grad(y16.square().sum(), tensors + weights)
    assert all(t.dtype == torch.float32 for t in s16.weights + s16.momentum)
    assert rel(y16, y32) <= 3e-2  # documented bf16 tolerance (docs/memory_rule.md)
    assert all(rel(a, b) <= 5e-2 for a, b in zip(g16, g32))
    if bf16_min_matrix is None and not use_native:
        assert rel(y16, y32) <= 1e-6  # small memories keep fp32 matmuls under autocast
    else:
        assert rel(y16, y32) > 1e-6   # ... and the forced path really ran in bf16


def test_empty_sequence_returns_state_unchanged():
    tensors, weights = make_inputs(T=10, depth=2, seed=15)
    _, state = memory_rule(*tensors, weights, chunk_size=4)
    y, s = memory_rule(*(t[:, :0] for t in tensors), weights, chunk_size=4, state=state)
    assert y.shape == (2, 0, 2, 8)
    assert s.position == 10 and all(torch.equal(a, b) for a, b in zip(s.weights, state.weights))


# ---- bad input -----------------------------------------------------------------------------

def _bad(**changes):
    tensors, weights = make_inputs(T=6, depth=2, seed=0)
    args = dict(zip(NAMES, tensors), weights=weights, chunk_size=4)
    args.update(changes)
    return args


@pytest.mark.parametrize("change,match", [
    (lambda a: {"k": a["k"][..., :4]}, "k must have the shape of q"),
    (lambda a: {"q": a["q"][0]}, "q must be a 4-d"),
    (lambda a: {"v": a["v"][:, :3]}, "v must be"),
    (lambda a: {"theta": a["theta"][..., 0]}, "theta must be"),
    (lambda a: {"theta": -a["theta"]}, "theta must be finite and >= 0"),
    (lambda a: {"eta": a["eta"] + 1.5}, "eta must lie in"),
    (lambda a: {"alpha": a["alpha"] - 1}, "alpha must lie in"),
    (lambda a: {"theta": a["theta"] + float("inf")}, "theta must be finite"),
    (lambda a: {"chunk_size": 0}, "chunk_size"),
    (lambda a: {"chunk_size": 2.0}, "chunk_size"),
    (lambda a: {"weights": []}, "weights must be"),
    (lambda a: {"weights": [a["weights"][0][:, :, :3], a["weights"][1]]}, r"weights\[0\]"),
    (lambda a: {"weights": [a["weights"][0], a["weights"][1][:, :3]]}, "last memory layer"),
    (lambda a: {"activation": "swish2"}, "activation"),
    (lambda a: {"impl": "fast"}, "impl"),
])
def test_bad_input_raises_value_error_naming_the_argument(change, match):
    args = _bad()
    args.update(change(args))
    tensors = [args.pop(n) for n in NAMES]
    with pytest.raises(ValueError, match=match):
        memory_rule(*tensors, **args)


@pytest.mark.parametrize("gate", ["theta", "eta", "alpha"])
def test_nan_gates_propagate_instead_of_raising(gate):
    """A NaN born in a diverging training step reaches the output (and the trainer's non-finite
    handling), never an argument error from inside the model."""
    args = _bad()
    args[gate] = args[gate].clone()
    args[gate][:, 2] = float("nan")
    tensors = [args.pop(n) for n in NAMES]
    y, _ = memory_rule(*tensors, **args)
    assert y[:, 4:].isnan().all()  # from the next chunk on (inside its chunk it may reach earlier tokens)


def test_residual_needs_equal_dims():
    tensors, weights = make_inputs(T=6, Dk=8, Dv=5, depth=2)
    with pytest.raises(ValueError, match="residual"):
        memory_rule(*tensors, weights, residual=True)


def test_bad_state_raises():
    tensors, weights = make_inputs(T=6, depth=2)
    _, state = memory_rule(*tensors, weights, chunk_size=4)
    with pytest.raises(ValueError, match="position"):
        memory_rule(*tensors, weights, state=MemoryState(state.weights, state.momentum, state.chunk_start, -1))
    with pytest.raises(ValueError, match=r"state.momentum\[1\]"):
        memory_rule(*tensors, weights, state=MemoryState(state.weights, [state.momentum[0], state.momentum[1][:1]],
                                                          state.chunk_start, 6))
    with pytest.raises(ValueError, match="layers"):
        memory_rule(*tensors, weights, state=MemoryState(state.weights[:1], state.momentum, state.chunk_start, 6))
    with pytest.raises(ValueError, match="MemoryState"):
        memory_rule(*tensors, weights, state=(state.weights, state.momentum))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-matmuls"])
def test_kept_internals_are_bit_for_bit(monkeypatch, bf16):
    # the backward from kept internals expands them with the forward's own elementwise ops:
    # every gradient must equal the one from recomputing them, exactly (residual, depth 3; also
    # with bf16 matmuls under autocast, which test sizes get only below BF16_MIN_MATRIX)
    import titans.ops.chunk_backward as cb
    monkeypatch.setattr(cb, "KEEP_ALL_BYTES", 0)
    monkeypatch.setattr(chunk, "BF16_MIN_MATRIX", 0)
    tensors, weights = make_inputs(T=61, depth=3, dtype=torch.float32, seed=5)
    out = {}
    for mode, threshold in (("keep", 0), ("rebuild", 2 ** 62)):
        monkeypatch.setattr(cb, "KEEP_INTERNALS_MIN_MATRIX", threshold)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out[mode] = run_with_grads("chunk", tensors, weights, chunk_size=4, residual=True)
    (y_a, s_a, g_a), (y_b, s_b, g_b) = out["keep"], out["rebuild"]
    assert torch.equal(y_a, y_b) and all(torch.equal(a, b) for a, b in zip(s_a.weights, s_b.weights))
    assert all(torch.equal(a, b) for a, b in zip(g_a, g_b))


@pytest.mark.parametrize("mode", ["keep-all", "rebuild", "keep-internals"])
def test_second_backward_with_retain_graph(monkeypatch, mode):
    # the first backward releases what the forward kept; a second one (retain_graph) recomputes
    # everything from the initial state and must give the same gradients
    import titans.ops.chunk_backward as cb
    if mode != "keep-all":
        monkeypatch.setattr(cb, "KEEP_ALL_BYTES", 0)
    monkeypatch.setattr(cb, "KEEP_INTERNALS_MIN_MATRIX", 0 if mode == "keep-internals" else 2 ** 62)
    tensors, weights = make_inputs(T=61, depth=2, seed=3)
    xs = [t.detach().clone().requires_grad_() for t in tensors + weights]
    y, _ = memory_rule(*xs[:6], xs[6:], chunk_size=4)
    loss = y.square().sum()
    first = torch.autograd.grad(loss, xs, retain_graph=True)
    second = torch.autograd.grad(loss, xs)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("internals", [False, True], ids=["rebuild", "keep"])
def test_backward_inside_autocast_equals_outside(monkeypatch, internals):
    # the op's precision is set in its forward; a backward called inside autocast (which PyTorch
    # allows) must give exactly the gradients of one called outside
    import titans.ops.chunk_backward as cb
    monkeypatch.setattr(chunk, "BF16_MIN_MATRIX", 0)
    monkeypatch.setattr(cb, "KEEP_ALL_BYTES", 0)
    monkeypatch.setattr(cb, "KEEP_INTERNALS_MIN_MATRIX", 0 if internals else 2 ** 62)
    tensors, weights = make_inputs(T=61, depth=2, dtype=torch.float32, seed=6)
    grads = {}
    for inside in (True, False):
        xs = [t.detach().clone().requires_grad_() for t in tensors + weights]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = memory_rule(*xs[:6], xs[6:], chunk_size=4)
            if inside:
                grads[inside] = torch.autograd.grad(y.square().sum(), xs)
        if not inside:
            grads[inside] = torch.autograd.grad(y.square().sum(), xs)
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))


@pytest.mark.parametrize("internals", ["rebuild", "keep", "over-cap"])
@pytest.mark.parametrize("chunk_size,T,depth,residual", [(1, 23, 2, False), (4, 61, 2, False), (4, 61, 1, True),
                                                         (5, 61, 3, True)])
def test_checkpointed_backward_equals_reference(monkeypatch, chunk_size, T, depth, residual, internals):
    # long sequences keep only every K-th chunk state and rebuild the rest in the backward (with
    # large memories, from every piece's kept internals); force both paths at test sizes.
    # (5, 61): the last piece starts at a kept state that the op also returns as chunk_start;
    # the backward once recycled it, corrupting the returned state.
    import titans.ops.chunk_backward as cb
    monkeypatch.setattr(cb, "KEEP_ALL_BYTES", 0)
    monkeypatch.setattr(cb, "KEEP_INTERNALS_MIN_MATRIX", 2 ** 62 if internals == "rebuild" else 0)
    if internals == "over-cap":  # large enough to keep internals, too long to keep them all
        monkeypatch.setattr(cb, "KEEP_INTERNALS_MAX_BYTES", 0)
    tensors, weights = make_inputs(T=T, depth=depth, seed=21)
    assert_match("chunk", "ref", tensors, weights, 1e-9, chunk_size=chunk_size, residual=residual)
    assert_match("chunk", "ref", tensors, weights, 1e-9, chunk_size=chunk_size, residual=residual,
                 normalize_step=True)
    # and resuming mid-chunk in that mode
    _, state = memory_rule(*(t[:, :3] for t in tensors), weights, chunk_size=chunk_size + 2)
    a = [t[:, 3:].clone().requires_grad_() for t in tensors]
    y, _ = memory_rule(*a, weights, chunk_size=chunk_size + 2, state=state)
    g = torch.autograd.grad(y.square().sum(), a)
    y_ref, _ = memory_rule(*a, weights, chunk_size=chunk_size + 2, state=state, impl="ref")
    g_ref = torch.autograd.grad(y_ref.square().sum(), a)
    assert rel(y, y_ref) <= 1e-9 and all(rel(x, r) <= 1e-9 for x, r in zip(g, g_ref))


@pytest.mark.parametrize("case", ["random", "zeros", "no-decay", "underflow"])
def test_chunk_gates_backward_equals_autograd(case):
    # the hand-written gradient of the gate products (zeros of eta and 1 - alpha, products that
    # underflow and get flushed) against autograd through chunk_gates
    gen = torch.Generator().manual_seed(7)
    theta, eta, alpha = (torch.rand(3, 2, 11, generator=gen, dtype=F64) for _ in range(3))
    if case == "zeros":
        eta[..., 3], alpha[..., 5], theta[..., 2] = 0, 1, 0
    elif case == "no-decay":
        eta.fill_(1), alpha.fill_(0)
    elif case == "underflow":
        eta.fill_(1e-40), alpha.fill_(1 - 1e-300)
    xs = [x.clone().requires_grad_() for x in (theta, eta, alpha)]
    gates = chunk.chunk_gates(*xs)
    d = chunk.ChunkGates(*(torch.randn(x.shape, generator=gen, dtype=F64) for x in gates))
    ref = torch.autograd.grad(list(gates), xs, list(d), allow_unused=True)
    ours = chunk.chunk_gates_backward(theta, eta, alpha, d)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=1e-12, atol=1e-12)
