"""Shared pieces of the long-context task generators: seeds, lengths, haystacks, answer scoring.

A haystack is built from *units* (sentences), each tokenized on its own with its trailing
space, so the token ids of a haystack are the concatenation of its units' ids and every unit
boundary is an exact token index. Needles and facts are units too and are inserted only at
unit boundaries, which keeps words intact and makes their token positions exact. (With a BPE
tokenizer this concatenation is a valid tokenization of the text, though not always the one
`encode` of the whole text would give; with the byte tokenizer it is the same.)
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable, Iterable, Sequence

from torch import Tensor

from ..corpus import Document
from ..tokens import StepBatches
from ..tokenizer import ByteTokenizer, Tokenizer

__all__ = ["derive_seed", "parse_length", "parse_lengths", "normalize_answer", "score_answer",
           "split_sentences", "UnitPool", "TaskBatches", "check_int"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MAX_UNIT_WORDS = 48  # long "sentences" (verse, lists) are cut so needles can land anywhere


def check_int(name: str, value: object, low: int) -> int:
    """`value` as an int >= low, else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def derive_seed(*parts: object) -> int:
    """A 63-bit seed fixed by `parts` (sha256 of their text): the same on every machine."""
    h = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") >> 1


def parse_length(value: str | int) -> int:
    """A token count from 4096, "4096", "4K" or "1M". K = 1024 and M = 1024**2 (RULER's sizes:
    "128K" is 131072); a plain integer is taken as is."""
    if isinstance(value, int) and not isinstance(value, bool):
        return check_int("length", value, 1)
    if not isinstance(value, str):
        raise ValueError(f"length must be an int or a string like '4K', got {value!r}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", value)
    if m is None:
        raise ValueError(f"length {value!r} is not a number with an optional K or M suffix")
    scale = {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()]
    n = float(m.group(1)) * scale
    if n != int(n) or n < 1:
        raise ValueError(f"length {value!r} is not a whole number of tokens >= 1")
    return int(n)


def parse_lengths(values: str | int | Iterable[str | int]) -> list[int]:
    """Lengths from "1K,4K,1M" or a list of lengths (see `parse_length`)."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    elif isinstance(values, int):
        values = [values]
    out = [parse_length(v) for v in values]
    if not out:
        raise ValueError("lengths must not be empty")
    return out


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def normalize_answer(text: str) -> str:
    """RULER's normalisation: control characters become spaces, whitespace runs collapse to one
    space, the ends are stripped and the text is lower-cased."""
    return " ".join(_CONTROL.sub(" ", text).split()).lower()


def score_answer(generated: str, answer: str, mode: str = "exact") -> bool:
    """Whether `generated` gives `answer`, both normalised (`normalize_answer`).

    mode "exact": the generation starts with the answer and the answer ends there (end of text
        or a character that is not a letter or digit, so "12345." and "12345 is it" count for
        12345 but "123456" and "12" do not). Decoding runs a few tokens past the answer, so
        what follows it is ignored.
    mode "contains": the answer appears anywhere in the generation (RULER's string_match_all).
    """
    if mode not in ("exact", "contains"):
        raise ValueError(f"mode must be 'exact' or 'contains', got {mode!r}")
    g, a = normalize_answer(generated), normalize_answer(answer)
    if not a:
        raise ValueError("answer must not be empty")
    if mode == "contains":
        return a in g
    return g.startswith(a) and (len(g) == len(a) or not g[len(a)].isalnum())


def split_sentences(text: str, max_words: int = _MAX_UNIT_WORDS) -> list[str]:
    """The sentences of `text` with whitespace collapsed; sentences longer than `max_words`
    words are cut into pieces of at most that many words."""
    out = []
    for s in _SENTENCE_END.split(" ".join(text.split())):
        words = s.split()
        for i in range(0, len(words), max_words):
            out.append(" ".join(words[i:i + max_words]))
    return [s for s in out if s]


class UnitPool:
    """Sentences to build haystacks from, each tokenized once (lazily) with a trailing space.

    Args:
        sentences: the units in order; a haystack is a run of consecutive units from a start
            index, wrapping around to the first unit when the pool runs out.
        tokenizer: counts the tokens.
    """

    def __init__(self, sentences: Sequence[str], tokenizer: Tokenizer) -> None:
        if not sentences:
            raise ValueError("documents hold no text to build a haystack from")
        self.sentences = list(sentences)
        self.tokenizer = tokenizer
        self._ids: dict[int, list[int]] = {}

    @classmethod
    def from_documents(cls, documents: Sequence[Document | str], tokenizer: Tokenizer) -> "UnitPool":
        """Every sentence of every document (a Document or plain text), in order."""
        if isinstance(documents, (str, Document)) or not isinstance(documents, Sequence) or not documents:
            raise ValueError("documents must be a non-empty sequence of Document or str")
        sentences: list[str] = []
        for d in documents:
            sentences.extend(split_sentences(d.text if isinstance(d, Document) else str(d)))
        return cls(sentences, tokenizer)

    def __len__(self) -> int:
        return len(self.sentences)

    def ids(self, i: int) -> list[int]:
        i %= len(self.sentences)
        if i not in self._ids:
            self._ids[i] = self.tokenizer.encode(self.sentences[i] + " ")
        return self._ids[i]

    def haystack(self, n_tokens: int, start: int = 0) -> tuple[list[int], list[int]]:
        """(ids, boundaries): exactly `n_tokens` ids of consecutive units from unit `start`
        (wrapping around), and the token index where each unit starts, with 0 first and
        `n_tokens` last. When the units overshoot, the FIRST unit is cut from its front, so the
        haystack reads like an excerpt: it may open mid-sentence but ends at a sentence end."""
        ids: list[int] = []
        bounds = [0]
        i = start
        while len(ids) < n_tokens:
            piece = self.ids(i)
            if not piece and i - start >= len(self.sentences):
                raise ValueError("documents tokenize to no tokens")
            ids.extend(piece)
            bounds.append(len(ids))
            i += 1
        cut = len(ids) - n_tokens
        return ids[cut:], sorted({0, *(b - cut for b in bounds if b > cut)})


def default_tokenizer(tokenizer: Tokenizer | None) -> Tokenizer:
    return ByteTokenizer() if tokenizer is None else tokenizer


class TaskBatches(StepBatches):
    """An endless, resumable iterator of training batches for the Trainer.

    Batch number s is `make(s)`, a function of s alone (each generator seeds itself from its
    seed and s), so resuming needs only the step: `state_dict()` / `load_state_dict()`.

    Args:
        make: step -> (inputs, targets), LongTensors [B, T] (targets already shifted, -100
            where not scored).
        name: what the batches are, checked on resume (e.g. "mqar:seed=0:B=8:T=256").
    """

    def __init__(self, make: Callable[[int], tuple[Tensor, Tensor]], name: str) -> None:
        self.make, self.name, self.step = make, name, 0

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Batch number `step` (does not move the position)."""
        return self.make(check_int("step", step, 0))

    def state_dict(self) -> dict:
        return {"step": self.step, "name": self.name}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state_dict name is {state.get('name')!r} but these batches are "
                             f"{self.name!r}: the batches would differ")
        self.step = check_int("state_dict step", state.get("step"), 0)
