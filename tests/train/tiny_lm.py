"""A tiny stand-in language model with the trainer's model contract, and a runner script.

Used in-process by the tests (loaded by path) and as a script in subprocesses:

    python tiny_lm.py --out DIR --steps 8 ...                       one process
    python -m torch.distributed.run --nproc_per_node=2 tiny_lm.py --modes ddp,fsdp --out DIR
        (each mode: a full run, then a run resumed from its middle checkpoint; losses.json)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from titans.data import EvalWindows, TokenBatches
from titans.data.tasks import TaskBatches
from titans.train import TrainConfig, Trainer, seed_everything

VOCAB, SEQ = 32, 8


@dataclass
class TinyConfig:
    vocab: int = VOCAB
    dim: int = 16
    layers: int = 2
    dropout: float = 0.0
    tie: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TinyConfig":
        return cls(**d)


class Block(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.norm(x)))
        # causal context: running mean over past positions
        h = h.cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device)[:, None]
        return x + self.drop(h)


class TinyLM(nn.Module):
    """Embedding, a ModuleList of causal blocks, norm, head; `sleep` slows forward (tests)."""

    def __init__(self, config: TinyConfig, sleep: float = 0.0) -> None:
        super().__init__()
        self.config, self.sleep = config, sleep
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.layers = nn.ModuleList(Block(config.dim, config.dropout) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab, bias=False)
        if config.tie:
            self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        if self.sleep:
            time.sleep(self.sleep)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        return SimpleNamespace(loss=loss, logits=logits)


def tokens(n: int = 4000, seed: int = 0) -> np.ndarray:
    """A learnable token stream: a noisy repeating pattern (uint16)."""
    rng = np.random.default_rng(seed)
    base = np.tile(np.arange(VOCAB), n // VOCAB + 1)[:n]
    noise = rng.integers(0, VOCAB, n)
    return np.where(rng.random(n) < 0.2, noise, base).astype(np.uint16)


def make(cfg: TrainConfig, model_cfg: TinyConfig | None = None, sleep: float = 0.0
         ) -> Trainer:
    """A Trainer over TinyLM (initialised from cfg.seed) and the synthetic stream; with
    cfg.carry_state, over the tiny TitansLM (LMM) reading contiguous streams (StreamBatches); with
    cfg.lead_in, over it reading windows with a lead-in of 0, L / 2 or L tokens in turn."""
    model_cfg = model_cfg or TinyConfig()
    seed_everything(cfg.seed)
    if cfg.carry_state or cfg.lead_in:
        from titans import TitansConfig, TitansLM
        from titans.data import StreamBatches
        model = TitansLM(TitansConfig.from_preset("tiny", variant="lmm"))
        batches = (lead_in_batches(cfg) if cfg.lead_in else
                   StreamBatches(tokens(), cfg.batch_size, cfg.seq_len, cfg.carry_state, seed=cfg.seed,
                                 micro_batches=cfg.grad_accum))
        val = EvalWindows(tokens(600, seed=1), cfg.seq_len, batch_size=4)
        return Trainer(model, batches, val, cfg, config_dict=model.config.to_dict())
    model = TinyLM(model_cfg, sleep=sleep)
    batches = TokenBatches(tokens(), cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    val = EvalWindows(tokens(600, seed=1), cfg.seq_len, batch_size=4)
    return Trainer(model, batches, val, cfg, config_dict=model_cfg.to_dict())


def lead_in_batches(cfg: TrainConfig) -> TaskBatches:
    """Rows of P + seq_len tokens from random places of the stream, P = 0, L / 2, L in turn."""
    data = torch.from_numpy(tokens().astype(np.int64))

    def make(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = (step % 3) * cfg.lead_in // 2 + cfg.seq_len + 1
        starts = torch.randint(0, len(data) - n, (cfg.batch_size,), generator=torch.Generator().manual_seed(step))
        rows = torch.stack([data[i:i + n] for i in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]
    return TaskBatches(make, f"lead-in:{cfg.lead_in}")


def base_cfg(out: str, **kw) -> TrainConfig:
    defaults = dict(steps=8, batch_size=4, seq_len=SEQ, lr=1e-2, warmup=2, eval_every=4,
                    eval_batches=3, ckpt_every=4, keep_last=2, out_dir=out, progress=False)
    return TrainConfig(**{**defaults, **kw})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ckpt-every", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--carry-state", type=int, default=0)
    p.add_argument("--lead-in", type=int, default=0)
    p.add_argument("--modes", default="")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    a = p.parse_args(argv)
    if a.threads:  # the last bits of a reduction can depend on the thread count
        torch.set_num_threads(a.threads)
    if not a.modes:  # one process, one run (killed from outside in the resume test)
        cfg = base_cfg(a.out, steps=a.steps, ckpt_every=a.ckpt_every, grad_accum=a.grad_accum)
        make(cfg, TinyConfig(dropout=a.dropout), sleep=a.sleep).fit()
        return
    import torch.distributed as dist
    dist.init_process_group("gloo")  # opened here so the trainers reuse (and keep) it
    result = {}
    for mode in a.modes.split(","):
        kw = dict(distributed=mode, steps=a.steps, ckpt_every=a.ckpt_every,
                  grad_accum=a.grad_accum, carry_state=a.carry_state, lead_in=a.lead_in)
        full = make(base_cfg(f"{a.out}/{mode}", **kw)).fit()
        ckpt = f"{a.out}/{mode}/checkpoints/step_{a.ckpt_every:06d}"
        resumed = make(base_cfg(f"{a.out}/{mode}-resumed", resume=ckpt, **kw)).fit()
        result[mode] = {"full": full, "resumed": resumed}
    if dist.get_rank() == 0:
        with open(f"{a.out}/losses.json", "w") as f:
            json.dump(result, f)
    gc.collect()  # the FSDP models' device meshes hold the group: release them first
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
