"""The training loop: one update by hand, logs, bf16 / compile, exact resume after SIGKILL."""

import csv
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from titans.data import EvalWindows, TokenBatches
from titans.train import Trainer, lr_at, param_groups, seed_everything
from titans.train.checkpoint import load_checkpoint

TINY_LM = Path(__file__).with_name("tiny_lm.py")


def _rows(out):
    with open(Path(out) / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _table(rows):
    """step, loss, lr, grad_norm, val_loss, val_ppl of each row (tokens/s is a timing)."""
    keys = ("step", "loss", "lr", "grad_norm", "val_loss", "val_ppl")
    return [[r[k] for k in keys] for r in rows]


def test_fit_logs_evaluates_and_checkpoints(tiny, tmp_path):
    cfg = tiny.base_cfg(str(tmp_path))
    trainer = tiny.make(cfg)
    history = trainer.fit()
    rows = _rows(tmp_path)
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [float(r["loss"]) for r in rows] == [h["loss"] for h in history]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) - 0.2  # it learns
    assert [float(r["lr"]) for r in rows] == [
        lr_at(s, lr=cfg.lr, steps=8, warmup=2, min_lr_ratio=0.1) for s in range(8)]
    assert [r["step"] for r in rows if r["val_loss"]] == ["4", "8"]
    # validation: token-weighted mean NLL of the first eval_batches windows, by hand
    model = trainer.model.eval()
    val = EvalWindows(tiny.tokens(600, seed=1), cfg.seq_len, batch_size=4)
    with torch.no_grad():
        nll = [model(x, labels=y).loss.item() * y.numel() for x, y in list(val)[:3]]
    assert float(rows[-1]["val_loss"]) == pytest.approx(sum(nll) / (12 * cfg.seq_len), rel=1e-6)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_000004", "step_000008"]
    last = load_checkpoint(tmp_path / "checkpoints" / "step_000008")
    assert last.config == tiny.TinyConfig().to_dict() and last.state["data"]["step"] == 8
    assert last.model_state.keys() == model.state_dict().keys()


def test_one_update_matches_a_hand_written_step(tiny, tmp_path):
    """grad_accum=2 + clipping + the decay groups + the schedule, against plain torch."""
    cfg = tiny.base_cfg(str(tmp_path), steps=3, grad_accum=2, grad_clip=0.05, lr=1e-2)
    trainer = tiny.make(cfg)
    row = trainer.train_step()
    seed_everything(cfg.seed)
    ref = tiny.TinyLM(tiny.TinyConfig())
    batches = TokenBatches(tiny.tokens(), cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    losses = [ref(x, labels=y).loss for x, y in (batches.batch(0), batches.batch(1))]
    (sum(losses) / 2).backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    groups = param_groups(ref.named_parameters(), 0.1)
    lr = lr_at(0, lr=1e-2, steps=3, warmup=2, min_lr_ratio=0.1)
    torch.optim.AdamW(groups, lr=lr, betas=cfg.betas).step()
    assert row["loss"] == pytest.approx(sum(l.item() for l in losses) / 2, abs=1e-6)
    assert row["grad_norm"] == pytest.approx(norm.item(), rel=1e-6) and norm > 0.05
    assert row["lr"] == lr
    for (name, p), q in zip(trainer.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)


def test_bf16_and_compile(tiny, tmp_path):
    base = tiny.make(tiny.base_cfg(str(tmp_path / "a"), steps=3)).fit()
    bf16 = tiny.make(tiny.base_cfg(str(tmp_path / "b"), steps=3, bf16=True)).fit()
    comp = tiny.make(tiny.base_cfg(str(tmp_path / "c"), steps=3, compile=True,
                                   compile_backend="aot_eager")).fit()
    for a, b, c in zip(base, bf16, comp):
        assert a["loss"] != b["loss"] and abs(a["loss"] - b["loss"]) < 0.05  # autocast is on
        assert c["loss"] == pytest.approx(a["loss"], abs=1e-5)
    saved = load_checkpoint(tmp_path / "c" / "checkpoints" / "step_000003").model_state
    assert saved.keys() == tiny.TinyLM(tiny.TinyConfig()).state_dict().keys()  # no _orig_mod.


def test_bad_input_errors(tiny, tmp_path):
    cfg = tiny.base_cfg(str(tmp_path), steps=2)
    tiny.make(cfg).fit()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        tiny.make(cfg)
    wrong = TokenBatches(tiny.tokens(), 2, cfg.seq_len)
    cfg2 = tiny.base_cfg(str(tmp_path / "x"), steps=2)
    with pytest.raises(ValueError, match=r"train_batches yielded inputs \(2, 8\)"):
        Trainer(tiny.TinyLM(tiny.TinyConfig()), wrong, None, cfg2).train_step()
    with pytest.raises(ValueError, match="cfg must be a TrainConfig"):
        Trainer(tiny.TinyLM(tiny.TinyConfig()), wrong, None, {"steps": 2})
    with pytest.raises(ValueError, match="needs torchrun"):
        tiny.make(tiny.base_cfg(str(tmp_path / "y"), distributed="ddp"))


def test_resume_falls_back_and_warns_on_changed_config(tiny, tmp_path, capsys):
    ref = tmp_path / "ref"
    tiny.make(tiny.base_cfg(str(ref), steps=6, ckpt_every=2, keep_last=None)).fit()
    run = tmp_path / "run"
    cfg = tiny.base_cfg(str(run), steps=6, ckpt_every=2, keep_last=None, resume=True)
    tiny.make(cfg).fit()  # nothing to resume: starts at 0
    assert "no checkpoint" in capsys.readouterr().err
    # newest checkpoint truncated, the one before it lacks its optimizer: back to step 2
    (run / "checkpoints" / "step_000006" / "model.safetensors").write_bytes(b"x")
    (run / "checkpoints" / "step_000004" / "optimizer.pt").unlink()
    with pytest.warns(UserWarning) as record:
        tiny.make(cfg).fit()
    messages = [str(w.message) for w in record]
    assert any("step_000006/model.safetensors" in m for m in messages)
    assert any("step_000004/optimizer.pt' is missing" in m for m in messages)
    assert "at step 2" in capsys.readouterr().err
    assert _table(_rows(run)) == _table(_rows(ref))
    with pytest.warns(UserWarning, match=r"TrainConfig fields differ.*\['lr'\]"):
        tiny.make(tiny.base_cfg(str(run), steps=6, lr=0.5, resume=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # more steps is how a run trains on: a notice, not a warning
        tiny.make(tiny.base_cfg(str(run), steps=9, resume=True)).close()
    assert "the schedule now runs to step 9 (the run was set up for 6)" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a path resumes that exact checkpoint, no fallback
        t = tiny.make(tiny.base_cfg(str(run), steps=6, resume=str(run / "checkpoints" /
                                                                  "step_000004")))
    assert t.step == 4 and t.train_batches.step == 4
    t.close()


def test_exact_resume_after_sigkill(tiny, tmp_path):
    """A run SIGKILLed after its step-4 checkpoint, resumed, logs the uninterrupted losses.

    Dropout is on, so the per-rank RNG states in the checkpoint matter too.
    """
    kw = dict(steps=10, grad_accum=2)
    ref = tmp_path / "ref"
    tiny.make(tiny.base_cfg(str(ref), **kw), tiny.TinyConfig(dropout=0.1)).fit()
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(TINY_LM.parents[2])}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(TINY_LM), "--out", str(run), "--steps",
                                 "10", "--grad-accum", "2", "--dropout", "0.1", "--sleep", "0.1",
                                 "--threads", str(torch.get_num_threads())],
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 60
        while not (run / "checkpoints" / "step_000004").is_dir():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    assert not (run / "checkpoints" / "step_000010").exists()  # it died mid-way
    tiny.make(tiny.base_cfg(str(run), resume=True, **kw), tiny.TinyConfig(dropout=0.1)).fit()
    assert _table(_rows(run)) == _table(_rows(ref))
    assert len(_rows(run)) == 10


def test_non_finite_gradients_skip_the_update_then_stop(tmp_path):
    import pytest as _pytest

    from titans.train import TrainConfig, Trainer
    from titans.train import trainer as trainer_module

    class Poisoned(torch.nn.Module):
        """Loss is NaN from the first step: every update must be skipped, weights untouched."""
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3, 3))

        def forward(self, inputs, labels=None):
            loss = (self.w.sum() * float("nan"))
            return type("Out", (), {"loss": loss, "logits": None})()

    def batches():
        while True:
            yield torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)

    class Batches:
        def __init__(self):
            self.it = batches()
        def __next__(self):
            return next(self.it)
        def __iter__(self):
            return self
        def state_dict(self):
            return {}
        def load_state_dict(self, s):
            pass

    model = Poisoned()
    cfg = TrainConfig(steps=trainer_module.MAX_BAD_STEPS + 5, batch_size=2, seq_len=4, warmup=0, eval_every=0,
                      ckpt_every=0, out_dir=str(tmp_path / "run"), progress=False)
    trainer = Trainer(model, Batches(), None, cfg)
    with _pytest.warns(UserWarning, match="update skipped"), _pytest.raises(RuntimeError, match="diverged"):
        trainer.fit()
    assert torch.equal(model.w.detach(), torch.ones(3, 3))


