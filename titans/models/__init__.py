"""Model assemblies: the config, the blocks of every variant, the language model."""

from .config import BLOCK_KINDS, PRESETS, VARIANTS, TitansConfig
from .dlinear import DLinear
from .dna import DNAClassifier, MarkovChain, dna_config
from .forecaster import RevIN, TitansForecaster
from .lm import LMOutput, ModelState, TitansLM

__all__ = ["TitansConfig", "TitansLM", "LMOutput", "ModelState", "PRESETS", "VARIANTS", "BLOCK_KINDS",
           "TitansForecaster", "RevIN", "DLinear", "DNAClassifier", "MarkovChain", "dna_config"]
