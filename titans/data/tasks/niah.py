"""Single needle in a haystack (S-NIAH), RULER style, generated on the fly (nothing downloaded).

The three single-needle tasks of the Titans paper's Table 2, plus the uuid form of W:

    task   haystack                                 needle value
    pk     the passkey noise, repeated              5-digit number  "The pass key is 12345. Remember it."
    n      essay sentences from `documents`         7-digit number  "One of the special magic numbers for {key} is: {value}."
    w      essay sentences from `documents`         a word          "One of the special magic words for {key} is: {value}."
    uuid   essay sentences from `documents`         a uuid4         "One of the special magic uuids for {key} is: {value}."

A sample's input is  instruction + haystack-with-needle + question  and is exactly `length`
tokens long; the answer follows it (its ids are the tokens of " " + value). Depth d puts the
needle at the haystack unit (sentence) boundary nearest to d * H tokens into the H-token
haystack (ties go to the earlier boundary), so d = 0 is right after the instruction and
d = 1 right before the question; `NiahSample.actual_depth` is the depth reached.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Sequence

from ..corpus import Document
from ..tokenizer import Tokenizer
from .common import UnitPool, check_int, default_tokenizer, derive_seed
from .words import ADJECTIVES, NOUNS

__all__ = ["NIAH_TASKS", "NiahSample", "NiahGenerator", "make_niah_sample", "PASSKEY_NOISE"]

NIAH_TASKS = ("pk", "n", "w", "uuid")

PASSKEY_NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                 "There and back again.")

_PK_INSTRUCTION = ("There is an important piece of information hidden inside a lot of "
                   "irrelevant text. Find it and memorize it. I will quiz you about it afterwards.\n")
_PK_NEEDLE = "The pass key is {value}. Remember it."
_PK_QUESTION = "\nWhat is the pass key? The pass key is"

_KIND = {"n": "numbers", "w": "words", "uuid": "uuids"}
_ESSAY_INSTRUCTION = ("Some special magic {kind} are hidden within the following text. Make sure "
                      "to memorize it. I will quiz you about the {kind} afterwards.\n")
_ESSAY_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
_ESSAY_QUESTION = ("\nWhat is the special magic {one} for {key} mentioned in the provided text? "
                   "The special magic {one} for {key} mentioned in the provided text is")


@dataclass(frozen=True)
class NiahSample:
    """One S-NIAH example.

    input_ids: the `length` tokens the model reads before answering.
    answer: the value to produce; answer_ids: the tokens of " " + answer (the continuation).
    needle_start, needle_end: the needle's token span in input_ids (end exclusive).
    haystack_start, haystack_end: the haystack's span in input_ids, needle included.
    depth: the depth asked for; key: the essay needle's key (None for pk).
    """

    task: str
    length: int
    depth: float
    index: int
    input_ids: list[int]
    answer: str
    answer_ids: list[int]
    needle: str
    question: str
    key: str | None
    needle_start: int
    needle_end: int
    haystack_start: int
    haystack_end: int

    @property
    def actual_depth(self) -> float:
        """The needle's start as a fraction of the haystack without the needle, in [0, 1]."""
        h = self.haystack_end - self.haystack_start - (self.needle_end - self.needle_start)
        return (self.needle_start - self.haystack_start) / h if h > 0 else 0.0


class NiahGenerator:
    """Deterministic S-NIAH samples of one task.

    Args:
        task: one of NIAH_TASKS ("pk", "n", "w", "uuid").
        tokenizer: sizes everything in its tokens; default the byte tokenizer.
        documents: the essay haystack for n / w / uuid (use held-out text, e.g. the validation
            side of `split_documents`); ignored for pk.
        seed: with the sample index, fixes the needle (key and value) and where in the essay
            text the haystack starts. Depth and length do not change them, so a sample index
            holds the same needle in every cell of a depth x length grid.
    """

    def __init__(self, task: str, tokenizer: Tokenizer | None = None,
                 documents: Sequence[Document | str] | None = None, seed: int = 0) -> None:
        if task not in NIAH_TASKS:
            raise ValueError(f"task must be one of {NIAH_TASKS}, got {task!r}")
        self.task, self.seed = task, check_int("seed", seed, 0)
        self.tokenizer = default_tokenizer(tokenizer)
        if task == "pk":
            self.pool = UnitPool(PASSKEY_NOISE, self.tokenizer)
        else:
            if documents is None:
                raise ValueError(f"documents are needed for the essay haystack of task {task!r}")
            self.pool = UnitPool.from_documents(documents, self.tokenizer)

    def _needle(self, rng: random.Random) -> tuple[str | None, str]:
        if self.task == "pk":
            return None, str(rng.randint(10000, 99999))
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if self.task == "n":
            return key, str(rng.randint(1_000_000, 9_999_999))
        if self.task == "w":
            return key, rng.choice(NOUNS)
        return key, str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def sample(self, length: int, depth: float, index: int = 0) -> NiahSample:
        """The sample number `index` at `length` tokens with the needle at `depth` in [0, 1]."""
        length = check_int("length", length, 1)
        if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1:
            raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
        index = check_int("index", index, 0)
        rng = random.Random(derive_seed("niah", self.task, self.seed, index))
        key, value = self._needle(rng)
        if self.task == "pk":
            instruction, needle, question = _PK_INSTRUCTION, _PK_NEEDLE.format(value=value), _PK_QUESTION
            start = 0  # the noise always starts with "The grass is green."
        else:
            kind = _KIND[self.task]
            instruction = _ESSAY_INSTRUCTION.format(kind=kind)
            needle = _ESSAY_NEEDLE.format(kind=kind, key=key, value=value)
            question = _ESSAY_QUESTION.format(one=kind[:-1], key=key)
            start = rng.randrange(len(self.pool))
        enc = self.tokenizer.encode
        pre, ndl, q = enc(instruction), enc(needle + " "), enc(question)
        h = length - len(pre) - len(ndl) - len(q)
        if h < 0:
            raise ValueError(f"length {length} is too short for task {self.task!r}: the "
                             f"instruction, needle and question alone take {length - h} tokens")
        hay, bounds = self.pool.haystack(h, start)
        target = depth * h
        at = min(bounds, key=lambda b: (abs(b - target), b))
        ids = pre + hay[:at] + ndl + hay[at:] + q
        ns = len(pre) + at
        return NiahSample(task=self.task, length=length, depth=float(depth), index=index,
                          input_ids=ids, answer=value, answer_ids=enc(" " + value), needle=needle,
                          question=question, key=key, needle_start=ns, needle_end=ns + len(ndl),
                          haystack_start=len(pre), haystack_end=len(pre) + h + len(ndl))


def make_niah_sample(task: str, length: int, depth: float, *, tokenizer: Tokenizer | None = None,
                     documents: Sequence[Document | str] | None = None, seed: int = 0,
                     index: int = 0) -> NiahSample:
    """One sample; see NiahGenerator (build one generator to make many samples cheaply)."""
    return NiahGenerator(task, tokenizer, documents, seed).sample(length, depth, index)
