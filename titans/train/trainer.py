"""One training loop for any causal LM: AdamW, warmup + cosine, clipping, accumulation, bf16,
checkpoints with exact resume, DDP / FSDP2 under torchrun, CSV / TensorBoard logs.

Shape legend
    B global batch rows per micro-step (cfg.batch_size), T sequence length (cfg.seq_len),
    W world size; each rank computes on its B / W rows (`distributed.shard_rows`).
    One optimizer step reads cfg.grad_accum micro-batches: B * T * grad_accum tokens.

The model contract (nothing else about the model is known here):

    out = model(inputs, labels=targets)   inputs, targets: LongTensor [b, T], targets already
                                          shifted (targets[:, t] is the token after inputs[:, t])
    out.loss                              mean cross-entropy over the b * T targets (scalar)

With cfg.carry_state = K > 0 the model also streams (a `titans.TitansLM`):

    out = model(inputs, labels=targets, state=state)    state: None (empty) or out.state of the
                                                        step before, detached (`out.state.detach()`)

Step k starts from the state the step before ended in, cut from the autograd graph (truncated
backprop through time), except every K-th step (k % K == 0), which starts empty: so a state lives
K steps, and 1 / K of the steps train the model from an empty state. With `titans.data.
StreamBatches(windows=K)` the rows are contiguous streams (TBPTT, Buitrago & Gu 2025); with any
other batches a sequence starts from the final state of an unrelated one (State Passing). Each
micro-batch and each rank carries its own state; checkpoints hold them (carried_state.safetensors),
so a resumed run equals the uninterrupted one.

With cfg.lead_in = L > 0 a batch's rows may be longer than T, [B, P + T] with 0 <= P <= L: the
first P tokens are a lead-in the model streams through without gradient (under torch.no_grad,
from the carried state or an empty one), and the step trains on the last T tokens from the state
the lead-in leaves (TBPTT over a long sample with one backpropagated window: the model meets the
states of long streams while it backpropagates through T tokens alone). The lead-in's targets are
not scored. The batches decide P (`titans.data.tasks.passkey_batch(lead_in=...)`).

`train_batches` yields (inputs, targets) [B, T] forever (a `titans.data.TokenBatches`); its
`state_dict()` / `load_state_dict()` give the data position for exact resume.
`val_windows` is an iterable of (inputs, targets) (a `titans.data.EvalWindows`), or None.

Files under cfg.out_dir: log.csv (one row per logged step), tensorboard/ (when tensorboard is
installed), loss.png (when matplotlib is installed), checkpoints/ (see `checkpoint.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..eval.metrics import perplexity
from ..typed import check_fields
from . import checkpoint as ckpt
from .carry import flatten_state, unflatten_state
from .distributed import (MODES, DistEnv, all_reduce_sum, barrier, full_state_dicts,
                          load_full_state_dicts, setup, shard_rows, teardown, unwrap, wrap_model)
from .optim import build_optimizer, lr_at
from .runlog import LOG_COLUMNS, RunLog

__all__ = ["TrainConfig", "Trainer", "seed_everything", "LOG_COLUMNS"]

MAX_BAD_STEPS = 10  # consecutive skipped updates before training stops
# Fields that may change between a run and its resume without a warning.
_FREE_ON_RESUME = {"resume", "out_dir", "progress", "compile", "compile_backend", "log_every",
                   "eval_every", "eval_batches", "ckpt_every", "keep_last", "device",
                   "distributed"}


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults follow the paper's recipe (AdamW 4e-4, cosine, wd 0.1).

    steps: optimizer updates.  batch_size: GLOBAL rows per micro-batch (divisible by the world
    size).  seq_len: T.  grad_accum: micro-batches per update.  lr, min_lr_ratio, warmup: the
    schedule (`optim.lr_at`).  weight_decay, betas: AdamW (`optim.param_groups` for the
    no-decay rule).  grad_clip: max global grad norm, 0 disables.  bf16: autocast to bfloat16
    (CPU or CUDA).  compile: torch.compile the model (compile_backend).  seed: seeds torch /
    numpy / python (plus the rank).  eval_every / ckpt_every: every this many steps and at the
    end (0: only at the end).  eval_batches: validation batches per evaluation (None: all).
    log_every: CSV / TensorBoard row interval.  keep_last: checkpoints kept (None: all).
    out_dir: run directory.  resume: False; True continues from the newest good checkpoint in
    out_dir (starts fresh if there is none); a path resumes from that checkpoint directory.
    distributed: "none" | "ddp" | "fsdp".  device: "auto" | "cpu" | "cuda".  progress: tqdm
    bar (only on a terminal, rank 0) or a line per evaluation otherwise.  carry_state: 0, or K:
    carry the model's state, detached, from each step into the next for K steps (see the module
    docstring; K = 1 is the same as 0).  lead_in: 0, or L: a batch's rows may carry up to L
    tokens of lead-in before the T trained ones (see the module docstring).
    """

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 4e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    bf16: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    seed: int = 0
    eval_every: int = 100
    eval_batches: int | None = 20
    log_every: int = 1
    ckpt_every: int = 100
    keep_last: int | None = 3
    out_dir: str = "runs/default"
    resume: bool | str = False
    distributed: str = "none"
    device: str = "auto"
    progress: bool = True
    carry_state: int = 0
    lead_in: int = 0

    def __post_init__(self) -> None:
        self.out_dir = str(self.out_dir)
        if not isinstance(self.resume, (bool, str)):
            self.resume = str(self.resume)  # a Path
        check_fields(self)  # betas from JSON is a list; text from the command line is parsed
        for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 1), ("grad_accum", 1),
                          ("warmup", 0), ("seed", 0), ("eval_every", 0), ("log_every", 1),
                          ("ckpt_every", 0), ("carry_state", 0), ("lead_in", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {low}, got {v!r}")
        for name in ("eval_batches", "keep_last"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"TrainConfig.{name} must be None or an integer >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas}")
        if not self.grad_clip >= 0:
            raise ValueError(f"TrainConfig.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.distributed not in MODES:
            raise ValueError(f"TrainConfig.distributed must be one of {MODES}, got "
                             f"{self.distributed!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"TrainConfig.from_dict: unknown fields {unknown}")
        return cls(**d)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy's global generator and python's `random`."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Trainer:
    """Train `model` on `train_batches` with `cfg`; `fit()` runs the loop.

    Args:
        model: an nn.Module with the contract in the module docstring (moved to the device
            and wrapped for DDP / FSDP here).
        train_batches: iterator of (inputs, targets) [B, T], with state_dict/load_state_dict.
        val_windows: iterable of (inputs, targets) for validation, or None.
        cfg: the TrainConfig.
        config_dict: the model config, saved as config.json in every checkpoint.
        tokenizer: saved beside the checkpoints (`.save(dir)`, `.name`), or None.
        run_info: JSON-able facts about the run kept in every checkpoint's trainer_state.json
            under "run" (the CLI stores the task, its arguments and the data directory there, so
            `--resume` and the evaluations can read them back).
    """

    def __init__(self, model: nn.Module, train_batches: Iterator[tuple[Tensor, Tensor]],
                 val_windows: Iterable[tuple[Tensor, Tensor]] | None, cfg: TrainConfig,
                 config_dict: dict | None = None, tokenizer: Any = None, run_info: dict | None = None) -> None:
        if not isinstance(cfg, TrainConfig):
            raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self.cfg, self.config_dict, self.tokenizer, self.run_info = cfg, config_dict, tokenizer, run_info
        self.train_batches, self.val_windows = train_batches, val_windows
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        if not cfg.resume and ckpt.list_checkpoints(self.ckpt_dir):
            raise ValueError(f"out_dir {cfg.out_dir!r} already holds checkpoints: set "
                             f"TrainConfig.resume=True to continue that run, or choose another out_dir")
        self.env: DistEnv = setup(cfg.distributed, cfg.device)
        if cfg.batch_size % self.env.world_size:
            raise ValueError(f"TrainConfig.batch_size {cfg.batch_size} must be divisible by the "
                             f"world size {self.env.world_size}")
        seed_everything(cfg.seed + self.env.rank)  # distinct dropout streams per rank
        self.model = wrap_model(model, self.env, unused_parameters=cfg.carry_state > 1 or cfg.lead_in > 0)
        self.optimizer = build_optimizer(unwrap(self.model), cfg.lr, cfg.weight_decay, cfg.betas)
        self.forward = (torch.compile(self.model, backend=cfg.compile_backend) if cfg.compile
                        else self.model)
        self.step = 0
        self.history: list[dict] = []
        self.bad_steps = 0  # consecutive updates skipped for a non-finite gradient
        # cfg.carry_state: this rank's state after the last step, one per micro-batch (None: empty)
        self.carried: list[Any] = [None] * cfg.grad_accum
        if cfg.resume:
            self._resume()
        if self.env.is_main:
            ckpt.clean_temp(self.ckpt_dir)
        self.log: RunLog | None = None  # opened by fit()

    # ------------------------------------------------------------------------ the loop
    def fit(self) -> list[dict]:
        """Train from `self.step` to cfg.steps; returns this call's log rows (one per step).

        Each row: step, loss (mean over the global batch), lr, grad_norm (before clipping),
        tokens_per_s, and val_loss / val_ppl at evaluation steps (else None). Closes the
        logs and the process group (if this trainer opened it) at the end.
        """
        cfg = self.cfg
        self.log = RunLog(self.out_dir, self.step, enabled=self.env.is_main)
        bar = self._progress_bar()
        try:
            while self.step < cfg.steps:
                row = self.train_step()
                last = self.step == cfg.steps
                if self.val_windows is not None and (last or (
                        cfg.eval_every and self.step % cfg.eval_every == 0)):
                    row.update(self.evaluate())
                    self._say(bar, row)
                self.history.append(row)
                if last or self.step % cfg.log_every == 0 or row["val_loss"] is not None:
                    self.log.write(row)
                if last or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
                    self.save()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                    tok_s=f"{row['tokens_per_s']:.0f}")
        finally:
            if bar is not None:
                bar.close()
            self.close()
        return self.history

    def train_step(self) -> dict:
        """One optimizer update over cfg.grad_accum micro-batches; its log row."""
        cfg, env = self.cfg, self.env
        t0 = time.perf_counter()
        lr = lr_at(self.step, lr=cfg.lr, steps=cfg.steps, warmup=cfg.warmup,
                   min_lr_ratio=cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss_sum = torch.zeros((), device=env.device)
        for micro in range(cfg.grad_accum):
            inputs, targets = next(self.train_batches)
            lead = inputs.shape[-1] - cfg.seq_len
            if (inputs.dim() != 2 or inputs.shape[0] != cfg.batch_size or not 0 <= lead <= cfg.lead_in
                    or targets.shape != inputs.shape):
                expected = (f"[batch_size, seq_len] = [{cfg.batch_size}, {cfg.seq_len}]" if not cfg.lead_in else
                            f"[batch_size, P + seq_len] = [{cfg.batch_size}, P + {cfg.seq_len}] with a lead-in "
                            f"0 <= P <= lead_in = {cfg.lead_in}")
                raise ValueError(f"train_batches yielded inputs {tuple(inputs.shape)} and targets "
                                 f"{tuple(targets.shape)}, expected {expected} for both")
            inputs = shard_rows(inputs, env).to(env.device)
            targets = shard_rows(targets, env).to(env.device)
            with self._grad_sync(micro == cfg.grad_accum - 1), self._autocast():
                state = None
                if cfg.carry_state and self.step % cfg.carry_state:
                    state = self.carried[micro]
                if lead:
                    with torch.no_grad():
                        state = self.forward(inputs[:, :lead], state=state).state
                    inputs, targets = inputs[:, lead:], targets[:, lead:]
                if cfg.carry_state or lead:
                    out = self.forward(inputs, labels=targets, state=state)
                else:
                    out = self.forward(inputs, labels=targets)
                if cfg.carry_state:
                    self.carried[micro] = out.state.detach()
                loss = out.loss
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(),
                                             cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        # A non-finite gradient would poison every weight: skip that update (the norm is the
        # same on every rank), and stop with a clear error when it keeps happening.
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            warnings.warn(f"step {self.step + 1}: non-finite gradient norm, update skipped")
            if self.bad_steps >= MAX_BAD_STEPS:
                raise RuntimeError(f"training diverged: non-finite gradients for {MAX_BAD_STEPS} steps in a "
                                   f"row (at step {self.step + 1}); lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = all_reduce_sum(loss_sum, env).item() / (cfg.grad_accum * env.world_size)
        seconds = time.perf_counter() - t0
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                "tokens_per_s": cfg.batch_size * cfg.seq_len * cfg.grad_accum / seconds,
                "val_loss": None, "val_ppl": None}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation NLL per target token over cfg.eval_batches batches, and perplexity.

        Under DDP the batches are dealt round-robin over the ranks and the sums all-reduced;
        under FSDP every rank runs every batch (each forward is a collective).
        """
        env, model = self.env, unwrap(self.model)
        model.eval()
        nll = torch.zeros((), dtype=torch.float64, device=env.device)
        count = torch.zeros((), dtype=torch.float64, device=env.device)
        for i, (inputs, targets) in enumerate(self.val_windows):
            if self.cfg.eval_batches is not None and i >= self.cfg.eval_batches:
                break
            if env.mode == "ddp" and i % env.world_size != env.rank:
                continue
            with self._autocast():
                loss = model(inputs.to(env.device), labels=targets.to(env.device)).loss
            nll += loss.double() * targets.numel()
            count += targets.numel()
        model.train()
        if env.mode == "ddp":
            nll, count = all_reduce_sum(nll, env), all_reduce_sum(count, env)
        mean = (nll / count).item()
        if not math.isfinite(mean):
            raise RuntimeError(f"step {self.step}: the validation loss is {mean}: the model diverged (lower the "
                               "learning rate; for Titans memory layers also max_lr, docs/models.md 'The inner "
                               f"loop's parameterisation'); earlier checkpoints are in {self.ckpt_dir}")
        return {"val_loss": mean, "val_ppl": perplexity(mean)}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        """Write a checkpoint of the current step (every rank calls; rank 0 writes)."""
        model_state, optim_state = full_state_dicts(self.model, self.optimizer)
        rngs: list = [ckpt.rng_state()]
        carried: list = [self._flat_carried()] if self.cfg.carry_state else []
        if self.env.active:
            rngs = [None] * self.env.world_size
            dist.all_gather_object(rngs, ckpt.rng_state())
            if self.cfg.carry_state:
                carried = [None] * self.env.world_size
                dist.all_gather_object(carried, self._flat_carried())
        path = None
        if self.env.is_main:
            data = getattr(self.train_batches, "state_dict", None)
            state = {"data": data() if data else None, "rng": rngs,
                     "world_size": self.env.world_size, "train_config": self.cfg.to_dict(), "run": self.run_info}
            tensors = {}
            if self.cfg.carry_state:  # every rank's skeletons in the JSON, their tensors in one file
                state["carried"] = [skeletons for skeletons, _ in carried]
                tensors = {k: v for _, t in carried for k, v in t.items()}
            path = ckpt.save_checkpoint(self.ckpt_dir, self.step, model_state=model_state,
                                        optim_state=optim_state, state=state,
                                        config=self.config_dict, tokenizer=self.tokenizer,
                                        keep_last=self.cfg.keep_last, carried=tensors)
        barrier(self.env)
        return path

    def _resume(self) -> None:
        r = self.cfg.resume
        found = (ckpt.load_checkpoint(r) if isinstance(r, (str, Path))
                 else ckpt.load_latest(self.ckpt_dir))
        if found is None:
            self._notice(f"resume: no checkpoint under {str(self.ckpt_dir)!r}, starting at step 0")
            return
        if found.step > self.cfg.steps:
            raise ValueError(f"resume: the checkpoint {str(found.path)!r} is at step {found.step}, past "
                             f"TrainConfig.steps={self.cfg.steps}: ask for more steps")
        load_full_state_dicts(self.model, self.optimizer, found.model_state, found.optim_state)
        self.step = found.step
        data = found.state.get("data")
        if data is not None and hasattr(self.train_batches, "load_state_dict"):
            self.train_batches.load_state_dict(data)
        else:
            warnings.warn("resume: no data position restored; batches restart from the "
                          "sampler's current position", stacklevel=3)
        rngs = found.state.get("rng") or []
        if len(rngs) == self.env.world_size:
            ckpt.set_rng_state(rngs[self.env.rank])
        else:
            warnings.warn(f"resume: checkpoint has RNG states of {len(rngs)} ranks, this run has "
                          f"{self.env.world_size}; RNG streams are re-seeded", stacklevel=3)
        if self.cfg.carry_state:
            self._restore_carried(found)
        saved = found.state.get("train_config", {})
        changed = sorted(k for k, v in self.cfg.to_dict().items()
                         if k not in _FREE_ON_RESUME | {"steps"} and k in saved
                         and saved[k] != (list(v) if isinstance(v, tuple) else v))
        if saved.get("steps", self.cfg.steps) != self.cfg.steps:  # the documented way to train on
            self._notice(f"resume: the schedule now runs to step {self.cfg.steps} (the run was set up for "
                         f"{saved['steps']}), so the learning rate from here on follows the new length")
        if changed:
            warnings.warn(f"resume: TrainConfig fields differ from the checkpoint's: {changed}; "
                          f"the run will not match an uninterrupted one", stacklevel=3)
        if self.config_dict is not None and found.config not in (None, self.config_dict):
            warnings.warn("resume: config_dict differs from the checkpoint's config.json",
                          stacklevel=3)
        self._notice(f"resumed from {str(found.path)!r} at step {self.step}")

    def _flat_carried(self) -> tuple[list, dict[str, Tensor]]:
        """This rank's carried states as (skeletons per micro-batch, tensors), names prefixed by the
        rank and the micro-batch (carry.flatten_state)."""
        skeletons, tensors = [], {}
        for m, state in enumerate(self.carried):
            skeleton, t = flatten_state(state, f"rank{self.env.rank}.micro{m}")
            skeletons.append(skeleton)
            tensors.update({k: v.cpu() for k, v in t.items()})
        return skeletons, tensors

    def _restore_carried(self, found: ckpt.Checkpoint) -> None:
        skeletons = found.state.get("carried")
        if (not isinstance(skeletons, list) or len(skeletons) != self.env.world_size
                or len(skeletons[self.env.rank]) != self.cfg.grad_accum):
            warnings.warn("resume: the checkpoint has no carried states for this run's ranks and micro-batches; "
                          "the next step starts from an empty state", stacklevel=4)
            return
        device = self.env.device
        self.carried = [unflatten_state(s, {k: v.to(device) for k, v in found.carried.items()})
                        for s in skeletons[self.env.rank]]

    # -------------------------------------------------------------------- helpers
    def _grad_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of an update."""
        if self.env.mode == "ddp" and not sync:
            return self.model.no_sync()
        if self.env.mode == "fsdp":
            self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def _progress_bar(self) -> Any:
        if not (self.cfg.progress and self.env.is_main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm
        return tqdm(total=self.cfg.steps, initial=self.step, unit="step", dynamic_ncols=True)

    def _say(self, bar: Any, row: dict) -> None:
        if not (self.cfg.progress and self.env.is_main):
            return
        msg = (f"step {row['step']}/{self.cfg.steps} loss {row['loss']:.4f} val_loss "
               f"{row['val_loss']:.4f} val_ppl {row['val_ppl']:.2f} tok/s {row['tokens_per_s']:.0f}")
        bar.write(msg) if bar is not None else print(msg, flush=True)

    def _notice(self, msg: str) -> None:
        if self.env.is_main:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Finish the logs (loss.png) and close the process group if this trainer opened it."""
        if self.log is not None:
            self.log.close()
        teardown(self.env)
