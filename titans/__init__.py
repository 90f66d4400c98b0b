"""Titans: Learning to Memorize at Test Time (Behrouz, Zhong, Mirrokni 2025) in PyTorch."""

from .ops import MemoryState, memory_rule

__all__ = ["memory_rule", "MemoryState"]
__version__ = "0.1.0"
