"""Training on the states of long streams (TrainConfig.carry_state): the state carries, detached,
from step to step and starts empty every K steps; StreamBatches continue each row's stream; a
checkpoint holds the carried states, so a resumed run equals the uninterrupted one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from titans import TitansConfig, TitansLM
from titans.data import StreamBatches
from titans.train import TrainConfig, Trainer, seed_everything
from titans.train.carry import flatten_state, unflatten_state
from titans.train.checkpoint import load_checkpoint

TOKENS = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16)


def test_stream_batches_continue_each_row():
    b = StreamBatches(TOKENS, batch_size=3, seq_len=8, windows=4, seed=1, micro_batches=2)
    # micro-batch m of step k is batch 2 k + m; windows 0-3 of one stream, then new starts
    first = [b.batch(2 * k)[0] for k in range(5)]
    starts = _starts(first[0])
    for k in range(1, 4):
        assert torch.equal(first[k][:, 0], b.batch(2 * (k - 1))[1][:, -1])   # targets run on
        assert torch.equal(first[k], torch.stack([torch.from_numpy(TOKENS[s + 8 * k:s + 8 * k + 8].astype(np.int64))
                                                  for s in starts]))
    assert not torch.equal(first[4][:, 0], b.batch(6)[1][:, -1])                # stream 2 starts elsewhere
    assert not torch.equal(b.batch(0)[0], b.batch(1)[0])                        # micro-batches differ
    b.step = 5
    state = b.state_dict()
    other = StreamBatches(TOKENS, 3, 8, 4, seed=1, micro_batches=2)
    other.load_state_dict(state)
    assert torch.equal(next(other)[0], b.batch(5)[0])
    with pytest.raises(ValueError, match="windows"):
        StreamBatches(TOKENS, 3, 8, 5, seed=1, micro_batches=2).load_state_dict(state)
    with pytest.raises(ValueError, match="need at least"):
        StreamBatches(TOKENS[:100], 3, 8, 20)


def _starts(window: torch.Tensor) -> np.ndarray:
    """Where each row of a first window starts in TOKENS (rows are distinct random 8-grams)."""
    view = np.lib.stride_tricks.sliding_window_view(TOKENS.astype(np.int64), 8)
    return np.array([int(np.flatnonzero((view == row.numpy()).all(1))[0]) for row in window])


def _trainer(out, variant="mac", **kw):
    seed_everything(0)
    config = TitansConfig.from_preset("tiny", variant=variant)
    cfg = TrainConfig(**{**dict(steps=6, batch_size=2, seq_len=48, grad_accum=2, lr=2e-3, warmup=2,
                                eval_every=0, ckpt_every=3, out_dir=str(out), progress=False, carry_state=4), **kw})
    batches = StreamBatches(TOKENS, cfg.batch_size, cfg.seq_len, cfg.carry_state, micro_batches=cfg.grad_accum)
    return Trainer(TitansLM(config), batches, None, cfg, config_dict=config.to_dict())


def test_the_state_carries_and_restarts_every_k_steps(tmp_path):
    trainer = _trainer(tmp_path / "a")
    seen = []
    forward = trainer.forward
    trainer.forward = lambda x, labels, state: seen.append(state) or forward(x, labels=labels, state=state)
    for _ in range(6):
        trainer.train_step()
    # two micro-batches per step: steps 0 and 4 start empty, the others carry
    assert [s is None for s in seen] == [True, True, False, False, False, False, False, False, True, True,
                                         False, False]
    assert seen[2].position == 48 and seen[7].position == 3 * 48
    assert all(not t.requires_grad for s in seen if s is not None for m in s.memories().values()
               for t in m.memory.weights)


def test_carried_state_round_trips_without_pickle():
    model = TitansLM(TitansConfig.from_preset("tiny", variant="mag"))
    state = model(torch.randint(0, 256, (2, 40))).state
    skeleton, tensors = flatten_state(state, "rank0.micro0")
    assert all(k.startswith("rank0.micro0.") for k in tensors)
    back = unflatten_state(skeleton, tensors)
    x = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(model(x, state=back).logits, model(x, state=state).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside the titans package"):
        unflatten_state({"class": "os:PathLike", "fields": {}}, {})


@pytest.mark.parametrize("variant", ["mac", "lmm"])
def test_resume_equals_the_uninterrupted_run(tmp_path, variant):
    full = _trainer(tmp_path / "full", variant).fit()
    ckpt = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_000003")
    assert ckpt.carried and all(k.startswith(("rank0.micro0.", "rank0.micro1.")) for k in ckpt.carried)
    resumed = _trainer(tmp_path / "resumed", variant, resume=str(ckpt.path)).fit()
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[3:]]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full[3:]]
    # without the carried states the resumed run differs: the test can fail
    trainer = _trainer(tmp_path / "lost", variant, resume=str(ckpt.path))
    trainer.carried = [None, None]
    assert trainer.train_step()["loss"] != full[3]["loss"]


def test_a_lead_in_is_streamed_without_gradient_before_the_trained_tokens(tmp_path):
    """TrainConfig.lead_in: rows of P + T tokens train on the last T from the state the first P
    leave, with no gradient through the lead-in; the same as the manual computation."""
    from titans.data.tasks.common import TaskBatches

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 20 + 32), generator=g)
    y = torch.randint(0, 256, (2, 20 + 32), generator=g)

    def trainer(lead_in, batch):
        seed_everything(0)
        config = TitansConfig.from_preset("tiny", variant="lmm")
        cfg = TrainConfig(steps=1, batch_size=2, seq_len=32, lr=2e-3, warmup=0, eval_every=0, ckpt_every=0,
                          out_dir=str(tmp_path / f"run{lead_in}-{batch.shape[1]}"), progress=False, lead_in=lead_in)
        return Trainer(TitansLM(config), TaskBatches(lambda s: (batch, y[:, -batch.shape[1]:]), "t"), None, cfg)

    row = trainer(20, x).train_step()
    seed_everything(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant="lmm"))
    with torch.no_grad():
        state = model(x[:, :20]).state
    loss = model(x[:, 20:], labels=y[:, 20:], state=state).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert row["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert row["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    # the lead-in's state matters: without it the step differs (the test can fail)
    assert trainer(20, x[:, 20:]).train_step()["loss"] != pytest.approx(row["loss"], rel=1e-4)
    with pytest.raises(ValueError, match="lead-in 0 <= P <= lead_in = 10"):
        trainer(10, x).train_step()
    with pytest.raises(ValueError, match=r"expected \[batch_size, seq_len\] = \[2, 32\]"):
        trainer(0, x).train_step()
