"""Helpers shared by the command modules: errors, overrides, loading runs and corpora."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["UserError", "parse_overrides", "load_run", "run_facts", "token_file", "default_corpus",
           "haystack_documents", "check_tokenizer", "given", "refuse", "positive_int", "nonnegative_int",
           "check_output", "plot_path",
           "progress", "add_quiet"]


class UserError(Exception):
    """A problem with the command's arguments or files, reported as one line."""


# --------------------------------------------------------------------------- flags
def given(a: argparse.Namespace, *dests: str) -> list[str]:
    """The flags among `dests` (argparse dest names) that the command line gave explicitly,
    as the user typed them (`--batch-size`); the parser records them (cli.build_parser)."""
    seen = getattr(a, "given_flags", {})
    return [seen[d] for d in dests if d in seen]


def refuse(a: argparse.Namespace, dests: tuple[str, ...], context: str, hint: str = "") -> None:
    """A flag that does not apply is an error, never ignored: refuse any of `dests` given with
    `context` (e.g. "--init")."""
    flags = given(a, *dests)
    if flags:
        raise UserError(f"{' and '.join(flags)} {'does' if len(flags) == 1 else 'do'} not apply with {context}"
                        + (f": {hint}" if hint else ""))


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (counts and lengths: 0 is never silently a default)."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0 (intervals where 0 means "only at the end", seeds)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value


# --------------------------------------------------------------------------- outputs
def check_output(path: str | Path, flag: str, *, directory: bool = False) -> Path:
    """Refuse an output path that cannot be written, before any work starts (so nothing
    computed is lost at the end): a parent that is a file, a file where a directory goes (or
    the reverse), a parent without write permission."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a directory")
    if not directory and path.is_dir():
        raise UserError(f"{flag} {path} is a directory: give a file path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise UserError(f"{flag} {path}: {target} is not writable")
    return path


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg")


def plot_path(value: str | None, model: str | None, name: str, flag: str = "--plot") -> str:
    """Where a plot goes, checked before the evaluation starts: --plot as given ('' skips the
    plot), inside it if it is a directory, else `name` in the --model directory (never the
    current directory). A path without a suffix gets .png, so the path printed is the one written."""
    if value == "":
        return ""
    path = Path(model or ".") / name if value is None else Path(value)
    if value is not None and path.is_dir():
        path = path / name
    if not path.suffix:
        path = path.with_suffix(".png")
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise UserError(f"{flag} {value}: a plot is one of {', '.join(PLOT_SUFFIXES)}")
    return str(check_output(path, flag))


# --------------------------------------------------------------------------- progress
def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar (it shows only when stderr is a terminal)")


def progress(total: int | None, unit: str, quiet: bool = False, desc: str | None = None):
    """A tqdm bar on stderr for a long job; disabled (a no-op) with --quiet or when stderr is not
    a terminal, so logs and pipes stay clean. Use it as a context manager: it closes (and its
    line ends) before any error line is printed."""
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False,
                unit_scale=unit == "token", disable=quiet or not sys.stderr.isatty())


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
