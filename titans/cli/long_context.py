"""Long-context commands: eval niah, eval babilong, eval stream, eval recall (docs/long_context.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (UserError, add_quiet, check_output, check_tokenizer, haystack_documents, load_run,
                     parse_overrides, plot_path, positive_int, progress, refuse, run_facts)


def _model(a: argparse.Namespace):
    """A trained run (--model), or an untrained preset (--preset/--variant) for stream tests."""
    if a.model:
        refuse(a, ("preset", "variant"), "--model", "an untrained --preset is the alternative to --model")
        model, tokenizer, _ = load_run(a.model)
        return model, tokenizer
    if not getattr(a, "preset", None):
        raise UserError("--model is required (or --preset for an untrained model)")
    import torch

    from ..data import load_tokenizer
    from ..models import TitansConfig, TitansLM
    torch.manual_seed(0)
    return TitansLM(TitansConfig.from_preset(a.preset, variant=a.variant or "mac")).eval(), load_tokenizer("byte")


def _lengths(value: str) -> list[int]:
    from ..data.tasks import parse_lengths
    try:
        return parse_lengths(value)
    except ValueError as e:
        raise UserError(f"--lengths {value}: {e}") from None


def cmd_niah(a: argparse.Namespace) -> None:
    from ..eval.niah import evaluate_niah, format_niah_table, plot_niah

    lengths = _lengths(a.lengths)  # every argument and output path checked before the first sample
    if a.task == "pk":
        refuse(a, ("text",), "--task pk", "the pass-key haystack is fixed noise")
    a.plot = plot_path(a.plot, a.model, f"niah-{a.task}.png")
    model, tokenizer = _model(a)
    docs = None if a.task == "pk" else haystack_documents(a.text)
    n_depths = a.depths if isinstance(a.depths, int) else len(a.depths)
    with progress(len(lengths) * n_depths * a.samples, "sample", a.quiet) as bar:
        records = evaluate_niah(model, tokenizer, a.task, lengths, a.depths, a.samples, documents=docs, seed=a.seed,
                                piece=a.piece, progress=lambda record: bar.update(1))
    print(format_niah_table(records))
    if a.plot:
        plot_niah(records, a.plot, title=f"S-NIAH {a.task}")
        print(f"heatmap: {a.plot}")


def cmd_babilong(a: argparse.Namespace) -> None:
    from ..data.tasks import BABILONG_TASKS
    from ..eval.babilong import evaluate_babilong, format_babilong_table, plot_babilong

    tasks = [t for t in a.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in BABILONG_TASKS]
    if not tasks or unknown:
        raise UserError(f"--tasks {a.tasks}: choose from {','.join(BABILONG_TASKS)}")
    lengths = _lengths(a.lengths)
    a.plot = plot_path(a.plot, a.model, "babilong.png")
    model, tokenizer = _model(a)
    # evaluate_babilong checks every task's stories against the shortest length before the first sample
    with progress(len(tasks) * len(lengths) * a.samples, "sample", a.quiet) as bar:
        records = evaluate_babilong(model, tokenizer, tasks, lengths, a.samples, documents=haystack_documents(a.text),
                                    seed=a.seed, piece=a.piece, progress=lambda record: bar.update(1))
    print(format_babilong_table(records))
    if a.plot:
        plot_babilong(records, a.plot)
        print(f"plot: {a.plot}")


def cmd_stream(a: argparse.Namespace) -> None:
    from ..data.tasks import parse_length, parse_lengths
    from ..eval.stream import format_stream_result, stream_eval

    try:
        n = parse_length(a.tokens)
        marks = parse_lengths(a.checkpoints)
    except ValueError as e:
        raise UserError(f"--tokens/--checkpoints: {e}") from None
    if a.source and not Path(a.source).exists():
        raise UserError(f"--source {a.source} does not exist")
    if a.json:
        check_output(a.json, "--json")
    model, tokenizer = _model(a)
    if a.source and a.model and Path(a.source).is_dir():
        from ..data import TokenFile, tokenizer_fingerprint
        check_tokenizer(tokenizer_fingerprint(tokenizer), TokenFile(a.source, "val"), f"the model {a.model}")
    checkpoints = [c for c in marks if c < n] + [n]
    with progress(n, "token", a.quiet) as bar:
        result = stream_eval(model, n, piece=a.piece, checkpoints=checkpoints, source=a.source, seed=a.seed,
                             progress=bar.update)
    print(format_stream_result(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, default=str))
    if not result["finite"]:
        raise UserError("NaN/Inf appeared in the state or the logits (see above)")


def cmd_recall(a: argparse.Namespace) -> None:
    from ..data.tasks import RECALL_TASKS, evaluate_recall, task_arguments

    refuse(a, ("piece",), "eval recall", "a recall sequence goes through the model in one call")
    model, _, ckpt = load_run(a.model)
    run = run_facts(ckpt)
    trained = run.get("task") in RECALL_TASKS
    task = a.task or (run["task"] if trained else "mqar")
    # the task arguments the run trained with, unless the flags change them (e.g. seq_len to go longer)
    kw = {**(run.get("task_args") or {} if trained and task == run["task"] else {}),
          **parse_overrides(a.task_arg, "--task-arg")}
    try:
        kw = task_arguments(task, kw)
    except ValueError as e:
        raise UserError(f"--task-arg: {e}" + ("" if trained else " (the run was not trained on a recall task, "
                                                                  "so give them all with --task-arg)")) from None
    with progress(a.batches, "batch", a.quiet) as bar:
        acc = evaluate_recall(model, task, a.batch_size, model.config.vocab_size, n_batches=a.batches, seed=a.seed,
                              progress=bar.update, **kw)
    args = " ".join(f"{k}={v}" for k, v in kw.items())
    print(f"{task} ({args}): accuracy {acc:.4f} on scored positions ({a.batches} batches of {a.batch_size})")


def _depths(value: str):
    """--depths: a count of evenly spaced depths (11) or a list of fractions (0,0.5,1)."""
    if "," not in value and "." not in value:
        return positive_int(value)
    try:
        depths = [float(x) for x in value.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a comma list of fractions, got {value!r}") from None
    if not depths or not all(0 <= d <= 1 for d in depths):
        raise argparse.ArgumentTypeError(f"depths are fractions in [0, 1], got {value!r}")
    return depths


def register(sub, ev) -> None:
    from ..models import PRESETS, VARIANTS

    def common(p: argparse.ArgumentParser, model_required: bool = True) -> None:
        p.add_argument("--model", required=model_required, help="run or checkpoint directory")
        p.add_argument("--piece", type=positive_int, default=4096, help="tokens per forward call while prefilling")
        p.add_argument("--seed", type=int, default=1, help="use another seed than training did")
        add_quiet(p)

    n = ev.add_parser("niah", help="single-needle in a haystack (RULER-style S-NIAH), table and heatmap")
    common(n)
    n.add_argument("--task", default="pk", choices=["pk", "n", "w", "uuid"])
    n.add_argument("--lengths", default="1K,2K,4K", help="comma list, K = 1024, M = 1024^2")
    n.add_argument("--depths", type=_depths, default=11, help="a count (11: 0, 0.1 .. 1) or a list of fractions")
    n.add_argument("--samples", type=positive_int, default=1, help="samples per cell")
    n.add_argument("--text", action="append", help="local text for the essay haystack (default: the corpus)")
    n.add_argument("--plot", help="heatmap path, .png/.pdf/.svg, or a directory ('' to skip; default niah-<task>.png "
                                  "in the --model directory)")
    n.set_defaults(func=cmd_niah)

    b = ev.add_parser("babilong", help="bAbI-like QA hidden in long distractor text: accuracy by length")
    common(b)
    b.add_argument("--tasks", default="qa1,qa2,qa3")
    b.add_argument("--lengths", default="1K,2K,4K")
    b.add_argument("--samples", type=positive_int, default=10)
    b.add_argument("--text", action="append", help="local text for the distractors (default: the corpus)")
    b.add_argument("--plot", help="plot path, .png/.pdf/.svg, or a directory ('' to skip; default babilong.png in "
                                  "the --model directory)")
    b.set_defaults(func=cmd_babilong)

    s = ev.add_parser("stream", help="run a model over a very long input in constant memory")
    common(s, model_required=False)
    s.add_argument("--preset", choices=sorted(PRESETS), help="an untrained preset instead of --model")
    s.add_argument("--variant", choices=sorted(VARIANTS), help="with --preset (default mac, as titans train)")
    s.add_argument("--tokens", default="1M", help="total tokens (K/M suffixes)")
    s.add_argument("--checkpoints", default="64K,256K", help="where to measure besides the end")
    s.add_argument("--source", default=None, help="a prepared corpus directory (default: random tokens)")
    s.add_argument("--json", help="write the result as JSON")
    s.set_defaults(func=cmd_stream)

    r = ev.add_parser("recall", help="accuracy on a synthetic recall task (mqar, copy, selective_copy)")
    common(r)
    r.add_argument("--task", choices=["mqar", "copy", "selective_copy"],
                   help="default: the task the run trained on (else mqar)")
    r.add_argument("--task-arg", action="append", metavar="KEY=VALUE",
                   help="change one of the run's task arguments, e.g. seq_len=1024 (repeatable)")
    r.add_argument("--batch-size", type=positive_int, default=16)
    r.add_argument("--batches", type=positive_int, default=4)
    r.set_defaults(func=cmd_recall)
