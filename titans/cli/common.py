"""Helpers shared by the command modules: errors, overrides, loading runs and corpora."""

from __future__ import annotations

from pathlib import Path

__all__ = ["UserError", "parse_overrides", "load_run", "run_facts", "token_file", "default_corpus",
           "haystack_documents", "check_tokenizer"]


class UserError(Exception):
    """A problem with the command's arguments or files, reported as one line."""


# --------------------------------------------------------------------------- helpers
def default_corpus(tokenizer: str) -> Path:
    from ..data.corpus import default_data_dir
    return default_data_dir() / "corpus" / Path(tokenizer).stem


def parse_overrides(pairs: list[str] | None, flag: str = "--set") -> dict[str, str]:
    """KEY=VALUE pairs as text; the config or task they go to parses each value by its field's
    type (titans.typed), so `momentum=False` is the boolean False."""
    out = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} expects KEY=VALUE, got {pair!r}")
        if key.strip() in out:
            raise UserError(f"{flag} {key.strip()} is given twice")
        out[key.strip()] = raw.strip()
    return out


def load_run(path: str | Path):
    """(model, tokenizer, checkpoint) from a run directory (its newest good checkpoint), a
    checkpoint directory, or a directory written by save_pretrained / `titans export` (then
    checkpoint is None). Loading reads safetensors and JSON only, never the optimizer state."""
    from ..data.tokenizer import TOKENIZER_FILE, load_tokenizer
    from ..models import TitansLM
    from ..train import load_run_checkpoint

    path = Path(path)
    if not path.exists():
        raise UserError(f"--model: {path} does not exist")
    ckpt = load_run_checkpoint(path)
    if ckpt is None:
        if not (path / "model.safetensors").exists():
            raise UserError(f"--model: no checkpoint or saved model under {path}")
        model = TitansLM.from_pretrained(path)  # a saved (exported) model
        return model, load_tokenizer(path if (path / TOKENIZER_FILE).exists() else "byte"), None
    name = ckpt.state.get("tokenizer") or "byte"
    return TitansLM.from_checkpoint(ckpt), load_tokenizer("byte" if name == "byte" else ckpt.path), ckpt


def run_facts(ckpt) -> dict:
    """What the trainer recorded about the run (task, task_args, data); {} for a saved model
    or a run from before these were kept."""
    return (ckpt.state.get("run") or {}) if ckpt is not None else {}


def token_file(data: str | None, split: str):
    from ..data import TokenFile
    root = Path(data) if data else default_corpus("byte")
    if not (root / "meta.json").exists():
        raise UserError(f"no prepared corpus at {root}: run `titans data prepare` first (or pass --data)")
    return TokenFile(root, split=split)


def check_tokenizer(fingerprint: str | None, data, who: str) -> None:
    """Refuse prepared data (a TokenFile) made with another tokenizer than `who` uses (its
    fingerprint; None: unknown, not checked)."""
    from ..data import tokenizer_fingerprint
    if fingerprint is None or data.meta is None:
        return
    made_with = data.meta.get("tokenizer_fingerprint") or tokenizer_fingerprint(data.tokenizer())
    if made_with != fingerprint:
        root = data.path.parent
        raise UserError(f"the data in {root} was prepared with tokenizer {data.meta['tokenizer']} ({made_with}), "
                        f"but {who} uses {fingerprint}: prepare the data with the run's tokenizer "
                        f"(titans data prepare --tokenizer <checkpoint>/tokenizer.json --out DIR) and pass --data DIR")


def haystack_documents(text: list[str] | None = None, data_dir: str | None = None):
    """The held-out (validation) documents of the corpus: haystacks and distractors for the
    long-context tasks, never seen in training."""
    from ..data import load_documents, split_documents
    sources = None if text else ["shakespeare", "wiki"]
    _, val = split_documents(load_documents(sources, text, data_dir))
    if not val:
        raise UserError("the corpus has no held-out documents for the haystack")
    return val
