"""DDP and FSDP2 under torchrun (2 processes, gloo) follow the single-process loss trajectory."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titans.train.distributed import DistEnv, fsdp_units, setup, shard_rows

TINY_LM = Path(__file__).with_name("tiny_lm.py")


def test_shard_rows_takes_contiguous_blocks():
    x = torch.arange(12).view(6, 2)
    parts = [shard_rows(x, DistEnv(mode="ddp", rank=r, world_size=3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), x) and parts[1].tolist() == [[4, 5], [6, 7]]
    assert shard_rows(x, DistEnv()) is x
    with pytest.raises(ValueError, match="batch_size 6 must be divisible by the world size 4"):
        shard_rows(x, DistEnv(mode="ddp", rank=0, world_size=4))


def test_setup_errors(monkeypatch):
    with pytest.raises(ValueError, match="distributed must be one of"):
        setup("horovod")
    with pytest.raises(ValueError, match="device must be"):
        setup("none", device="tpu")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="needs torchrun"):
        setup("fsdp")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2"):
        setup("none")


def test_fsdp_units_are_the_layer_stack(tiny):
    model = tiny.TinyLM(tiny.TinyConfig(layers=3))
    assert list(fsdp_units(model)) == list(model.layers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("carry, lead", [(0, 0), (4, 0), (0, 16)])
def test_ddp_and_fsdp_match_one_process(tiny, tmp_path, carry, lead):
    """2 ranks x 2 rows == 1 process x 4 rows, with grad_accum=2, clipping, eval, and resume.
    carry 4: the tiny TitansLM with its state carried across steps (TBPTT): each rank carries its
    own rows' states, and the step-3 checkpoint holds every rank's. lead 16: the tiny TitansLM
    with a lead-in streamed without gradient (through the wrapped model) before each window."""
    kw = dict(steps=6, ckpt_every=3, grad_accum=2, carry_state=carry, lead_in=lead)
    single = tiny.make(tiny.base_cfg(str(tmp_path / "single"), **kw)).fit()
    env = {**os.environ, "PYTHONPATH": str(TINY_LM.parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(TINY_LM),
           "--modes", "ddp,fsdp", "--out", str(tmp_path), "--steps", "6", "--ckpt-every", "3",
           "--grad-accum", "2", "--carry-state", str(carry), "--lead-in", str(lead)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "losses.json").read_text())
    for mode in ("ddp", "fsdp"):
        full, resumed = result[mode]["full"], result[mode]["resumed"]
        assert [r["step"] for r in full] == list(range(1, 7))
        for one, many in zip(single, full):
            for key in ("loss", "grad_norm"):
                assert many[key] == pytest.approx(one[key], abs=1e-5), (mode, key, one["step"])
            assert (many["val_loss"] is None) == (one["val_loss"] is None)
            if one["val_loss"] is not None:
                assert many["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
        # resumed from the full run's step-3 checkpoint (full state dicts, every rank loads)
        assert [r["step"] for r in resumed] == [4, 5, 6]
        for a, b in zip(resumed, full[3:]):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (mode, a["step"])
