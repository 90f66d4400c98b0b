"""Model assemblies: the config, the blocks of every variant, the language model."""

# The config (presets, variants) is plain Python and loads at once: the command line reads it to
# build its parser without importing torch. The modules load on first use (PEP 562).
from .config import BLOCK_KINDS, PRESETS, VARIANTS, TitansConfig

_LAZY = {"DLinear": "dlinear", "DNAClassifier": "dna", "MarkovChain": "dna", "dna_config": "dna",
         "RevIN": "forecaster", "TitansForecaster": "forecaster",
         "LMOutput": "lm", "ModelState": "lm", "TitansLM": "lm"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["TitansConfig", "TitansLM", "LMOutput", "ModelState", "PRESETS", "VARIANTS", "BLOCK_KINDS",
           "TitansForecaster", "RevIN", "DLinear", "DNAClassifier", "MarkovChain", "dna_config"]
