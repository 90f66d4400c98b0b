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
import warnings

from .common import UserError, load_run

__all__ = ["main", "build_parser", "load_run", "UserError", "error_message"]


def _shows_default(action: argparse.Action) -> bool:
    return bool(action.option_strings) and not any(action.default is v for v in (None, False, argparse.SUPPRESS))


class _HelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default (unless it is None or False, or the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _shows_default(action) and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line too, through main (argparse would print the usage first and
    exit): the usage is one --help away, named in the line."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


_RECORDING: dict[type, type] = {}


def _recording(cls: type) -> type:
    """`cls` that also notes, in namespace.given_flags, that its flag was on the command line,
    so a command can tell a flag given from a default (common.given / common.refuse)."""
    if cls not in _RECORDING:
        def __call__(self, parser, namespace, values, option_string=None):
            flags = getattr(namespace, "given_flags", None)
            if flags is None:
                flags = {}
                setattr(namespace, "given_flags", flags)
            flags[self.dest] = self.option_strings[-1] if option_string is None else option_string
            cls.__call__(self, parser, namespace, values, option_string)
        _RECORDING[cls] = type(f"Recording{cls.__name__}", (cls,), {"__call__": __call__})
    return _RECORDING[cls]


def _parsers(p: argparse.ArgumentParser):
    """p and every subcommand parser under it."""
    yield p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def build_parser() -> argparse.ArgumentParser:
    """The `titans` parser. Building it imports no torch (the command modules import their
    heavy modules inside the commands), so --help and --version are quick."""
    from .._version import __version__
    from . import domains, lm, long_context, positions

    p = _Parser(prog="titans", description="Titans: learning to memorize at test time.")
    p.add_argument("--version", action="version", version=f"titans {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="action", required=True)
    for module in (lm, long_context, positions, domains):
        module.register(sub, ev)
    for parser in _parsers(p):
        parser.formatter_class = _HelpFormatter
        for action in parser._actions:
            if action.help is None and _shows_default(action):
                action.help = "(default: %(default)s)"  # argparse prints nothing for help=None
            if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                action.__class__ = _recording(type(action))
    return p


# Exceptions that bad input or a bad environment raise (not bugs): reported as one line. OSError
# covers missing and unwritable files, and the network (requests' and the hub's connection and
# HTTP errors derive from it); ValueError covers JSON, config, checkpoint (CheckpointError) and
# hub repo-id errors; RuntimeError torch's refusals; ImportError a missing extra.
_EXPECTED = (UserError, ValueError, OSError, RuntimeError, ImportError, MemoryError)


def error_message(e: BaseException) -> str | None:
    """The one line for an expected exception (None: a bug, let its traceback show)."""
    if not isinstance(e, _EXPECTED):
        return None
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    elif isinstance(e, MemoryError):
        text = f"out of memory{': ' + str(e) if str(e) else ''}"
    else:
        text = str(e) or type(e).__name__
        if type(e).__module__.split(".")[0] not in ("builtins", "titans"):
            text = f"{type(e).__name__}: {text}"  # e.g. ConnectionError, HFValidationError
    return " ".join(text.split())  # one line


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    # warnings the user should see (a checkpoint skipped, a resume that will not match), without
    # Python's file name and source-line echo (formatwarning, not showwarning: pytest.warns and
    # other recorders still see the warning itself)
    return f"titans: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Run the command; an expected exception ends in one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except UserError as e:
        print(f"titans: error: {e}", file=sys.stderr)
        return 2
    import shlex
    args.command_line = shlex.join(["titans", *argv])  # kept with a run (titans export's model card)
    show = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("titans: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = error_message(e)
        if message is None:
            raise
        print(f"titans: error: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = show
    return 0
