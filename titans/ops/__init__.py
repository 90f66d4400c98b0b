"""The math: pure functions on tensors, no nn.Module."""

from .memory_rule import IMPLS, memory_rule
from .nets import ACTIVATIONS, memory_forward, memory_key_backward
from .state import MemoryState

__all__ = ["memory_rule", "MemoryState", "IMPLS", "ACTIVATIONS", "memory_forward", "memory_key_backward"]
