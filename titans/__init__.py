"""Titans: Learning to Memorize at Test Time (Behrouz, Zhong, Mirrokni 2025) in PyTorch."""

from .layers import Attention, AttentionState, NeuralMemory, NeuralMemoryState, PersistentMemory, RMSNorm, SwiGLU
from .models import LMOutput, ModelState, TitansConfig, TitansLM
from .ops import MemoryState, memory_rule

# Training pulls in torch.distributed.checkpoint (47 MB of resident memory, `python
# benchmarks/layer_memory.py` before/after; ~0.5 s, `python -X importtime -c "import titans"`):
# it loads on first use, so that `import titans` for the layers and models stays light.
_LAZY = {"CheckpointError": "train", "TrainConfig": "train", "Trainer": "train", "load_checkpoint": "train"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "memory_rule", "MemoryState",
    "NeuralMemory", "NeuralMemoryState", "Attention", "AttentionState", "PersistentMemory", "RMSNorm", "SwiGLU",
    "TitansConfig", "TitansLM", "LMOutput", "ModelState",
    "TrainConfig", "Trainer", "load_checkpoint", "CheckpointError",
]
__version__ = "0.1.0"
