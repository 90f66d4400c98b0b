"""DNA benchmarks (paper section 5.7, Table 4) at CPU scale: species classification and
next-base language modelling, each against an order-k Markov baseline.

Shape legend
    B batch, W bases per window, K classes, V vocabulary (5: A C G T N)
    classification batch: tokens [B, W], labels [B]   LM batch: x, y [B, W] (y = x shifted)

run_dna_classification trains DNAClassifier on a DNAClassificationTask (by default the species
task of titans.data.dna.build_window_task on Debian's ragout-examples genomes: held-out
strains for test), keeps the weights with the best validation accuracy and reports test
accuracy. run_dna_lm trains TitansLM on random windows of the first part of every genome
record and reports bits per base on windows of the last part (a split by position).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..data.dna import DNAClassificationSet, DNAClassificationTask, DNATokenizer, FastaSource, build_window_task
from ..data.dna import fetch_genomes, read_fasta
from ..models.dna import DNAClassifier, MarkovChain, dna_config
from ..models.lm import TitansLM
from .metrics import accuracy, bits_per_token

__all__ = ["run_dna_classification", "run_dna_lm", "evaluate_classifier", "format_dna_table"]


def _logger(progress: bool):
    return (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else None


def _optimizer(model: nn.Module, lr: float, weight_decay: float, steps: int):
    """AdamW and a cosine decay to 0 over `steps`."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, sched


