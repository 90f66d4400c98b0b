"""Checkpoint files: exact round trip, atomic layout, pruning, validation and fallback."""

import json
import os
import pickle
import random
import warnings

import numpy as np
import pytest
import torch

from titans.train import (CheckpointError, list_checkpoints, load_checkpoint, load_latest,
                          save_checkpoint)
from titans.train.checkpoint import clean_temp, rng_state, set_rng_state
from titans.train.distributed import full_state_dicts


class FakeTokenizer:
    name = "fake"

    def save(self, directory):
        path = os.path.join(directory, "tokenizer.json")
        with open(path, "w") as f:
            f.write('{"vocab": 32}')
        return path


def _trained(tiny, tie=False):
    torch.manual_seed(0)
    model = tiny.TinyLM(tiny.TinyConfig(tie=tie))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 32, (2, 8))
    model(x, labels=x).loss.backward()
    opt.step()
    return model, opt


def _save(tiny, root, step, **kw):
    model, opt = _trained(tiny, kw.pop("tie", False))
    ms, os_ = full_state_dicts(model, opt)
    return save_checkpoint(root, step, model_state=ms, optim_state=os_, state={"data": {"s": 1}},
                           **kw), ms, os_


def test_round_trip_is_exact(tiny, tmp_path):
    path, ms, os_ = _save(tiny, tmp_path, 7, config={"dim": 16}, tokenizer=FakeTokenizer())
    assert path == tmp_path / "step_000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.pt", "tokenizer.json", "trainer_state.json"]
    assert (tmp_path / "latest").read_text() == "step_000007\n"
    ck = load_checkpoint(path)
    assert ck.step == 7 and ck.config == {"dim": 16} and ck.state["data"] == {"s": 1}
    assert ck.state["tokenizer"] == "fake"
    assert ck.model_state.keys() == ms.keys()
    assert all(torch.equal(ck.model_state[k], v) for k, v in ms.items())
    for name, st in os_["state"].items():
        for k, v in st.items():
            assert torch.equal(ck.optim_state["state"][name][k], v)
    assert ck.optim_state["param_groups"] == os_["param_groups"]


def test_tied_weights_stored_once(tiny, tmp_path):
    path, ms, _ = _save(tiny, tmp_path, 1, tie=True)
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "head.weight" in ms and len(stored) == len(ms) - 1
    ck = load_checkpoint(path)
    assert torch.equal(ck.model_state["head.weight"], ms["embed.weight"])
    model = tiny.TinyLM(tiny.TinyConfig(tie=True))
    model.load_state_dict(ck.model_state)
    assert model.head.weight is model.embed.weight


