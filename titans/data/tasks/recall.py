"""Synthetic recall tasks for fast checks: MQAR, copy, selective copy and pass-key retrieval.

Every generator returns (inputs, targets), LongTensors [B, T]: targets[:, t] is the token that
follows inputs[:, t] (already shifted, the Trainer's contract) and -100 wherever the position
is not scored, so `model(inputs, labels=targets).loss` trains on the recalled tokens only and
`masked_accuracy` scores them. Each batch is a function of (seed, step) alone.

Token layout (ids below `vocab_size`):

    MQAR (Arora et al. 2023, "Zoology"): 0 is the filler. Keys come from [1, V/2), values from
        [V/2, V). A sequence is N key-value pairs  k1 v1 ... kN vN, then a query region of
        (key, value) slots, mostly filler; n_queries of the keys (each at most once) are asked
        again in slots drawn with probability ~ i^(power_a - 1) (slot i >= 1, so early slots
        are likelier, Zoology's power law). Scored: the value after each queried key.
    copy: 0 filler, 1 separator, data from [2, V). n data tokens, `delay` fillers, the
        separator, then the n data tokens again. Scored: the copy.
    selective copy (Mamba, Gu & Dao 2023): 0 filler, 1 separator, data from [2, V). A stretch
        of `region` tokens, filler except for n data tokens at random positions, then the
        separator, then the n data tokens in their order. Scored: the copy.
    niah (pass-key retrieval, the paper's Table 2 "S-NIAH-PK" for training): the byte text of
        `titans.data.tasks.niah` task "pk" with the needle at a depth drawn uniformly from
        [0, 1], then the answer as the needle gives it (" " + 5 digits + "."), `seq_len` tokens
        in all (the answer ends up to `jitter` tokens early, the rest is noise). With `lead_in`
        the rows of a step are longer by a lead-in of P tokens (the Trainer reads them without
        gradient before the seq_len tokens it trains on, TrainConfig.lead_in): one pass-key sample
        of P + seq_len tokens, the needle anywhere in it.
        Scored: the answer's tokens, its full stop included (`titans eval niah` decodes past the
        answer and counts "12345" only where what follows is not a digit, so a model must learn
        where the key ends), or with `all_tokens` every token. The needles come from other
        generator seeds than `titans eval niah` uses, so evaluation samples are held out.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ...typed import typed_arguments
from .common import TaskBatches, check_int, derive_seed
from .niah import NiahGenerator

__all__ = ["RECALL_TASKS", "mqar_batch", "copy_batch", "selective_copy_batch", "passkey_batch", "masked_accuracy",
           "recall_batches", "evaluate_recall", "task_arguments"]

RECALL_TASKS = ("mqar", "copy", "selective_copy", "niah")
FILLER, SEPARATOR = 0, 1


def _gen(task: str, seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(task, check_int("seed", seed, 0),
                                                     check_int("step", step, 0)))


def _shift(seq: Tensor, scored: Tensor) -> tuple[Tensor, Tensor]:
    """(inputs, targets) from sequences [B, T + 1] and a mask of the scored tokens [B, T + 1]."""
    targets = seq[:, 1:].masked_fill(~scored[:, 1:], -100)
    return seq[:, :-1].contiguous(), targets.contiguous()


def mqar_batch(batch_size: int, seq_len: int, n_pairs: int, vocab_size: int, *, seed: int = 0,
               step: int = 0, n_queries: int | None = None, power_a: float = 0.01) -> tuple[Tensor, Tensor]:
    """Multi-query associative recall, inputs and targets [batch_size, seq_len].

    Needs n_queries <= n_pairs (default all of them), n_pairs < vocab_size / 2 distinct keys, and
    (seq_len + 1 - 2 n_pairs) // 2 >= n_queries query slots.
    """
    B, T = check_int("batch_size", batch_size, 1), check_int("seq_len", seq_len, 2)
    n, V = check_int("n_pairs", n_pairs, 1), check_int("vocab_size", vocab_size, 4)
    q = n if n_queries is None else check_int("n_queries", n_queries, 1)
    if q > n:
        raise ValueError(f"n_queries={q} must be <= n_pairs={n}")
    if n > V // 2 - 1:
        raise ValueError(f"n_pairs={n} needs vocab_size >= {2 * n + 2} (distinct keys in [1, V/2))")
    slots = (T + 1 - 2 * n) // 2
    if slots < q:
        raise ValueError(f"seq_len={T} is too short for {n} pairs and {q} queries "
                         f"(needs seq_len >= {2 * n + 2 * q - 1})")
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a!r}")
    g = _gen("mqar", seed, step)
    keys = torch.stack([torch.randperm(V // 2 - 1, generator=g)[:n] + 1 for _ in range(B)])  # [B, n]
    values = torch.randint(V // 2, V, (B, n), generator=g)
    seq = torch.full((B, T + 1), FILLER, dtype=torch.long)
    seq[:, 0:2 * n:2], seq[:, 1:2 * n:2] = keys, values
    weights = torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    which = torch.stack([torch.randperm(n, generator=g)[:q] for _ in range(B)])  # queried pairs
    where = torch.stack([torch.multinomial(weights, q, replacement=False, generator=g)
                         for _ in range(B)])  # [B, q] query slots
    rows = torch.arange(B)[:, None]
    kpos = 2 * n + 2 * where
    seq[rows, kpos] = keys.gather(1, which)
    seq[rows, kpos + 1] = values.gather(1, which)
    scored = torch.zeros_like(seq, dtype=torch.bool)
    scored[rows, kpos + 1] = True
    return _shift(seq, scored)


def copy_batch(batch_size: int, n_tokens: int, vocab_size: int, *, seed: int = 0, step: int = 0,
               delay: int = 0) -> tuple[Tensor, Tensor]:
    """Copy: inputs and targets [batch_size, 2 n_tokens + delay] (data, fillers, sep, data)."""
    B, n = check_int("batch_size", batch_size, 1), check_int("n_tokens", n_tokens, 1)
    V, delay = check_int("vocab_size", vocab_size, 3), check_int("delay", delay, 0)
    g = _gen("copy", seed, step)
    data = torch.randint(2, V, (B, n), generator=g)
    sep = torch.full((B, 1), SEPARATOR, dtype=torch.long)
    seq = torch.cat([data, torch.full((B, delay), FILLER, dtype=torch.long), sep, data], 1)
    scored = torch.zeros_like(seq, dtype=torch.bool)
    scored[:, -n:] = True
    return _shift(seq, scored)


def selective_copy_batch(batch_size: int, n_tokens: int, region: int, vocab_size: int, *,
                         seed: int = 0, step: int = 0) -> tuple[Tensor, Tensor]:
    """Selective copy: inputs and targets [batch_size, region + n_tokens]. The n data tokens sit
    at random positions of a `region`-token filler stretch; after the separator they are
    to be written out in order."""
    B, n = check_int("batch_size", batch_size, 1), check_int("n_tokens", n_tokens, 1)
    V, R = check_int("vocab_size", vocab_size, 3), check_int("region", region, 1)
    if R < n:
        raise ValueError(f"region={R} must be >= n_tokens={n}")
    g = _gen("selective_copy", seed, step)
    data = torch.randint(2, V, (B, n), generator=g)
    pos = torch.stack([torch.randperm(R, generator=g)[:n].sort().values for _ in range(B)])
    body = torch.full((B, R), FILLER, dtype=torch.long).scatter(1, pos, data)
    seq = torch.cat([body, torch.full((B, 1), SEPARATOR, dtype=torch.long), data], 1)
    scored = torch.zeros_like(seq, dtype=torch.bool)
    scored[:, -n:] = True
    return _shift(seq, scored)


AUTO_JITTER = 63   # task niah's default jitter where the text leaves room: any chunk or segment up to 64
NO_LEAD_IN = 0.25  # task niah with lead_in: the share of steps without one (the trained length in distribution)


def passkey_batch(batch_size: int, seq_len: int, vocab_size: int, *, seed: int = 0, step: int = 0,
                  all_tokens: bool = False, jitter: int | None = None, lead_in: int = 0) -> tuple[Tensor, Tensor]:
    """Pass-key retrieval: inputs and targets [batch_size, P + seq_len] (byte tokens; see the module
    doc), P = 0 without lead_in.

    Each row is a pass-key sample of seq_len + 1 - A - j tokens followed by its A answer tokens
    (" 12345.") and j tokens of the noise, unscored, so the A answer targets are scored; the depth
    is uniform in [0, 1] and j uniform in [0, jitter] per row. With every answer at one place in the
    row (jitter=0, the rows of the pass-key studies in docs/RESULTS.md) tiny MAC and Transformer++
    learnt the answer only at that place, and missed it at the place `titans eval niah` puts it
    (docs/long_context.md). jitter=None (the default): the noise tokens of a full row, at most
    AUTO_JITTER (31 at seq_len 256). all_tokens: score every target, as language
    modelling does (a curriculum for copying: the noise repeats; tried in docs/RESULTS.md's pass-key
    study, it taught the noise but not the key).

    lead_in: the longest lead-in. On a NO_LEAD_IN share of the steps P = 0, on the others P is
    uniform in [1, lead_in]; every row of a step has the same P. Each row is one sample of P +
    seq_len + 1 tokens with its answer in the last seq_len targets, so the model learns to
    answer from the state a stream of up to lead_in + seq_len tokens leaves while it trains on
    seq_len tokens alone (TBPTT over a long sample, Buitrago & Gu 2025; the trainer's lead-in).
    docs/long_context.md gives the recipe that carried the key to 16K with it."""
    B, T = check_int("batch_size", batch_size, 1), check_int("seq_len", seq_len, 2)
    lead_in = check_int("lead_in", lead_in, 0)
    if jitter is not None:
        jitter = check_int("jitter", jitter, 0)
    if vocab_size < 256:
        raise ValueError(f"task niah is byte text: it needs vocab_size >= 256, got {vocab_size}")
    g = _gen("niah", seed, step)
    # generator seeds far from the small ones `titans eval niah --seed` takes: held-out needles
    make = NiahGenerator("pk", seed=derive_seed("niah-train", seed) % 2**31)
    stop = make.tokenizer.encode(".")
    A = len(make.tokenizer.encode(" 12345."))  # every answer is " " + 5 digits + "."
    rows = []
    try:  # the shortest row any draw can make: too short fails at every step, not at a rare one
        probe = make.sample(T + 1 - A - (jitter or 0), 0.0, 0)
    except ValueError as e:  # the instruction, needle and question do not fit
        with_jitter = f" with jitter={jitter}" if jitter else ""
        raise ValueError(f"seq_len={T} is too short for task niah{with_jitter} ({e})") from None
    if jitter is None:  # the noise tokens of a full-length row can all give way
        noise = probe.haystack_end - probe.haystack_start - (probe.needle_end - probe.needle_start)
        jitter = min(AUTO_JITTER, noise)
    depths = torch.rand(B, generator=g, dtype=torch.float64).tolist()
    # drawn only with jitter, so that jitter=0 gives the rows it always gave
    tails = torch.randint(0, jitter + 1, (B,), generator=g).tolist() if jitter else [0] * B
    P = 0
    if lead_in and torch.rand((), generator=g).item() >= NO_LEAD_IN:
        P = int(torch.randint(1, lead_in + 1, (), generator=g))
    scored = torch.zeros(B, P + T + 1, dtype=torch.bool)
    for b, (depth, j) in enumerate(zip(depths, tails)):
        s = make.sample(P + T + 1 - A - j, depth, step * B + b)
        rows.append(s.input_ids + s.answer_ids + stop + make.pool.haystack(j, 0)[0])
        scored[b, 1 if all_tokens else P + T + 1 - A - j:P + T + 1 - j] = True
    return _shift(torch.tensor(rows), scored)


def masked_accuracy(logits_or_pred: Tensor, targets: Tensor) -> float:
    """Accuracy on the scored positions (targets != -100): logits [B, T, V] (argmax taken) or
    predicted ids [B, T]."""
    pred = logits_or_pred
    if pred.shape != targets.shape:
        if pred.shape[:-1] != targets.shape:
            raise ValueError(f"logits_or_pred {tuple(pred.shape)} must be targets' shape "
                             f"{tuple(targets.shape)} or that plus a vocabulary axis")
        pred = pred.argmax(-1)
    scored = targets != -100
    if not scored.any():
        raise ValueError("targets has no scored position (all -100)")
    return (pred[scored] == targets[scored]).double().mean().item()


_BATCH_FNS = {"mqar": mqar_batch, "copy": copy_batch, "selective_copy": selective_copy_batch,
              "niah": passkey_batch}


def task_arguments(task: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A recall task's own arguments, typed by its batch function (text is parsed: "16" -> 16);
    an unknown task or argument is a ValueError naming the ones there are."""
    if task not in _BATCH_FNS:
        raise ValueError(f"task must be one of {RECALL_TASKS}, got {task!r}")
    return typed_arguments(_BATCH_FNS[task], kwargs, f"task {task}", skip=("batch_size", "vocab_size", "seed", "step"))


def _maker(task: str, batch_size: int, vocab_size: int, seed: int, kw: dict[str, Any]
           ) -> Callable[[int], tuple[Tensor, Tensor]]:
    fn, kw = _BATCH_FNS.get(task), task_arguments(task, kw)
    return lambda step: fn(batch_size, vocab_size=vocab_size, seed=seed, step=step, **kw)


def recall_batches(task: str, batch_size: int, vocab_size: int, *, seed: int = 0,
                   **kwargs: Any) -> TaskBatches:
    """Endless resumable batches of a recall task for the Trainer. kwargs are the task's own
    arguments: mqar seq_len, n_pairs (n_queries, power_a); copy n_tokens (delay);
    selective_copy n_tokens, region; niah seq_len (all_tokens, jitter, lead_in)."""
    make = _maker(task, batch_size, vocab_size, seed, kwargs)
    make(0)  # bad arguments fail here, not at the first training step
    name = ":".join([task, f"seed={seed}", f"B={batch_size}", f"V={vocab_size}",
                     *(f"{k}={v}" for k, v in sorted(kwargs.items()))])
    return TaskBatches(make, name)


@torch.no_grad()
def evaluate_recall(model: Callable[..., Any], task: str, batch_size: int, vocab_size: int, *,
                    n_batches: int = 1, seed: int = 1, progress: Callable[[int], None] | None = None,
                    **kwargs: Any) -> float:
    """Accuracy of `model` (model(inputs).logits [B, T, V]) on `n_batches` batches of a recall
    task, over all scored positions. Use another seed than training (default 1). `progress` is
    called with 1 after each batch (e.g. a tqdm bar's update)."""
    make = _maker(task, batch_size, vocab_size, seed, kwargs)
    right = total = 0
    for step in range(check_int("n_batches", n_batches, 1)):
        inputs, targets = make(step)
        pred = model(inputs).logits.argmax(-1)
        scored = targets != -100
        right += int((pred[scored] == targets[scored]).sum())
        total += int(scored.sum())
        if progress is not None:
            progress(1)
    return right / total
