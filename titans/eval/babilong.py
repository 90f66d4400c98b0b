"""BABILong-style evaluation: accuracy by task and length, a table and a plot.

Each sample's input goes through the streaming path (`titans.eval.stream.prefill`, `piece`
tokens per call), then the answer is decoded greedily for len(answer tokens) + `extra_tokens`
tokens and scored with `score_answer` (normalised: the one-word answer must come first).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from ..data.corpus import Document
from ..data.tasks import BABILONG_TASKS, BabilongGenerator, parse_lengths
from ..data.tokenizer import Tokenizer
from .plots import accuracy_curves, grid_table
from .stream import check_sampling, eval_mode, score_samples

__all__ = ["BabilongRecord", "evaluate_babilong", "babilong_accuracy", "format_babilong_table",
           "plot_babilong"]


@dataclass(frozen=True)
class BabilongRecord:
    """One scored sample: task, input length, sample index, question, answer, decoded text."""

    task: str
    length: int
    index: int
    question: str
    answer: str
    generated: str
    correct: bool

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_babilong(model: Any, tokenizer: Tokenizer, tasks: Sequence[str] = BABILONG_TASKS,
                      lengths: Sequence[int | str] | str = (1024, 4096), n_samples: int = 10, *,
                      documents: Sequence[Document | str] | None = None, seed: int = 0,
                      piece: int = 4096, batch_size: int = 1, extra_tokens: int = 2,
                      scoring: str = "exact", n_facts: int | None = None,
                      progress: Callable[[BabilongRecord], None] | None = None
                      ) -> list[BabilongRecord]:
    """Score `model` on each task at each length with `n_samples` samples.

    Use another seed than fine-tuning used (`babilong_batches`), and held-out `documents`.
    Returns one BabilongRecord per (task, length, sample), in that loop order.
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not tasks or any(t not in BABILONG_TASKS for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of {BABILONG_TASKS}, got {tasks!r}")
    lengths_ = parse_lengths(lengths)
    check_sampling(n_samples, batch_size, scoring)
    gens = {task: BabilongGenerator(task, tokenizer, documents, seed, n_facts) for task in tasks}
    # every story must fit the shortest length: checked before the first sample, so a length too
    # short for one task does not end the evaluation after the others have run
    need = {task: max(gen.sample(None, i).length for i in range(n_samples)) for task, gen in gens.items()}
    short = {task: n for task, n in need.items() if n > min(lengths_)}
    if short:
        raise ValueError(f"length {min(lengths_)} is too short for " + ", ".join(
            f"{task} (its stories need up to {n} tokens)" for task, n in short.items()))
    records: list[BabilongRecord] = []
    with eval_mode(model):
        for task, gen in gens.items():
            for length in lengths_:
                for s, text, correct in score_samples(model, tokenizer, lambda i: gen.sample(length, i), n_samples,
                                                      batch_size, extra_tokens, piece, scoring):
                    records.append(BabilongRecord(task, length, s.index, s.story.question, s.answer, text, correct))
                    if progress is not None:
                        progress(records[-1])
    return records


def babilong_accuracy(records: Sequence[BabilongRecord]) -> dict[tuple[str, int], float]:
    """Accuracy per (task, length)."""
    cells: dict[tuple[str, int], list[bool]] = {}
    for r in records:
        cells.setdefault((r.task, r.length), []).append(r.correct)
    return {k: sum(v) / len(v) for k, v in cells.items()}


def format_babilong_table(records: Sequence[BabilongRecord]) -> str:
    """Accuracy (%) with tasks as rows and lengths as columns, plus each length's mean."""
    if not records:
        raise ValueError("records is empty")
    return grid_table(babilong_accuracy(records), row_name="task", col_name="length",
                      title="BABILong: accuracy (%)")


def plot_babilong(records: Sequence[BabilongRecord], path: str | os.PathLike,
                  title: str = "BABILong") -> None:
    """Accuracy vs length, one line per task, as a PNG at `path` (needs matplotlib)."""
    if not records:
        raise ValueError("records is empty")
    accuracy_curves(babilong_accuracy(records), path, title=title, col_name="context length (tokens)")
