"""Training: one model-agnostic loop (`Trainer`), checkpoints with exact resume, DDP / FSDP2."""

from .checkpoint import (Checkpoint, CheckpointError, list_checkpoints, load_checkpoint,
                         load_latest, load_run_checkpoint, save_checkpoint)
from .distributed import DistEnv, shard_rows
from .optim import build_optimizer, decays, lr_at, param_groups
from .trainer import LOG_COLUMNS, TrainConfig, Trainer, seed_everything

__all__ = ["TrainConfig", "Trainer", "seed_everything", "LOG_COLUMNS", "Checkpoint",
           "CheckpointError", "save_checkpoint", "load_checkpoint", "load_latest", "load_run_checkpoint",
           "list_checkpoints", "DistEnv", "shard_rows", "build_optimizer", "param_groups",
           "decays", "lr_at"]
