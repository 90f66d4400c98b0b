"""The `titans` command: prepare data, train, evaluate, generate, inspect.

    titans data prepare [--tokenizer byte|bpe] [--text PATH] [--dna]
    titans train --preset small --variant mac --steps 200 --out runs/demo
    titans eval ppl --model runs/demo
    titans eval niah --model runs/demo --task pk --lengths 1K,4K --depths 11
    titans generate --model runs/demo --prompt "ROMEO:"
    titans info --preset 170M --variant mac
    titans export --model runs/demo --out exported/demo     (then TitansLM.from_pretrained)
    titans forecast --example sf-temps        titans dna classify

Every subcommand has --help. Bad arguments and bad files end with one line on stderr
("titans: error: ...") and exit status 2, never a traceback. The commands live in lm.py
(language modelling), long_context.py and domains.py; common.py holds what they share.
"""

from __future__ import annotations

import argparse
import sys

from .common import UserError, load_run

__all__ = ["main", "build_parser", "load_run", "UserError"]


def _shows_default(action: argparse.Action) -> bool:
    return bool(action.option_strings) and not any(action.default is v for v in (None, False, argparse.SUPPRESS))


class _HelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default (unless it is None or False, or the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _shows_default(action) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _parsers(p: argparse.ArgumentParser):
    """p and every subcommand parser under it."""
    yield p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from . import domains, lm, long_context

    p = argparse.ArgumentParser(prog="titans", description="Titans: learning to memorize at test time.")
    p.add_argument("--version", action="version", version=f"titans {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="action", required=True)
    for module in (lm, long_context, domains):
        module.register(sub, ev)
    for parser in _parsers(p):
        parser.formatter_class = _HelpFormatter
        for action in parser._actions:
            if action.help is None and _shows_default(action):
                action.help = "(default: %(default)s)"  # argparse prints nothing for help=None
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..train import CheckpointError
    try:
        args.func(args)
    except (UserError, ValueError, CheckpointError, FileNotFoundError, RuntimeError) as e:
        print(f"titans: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("titans: interrupted", file=sys.stderr)
        return 130
    return 0
