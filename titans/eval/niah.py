"""S-NIAH evaluation: accuracy over a depth x length grid, a table and a heatmap.

Each sample's `length` input tokens are prefilled through the streaming path
(`titans.eval.stream.prefill`, `piece` tokens per call, only the state carried), then the
answer is decoded greedily for len(answer tokens) + `extra_tokens` tokens and scored with
`score_answer` (normalised exact match by default; docs/long_context.md).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from ..data.corpus import Document
from ..data.tasks import NiahGenerator, parse_lengths
from ..data.tokenizer import Tokenizer
from .plots import grid_table, heatmap
from .stream import check_sampling, eval_mode, score_samples

__all__ = ["NiahRecord", "evaluate_niah", "niah_accuracy", "format_niah_table", "plot_niah"]


@dataclass(frozen=True)
class NiahRecord:
    """One scored sample: the cell (length, depth), the sample index, the expected answer,
    the decoded continuation, whether it counts, and the needle's token position."""

    task: str
    length: int
    depth: float
    index: int
    answer: str
    generated: str
    correct: bool
    needle_position: int

    def to_dict(self) -> dict:
        return asdict(self)


def _depths(depths: Sequence[float] | int) -> list[float]:
    if isinstance(depths, int) and not isinstance(depths, bool):
        if depths < 1:
            raise ValueError(f"depths must be >= 1 when a count, got {depths}")
        return [i / (depths - 1) if depths > 1 else 0.0 for i in range(depths)]
    out = [float(d) for d in depths]
    if not out or any(not 0 <= d <= 1 for d in out):
        raise ValueError(f"depths must be a non-empty list of numbers in [0, 1], got {depths!r}")
    return out


@torch.no_grad()
def evaluate_niah(model: Any, tokenizer: Tokenizer, task: str, lengths: Sequence[int | str] | str,
                  depths: Sequence[float] | int = 11, n_samples: int = 1, *,
                  documents: Sequence[Document | str] | None = None, seed: int = 0,
                  piece: int = 4096, batch_size: int = 1, extra_tokens: int = 4,
                  scoring: str = "exact",
                  progress: Callable[[NiahRecord], None] | None = None) -> list[NiahRecord]:
    """Score `model` on S-NIAH `task` ("pk", "n", "w" or "uuid") at every length x depth.

    Args:
        lengths: input lengths in tokens (ints or "4K"-style strings, or "1K,4K").
        depths: needle depths in [0, 1], or a count of evenly spaced depths (11: 0, 0.1 .. 1).
        n_samples: samples per cell; sample i carries the same needle in every cell.
        documents: the essay haystack (held-out text) for n / w / uuid.
        piece: tokens per forward call while prefilling (bounds the activations' memory).
        batch_size: samples of one cell decoded together (they have equal lengths).
        extra_tokens: decoded past the answer's token count, so "12345." can be seen whole.
        scoring: "exact" or "contains" (`score_answer`).
        progress: called with each record as it is made.

    Returns one NiahRecord per (length, depth, sample), in that loop order.
    """
    lengths_ = parse_lengths(lengths)
    depths_ = _depths(depths)
    check_sampling(n_samples, batch_size, scoring)
    gen = NiahGenerator(task, tokenizer, documents, seed)
    for i in range(n_samples):  # every needle fits the shortest length, checked before the first sample
        gen.sample(min(lengths_), 0.0, i)
    records: list[NiahRecord] = []
    with eval_mode(model):
        for length in lengths_:
            for depth in depths_:
                for s, text, correct in score_samples(model, tokenizer, lambda i: gen.sample(length, depth, i),
                                                      n_samples, batch_size, extra_tokens, piece, scoring):
                    records.append(NiahRecord(task, length, depth, s.index, s.answer, text, correct, s.needle_start))
                    if progress is not None:
                        progress(records[-1])
    return records


def niah_accuracy(records: Sequence[NiahRecord]) -> dict[tuple[int, float], float]:
    """Accuracy per (length, depth) cell."""
    cells: dict[tuple[int, float], list[bool]] = {}
    for r in records:
        cells.setdefault((r.length, r.depth), []).append(r.correct)
    return {k: sum(v) / len(v) for k, v in cells.items()}


def format_niah_table(records: Sequence[NiahRecord]) -> str:
    """Accuracy (%) with depths as rows and lengths as columns, plus each length's mean."""
    if not records:
        raise ValueError("records is empty")
    cells = {(d, n): a for (n, d), a in niah_accuracy(records).items()}
    return grid_table(cells, row_name="depth", col_name="length",
                      title=f"S-NIAH {records[0].task}: accuracy (%)")


def plot_niah(records: Sequence[NiahRecord], path: str | os.PathLike, title: str | None = None) -> None:
    """Write the depth x length accuracy heatmap (the field's standard picture) to `path` (PNG);
    needs matplotlib."""
    if not records:
        raise ValueError("records is empty")
    cells = {(d, n): a for (n, d), a in niah_accuracy(records).items()}
    heatmap(cells, path, title=title or f"S-NIAH {records[0].task}",
            row_name="needle depth", col_name="context length (tokens)")
