"""Model assemblies: the config, the blocks of every variant, the language model."""

from .config import BLOCK_KINDS, PRESETS, VARIANTS, TitansConfig
from .lm import LMOutput, ModelState, TitansLM

__all__ = ["TitansConfig", "TitansLM", "LMOutput", "ModelState", "PRESETS", "VARIANTS", "BLOCK_KINDS"]
