"""AdamW with the usual language-model parameter groups, and the warmup + cosine schedule.

Weight-decay rule (one place, used by the trainer): a parameter is NOT decayed when

    p.ndim < 2                                   (biases, norm gains, scalar gates)
    or its name contains "norm", "bias" or "embed" (case-insensitive)

and every other parameter (the weight matrices of linear layers, memory networks, ...) is
decayed. Decaying a norm gain pulls it towards 0 instead of towards 1, and decaying an
embedding shrinks rare tokens' rows that get almost no gradient, so both are exempt, as in
GPT-2 / nanoGPT / LLaMA recipes. A tied output head shares its tensor with the embedding
and appears once, under the embedding's name, so it is not decayed either.

The schedule is a pure function of the step, so a checkpoint only needs the step to resume it.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

__all__ = ["NO_DECAY_NAME_PARTS", "decays", "param_groups", "build_optimizer", "lr_at"]

NO_DECAY_NAME_PARTS = ("norm", "bias", "embed")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether the parameter `name` gets weight decay (see the module docstring)."""
    lowered = name.lower()
    return param.ndim >= 2 and not any(part in lowered for part in NO_DECAY_NAME_PARTS)


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float
                 ) -> list[dict]:
    """Two AdamW groups: decayed and not decayed. Frozen parameters are left out.

    Args:
        named_params: `model.named_parameters()` (of the unwrapped model, so names carry no
            "module." prefix; FSDP2 keeps the names).
        weight_decay: the decay of the first group (>= 0).

    Returns:
        [{"params": [...], "weight_decay": weight_decay, "names": [...]},
         {"params": [...], "weight_decay": 0.0, "names": [...]}]; empty groups are dropped.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    groups = {True: ([], []), False: ([], [])}
    for name, p in named_params:
        if p.requires_grad:
            params, names = groups[decays(name, p)]
            params.append(p)
            names.append(name)
    return [{"params": params, "names": names, "weight_decay": wd}
            for (params, names), wd in ((groups[True], weight_decay), (groups[False], 0.0))
            if params]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8
                    ) -> torch.optim.AdamW:
    """AdamW over `param_groups(model.named_parameters(), weight_decay)`.

    The group dicts keep a "names" list: it is informative only (torch ignores extra keys and
    saves them in the optimizer state dict, which is how a checkpoint records the split).
    """
    groups = param_groups(model.named_parameters(), weight_decay)
    if not groups:
        raise ValueError("model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_at(step: int, *, lr: float, steps: int, warmup: int, min_lr_ratio: float) -> float:
    """The learning rate of optimizer step `step` (0-based: the update that makes step+1).

    Linear warmup to `lr` over the first `warmup` updates (update 0 uses lr / warmup), then a
    cosine from `lr` down to `lr * min_lr_ratio`, reached at the last update (steps - 1).

        step < warmup:  lr * (step + 1) / warmup
        otherwise:      lo + (lr - lo) * (1 + cos(pi * p)) / 2,  lo = lr * min_lr_ratio,
                        p = (step - warmup) / max(1, steps - 1 - warmup)
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return lr * (step + 1) / warmup
    lo = lr * min_lr_ratio
    progress = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
    return lo + (lr - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))
