"""Loss by position on long documents: does the carried memory help or hurt past the trained length?

Each document is read in pieces of P tokens (P: the trained length). Every piece is scored twice:
with the state carried from the document's start ("carried", the model as it streams at inference)
and from an empty state ("reset": the model as a short-context model, which never sees more than P
tokens). The per-token losses are averaged in buckets of piece indices, in multiples of P:
0-1x (the first piece: both modes agree), 1-4x, 4-16x, 16-64x, 64-256x. A carried loss above the
reset loss in a bucket means that what the memory carries from that far back makes predictions
worse (the length-generalization failure of Buitrago & Gu 2025); below it, the memory earns its keep.

A third score separates what the memory brings from far back from the mere continuity at a piece's
start: "previous" reads each piece after the piece before it, from an empty state (1-2 pieces of
context, the loss a model that never looks further back than that could reach). The reset loss
pays a cold start at every piece; the previous loss does not. Carried minus previous is what the
state carries from more than one piece back.

Shape legend
    N tokens of one document, P piece length, n = (N - 1) // P full pieces (at most the last bucket's end)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BUCKETS", "PositionLosses", "loss_by_position"]

BUCKETS = ((0, 1), (1, 4), (4, 16), (16, 64), (64, 256))   # piece indices [lo, hi), multiples of P


@dataclass
class PositionLosses:
    """Mean loss per target token (nats) in each bucket, carried, reset and previous, with the
    targets counted. A bucket no document reaches has count 0 and NaN losses; so have the carried
    and previous losses of a reset-only score."""

    piece: int
    buckets: tuple[tuple[int, int], ...]
    carried: list[float] = field(default_factory=list)
    reset: list[float] = field(default_factory=list)
    previous: list[float] = field(default_factory=list)
    count: list[int] = field(default_factory=list)
    documents: int = 0

    def rows(self) -> list[dict[str, Any]]:
        return [{"bucket": f"{lo}-{hi}x", "tokens": n, "carried": c, "reset": r, "previous": p,
                 "carried_minus_reset": c - r, "carried_minus_previous": c - p}
                for (lo, hi), c, r, p, n in zip(self.buckets, self.carried, self.reset, self.previous, self.count)]


@torch.no_grad()
def loss_by_position(model: Any, documents: Sequence[Tensor], piece: int,
                     buckets: Sequence[tuple[int, int]] = BUCKETS, batch_size: int = 16,
                     progress: Callable[[int], None] | None = None, carried: bool = True) -> PositionLosses:
    """Carried, reset and previous losses by position bucket over `documents` (1-d LongTensors [N]).

    model: model(ids [B, P], state=...) -> .logits [B, P, V], .state (a TitansLM).  piece: P.
    batch_size: pieces (or pairs of pieces) scored together from an empty state.  progress: called
    with the number of tokens scored after each step (three passes per document: carried piece by
    piece, then reset and previous in batches).
    carried: False scores only the reset pieces (the carried and previous losses are NaN): for a
    model whose state grows with its input, such as Transformer++'s whole KV cache, reading a long
    document carried costs time quadratic in its length, and two pieces are past its trained length.
    """
    if piece < 1:
        raise ValueError(f"piece must be >= 1, got {piece}")
    buckets = tuple((int(lo), int(hi)) for lo, hi in buckets)
    if not buckets or any(not 0 <= lo < hi for lo, hi in buckets):
        raise ValueError(f"buckets must be non-empty [lo, hi) piece ranges with 0 <= lo < hi, got {buckets}")
    last = max(hi for _, hi in buckets)
    sums = {mode: [0.0] * len(buckets) for mode in ("carried", "reset", "previous")}
    count = [0] * len(buckets)
    where = [next((j for j, (lo, hi) in enumerate(buckets) if lo <= i < hi), None) for i in range(last)]
    model.eval()
    used = 0
    for ids in documents:
        n = min((ids.numel() - 1) // piece, last)
        if n < 1:
            continue
        used += 1
        x = ids[:n * piece].view(n, piece)                     # [n, P]
        y = ids[1:n * piece + 1].view(n, piece)
        state = None
        for i in range(n if carried else 0):
            out = model(x[i:i + 1], state=state)
            state = out.state
            if where[i] is not None:
                sums["carried"][where[i]] += F.cross_entropy(out.logits[0].float(), y[i], reduction="sum").item()
            if progress is not None:
                progress(piece)
        for i0 in range(0, n, batch_size):
            logits = model(x[i0:i0 + batch_size]).logits.float()   # every piece from an empty state
            nll = F.cross_entropy(logits.flatten(0, 1), y[i0:i0 + batch_size].flatten(), reduction="none")
            for i, row in zip(range(i0, i0 + batch_size), nll.view(-1, piece).sum(1).tolist()):
                if where[i] is not None:
                    sums["reset"][where[i]] += row
                    count[where[i]] += piece   # every piece is scored reset, carried or not
                    if i == 0:
                        sums["previous"][where[i]] += row   # the first piece has none before it
            if progress is not None:
                progress(piece * min(batch_size, n - i0))
        for i0 in range(1 if carried else n, n, batch_size):
            i1 = min(i0 + batch_size, n)
            pairs = torch.cat([x[i0 - 1:i1 - 1], x[i0:i1]], 1)     # [b, 2P]: each piece after the one before it
            logits = model(pairs).logits[:, piece:].float()
            nll = F.cross_entropy(logits.flatten(0, 1), y[i0:i1].flatten(), reduction="none")
            for i, row in zip(range(i0, i1), nll.view(-1, piece).sum(1).tolist()):
                if where[i] is not None:
                    sums["previous"][where[i]] += row
            if progress is not None:
                progress(piece * (i1 - i0))
    nan = float("nan")

    def mean(mode: str) -> list[float]:
        return [s / c if c and (carried or mode == "reset") else nan for s, c in zip(sums[mode], count)]
    return PositionLosses(piece, buckets, mean("carried"), mean("reset"), mean("previous"), count, used)
