"""Weight-decay groups, the warmup + cosine schedule, TrainConfig validation."""

import json
import math

import pytest
import torch
from torch import nn

from titans.train import TrainConfig, build_optimizer, decays, lr_at, param_groups


def test_decay_rule():
    w2, w1 = torch.zeros(3, 3), torch.zeros(3)
    assert decays("layers.0.mix.weight", w2)
    assert not decays("layers.0.mix.bias", w1)              # ndim < 2
    assert not decays("gate", torch.zeros(()))               # scalar
    assert not decays("embed.weight", w2)                    # embedding by name
    assert not decays("tok_Embedding.weight", w2)            # case-insensitive
    assert not decays("layers.0.norm.weight", w2)            # a 2-d norm gain is still a norm
    assert not decays("proj.bias_table", w2)


def test_param_groups_on_a_model(tiny):
    model = tiny.TinyLM(tiny.TinyConfig(layers=1))
    model.norm.weight.requires_grad_(False)                  # frozen: left out
    groups = param_groups(model.named_parameters(), 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert groups[0]["names"] == ["layers.0.mix.weight", "head.weight"]
    assert groups[1]["names"] == ["embed.weight", "layers.0.norm.weight", "layers.0.norm.bias",
                                  "layers.0.mix.bias", "norm.bias"]
    assert all(p is dict(model.named_parameters())[n]
               for g in groups for n, p in zip(g["names"], g["params"]))


def test_tied_head_is_not_decayed(tiny):
    model = tiny.TinyLM(tiny.TinyConfig(layers=1, tie=True))
    names = [n for g in param_groups(model.named_parameters(), 0.1) for n in g["names"]]
    assert "head.weight" not in names and "embed.weight" in names


def test_build_optimizer_errors():
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(nn.Linear(2, 2).named_parameters(), -1.0)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, 1e-3, 0.1)
    opt = build_optimizer(nn.Linear(2, 2), 1e-3, 0.1, betas=(0.8, 0.9))
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[1]["weight_decay"] == 0


def test_lr_schedule_values():
    kw = dict(lr=1.0, steps=11, warmup=2, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == 0.5 and lr_at(1, **kw) == 1.0    # warmup: (s + 1) / warmup
    assert lr_at(2, **kw) == 1.0                               # cosine starts at the peak
    # halfway through the cosine (p = 4/8): lo + (1 - lo) / 2
    assert lr_at(6, **kw) == pytest.approx(0.55)
    assert lr_at(4, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(10, **kw) == pytest.approx(0.1)               # last update at the floor
    assert lr_at(50, **kw) == pytest.approx(0.1)               # stays there
    assert lr_at(0, lr=2.0, steps=3, warmup=0, min_lr_ratio=0.0) == 2.0
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, **kw)


@pytest.mark.parametrize("field,value,match", [
    ("steps", 0, "steps"), ("batch_size", 2.0, "batch_size"), ("grad_accum", 0, "grad_accum"),
    ("lr", 0.0, "lr"), ("min_lr_ratio", 1.5, "min_lr_ratio"), ("betas", (0.9, 1.0), "betas"),
    ("grad_clip", -1.0, "grad_clip"), ("distributed", "deepspeed", "distributed"),
    ("keep_last", 0, "keep_last"), ("eval_every", -1, "eval_every"), ("log_every", 0, "log_every"),
])
def test_train_config_rejects(field, value, match):
    with pytest.raises(ValueError, match=f"TrainConfig.{match}"):
        TrainConfig(**{field: value})


def test_train_config_dict_roundtrip():
    cfg = TrainConfig(steps=5, betas=(0.8, 0.9), resume="x")
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))  # betas: list in JSON
    assert back == cfg and back.betas == (0.8, 0.9)
    with pytest.raises(ValueError, match=r"unknown fields \['stepz'\]"):
        TrainConfig.from_dict({"stepz": 3})
