"""Every variant and baseline through TitansLM: causality, streaming, decoding, bounded state,
learning, and MAC's write-from-y (docs/design.md §3)."""

from __future__ import annotations

import random

import pytest
import torch

from titans import TitansConfig, TitansLM
from titans.models.variants import MAC, MAL
from titans.ops import memory_forward

VARIANTS = ["lmm", "mac", "mag", "mal", "transformer", "swa"]
HYBRID = dict(block_pattern=("swa", "mac", "lmm", "mag", "mal", "attn"), n_layers=6)


def tiny(variant, **kw) -> TitansLM:
    torch.manual_seed(0)
    # tiny: chunk 16, window 32, segment 32, 4 persistent tokens; T = 70 crosses all of them
    model = TitansLM(TitansConfig.from_preset("tiny", variant=variant, **kw)).double()
    with torch.no_grad():  # data-dependent gates, so that every token's gates differ
        for name, p in model.named_parameters():
            if name.endswith("wgates.weight"):
                p.normal_(std=0.3)
    return model.eval()


def ids(B=2, T=70, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


CASES = [(v, {}) for v in VARIANTS] + [("lmm", HYBRID)]
NAMES = VARIANTS + ["hybrid"]


@pytest.mark.parametrize("variant,kw", CASES, ids=NAMES)
def test_causal(variant, kw):
    model = tiny(variant, **kw)
    x = ids(B=1)
    ref = model(x).logits
    for j in (0, 15, 16, 31, 32, 33, 69):  # chunk, window and segment edges
        x2 = x.clone()
        x2[0, j] = (x2[0, j] + 1) % 256
        out = model(x2).logits
        assert torch.equal(out[:, :j], ref[:, :j]), f"position < {j} changed"
        assert not torch.equal(out[:, j], ref[:, j])


@pytest.mark.parametrize("variant,kw", CASES, ids=NAMES)
def test_streaming_random_pieces_equal_one_pass(variant, kw):
    model = tiny(variant, **kw)
    x = ids()
    full = model(x).logits
    rng = random.Random(variant)
    for _ in range(2):
        logits, state, i = [], None, 0
        while i < x.shape[1]:
            n = min(rng.randint(1, 25), x.shape[1] - i)
            out = model(x[:, i:i + n], state=state)
            logits.append(out.logits)
            state, i = out.state, i + n
        assert (torch.cat(logits, 1) - full).abs().max() < 1e-9


@pytest.mark.parametrize("variant,kw", CASES, ids=NAMES)
def test_prefill_then_decode_equals_forward(variant, kw):
    model = tiny(variant, **kw)
    x = ids()
    full = model(x).logits
    out = model(x[:, :23])
    logits, state = [out.logits], out.state
    for t in range(23, x.shape[1]):
        out = model(x[:, t:t + 1], state=state)
        logits.append(out.logits)
        state = out.state
    assert (torch.cat(logits, 1) - full).abs().max() < 1e-9


def _state_numel(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, (list, tuple)):
        return sum(_state_numel(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_state_numel(o) for o in obj.values())
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_state_numel(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 0


@pytest.mark.parametrize("variant", ["lmm", "mac", "mag", "mal", "swa"])
def test_decode_state_does_not_grow(variant):
    model = tiny(variant)
    state = model(ids(B=1, T=8)).state
    sizes = []
    for t in range(120):
        state = model(torch.tensor([[t % 256]]), state=state).state
        if t % 32 == 31:  # compare at the same phase of every chunk/window/segment period
            sizes.append(_state_numel(state))
    assert len(set(sizes)) == 1, sizes


@pytest.mark.parametrize("variant,kw", CASES, ids=NAMES)
def test_overfits_a_tiny_repeated_sequence(variant, kw):
    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant=variant, **kw))
    seq = torch.randint(0, 256, (1, 12))
    x = seq.repeat(1, 4)                      # 48 tokens: the pattern repeats
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    # gradients clipped as in any real run (titans.train): without it a loss spike near step 50
    # (seed 0, hybrid) made the result hinge on float-level differences between kernels; with it
    # every variant is below 0.03x its first loss at step 59 in both the C++ and Python paths
    for step in range(60):
        loss = model(x[:, :-1], labels=x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.1 * first, (first, loss.item())


@pytest.mark.parametrize("write", ["y", "residual", "x"])
def test_mac_writes_the_chosen_stream(write):
    torch.manual_seed(0)
    cfg = TitansConfig.from_preset("tiny", variant="mac", mac_write=write)
    mac = MAC(cfg).double()
    x = torch.randn(1, 2 * cfg.segment_len, cfg.dim, dtype=torch.float64)
    C = cfg.segment_len
    seen, ys = [], []
    hook = mac.memory.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    wo = mac.wo.register_forward_hook(lambda mod, args, out: ys.append(out.detach()))
    _, state = mac(x[:, :C])
    hook.remove()
    wo.remove()
    expected = {"y": ys[0], "residual": x[:, :C] + ys[0], "x": x[:, :C]}[write]
    assert torch.equal(seen[0], expected)
    # the memory state after segment 1 is exactly what writing that stream gives
    _, direct = mac.memory(seen[0])
    for a, b in zip(state.memory.memory.weights, direct.memory.weights):
        assert torch.allclose(a, b, atol=1e-12)
    h_ref = mac.retrieve(x[:, C:], state.memory.memory.weights)
    # change segment 1's input: segment 2's retrieval moves (whatever is written depends on x)
    _, state2 = mac(x[:, :C] + 0.5)
    h_new = mac.retrieve(x[:, C:], state2.memory.memory.weights)
    assert not torch.allclose(h_new, h_ref)


@pytest.mark.parametrize("qk_silu", [False, True])
def test_mac_retrieves_with_the_memorys_own_query_features(qk_silu):
    # without the convolution, MAC's retrieval query is exactly the memory layer's q
    torch.manual_seed(0)
    mac = MAC(TitansConfig.from_preset("tiny", variant="mac", conv=False, qk_silu=qk_silu)).double()
    mem = mac.memory
    x = torch.randn(1, 20, 64, dtype=torch.float64)
    q = mem._qkv(x, mem.init_state(1))[0]                                           # [B, T, H, Dh]
    expected = mem.read_out(memory_forward(q.transpose(1, 2), [w.unsqueeze(0) for w in mem.memory], mem.activation,
                                           mem.residual).transpose(1, 2), x)
    torch.testing.assert_close(mac.retrieve(x, None), expected, rtol=1e-12, atol=1e-12)


def test_mal_residual_passes_the_memory_output_past_the_attention():
    torch.manual_seed(0)
    x = torch.randn(1, 40, 64, dtype=torch.float64)
    for residual in (True, False):
        mal = MAL(TitansConfig.from_preset("tiny", variant="mal", mal_residual=residual)).double()
        outs = []
        hook = mal.memory.register_forward_hook(lambda mod, args, out: outs.append(out[0].detach()))
        o, _ = mal(x)
        hook.remove()
        y = outs[0][:, mal.persistent().shape[0]:]
        # zero the attention's output projection: what is left is the memory's own output, or nothing
        torch.nn.init.zeros_(mal.attention.wo.weight)
        o0, _ = mal(x)
        assert torch.allclose(o0, y if residual else torch.zeros_like(y), atol=1e-12)


def test_hybrid_pattern_builds_the_listed_kinds():
    model = tiny("lmm", **HYBRID)
    names = [type(b.mixer).__name__ for b in model.blocks]
    assert names == ["Attention", "MAC", "NeuralMemory", "MAG", "MAL", "Attention"]
    assert model.blocks[0].mixer.window == 32 and model.blocks[5].mixer.window is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_stream_scale_at_init(variant):
    """At init every block's mixer writes an update of the embeddings' order into the residual
    stream (GPT-2 scaling; MAC's and MAG's gated product alone has RMS ~0.5, 25x the embeddings),
    and MAL's attention sees normalised inputs (the memory's output alone has RMS ~1e-4)."""
    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant=variant)).eval()
    seen = {}
    rms = lambda t: t.float().pow(2).mean().sqrt().item()
    hooks = [b.mixer.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (rms(i[0]), rms(o[0]))))
             for n, b in enumerate(model.blocks)]
    if variant == "mal":
        for n, b in enumerate(model.blocks):
            hooks.append(b.mixer.attention.register_forward_hook(
                lambda m, i, o, n=n: seen.__setitem__(f"attn{n}", rms(i[0]))))
    with torch.no_grad():
        model(ids(B=2, T=96))
    for h in hooks:
        h.remove()
    embed = model.embed.weight.std().item()
    for n in range(len(model.blocks)):
        _, out = seen[n]
        assert 0 < out < 3 * embed, f"block {n}: mixer output RMS {out:.3g} against embeddings {embed:.3g}"
        if variant == "mal":
            assert 0.5 < seen[f"attn{n}"] < 2, f"MAL attention input RMS {seen[f'attn{n}']:.3g}"


@pytest.mark.parametrize("kw", [{}, dict(memory_depth=2, memory_residual=True), dict(mac_write="y")],
                         ids=["default", "deep", "write-y"])
def test_mac_without_autograd_equals_the_training_path(kw):
    """Without autograd MAC runs a call's whole segments together (MAC._segments); the logits and
    the state equal the segment-by-segment path's, from a boundary and from inside a segment."""
    from .test_decode import assert_same
    model = tiny("mac", **kw)
    x = ids(T=110)                                   # segments of 32: three whole ones and a part
    ref = model(x)
    full = model(x[:, :40])
    ref_split = model(x[:, 40:], state=full.state)
    with torch.no_grad():
        out = model(x)
        first = model(x[:, :40])
        split = model(x[:, 40:], state=first.state)   # starts inside a segment, then whole ones
    assert (out.logits - ref.logits).abs().max() < 1e-9
    assert_same(out.state, ref.state.detach(), "state", tol=1e-10)
    assert (split.logits - ref_split.logits).abs().max() < 1e-9
    assert_same(split.state, ref_split.state.detach(), "split state", tol=1e-10)
