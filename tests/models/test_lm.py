"""TitansConfig and the TitansLM API: presets, validation, safe config files, output structure,
generation."""

from __future__ import annotations

import pytest
import torch

from titans import LMOutput, ModelState, TitansConfig, TitansLM
from titans.models.lm import sample


def test_presets_and_overrides():
    c = TitansConfig.from_preset("tiny", variant="mag", dim=32, heads=2)
    assert (c.variant, c.dim, c.heads, c.layer_kinds) == ("mag", 32, 2, ("mag", "mag"))
    assert TitansConfig.from_preset("small", variant="transformer").layer_kinds == ("attn",) * 4
    assert TitansConfig.from_preset("tiny", block_pattern=["swa", "lmm"], n_layers=3).layer_kinds == ("swa", "lmm", "swa")


@pytest.mark.parametrize("kw,match", [
    (dict(variant="mamba"), "variant"),
    (dict(dim=30, heads=4), "divisible"),
    (dict(segment_len=24, chunk_size=16), "multiple of chunk_size"),
    (dict(block_pattern=("lmm", "rnn")), "block_pattern"),
    (dict(gate_mode="layer"), "gate_mode"),
    (dict(memory_depth=0), "memory_depth"),
    (dict(n_persistent=-1), "n_persistent"),
    (dict(max_lr=0.0), "max_lr"),
    (dict(momentum_form="heavy"), "momentum_form"),
    (dict(theta_init=0.0), "theta_init"),
    (dict(alpha_init=(0.1, 0.01)), "alpha_init"),
    (dict(alpha_init=(0.1,)), "alpha_init"),
    (dict(forget_to_init=True, memory_depth=2), "forget_to_init needs a linear memory"),
])
def test_config_validation_errors_are_clear(kw, match):
    with pytest.raises(ValueError, match=match):
        TitansConfig(**kw)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset"):
        TitansConfig.from_preset("huge")
    with pytest.raises(ValueError, match="unknown field"):
        TitansConfig.from_dict({"dim": 64, "layers": 3})


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_round_trip(tmp_path, suffix):
    c = TitansConfig.from_preset("tiny", variant="mac", block_pattern=("mac", "swa"))
    path = tmp_path / f"cfg{suffix}"
    c.save(path)
    assert TitansConfig.load(path) == c


def test_config_loads_toml_and_rejects_bad_files(tmp_path):
    (tmp_path / "c.toml").write_text('variant = "mal"\ndim = 32\nheads = 2\n')
    assert TitansConfig.load(tmp_path / "c.toml").variant == "mal"
    (tmp_path / "bad.yaml").write_text("!!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ValueError, match="cannot parse"):
        TitansConfig.load(tmp_path / "bad.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="mapping"):
        TitansConfig.load(tmp_path / "list.json")
    with pytest.raises(ValueError, match="not found"):
        TitansConfig.load(tmp_path / "missing.json")


def test_forward_returns_the_same_structure_and_loss_matches_cross_entropy():
    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny"))
    x = torch.randint(0, 256, (2, 20))
    out = model(x)
    assert isinstance(out, LMOutput) and out.loss is None and isinstance(out.state, ModelState)
    assert out.logits.shape == (2, 20, 256) and out.state.position == 20
    labels = torch.randint(0, 256, (2, 20))
    labels[0, :5] = -100
    out = model(x, labels=labels)
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(out.logits[keep], labels[keep])
    assert torch.allclose(out.loss, expected)


def test_bad_model_inputs():
    model = TitansLM(TitansConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="labels"):
        model(torch.tensor([[1, 2]]), labels=torch.tensor([[1]]))
    with pytest.raises(ValueError, match="ModelState"):
        model(torch.tensor([[1, 2]]), state={"blocks.0": None})
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.tensor([[1]]), 3, top_p=1.5)
    with pytest.raises(ValueError, match="prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"one prompt: ids\[None\]"):
        model.generate(torch.tensor([1, 2]), 3)
    with pytest.raises(ValueError, match="nothing to score"):
        model(torch.tensor([[1, 2]]), labels=torch.full((1, 2), -100))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):  # not truncated to 1, 2
        model(torch.tensor([[1, 2]]), labels=torch.tensor([[1.5, 2.7]]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, vocab_size=256\) or be -100, got 300"):
        model(torch.tensor([[1, 2]]), labels=torch.tensor([[300, -100]]))


@pytest.mark.parametrize("other,match", [
    (dict(), "batch of 2 sequences, input_ids has 3"),
    (dict(variant="mag"), "another architecture"),
    (dict(dim=32), "another architecture"),
])
def test_a_state_from_elsewhere_is_refused(other, match):
    torch.manual_seed(0)
    state = TitansLM(TitansConfig.from_preset("tiny", **{"variant": "mac", **other}))(torch.randint(0, 256, (2, 8))).state
    model = TitansLM(TitansConfig.from_preset("tiny", variant="mac"))
    with pytest.raises(ValueError, match=match):
        model(torch.randint(0, 256, (3 if not other else 2, 8)), state=state)


def test_config_values_are_typed_from_text_and_files(tmp_path):
    c = TitansConfig.from_dict({"momentum": "False", "conv": "TRUE", "dim": "64", "heads": 2, "max_lr": 1,
                                "alpha_init": [1e-3, 2e-3], "block_pattern": "swa,lmm"})
    assert (c.momentum, c.conv, c.dim, c.max_lr) == (False, True, 64, 1.0)
    assert c.alpha_init == (1e-3, 2e-3) and c.block_pattern == ("swa", "lmm")
    for bad, match in (({"momentum": "maybe"}, "momentum must be true or false"), ({"dim": 64.5}, "dim must be an integer"),
                       ({"variant": 3}, "variant must be a string"), ({"forgetting": 1}, "forgetting must be true or false")):
        with pytest.raises(ValueError, match=match):
            TitansConfig.from_dict(bad)
    (tmp_path / "c.toml").write_text('momentum = "yes"\n')
    with pytest.raises(ValueError, match="momentum must be true or false, got 'yes'"):
        TitansConfig.load(tmp_path / "c.toml")


def test_generate_greedy_matches_argmax_of_forward():
    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant="mac")).eval()
    prompt = torch.randint(0, 256, (2, 9))
    ids = model.generate(prompt, 12, temperature=0)
    assert ids.shape == (2, 21) and torch.equal(ids[:, :9], prompt)
    logits = model(ids[:, :-1]).logits
    assert torch.equal(logits[:, 8:].argmax(-1), ids[:, 9:])


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    top2 = sample(logits, 1.0, top_k=2, generator=gen)
    assert set(top2.tolist()) == {2, 3}
    # p(3) = 0.64, p(2) = 0.24: top_p 0.5 keeps only the best token
    assert set(sample(logits, 1.0, top_p=0.5, generator=gen).tolist()) == {3}
    assert set(sample(logits, 1.0, top_p=0.8, generator=gen).tolist()) == {2, 3}
    assert set(sample(logits, 0.0).tolist()) == {3}


def test_tied_and_untied_embeddings():
    tied = TitansLM(TitansConfig.from_preset("tiny"))
    untied = TitansLM(TitansConfig.from_preset("tiny", tie_embeddings=False))
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(untied) - n(tied) == 256 * 64
