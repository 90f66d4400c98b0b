"""Training: one model-agnostic loop (`Trainer`), checkpoints with exact resume, DDP / FSDP2."""

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


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["TrainConfig", "Trainer", "seed_everything", "LOG_COLUMNS", "Checkpoint",
           "CheckpointError", "save_checkpoint", "load_checkpoint", "load_latest", "load_run_checkpoint",
           "list_checkpoints", "DistEnv", "shard_rows", "build_optimizer", "param_groups",
           "decays", "lr_at"]