def test_non_finite_validation_stops_with_a_clear_error(tmp_path):
    import pytest as _pytest

    from titans.train import TrainConfig, Trainer

    class NaNInEval(torch.nn.Module):
        """Finite loss in training, NaN in evaluation (a forward that diverges on some inputs)."""
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, inputs, labels=None):
            loss = self.w * (1.0 if self.training else float("nan"))
            return type("Out", (), {"loss": loss, "logits": None})()

    windows = [(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))]
    cfg = TrainConfig(steps=3, batch_size=1, seq_len=4, warmup=0, eval_every=0, ckpt_every=0,
                      out_dir=str(tmp_path / "run"), progress=False)
    trainer = Trainer(NaNInEval(), iter(()), windows, cfg)
    with _pytest.raises(RuntimeError, match="validation loss is nan: the model diverged"):
        trainer.evaluate()


def test_a_diverging_inner_loop_is_skipped_not_a_crash(tmp_path):
    """A memory whose inner loop blows up inside a step (NaN born in the forward, reaching the
    next layer's gates) is the trainer's non-finite case: updates skipped, then a one-line stop;
    never a ValueError from the op's argument checks."""
    import pytest as _pytest

    from titans import TitansConfig, TitansLM
    from titans.data.tasks import recall_batches
    from titans.train import TrainConfig, Trainer
    from titans.train import trainer as trainer_module

    torch.manual_seed(0)
    config = TitansConfig.from_preset("tiny", variant="lmm", max_lr=1e6, normalize_step=False, memory_depth=2,
                                      momentum=True, momentum_form="plain", forgetting=False)
    model = TitansLM(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(steps=trainer_module.MAX_BAD_STEPS + 2, batch_size=2, seq_len=64, warmup=0,
                      eval_every=0, ckpt_every=0, out_dir=str(tmp_path / "run"), progress=False)
    batches = recall_batches("mqar", 2, config.vocab_size, seed=0, seq_len=64, n_pairs=4)
    with _pytest.warns(UserWarning, match="update skipped"), _pytest.raises(RuntimeError, match="diverged"):
        Trainer(model, batches, None, cfg).fit()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
