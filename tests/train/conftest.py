"""The tiny stand-in model (tiny_lm.py) as a fixture, loaded by path (importlib mode)."""

import importlib.util
import sys
from pathlib import Path

import pytest

TINY_LM = Path(__file__).with_name("tiny_lm.py")


@pytest.fixture(scope="session")
def tiny():
    """The tiny_lm module: TinyLM, TinyConfig, tokens(), make(cfg), base_cfg(out, **kw)."""
    if "tiny_lm" not in sys.modules:
        spec = importlib.util.spec_from_file_location("tiny_lm", TINY_LM)
        module = importlib.util.module_from_spec(spec)
        sys.modules["tiny_lm"] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules["tiny_lm"]
