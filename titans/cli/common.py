"""Helpers shared by the command modules: errors, overrides, loading runs and corpora."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["UserError", "parse_overrides", "load_run", "token_file", "default_corpus", "haystack_documents"]


class UserError(Exception):
    """A problem with the command's arguments or files, reported as one line."""


# --------------------------------------------------------------------------- helpers
def default_corpus(tokenizer: str) -> Path:
    from ..data.corpus import default_data_dir
    return default_data_dir() / "corpus" / Path(tokenizer).stem


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """--set key=value pairs; values parse as JSON when they can (numbers, booleans, lists)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def load_run(path: str | Path):
    """(model, tokenizer, checkpoint) from a run directory (its newest good checkpoint) or a
    checkpoint directory. Loading reads safetensors and JSON only."""
    from ..data.tokenizer import load_tokenizer
    from ..models import TitansConfig, TitansLM
    from ..train import load_checkpoint, load_latest

    path = Path(path)
    if not path.exists():
        raise UserError(f"--model: {path} does not exist")
    ckpt = load_checkpoint(path) if (path / "model.safetensors").exists() else load_latest(path / "checkpoints")
    if ckpt is None:
        raise UserError(f"--model: no checkpoint under {path}")
    if ckpt.config is None:
        raise UserError(f"--model: checkpoint {ckpt.path} has no config.json")
    model = TitansLM(TitansConfig.from_dict(ckpt.config))
    model.load_state_dict(ckpt.model_state)
    name = ckpt.state.get("tokenizer") or "byte"
    tokenizer = load_tokenizer("byte" if name == "byte" else ckpt.path)
    return model.eval(), tokenizer, ckpt


def token_file(data: str | None, split: str):
    from ..data import TokenFile
    root = Path(data) if data else default_corpus("byte")
    if not (root / "meta.json").exists():
        raise UserError(f"no prepared corpus at {root}: run `titans data prepare` first (or pass --data)")
    return TokenFile(root, split=split)


def haystack_documents(text: list[str] | None = None, data_dir: str | None = None):
    """The held-out (validation) documents of the corpus: haystacks and distractors for the
    long-context tasks, never seen in training."""
    from ..data import load_documents, split_documents
    sources = None if text else ["shakespeare", "wiki"]
    _, val = split_documents(load_documents(sources, text, data_dir))
    if not val:
        raise UserError("the corpus has no held-out documents for the haystack")
    return val
