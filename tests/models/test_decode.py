"""The one-token decode step (titans.models.decode) against the chunked forward: logits and
state at every step, greedy tokens, in-place buffers that never leak, clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from titans.layers import Attention
from titans.layers.decode import AttentionDecoder
from titans.ops import native

from .test_variants import HYBRID, VARIANTS, ids, tiny

CASES = ([(v, dict(memory_depth=d)) for v in VARIANTS for d in (1, 2)]
         + [("lmm", HYBRID),
            ("mac", dict(mac_write="y", memory_residual=True, memory_depth=2)),
            ("mag", dict(gate_mode="chunk", momentum=True, momentum_form="plain", qk_silu=True)),
            ("mal", dict(mal_residual=False, qk_norm=True, conv=False)),
            ("lmm", dict(momentum=True, normalize_step=False, memory_activation="gelu", key_shift=False)),
            ("mac", dict(forget_to_init=True)),
            ("lmm", dict(forget_to_init=True, momentum=True, memory_residual=True))])
NAMES = [f"{v}-depth{d}" for v in VARIANTS for d in (1, 2)] + [
    "hybrid", "mac-write-y-residual", "mag-chunk-gates-momentum", "mal-eq31-qknorm-noconv", "lmm-plain-gelu",
    "mac-forget-to-init", "lmm-forget-to-init-momentum-residual"]


def assert_same(a, b, where: str, tol: float = 1e-12) -> None:
    """Two streaming states hold the same structure and values (tensors within tol)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item()), where
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}", tol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]", tol)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key}]", tol)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(params=["native", "python"])
def path(request, monkeypatch):
    """The memory's decode step in C++ (csrc/step_native.cpp) or in Python (its definition)."""
    if request.param == "python":
        monkeypatch.setattr(native, "step_module", lambda: None)
    elif native.step_module() is None:
        pytest.fail("the C++ decode step did not build (a compiler is part of the test set-up)")
    return request.param


@pytest.mark.parametrize("variant,kw", CASES, ids=NAMES)
def test_decode_equals_the_forward_at_every_step(variant, kw, path):
    model = tiny(variant, **kw)
    x = ids()                          # T = 70: chunk (16), window (32) and segment (32) edges in the decode
    full = model(x).logits
    prefill = 23
    state = model(x[:, :prefill]).state
    decoder = model.decoder(state)
    for t in range(prefill, x.shape[1]):
        logits = decoder.step(x[:, t])
        state = model(x[:, t:t + 1], state=state).state      # the chunked forward, one token per call
        assert (logits - full[:, t]).abs().max() < 1e-5, t   # logits are float32
        assert_same(decoder.state(), state, f"step {t}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_equal_the_forward_loop(variant):
    model = tiny(variant).float()
    prompt = ids(B=3, T=9, seed=1)
    tokens = model.generate(prompt, 40, temperature=0)[:, 9:]
    out = model(prompt)
    expect, state = [], out.state
    token = out.logits[:, -1].argmax(-1)
    for _ in range(40):
        expect.append(token)
        out = model(token[:, None], state=state)
        token, state = out.logits[:, -1].argmax(-1), out.state
    assert torch.equal(tokens, torch.stack(expect, 1))


def test_decoder_state_is_a_copy_and_the_prefill_state_is_untouched():
    model = tiny("mac")
    state = model(ids(T=40)).state
    before = state.detach()
    before = dataclasses.replace(before, layers={k: _clone(v) for k, v in before.layers.items()})
    decoder = model.decoder(state)
    decoder.step(ids(T=1)[:, 0])
    snapshot = decoder.state()
    kept = dataclasses.replace(snapshot, layers={k: _clone(v) for k, v in snapshot.layers.items()})
    for t in range(5):
        decoder.step(ids(T=1, seed=t)[:, 0])
    assert_same(state, before, "prefill state", tol=0)
    assert_same(snapshot, kept, "exported state", tol=0)


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _clone(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, list):
        return [_clone(o) for o in obj]
    return obj


def test_full_attention_buffer_grows():
    torch.manual_seed(0)
    layer = Attention(32, 2, n_persistent=3).double()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    full, _ = layer(x)
    _, state = layer(x[:, :4])
    decoder = AttentionDecoder(layer, state, 2, reserve=1)     # grows at once, then doubles
    for t in range(4, 20):
        assert (decoder.step(x[:, t]) - full[:, t]).abs().max() < 1e-12
    assert_same(decoder.state(), layer(x)[1], "state")


def test_decoder_needs_a_prefilled_state():
    model = tiny("lmm")
    with pytest.raises(ValueError, match="prefill"):
        model.decoder(model.init_state(2))
    with pytest.raises(ValueError, match="ModelState"):
        model.decoder(None)
    with pytest.raises(ValueError, match="architecture"):
        model.decoder(tiny("mac")(ids(T=3)).state)