def test_keep_last_and_resave(tiny, tmp_path):
    for step in (2, 4, 6, 8):
        _save(tiny, tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000006", "step_000008"]
    _save(tiny, tmp_path, 6, keep_last=2)  # re-reaching a step replaces it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000006", "step_000008"]
    assert (tmp_path / "latest").read_text() == "step_000006\n"
    assert not list(tmp_path.glob(".tmp-*"))


def test_temp_dirs_are_ignored_and_cleaned(tiny, tmp_path):
    _save(tiny, tmp_path, 3)
    (tmp_path / ".tmp-step_000005").mkdir()  # what a kill during a save leaves
    (tmp_path / ".tmp-step_000005" / "model.safetensors").write_bytes(b"half")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003"]
    assert load_latest(tmp_path).step == 3
    clean_temp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000003"]


def _rewrite_size(path, name):
    """Record the file as it is now (size and sha256): a manifest that agrees with a bad file."""
    import hashlib
    state = json.loads((path / "trainer_state.json").read_text())
    state["files"][name] = {"size": (path / name).stat().st_size,
                            "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()}
    (path / "trainer_state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("damage,match", [
    ("truncate_model", r"model\.safetensors' is truncated"),
    ("garble_model", r"model\.safetensors' is corrupt"),
    ("garble_optim", r"optimizer\.pt' is corrupt"),
    ("delete_optim", r"optimizer\.pt' is missing"),
    ("garble_state", r"trainer_state\.json' is corrupt"),
    ("delete_state", r"trainer_state\.json' is missing"),
    ("pickle_optim", r"optimizer\.pt' is corrupt or holds more than tensors"),
])
def test_damaged_checkpoint_names_the_file(tiny, tmp_path, damage, match):
    path, _, _ = _save(tiny, tmp_path, 1)
    model, optim = path / "model.safetensors", path / "optimizer.pt"
    if damage == "truncate_model":
        model.write_bytes(model.read_bytes()[:-100])
    elif damage == "garble_model":  # same size, broken header
        data = model.read_bytes()
        model.write_bytes(b"\xff" * 8 + data[8:])
    elif damage == "garble_optim":
        data = optim.read_bytes()
        optim.write_bytes(data[:50] + bytes(len(data) - 50))
    elif damage == "delete_optim":
        optim.unlink()
    elif damage == "garble_state":
        (path / "trainer_state.json").write_text("{not json")
    elif damage == "delete_state":
        (path / "trainer_state.json").unlink()
    elif damage == "pickle_optim":  # an arbitrary object: weights_only must refuse it
        torch.save({"state": {}, "evil": FakeTokenizer()}, optim)
        _rewrite_size(path, "optimizer.pt")
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_weights_changed_in_place_are_caught_and_the_previous_checkpoint_used(tiny, tmp_path):
    _save(tiny, tmp_path, 1)
    path, _, _ = _save(tiny, tmp_path, 2)
    model = path / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-64:] = bytes(64)  # tensor bytes zeroed: same size, header intact, parses fine
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors' is corrupt: its sha256 differs"):
        load_checkpoint(path)
    with pytest.warns(UserWarning, match="skipping bad checkpoint"):
        assert load_latest(tmp_path).step == 1


def test_inference_reads_only_the_weights(tiny, tmp_path):
    path, ms, _ = _save(tiny, tmp_path, 1)
    (path / "optimizer.pt").write_bytes(b"x" * (path / "optimizer.pt").stat().st_size)
    ck = load_checkpoint(path, load_optimizer=False)
    assert ck.optim_state is None and torch.equal(ck.model_state["embed.weight"], ms["embed.weight"])
    with pytest.raises(CheckpointError, match="optimizer"):
        load_checkpoint(path)


def test_files_are_written_with_the_same_permissions(tiny, tmp_path):
    path, _, _ = _save(tiny, tmp_path, 1)
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    assert len(set(modes.values())) == 1, modes


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_object_is_never_loaded(tiny, tmp_path):
    path, _, _ = _save(tiny, tmp_path, 1)
    with open(path / "optimizer.pt", "wb") as f:
        pickle.dump(FakeTokenizer(), f)  # a plain pickle, not even a torch zip
    _rewrite_size(path, "optimizer.pt")
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        load_checkpoint(path)


def test_load_latest_falls_back(tiny, tmp_path):
    assert load_latest(tmp_path / "none") is None
    _save(tiny, tmp_path, 2)
    bad, _, _ = _save(tiny, tmp_path, 4)
    (bad / "model.safetensors").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"step_000004/model\.safetensors.*previous"):
        assert load_latest(tmp_path).step == 2
    (tmp_path / "step_000002" / "trainer_state.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="no usable checkpoint"):
            load_latest(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "step_000009")


def test_rng_state_round_trip():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    random.gauss(0, 1), np.random.randn()  # leave cached gaussians in both
    saved = json.loads(json.dumps(rng_state()))  # survives JSON
    draw = lambda: (torch.rand(4).tolist(), np.random.rand(4).tolist(), random.random(),  # noqa: E731
                    random.gauss(0, 1), float(np.random.randn()))
    first = draw()
    draw()
    set_rng_state(saved)
    assert draw() == first
