"""Multi-process training on PyTorch's own engine: DDP, or FSDP2 (`fully_shard`), under torchrun.

    torchrun --nproc_per_node=N train_script.py ...      (distributed="ddp" or "fsdp")

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `setup` reads them and
opens the process group (NCCL on CUDA, gloo on CPU) unless the caller already did.

Data: every rank draws the same GLOBAL batch [B, T] from the sampler and keeps its contiguous
block of B / world rows (`shard_rows`), so world x (B / world) rows are exactly the B rows one
process would see, and the mean of the ranks' equal-sized losses is the global mean loss: a
run on N processes follows the single-process loss trajectory up to float rounding.

FSDP2 sharding units: every element of each outermost nn.ModuleList (the layer stack of
almost every LM), then the root. The root's parameters are broadcast from rank 0 first, so
the ranks start from one set of weights even if their inits differed (DDP does the same).

State dicts go through torch.distributed.checkpoint.state_dict in every mode: full,
unsharded tensors on the CPU with the plain parameter names (no "module." prefix), so one
checkpoint loads under none / ddp / fsdp and any world size.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)

__all__ = ["MODES", "DistEnv", "setup", "teardown", "wrap_model", "unwrap", "shard_rows",
           "all_reduce_sum", "barrier", "full_state_dicts", "load_full_state_dicts", "fsdp_units"]

MODES = ("none", "ddp", "fsdp")


@dataclass
class DistEnv:
    """Where this process stands: its rank, the world size, its device, and the mode."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when `setup` opened the process group (so closes it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode != "none"


def setup(mode: str, device: str = "auto") -> DistEnv:
    """Read torchrun's environment and open the process group for `mode` ("none"/"ddp"/"fsdp").

    Args:
        mode: "none" runs one process (and refuses to run under a torchrun world > 1, where
            every process would train its own copy); "ddp" / "fsdp" need torchrun's variables.
        device: "auto" (cuda:LOCAL_RANK when CUDA is present, else cpu), "cpu" or "cuda".
    """
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none":
        if world > 1:
            raise ValueError(f"distributed='none' but WORLD_SIZE={world}: launched by torchrun, "
                             f"pass distributed='ddp' or 'fsdp'")
        return DistEnv(device=torch.device("cuda" if use_cuda else "cpu"))
    if "RANK" not in os.environ and not dist.is_initialized():
        raise ValueError(f"distributed={mode!r} needs torchrun (RANK / WORLD_SIZE are not set): "
                         f"torchrun --nproc_per_node=N your_script.py")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(mode=mode, rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=local_rank, device=dev, owns_group=owns)


def teardown(env: DistEnv) -> None:
    """Close the process group if `setup` opened it (after a barrier, so no rank closes its
    connections while another still talks)."""
    if env.owns_group and dist.is_initialized():
        gc.collect()  # drop unreachable FSDP meshes / DDP reducers that hold the group
        dist.barrier()
        dist.destroy_process_group()
        env.owns_group = False


def fsdp_units(module: nn.Module) -> Iterator[nn.Module]:
    """The elements of every outermost nn.ModuleList under `module` (FSDP2 sharding units)."""
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            yield from child
        else:
            yield from fsdp_units(child)


def wrap_model(model: nn.Module, env: DistEnv, unused_parameters: bool = False) -> nn.Module:
    """Move `model` to the device and wrap it for `env.mode` (returns it unchanged for "none").

    "ddp": DistributedDataParallel (broadcasts rank 0's weights, averages gradients).
    unused_parameters: some steps leave parameters without a gradient (a carried state does not
    read the learned initial memory W_0), so DDP must look for them (find_unused_parameters).
    "fsdp": broadcast rank 0's weights, then `fully_shard` each unit and the root; the
    module keeps its class and parameter names, its parameters become sharded DTensors.
    """
    model = model.to(env.device)
    if env.mode == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused_parameters)
    if env.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)
        for unit in list(fsdp_units(model)):
            fully_shard(unit)
        fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper and/or torch.compile (FSDP2 wraps in place)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shard_rows(x: Tensor, env: DistEnv) -> Tensor:
    """This rank's contiguous block of the global batch: rows [r B/W, (r+1) B/W) of x [B, ...]."""
    if not env.active:
        return x
    rows = x.shape[0]
    if rows % env.world_size:
        raise ValueError(f"batch_size {rows} must be divisible by the world size "
                         f"{env.world_size} (each rank takes an equal block of rows)")
    per = rows // env.world_size
    return x[env.rank * per:(env.rank + 1) * per]


def all_reduce_sum(x: Tensor, env: DistEnv) -> Tensor:
    """Sum of `x` over the ranks (x itself when not distributed)."""
    if env.active:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if env.active:
        dist.barrier()


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer
                     ) -> tuple[dict[str, Tensor], dict]:
    """Full (unsharded, CPU) model and optimizer state dicts keyed by parameter name.

    A collective under FSDP: every rank must call it. Under FSDP only rank 0 gets the full
    dicts (the others get empty ones), which is the rank that writes checkpoints.
    """
    model = unwrap(model)
    return (get_model_state_dict(model, options=_FULL),
            get_optimizer_state_dict(model, optimizer, options=_FULL))


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                          model_state: dict[str, Tensor], optim_state: dict | None) -> None:
    """Load full state dicts (from `full_state_dicts`) into a plain, DDP or FSDP model.

    Every rank passes the full dicts (each reads the checkpoint from disk); FSDP keeps only
    its shard. Raises on missing or unexpected keys.
    """
    model = unwrap(model)
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, model_state, options=opts)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
