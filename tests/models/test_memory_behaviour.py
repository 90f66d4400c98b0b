"""The memory memorises inside the models: what a Titans variant reads far past its attention
window depends on what its memory wrote, and a trained model's memories stay alive over a long
stream. Each test fails on a memory that never writes (theta = 0)."""

from __future__ import annotations

import pytest
import torch

from titans import TitansConfig, TitansLM


@pytest.mark.parametrize("variant", ["lmm", "mac", "mag", "mal"])
def test_a_token_reaches_outputs_past_the_attention_window(variant):
    """tiny: window 32, segment 32, conv 4. Past them only the memory carries token 0 (at
    default init the gates do not depend on the input, so a memory that never writes carries
    nothing: with theta = 0 the outputs at positions >= 160 would be equal bit for bit)."""
    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant=variant)).eval()
    x = torch.randint(0, 256, (1, 224), generator=torch.Generator().manual_seed(1))
    x2 = x.clone()
    x2[0, 0] = (x2[0, 0] + 1) % 256
    with torch.no_grad():
        a, b = model(x).logits[0, 160:], model(x2).logits[0, 160:]
    change = ((a - b).norm() / a.norm()).item()
    assert change > 1e-5, f"changing token 0 moved the logits at 160-223 by {change:.3g} (relative)"


def test_a_trained_model_keeps_its_memories_over_32k_streamed_tokens():
    """make demo's recipe (MAC, byte-level text, AdamW), short: after 40 steps, stream 32K tokens
    of held-out text in pieces of 2,048. Every memory matrix must stay finite and keep at least a
    tenth of its initial norm: under the old defaults they were exactly 0 by 20K tokens. The
    text is Python's own standard-library source (real, structured, on every machine, no
    download): some modules to train on, others held out."""
    import argparse, http.client, inspect, json.decoder, pathlib, typing  # noqa: E401

    encode = lambda mods: torch.tensor(list("\n".join(inspect.getsource(m) for m in mods).encode()),
                                       dtype=torch.long)
    train, val = encode([argparse, pathlib, typing]), encode([http.client, json.decoder, inspect])[:32768 + 1]
    assert val.numel() == 32769
    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant="mac"))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, train.numel() - 257, (8,), generator=gen)
        batch = torch.stack([train[s:s + 257] for s in starts.tolist()])
        loss = model(batch[:, :-1], labels=batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    state, nll = None, []
    with torch.no_grad():
        for i in range(0, 32768, 2048):
            out = model(val[None, i:i + 2048], state=state, labels=val[None, i + 1:i + 2049])
            state, _ = out.state, nll.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(nll))), nll
    memories = list(state.memories().values())
    assert len(memories) == len(model.blocks)
    for block, s in zip(model.blocks, memories):
        for w, w0 in zip(s.memory.weights, block.mixer.memory.memory):
            assert torch.isfinite(w).all()
            assert w.norm() >= 0.1 * w0.norm(), f"|W| {w.norm():.3g} after 32K tokens, |W_0| {w0.norm():.3g}"