def _update(model: nn.Module, loss: Tensor, opt, sched, step: int) -> None:
    """One optimiser step with gradient clipping at 1; a non-finite loss or gradient stops the run."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if not (torch.isfinite(loss) and torch.isfinite(norm)):
        raise RuntimeError(f"training diverged at step {step} (loss {loss.item()}, gradient norm {norm.item()}); "
                           "try a lower lr")
    opt.step()
    sched.step()


def _check_loop(steps: int, batch_size: int, lr: float) -> None:
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"steps and batch_size must be >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data: DNAClassificationSet, batch_size: int = 64,
                        device: str | torch.device = "cpu") -> float:
    """Accuracy of model (tokens [B, W] -> logits [B, K]) over every example of `data`."""
    model.eval()
    preds = [model(data.tokens[s:s + batch_size].to(device)).argmax(-1).cpu()
             for s in range(0, len(data), batch_size)]
    return accuracy(torch.cat(preds), data.labels)


def run_dna_classification(task: DNAClassificationTask | None = None, *, sources: Sequence[FastaSource] | None = None,
                           data_dir: str | None = None, window: int = 500, n_train: int = 1000, n_val: int = 100,
                           n_test: int = 250, preset: str = "tiny", variant: str = "lmm",
                           config: dict[str, Any] | None = None, steps: int = 200, batch_size: int = 8,
                           lr: float = 1e-3, weight_decay: float = 0.1, eval_every: int = 100,
                           markov_orders: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0, device: str = "cpu",
                           pad_id: int | None = None, dataset: str = "species",
                           progress: bool = True) -> list[dict[str, Any]]:
    """Species (or any label) classification: a Titans classifier and a Markov baseline.

    Args:
        task: train / val / test sets; None builds the species task with build_window_task
            from `sources` (None: fetch_genomes(data_dir), the 4 species of ragout-examples),
            `window` bases, n_train / n_val / n_test windows per class, `seed`.
        preset, variant, config: the backbone, dna_config(preset, variant, **config).
        steps, batch_size, lr, weight_decay: AdamW with a cosine decay; validation accuracy
            every `eval_every` steps and at the end, the best weights are tested.
        markov_orders: orders of the per-class Markov baseline; the best on val is tested
            (empty: no baseline).
        seed: model initialisation and batch order.
        pad_id: the task's pad token, left out of the pooled mean (None for equal lengths).

    Returns:
        rows {task, model, accuracy, val_accuracy, steps, train_time_s, params, note}.
    """
    _check_loop(steps, batch_size, lr)
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    log = _logger(progress)
    if task is None:
        srcs = list(sources) if sources is not None else fetch_genomes(data_dir)
        task = build_window_task(srcs, window, n_train, n_val, n_test, seed=seed)
    K = len(task.labels)
    if log:
        log(f"{dataset}: {K} classes, {len(task.train)} train / {len(task.val)} val / {len(task.test)} test")
    rows: list[dict[str, Any]] = []

    torch.manual_seed(seed)
    # the 5 bases, or more if the task's tokenizer has specials (e.g. <pad> for uneven lengths)
    vocab = max(DNATokenizer().vocab_size, *(int(s.tokens.max()) + 1 for s in (task.train, task.val, task.test)))
    cfg = dna_config(preset, variant, **{"vocab_size": vocab, **(config or {})})
    model = DNAClassifier(cfg, K, pad_id=pad_id).to(device)
    opt, sched = _optimizer(model, lr, weight_decay, steps)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, order = -1.0, None, torch.empty(0, dtype=torch.long)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        if len(order) == 0:
            order = torch.randperm(len(task.train), generator=gen)
        idx, order = order[:batch_size], order[batch_size:]
        model.train()
        loss = nn.functional.cross_entropy(model(task.train.tokens[idx].to(device)), task.train.labels[idx].to(device))
        _update(model, loss, opt, sched, step)
        if step % eval_every == 0 or step == steps:
            val = evaluate_classifier(model, task.val, device=device)
            if log:
                log(f"  step {step}/{steps} loss {loss.item():.4f} val accuracy {val:.4f}")
            if val > best:
                best, best_state = val, copy.deepcopy(model.state_dict())
    took = time.perf_counter() - t0
    model.load_state_dict(best_state)
    test_acc = evaluate_classifier(model, task.test, device=device)
    rows.append(dict(task=dataset, model=f"titans-{variant}", accuracy=test_acc, val_accuracy=best,
                     steps=steps, train_time_s=round(took, 1),
                     params=sum(p.numel() for p in model.parameters()), note=f"preset {preset}"))

    if markov_orders:
        t0 = time.perf_counter()
        V = cfg.vocab_size
        fits = [MarkovChain(k, V, K).fit(task.train.tokens.numpy(), task.train.labels.tolist()) for k in markov_orders]
        vals = [accuracy(torch.from_numpy(m.class_log_likelihood(task.val.tokens.numpy())), task.val.labels)
                for m in fits]
        i = int(np.argmax(vals))
        acc = accuracy(torch.from_numpy(fits[i].class_log_likelihood(task.test.tokens.numpy())), task.test.labels)
        rows.append(dict(task=dataset, model=f"markov-k{markov_orders[i]}", accuracy=acc, val_accuracy=vals[i],
                         steps=0, train_time_s=round(time.perf_counter() - t0, 1),
                         params=int(fits[i].counts.size), note=f"order chosen on val among {tuple(markov_orders)}"))
    if log:
        for r in rows:
            log(f"{dataset} {r['model']}: test accuracy {r['accuracy']:.4f} (val {r['val_accuracy']:.4f})")
    return rows


def _lm_regions(sources: Sequence[FastaSource], tok: DNATokenizer, val_fraction: float, test_fraction: float
                ) -> dict[str, list[tuple[np.ndarray, int, int]]]:
    """Per record: train [0, a) | val [a, b) | test [b, n) by position."""
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    for src in sources:
        for rec in read_fasta(src.path):
            ids = tok.encode_np(rec.seq)
            n = len(ids)
            a, b = int(n * (1 - val_fraction - test_fraction)), int(n * (1 - test_fraction))
            for name, lo, hi in (("train", 0, a), ("val", a, b), ("test", b, n)):
                out[name].append((ids, lo, hi))
    return out


def _draw(regions: list, n: int, length: int, margin: int, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """n (sequence, start) pairs, uniform over every start with [start - margin, start + length) in a region."""
    spans = [(ids, lo + margin, hi - length + 1) for ids, lo, hi in regions if hi - lo - margin >= length]
    if not spans:
        raise ValueError(f"seq_len={length - 1}: no region is long enough")
    w = np.array([hi - lo for _, lo, hi in spans], dtype=np.float64)
    picks = rng.choice(len(spans), size=n, p=w / w.sum())
    return [(spans[j][0], int(rng.integers(spans[j][1], spans[j][2]))) for j in picks]


def _windows(pairs: list[tuple[np.ndarray, int]], length: int) -> Tensor:
    return torch.from_numpy(np.stack([ids[s:s + length] for ids, s in pairs]).astype(np.int64))


@torch.no_grad()
def _lm_bits(model: TitansLM, chunks: Tensor, batch_size: int, device: str) -> float:
    """Bits per base of model on chunks [N, W + 1] (every chunk predicts its last W bases)."""
    model.eval()
    nll = [model(c[:, :-1].to(device), labels=c[:, 1:].to(device)).loss.item() * len(c)
           for c in chunks.split(batch_size)]
    return bits_per_token(sum(nll) / len(chunks))


def run_dna_lm(sources: Sequence[FastaSource] | None = None, *, data_dir: str | None = None, seq_len: int = 512,
               steps: int = 200, batch_size: int = 8, preset: str = "tiny", variant: str = "lmm",
               config: dict[str, Any] | None = None, lr: float = 1e-3, weight_decay: float = 0.1,
               val_fraction: float = 0.1, test_fraction: float = 0.1, n_eval_windows: int = 64,
               markov_orders: Sequence[int] = (2, 4, 6, 8), seed: int = 0, device: str = "cpu",
               dataset: str = "genomes", progress: bool = True) -> list[dict[str, Any]]:
    """Next-base language modelling in bits per base: TitansLM and order-k Markov chains.

    Every record of every source is split by position into train | val | test
    (1 - val - test : val : test). The LM trains `steps` AdamW steps on random train windows
    of seq_len bases; the Markov chains count every train transition. Both are scored on the
    same n_eval_windows random windows of the val and of the test part (seeded); the order
    with the best val bits is the baseline reported. The Markov chain reads its k context
    bases from before a window's start; the LM sees only the window (a small edge to the
    baseline).

    Returns:
        rows {task, model, bits_per_base, val_bits_per_base, steps, train_time_s, params, note}.
    """
    _check_loop(steps, batch_size, lr)
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be in (0, 1) with sum < 1, "
                         f"got {val_fraction}, {test_fraction}")
    if seq_len < 1 or n_eval_windows < 1:
        raise ValueError(f"seq_len and n_eval_windows must be >= 1, got {seq_len}, {n_eval_windows}")
    log = _logger(progress)
    tok = DNATokenizer()
    srcs = list(sources) if sources is not None else fetch_genomes(data_dir)
    regions = _lm_regions(srcs, tok, val_fraction, test_fraction)
    margin = max(markov_orders, default=0)
    eval_rng = np.random.default_rng(seed + 1)   # the evaluation windows do not depend on `steps`
    evals = {sp: _draw(regions[sp], n_eval_windows, seq_len + 1, margin, eval_rng) for sp in ("val", "test")}
    chunks = {sp: _windows(p, seq_len + 1) for sp, p in evals.items()}
    if log:
        n_train = sum(hi - lo for _, lo, hi in regions["train"])
        log(f"{dataset}: {len(regions['train'])} records, {n_train:,} train bases; "
            f"{n_eval_windows} val / test windows of {seq_len}")
    rows: list[dict[str, Any]] = []

    torch.manual_seed(seed)
    model = TitansLM(dna_config(preset, variant, **(config or {}))).to(device)
    opt, sched = _optimizer(model, lr, weight_decay, steps)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        batch = _windows(_draw(regions["train"], batch_size, seq_len + 1, 0, rng), seq_len + 1)
        model.train()
        loss = model(batch[:, :-1].to(device), labels=batch[:, 1:].to(device)).loss
        _update(model, loss, opt, sched, step)
        if log and (step % 50 == 0 or step == steps):
            log(f"  step {step}/{steps} train bits/base {bits_per_token(loss.item()):.4f}")
    took = time.perf_counter() - t0
    bits = {sp: _lm_bits(model, c, batch_size, device) for sp, c in chunks.items()}
    rows.append(dict(task=dataset, model=f"titans-{variant}", bits_per_base=bits["test"],
                     val_bits_per_base=bits["val"], steps=steps, train_time_s=round(took, 1),
                     params=sum(p.numel() for p in model.parameters()),
                     note=f"preset {preset}, {steps * batch_size * seq_len:,} train bases seen"))

    if markov_orders:
        t0 = time.perf_counter()
        scored = []
        for k in markov_orders:
            mc = MarkovChain(k, tok.vocab_size).fit(ids[lo:hi] for ids, lo, hi in regions["train"])
            b = {sp: bits_per_token(mc.mean_nll(np.stack([ids[s + 1 - k:s + seq_len + 1] for ids, s in p])))
                 for sp, p in evals.items()}
            scored.append((b["val"], b["test"], k, mc.counts.size))
        val, test, k, size = min(scored)
        rows.append(dict(task=dataset, model=f"markov-k{k}", bits_per_base=test, val_bits_per_base=val, steps=0,
                         train_time_s=round(time.perf_counter() - t0, 1), params=int(size),
                         note=f"order chosen on val among {tuple(markov_orders)}, every train base counted"))
    if log:
        for r in rows:
            log(f"{dataset} {r['model']}: test bits/base {r['bits_per_base']:.4f} (val {r['val_bits_per_base']:.4f})")
    return rows


def format_dna_table(rows: Sequence[dict[str, Any]], digits: int = 3) -> str:
    """A markdown table of run_dna_classification rows (accuracy) or run_dna_lm rows (bits per base)."""
    if not rows:
        raise ValueError("rows is empty")
    if all("accuracy" in r for r in rows):
        metric, val, names = "accuracy", "val_accuracy", ("test accuracy", "val accuracy")
    elif all("bits_per_base" in r for r in rows):
        metric, val, names = "bits_per_base", "val_bits_per_base", ("test bits/base", "val bits/base")
    else:
        raise ValueError("rows must all come from run_dna_classification or all from run_dna_lm")
    lines = [f"| task | model | {names[0]} | {names[1]} | params | steps | train s | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['model']} | {r[metric]:.{digits}f} | {r[val]:.{digits}f} | "
                     f"{r['params']:,} | {r['steps']} | {r['train_time_s']} | {r['note']} |")
    return "\n".join(lines)
