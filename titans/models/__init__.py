"""Model assemblies: the config, the blocks of every variant, the language model."""

from .._lazy import lazy_attributes

# The config (presets, variants) is plain Python and loads at once: the command line reads it to
# build its parser without importing torch. The modules load on first use (PEP 562).
from .config import BLOCK_KINDS, PRESETS, VARIANTS, TitansConfig

_LAZY = {"DLinear": "dlinear", "DNAClassifier": "dna", "MarkovChain": "dna", "dna_config": "dna",
         "RevIN": "forecaster", "TitansForecaster": "forecaster",
         "LMOutput": "lm", "ModelState": "lm", "TitansLM": "lm"}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())


__all__ = ["TitansConfig", "TitansLM", "LMOutput", "ModelState", "PRESETS", "VARIANTS", "BLOCK_KINDS",
           "TitansForecaster", "RevIN", "DLinear", "DNAClassifier", "MarkovChain", "dna_config"]
