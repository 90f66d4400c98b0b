"""The math: pure functions on tensors, no nn.Module."""

import os as _os

import torch as _torch

# Flush-to-zero for subnormal floats, process-wide, from import on. Gate products decay
# geometrically, so the memory's terms keep sinking below 1.2e-38 (fp32), and x86 arithmetic on
# subnormals is much slower (numbers and the command that shows them: docs/memory_rule.md). The mode is inherited by the intra-op threads only when they start after it is
# set, hence here, at import (import titans before running other torch work). Values below
# 1.2e-38 then read as 0. TITANS_KEEP_DENORMALS=1 leaves the mode alone. See docs/memory_rule.md.
if _os.environ.get("TITANS_KEEP_DENORMALS", "") in ("", "0"):
    _torch.set_flush_denormal(True)

from .memory_rule import IMPLS, memory_rule
from .nets import ACTIVATIONS, memory_forward
from .state import MemoryState
from .step import memory_step, owned_state

__all__ = ["memory_rule", "MemoryState", "IMPLS", "ACTIVATIONS", "memory_forward", "memory_step", "owned_state"]
