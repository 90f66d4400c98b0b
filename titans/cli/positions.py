"""`titans eval by-position`: loss by position on held-out long documents, the state carried against
reset at every piece and against read from the piece before (titans/eval/by_position.py), for a model
and optionally a baseline."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .common import (UserError, add_quiet, check_output, check_tokenizer, default_corpus, load_run, positive_int,
                     progress, run_facts, token_file)

DEFAULT_MIN_PIECES = 64


def _trained_length(ckpt, flag: int | None, who: str) -> int:
    if flag is not None:
        return flag
    seq_len = (ckpt.state.get("train_config") or {}).get("seq_len") if ckpt is not None else None
    if not seq_len:
        raise UserError(f"{who} records no training length (a saved model): give --piece")
    return int(seq_len)


def _documents(a: argparse.Namespace, tokenizer, ckpt, piece: int):
    """[(name, ids)]: the --text files, or the long documents of the run's held-out split."""
    import torch

    from ..data import tokenizer_fingerprint
    from ..data.tokens import document_separator
    need = a.min_pieces * piece + 1
    if a.text:
        docs = []
        for path in a.text:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"--text {path}: {e}") from None
            docs.append((path, torch.tensor(document_separator(tokenizer) + tokenizer.encode(text))))
    else:
        data = token_file(str(a.data or run_facts(ckpt).get("data") or default_corpus(tokenizer.name)), a.split)
        check_tokenizer(tokenizer_fingerprint(tokenizer), data, f"the model {a.model}")
        # a document is read from the separator before it, as the model saw documents in training
        docs = [(name, torch.from_numpy(data.tokens[max(0, s - 1):e].astype("int64")))
                for name, s, e in data.documents()]
    long = [(n, ids) for n, ids in docs if ids.numel() >= need]
    if not long:
        raise UserError(f"no document of at least {a.min_pieces} pieces of {piece} tokens ({need:,} tokens): "
                        f"lower --min-pieces or --piece, or give --text")
    return long


def cmd_by_position(a: argparse.Namespace) -> None:
    from ..eval.by_position import BUCKETS, loss_by_position

    for flag, path in (("--json", a.json), ("--plot", a.plot)):
        if path:
            check_output(path, flag)
    model, tokenizer, ckpt = load_run(a.model)
    piece = _trained_length(ckpt, a.piece, f"--model {a.model}")
    models = [("model", a.model, model)]
    if a.baseline:
        base, base_tok, _ = load_run(a.baseline)
        if base_tok.name != tokenizer.name:
            raise UserError(f"--baseline {a.baseline} uses tokenizer {base_tok.name}, --model {tokenizer.name}")
        models.append(("baseline", a.baseline, base))
    docs = _documents(a, tokenizer, ckpt, piece)
    last = max(hi for _, hi in BUCKETS)
    pieces = [min((ids.numel() - 1) // piece, last) for _, ids in docs]
    # carried, reset, and previous (every piece but the first); reset-only: one pass
    total = sum(n if a.reset_only else 3 * n - 1 for n in pieces) * piece * len(models)
    print(f"{len(docs)} documents ({', '.join(n for n, _ in docs[:4])}{', ...' if len(docs) > 4 else ''}), "
          f"pieces of {piece} tokens; " + ("every piece from an empty state" if a.reset_only
                                              else "the state carried, reset at every piece, and from the piece before"), flush=True)
    results = {}
    with progress(total, "token", a.quiet, desc="scoring") as bar:
        for role, path, m in models:
            results[role] = loss_by_position(m, [ids for _, ids in docs], piece, batch_size=a.batch_size,
                                             progress=bar.update, carried=not a.reset_only)
    head = f"{'bucket':>9} {'tokens':>9} {'carried':>8} {'reset':>8} {'c - r':>7} {'previous':>8} {'c - p':>7}"
    if a.baseline:
        head += f" {'base c':>8} {'base r':>8} {'c - best short':>14}"
    lines = [f"loss in nats per token by position ({tokenizer.name} tokenizer); previous: each piece read after "
             f"the one before it from an empty state, c - p: what the state carries from further back", head]
    ours = results["model"]
    for j, row in enumerate(ours.rows()):
        if not row["tokens"]:
            continue
        line = (f"{row['bucket']:>9} {row['tokens']:>9,} {row['carried']:8.4f} {row['reset']:8.4f} "
                f"{row['carried_minus_reset']:+7.4f} {row['previous']:8.4f} {row['carried_minus_previous']:+7.4f}")
        if a.baseline:
            b = results["baseline"]
            best = min(row["reset"], b.reset[j])   # the best short-context loss of the two models
            line += f" {b.carried[j]:8.4f} {b.reset[j]:8.4f} {row['carried'] - best:+14.4f}"
        lines.append(line)
    print("\n".join(lines))
    if a.json:
        out = {"piece": piece, "documents": [n for n, _ in docs],
               **{role: {"path": str(p), "rows": results[role].rows()} for role, p, _ in models}}
        Path(a.json).write_text(json.dumps(out, indent=1, default=lambda v: None if math.isnan(v) else v) + "\n")
        print(f"wrote {a.json}")
    if a.plot:
        from ..eval.plots import position_curves
        kept = [j for j, n in enumerate(ours.count) if n]
        curves = {f"{role} {mode}": [getattr(results[role], mode)[j] for j in kept]
                  for role, _, _ in models for mode in (("reset",) if a.reset_only else ("carried", "reset", "previous"))}
        position_curves(curves, [ours.buckets[j] for j in kept], a.plot,
                        title=f"{Path(a.model).name}: loss by position (pieces of {piece})")
        print(f"wrote {a.plot}")


def register(sub, ev) -> None:
    p = ev.add_parser("by-position", help="loss by position on long held-out documents: the state carried, reset "
                      "at every piece, and from the piece before")
    p.add_argument("--model", required=True, help="run, checkpoint or saved model directory")
    p.add_argument("--baseline", help="a second model scored the same way (e.g. trained without --carry-state)")
    p.add_argument("--piece", type=positive_int, help="tokens per piece (default: the run's training length)")
    p.add_argument("--data", help="prepared corpus directory (default: the one the run trained on)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--text", action="append", help="score this text file as one document instead (repeatable)")
    p.add_argument("--min-pieces", type=positive_int, default=DEFAULT_MIN_PIECES,
                   help="use only documents of at least this many pieces")
    p.add_argument("--batch-size", type=positive_int, default=16, help="pieces scored together from an empty state")
    p.add_argument("--reset-only", action="store_true",
                   help="score only the reset pieces: for a model whose state grows with the input (Transformer++'s "
                        "whole KV cache), reading a long document carried costs time quadratic in its length")
    p.add_argument("--json", help="write the table as JSON")
    p.add_argument("--plot", help="write the curves as a PNG")
    add_quiet(p)
    p.set_defaults(func=cmd_by_position)
