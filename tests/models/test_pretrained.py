"""save_pretrained / from_pretrained: a saved model, a run directory and a checkpoint directory
load the same way, exactly, and a bad directory is a clear error (no network in these tests)."""

from __future__ import annotations

import json

import pytest
import torch

from titans import TitansConfig, TitansLM


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _model(variant="mac", **kw):
    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant=variant, **kw)).eval()
    with torch.no_grad():  # move every weight off its init so a missed tensor shows
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant", ["mac", "lmm"])
def test_save_then_load_gives_the_same_model(tmp_path, variant):
    model = _model(variant)
    model.save_pretrained(tmp_path / "m")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "m").iterdir()}
    assert json.loads((tmp_path / "m" / "config.json").read_text())["variant"] == variant
    loaded = TitansLM.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    assert loaded.head.weight is loaded.embed.weight  # tied weights stay tied
    x = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        a, b = model(x[:, :20]), loaded(x[:, :20])
        assert torch.equal(a.logits, b.logits)
        # the state behaves the same: continuing the stream gives the same outputs
        assert torch.equal(model(x[:, 20:], state=a.state).logits, loaded(x[:, 20:], state=b.state).logits)


def test_a_run_and_a_checkpoint_load_like_a_saved_model(tmp_path):
    from titans.train import save_checkpoint
    model = _model("mag")
    ckpts = tmp_path / "run" / "checkpoints"
    path = save_checkpoint(ckpts, 7, model_state=model.state_dict(), optim_state=None, state={},
                           config=model.config.to_dict())
    x = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        want = model(x).logits
        for where in (tmp_path / "run", path):
            assert torch.equal(TitansLM.from_pretrained(where)(x).logits, want)


@pytest.mark.parametrize("damage,match", [
    ("no_weights", "model.safetensors' is missing"),
    ("garbled_weights", "is corrupt or does not fit config.json"),
    ("other_config", "is corrupt or does not fit config.json"),
    ("no_config", "has no config.json"),
    ("bad_config", "memory_depth must be an integer"),
])
def test_a_bad_directory_is_one_clear_error(tmp_path, damage, match):
    d = tmp_path / "m"
    _model().save_pretrained(d)
    if damage == "no_weights":
        (d / "model.safetensors").unlink()
    elif damage == "garbled_weights":
        (d / "model.safetensors").write_bytes(b"\x07" * 200)
    elif damage == "other_config":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "dim": 32}))
    elif damage == "no_config":
        (d / "config.json").unlink()
    elif damage == "bad_config":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "memory_depth": "deep"}))
    with pytest.raises(ValueError, match=match) as info:
        TitansLM.from_pretrained(d)
    assert "\n" not in str(info.value)


def test_a_path_that_is_not_there_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in ("./typo/path", "runs/x/y", str(tmp_path / "nope")):  # not hub ids: no network at all
        with pytest.raises(FileNotFoundError, match="no such directory") as info:
            TitansLM.from_pretrained(missing)
        assert missing in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="'typo/path': no such directory, and the hub"):
        TitansLM.from_pretrained("typo/path")  # a hub id's form: the hub is asked (offline here)
    d = tmp_path / "m"
    _model().save_pretrained(d)
    with pytest.raises(ValueError, match="is a file"):
        TitansLM.from_pretrained(d / "model.safetensors")
    (d / "config.json").write_text('{"dim": 64,')
    with pytest.raises(ValueError, match=r"config.json' is not valid JSON"):
        TitansLM.from_pretrained(d)


def test_the_model_card_says_what_the_model_is_and_no_more(tmp_path):
    model = _model("lmm")
    model.save_pretrained(tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: titans") and "variant `lmm`" in card
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in card
    assert "pushed to the Hub" not in card
    model.save_pretrained(tmp_path / "n", model_card="my card")
    assert (tmp_path / "n" / "README.md").read_text() == "my card"
