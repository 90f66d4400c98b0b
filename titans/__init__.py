"""Titans: Learning to Memorize at Test Time (Behrouz, Zhong, Mirrokni 2025) in PyTorch."""

from .layers import Attention, AttentionState, NeuralMemory, NeuralMemoryState, PersistentMemory, RMSNorm, SwiGLU
from .models import LMOutput, ModelState, TitansConfig, TitansLM
from .ops import MemoryState, memory_rule
from .train import CheckpointError, TrainConfig, Trainer, load_checkpoint

__all__ = [
    "memory_rule", "MemoryState",
    "NeuralMemory", "NeuralMemoryState", "Attention", "AttentionState", "PersistentMemory", "RMSNorm", "SwiGLU",
    "TitansConfig", "TitansLM", "LMOutput", "ModelState",
    "TrainConfig", "Trainer", "load_checkpoint", "CheckpointError",
]
__version__ = "0.1.0"
