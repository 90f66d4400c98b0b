"""nn.Modules: the layers the Titans blocks are built from."""

from .attention import Attention, AttentionState
from .common import RMSNorm, SwiGLU
from .neural_memory import NeuralMemory, NeuralMemoryState
from .persistent import PersistentMemory

__all__ = ["Attention", "AttentionState", "NeuralMemory", "NeuralMemoryState", "PersistentMemory", "RMSNorm", "SwiGLU"]
