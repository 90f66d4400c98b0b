"""Streaming evaluation: long inputs fed piece by piece through the model's state.

Shape legend
    B batch, T tokens, P piece length (tokens per forward call), V vocabulary

`prefill` is the path every long-context evaluation uses: the input goes through
`model(piece, state=state)` P tokens at a time, so only the state is carried (constant size for
every block kind but full attention, whose key/value cache grows by design). `stream_eval`
measures that path on up to millions of tokens: throughput, resident memory at checkpoints and
whether the state stays finite.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["prefill", "token_logprobs", "greedy_answer", "eval_mode", "answer_and_score", "check_sampling", "score_samples", "state_tensors", "nonfinite_state", "state_bytes",
           "current_rss", "peak_rss", "memory_norms", "stream_eval", "format_stream_result"]

DEFAULT_CHECKPOINTS = (65536, 262144, 1_000_000)


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


@torch.no_grad()
def prefill(model: Any, input_ids: Tensor, piece: int = 4096, state: Any = None) -> tuple[Any, Tensor]:
    """Run input_ids [B, T] through `model` P = `piece` tokens at a time, carrying the state.

    Returns (state after the T tokens, logits of the last position [B, V]). Equals one call on
    the whole input (the model's streaming contract) with memory bounded by the piece.
    """
    piece = _check_int("piece", piece, 1)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be a non-empty integer tensor [B, T]")
    last = None
    for s in range(0, input_ids.shape[1], piece):
        out = model(input_ids[:, s:s + piece], state=state)
        state, last = out.state, out.logits[:, -1]
    return state, last


@torch.no_grad()
def token_logprobs(model: Any, ids: Tensor, piece: int = 4096, state: Any = None,
                   last_logits: Tensor | None = None,
                   progress: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor, Any]:
    """Score every token of ids [T] given all before it, P = `piece` tokens per call, carrying
    the state (no truncation, however long the input).

    Without a state, ids[0] is the context start and is not scored: returns log p(ids[t] |
    ids[<t]) for t >= 1 and the greedy token at those positions, both [T - 1], and the state
    after ids. With a state and the logits its last token left (`last_logits` [V], as returned
    here or by `prefill`), every token of ids is scored: [T] each. The perplexity of
    `titans eval ppl --text` and the harness's log-likelihoods are this function. `progress` is
    called with the number of tokens of each piece done (e.g. a tqdm bar's update).
    """
    piece = _check_int("piece", piece, 1)
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.numel() == 0:
        raise ValueError("ids must be a non-empty integer tensor [T]")
    if (state is None) != (last_logits is None):
        raise ValueError("give state and last_logits together (or neither)")
    logits = [] if last_logits is None else [last_logits.float().reshape(1, -1)]
    for s in range(0, ids.numel(), piece):
        out = model(ids[None, s:s + piece], state=state)
        state = out.state
        logits.append(out.logits[0].float())
        if progress is not None:
            progress(out.logits.shape[1])
    logits = torch.cat(logits)[:-1]                              # [T - 1 or T, V]: predicts the next token
    targets = ids[1:] if last_logits is None else ids
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None].long())[:, 0]
    return logp, logits.argmax(-1), state


@torch.no_grad()
def greedy_answer(model: Any, input_ids: Tensor, max_new_tokens: int, piece: int = 4096) -> Tensor:
    """Greedy continuation [B, max_new_tokens] of input_ids [B, T]: the first T - 1 tokens go
    through `prefill`, then `model.generate(last token, max_new_tokens, temperature=0,
    state=...)` decodes."""
    _check_int("max_new_tokens", max_new_tokens, 1)
    state = None
    if input_ids.shape[1] > 1:
        state, _ = prefill(model, input_ids[:, :-1], piece)
    out = model.generate(input_ids[:, -1:], max_new_tokens, temperature=0.0, state=state)
    return out[:, 1:]


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """The model in eval mode for the block, then back to the mode it had."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was_training and hasattr(model, "train"):
            model.train()


def answer_and_score(model: Any, tokenizer: Any, samples: Sequence[Any], extra_tokens: int, piece: int,
                     scoring: str) -> list[tuple[str, bool]]:
    """Greedy answers to equal-length samples (each with .input_ids, .answer, .answer_ids),
    decoded, and whether each matches its answer (`score_answer` with `scoring`)."""
    from ..data.tasks import score_answer
    ids = torch.tensor([s.input_ids for s in samples], dtype=torch.long)
    n_new = max(len(s.answer_ids) for s in samples) + extra_tokens
    texts = [tokenizer.decode(row) for row in greedy_answer(model, ids, n_new, piece).tolist()]
    return [(text, score_answer(text, s.answer, scoring)) for s, text in zip(samples, texts)]


def check_sampling(n_samples: int, batch_size: int, scoring: str) -> None:
    """The checks an evaluation makes before any work: counts >= 1 and a known scoring mode."""
    from ..data.tasks import score_answer
    _check_int("n_samples", n_samples, 1)
    _check_int("batch_size", batch_size, 1)
    score_answer("x", "x", scoring)


def score_samples(model: Any, tokenizer: Any, make_sample: Callable[[int], Any], n_samples: int, batch_size: int,
                  extra_tokens: int, piece: int, scoring: str) -> Iterator[tuple[Any, str, bool]]:
    """(sample, answer text, correct) for make_sample(0 .. n_samples - 1), answered `batch_size`
    at a time with `answer_and_score` (check the arguments first: `check_sampling`)."""
    for b in range(0, n_samples, batch_size):
        samples = [make_sample(i) for i in range(b, min(b + batch_size, n_samples))]
        for s, (text, correct) in zip(samples, answer_and_score(model, tokenizer, samples, extra_tokens, piece,
                                                                scoring)):
            yield s, text, correct


def state_tensors(state: Any, prefix: str = "state") -> Iterator[tuple[str, Tensor]]:
    """(path, tensor) for every tensor inside a state (dataclasses, dicts, lists, tuples)."""
    if isinstance(state, Tensor):
        yield prefix, state
    elif is_dataclass(state) and not isinstance(state, type):
        for f in fields(state):
            yield from state_tensors(getattr(state, f.name), f"{prefix}.{f.name}")
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from state_tensors(v, f"{prefix}.{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from state_tensors(v, f"{prefix}[{i}]")


def nonfinite_state(state: Any) -> list[str]:
    """The paths of the state's tensors that hold a NaN or an infinity (empty: all finite)."""
    return [p for p, t in state_tensors(state)
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def state_bytes(state: Any) -> int:
    """Bytes held by the state's tensors."""
    return sum(t.numel() * t.element_size() for _, t in state_tensors(state))


def memory_norms(state: Any) -> list[float]:
    """The Frobenius norm of every memory weight matrix in a model state (a `ModelState`'s
    `memories()`; empty for a state without memories). A memory that has decayed to nothing
    shows as norms near 0."""
    memories = state.memories() if hasattr(state, "memories") else {}
    return [w.float().norm().item() for s in memories.values() for w in s.memory.weights]


def current_rss() -> int | None:
    """Resident memory of this process now, in bytes (/proc/self/statm; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss() -> int:
    """The process's peak resident memory so far, in bytes: getrusage ru_maxrss (KiB on Linux,
    bytes on macOS), or the current RSS when higher (Linux updates its high-water mark lazily)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = r if sys.platform == "darwin" else r * 1024
    return max(r, current_rss() or 0)


def _source_pieces(source: Any, vocab_size: int, batch_size: int, seed: int
                   ) -> Iterator[Tensor]:
    """An endless stream of token blocks [B, n] (n chosen by the caller via send())."""
    if source is None or (isinstance(source, str) and source == "random"):
        g = torch.Generator().manual_seed(seed)
        n = yield  # type: ignore[misc]
        while True:
            n = yield torch.randint(0, vocab_size, (batch_size, n), generator=g)
    tokens = _as_array(source)
    if len(tokens) == 0:
        raise ValueError("source holds no tokens")
    if int(tokens.max()) >= vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"source tokens must lie in [0, vocab_size={vocab_size})")
    pos = 0
    n = yield  # type: ignore[misc]
    while True:  # the same stretch in every row, repeated when it runs out
        idx = (pos + np.arange(n)) % len(tokens)
        pos = (pos + n) % len(tokens)
        row = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
        n = yield row[None].expand(batch_size, n).contiguous()


def _as_array(source: Any) -> np.ndarray:
    if isinstance(source, (str, os.PathLike)):
        from ..data.tokens import TokenFile
        try:
            return TokenFile(source, "val").tokens  # a prepared directory or .bin file
        except Exception as e:
            raise ValueError(f"source {str(source)!r} is not a token file: {e}") from None
    if isinstance(source, Tensor):
        return source.reshape(-1).cpu().numpy()
    if hasattr(source, "tokens"):  # a TokenFile
        return np.asarray(source.tokens)
    return np.asarray(source).reshape(-1)


@torch.no_grad()
def stream_eval(model: Any, n_tokens: int, piece: int = 4096,
                checkpoints: Sequence[int] = DEFAULT_CHECKPOINTS, source: Any = None, *,
                batch_size: int = 1, seed: int = 0, vocab_size: int | None = None,
                progress: Callable[[int], None] | None = None) -> dict:
    """Feed `n_tokens` tokens through `model` `piece` at a time with only the state carried.

    Args:
        source: None / "random" (seeded uniform tokens), a token array or tensor (repeated when
            it runs out, e.g. held-out corpus tokens), or a path a `TokenFile` opens.
        checkpoints: token counts where measurements are taken (those > n_tokens are dropped;
            n_tokens itself is always one). Pieces are cut to stop exactly there.
        vocab_size: default model.config.vocab_size.
        progress: called with the number of tokens of each piece done (e.g. a tqdm bar's update).

    Returns a dict: n_tokens, piece, batch_size, tokens_per_s (overall), seconds, finite (no
    NaN/Inf in the state at any checkpoint nor in any logits), first_nonfinite_logits (token
    count or None), and `checkpoints`: one dict per checkpoint with tokens, seconds,
    tokens_per_s (since the previous checkpoint), rss and peak_rss (bytes), state_bytes,
    nonfinite (paths of state tensors holding NaN/Inf) and memory_norm (the smallest norm of any
    memory weight matrix, `memory_norms`; None without memories), plus state_constant (state_bytes equal at
    every checkpoint: no growing cache) and rss_growth (bytes, last minus first checkpoint).
    """
    n_tokens, piece = _check_int("n_tokens", n_tokens, 1), _check_int("piece", piece, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    if vocab_size is None:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab_size is None:
            raise ValueError("vocab_size is needed when the model has no config.vocab_size")
    marks = sorted({_check_int("checkpoints", c, 1) for c in checkpoints if c <= n_tokens} | {n_tokens})
    stream = _source_pieces(source, vocab_size, batch_size, seed)
    next(stream)
    state, pos, rows, bad_logits = None, 0, [], None
    t0 = t_prev = time.perf_counter()
    prev_pos = 0
    for mark in marks:
        while pos < mark:
            n = min(piece, mark - pos)
            out = model(stream.send(n), state=state)
            state = out.state
            pos += n
            if progress is not None:
                progress(n)
            if bad_logits is None and not bool(torch.isfinite(out.logits).all()):
                bad_logits = pos
        now = time.perf_counter()
        rows.append(dict(tokens=pos, seconds=now - t0,
                         tokens_per_s=(pos - prev_pos) * batch_size / max(now - t_prev, 1e-9),
                         rss=current_rss(), peak_rss=peak_rss(), state_bytes=state_bytes(state),
                         nonfinite=nonfinite_state(state), memory_norm=min(memory_norms(state), default=None)))
        t_prev, prev_pos = time.perf_counter(), pos  # the checks above are not timed
        t0 += t_prev - now
    seconds = rows[-1]["seconds"]
    rss = [r["rss"] for r in rows]
    return dict(n_tokens=n_tokens, piece=piece, batch_size=batch_size,
                tokens_per_s=n_tokens * batch_size / max(seconds, 1e-9), seconds=seconds,
                finite=bad_logits is None and not any(r["nonfinite"] for r in rows),
                first_nonfinite_logits=bad_logits, checkpoints=rows,
                state_constant=len({r["state_bytes"] for r in rows}) == 1,
                rss_growth=None if None in rss else rss[-1] - rss[0])


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f}"


def format_stream_result(result: dict) -> str:
    """A plain-text table of a `stream_eval` result."""
    lines = [f"{'tokens':>12} {'seconds':>9} {'tok/s':>10} {'RSS MiB':>9} {'peak MiB':>9} "
             f"{'state MiB':>9} {'min |W|':>9}  finite"]
    for r in result["checkpoints"]:
        fin = "yes" if not r["nonfinite"] else "NO: " + ", ".join(r["nonfinite"][:4])
        lines.append(f"{r['tokens']:>12,} {r['seconds']:>9.1f} {r['tokens_per_s']:>10,.0f} "
                     f"{_mib(r['rss']):>9} {_mib(r['peak_rss']):>9} {_mib(r['state_bytes']):>9} "
                     f"{'n/a' if r['memory_norm'] is None else format(r['memory_norm'], '.3g'):>9}  {fin}")
    growth = result["rss_growth"]
    lines.append(f"overall {result['tokens_per_s']:,.0f} tokens/s (batch {result['batch_size']}, "
                 f"piece {result['piece']}); state size "
                 f"{'constant' if result['state_constant'] else 'GROWS'}; RSS growth "
                 f"{_mib(growth)} MiB; "
                 + ("state and logits finite" if result["finite"] else
                    f"NON-FINITE values (logits first at {result['first_nonfinite_logits']})"))
    return "\n".join(lines)
