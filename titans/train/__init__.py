"""Training: one model-agnostic loop (`Trainer`), checkpoints with exact resume, DDP / FSDP2."""

from .._lazy import lazy_attributes

# Checkpoints load without the trainer: the trainer and distributed modules pull in
# torch.distributed.checkpoint (~0.8 s, `python -X importtime -m titans generate ...`), which
# `titans generate` and the evaluations never use. Every name loads on first use (PEP 562).
_LAZY = {
    **{name: "checkpoint" for name in ("Checkpoint", "CheckpointError", "list_checkpoints", "load_checkpoint",
                                       "load_latest", "load_run_checkpoint", "save_checkpoint")},
    "DistEnv": "distributed", "shard_rows": "distributed",
    **{name: "optim" for name in ("build_optimizer", "decays", "lr_at", "param_groups")},
    **{name: "trainer" for name in ("LOG_COLUMNS", "TrainConfig", "Trainer", "seed_everything")},
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())


__all__ = ["TrainConfig", "Trainer", "seed_everything", "LOG_COLUMNS", "Checkpoint",
           "CheckpointError", "save_checkpoint", "load_checkpoint", "load_latest", "load_run_checkpoint",
           "list_checkpoints", "DistEnv", "shard_rows", "build_optimizer", "param_groups",
           "decays", "lr_at"]
