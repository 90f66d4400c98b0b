"""Titans: Learning to Memorize at Test Time (Behrouz, Zhong, Mirrokni 2025) in PyTorch."""

from ._lazy import lazy_attributes
from ._version import __version__

# Every public name loads on first use (PEP 562), so `import titans` and `titans --help` do
# not import torch (1.5 s) and `from titans import TitansLM` loads only the models. Training in
# particular pulls in torch.distributed.checkpoint (47 MB of resident memory, `python
# benchmarks/layer_memory.py` before/after; ~0.5 s, `python -X importtime -c "import titans"`).
_LAZY = {
    "memory_rule": "ops", "MemoryState": "ops",
    **{name: "layers" for name in ("Attention", "AttentionState", "NeuralMemory", "NeuralMemoryState",
                                   "PersistentMemory", "RMSNorm", "SwiGLU")},
    **{name: "models" for name in ("LMOutput", "ModelState", "TitansConfig", "TitansLM")},
    **{name: "train" for name in ("CheckpointError", "TrainConfig", "Trainer", "load_checkpoint")},
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())


__all__ = [
    "memory_rule", "MemoryState",
    "NeuralMemory", "NeuralMemoryState", "Attention", "AttentionState", "PersistentMemory", "RMSNorm", "SwiGLU",
    "TitansConfig", "TitansLM", "LMOutput", "ModelState",
    "TrainConfig", "Trainer", "load_checkpoint", "CheckpointError",
    "__version__",
]
