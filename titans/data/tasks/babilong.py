"""BABILong-style QA: bAbI-like stories (qa1-qa3) scattered through long distractor text.

A small world simulator (people, places, objects) writes a story as a list of fact sentences:

    move   "{person} {moved|went|journeyed|travelled} to the {place}."
    grab   "{person} {picked up|grabbed|got|took} the {object}."      (an object where they are,
                                                                       or one never placed yet)
    drop   "{person} {dropped|discarded|put down|left} the {object}."  (an object they carry)

A carried object moves with its carrier. Questions (answers are single words, always places):

    qa1  "Where is {person}?"                       supporting fact: the person's last move
    qa2  "Where is the {object}?"                   two: the last grab/drop of the object and
                                                    the carrier's move that placed it
    qa3  "Where was the {object} before the {place}?"  where the object was before it last
                                                    arrived in {place}, its current place;
                                                    three: the arrival there, the arrival
                                                    before it, the grab that carried it

The facts keep their order and are inserted at random sentence boundaries of a distractor
haystack (sentences of `documents`, BABILong uses PG-19 books). A sample's input is
instruction + haystack-with-facts + "\\nQuestion: ...\\nAnswer:" and is exactly `length` tokens;
the answer ids are the tokens of " " + answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..corpus import Document
from ..tokenizer import Tokenizer
from .common import TaskBatches, UnitPool, check_int, default_tokenizer, derive_seed

__all__ = ["BABILONG_TASKS", "PEOPLE", "PLACES", "OBJECTS", "Story", "simulate_story",
           "BabilongSample", "BabilongGenerator", "babilong_batch", "babilong_batches"]

BABILONG_TASKS = ("qa1", "qa2", "qa3")
PEOPLE = ("Mary", "John", "Daniel", "Sandra")
PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
MOVE_VERBS = ("moved", "went", "journeyed", "travelled")
GRAB_VERBS = ("picked up", "grabbed", "got", "took")
DROP_VERBS = ("dropped", "discarded", "put down", "left")
DEFAULT_FACTS = {"qa1": 6, "qa2": 10, "qa3": 14}

_INSTRUCTION = ("Read the text below. Facts about people, places and objects are hidden in it. "
                "Answer the question with one word.\n")


@dataclass(frozen=True)
class Story:
    """facts: the fact sentences in order; question, answer; supporting: indices into facts."""

    task: str
    facts: tuple[str, ...]
    question: str
    answer: str
    supporting: tuple[int, ...]


def _simulate(task: str, n_facts: int, rng: random.Random) -> Story | None:
    person_at: dict[str, str | None] = {p: None for p in PEOPLE}
    last_move: dict[str, int] = {}
    carrier: dict[str, str | None] = {o: None for o in OBJECTS}
    obj_at: dict[str, str | None] = {o: None for o in OBJECTS}
    obj_link: dict[str, int] = {}       # the object's last grab or drop
    obj_placed_by: dict[str, int] = {}  # the move (or grab) that put it where it is
    history: dict[str, list[tuple[str, int]]] = {o: [] for o in OBJECTS}  # (place, fact) arrivals
    grabs: dict[str, list[int]] = {o: [] for o in OBJECTS}
    facts: list[str] = []
    for i in range(n_facts):
        r = rng.random()
        located = [p for p in PEOPLE if person_at[p] is not None]
        grabbable = [(p, o) for p in located for o in OBJECTS
                     if carrier[o] is None and obj_at[o] in (None, person_at[p])]
        droppable = [(p, o) for o in OBJECTS if (p := carrier[o]) is not None]  # type: ignore[misc]
        if task != "qa1" and r < 0.3 and grabbable:
            p, o = rng.choice(grabbable)
            carrier[o], obj_link[o] = p, i
            grabs[o].append(i)
            obj_placed_by[o] = last_move[p]  # the reader learns where it is from p's last move
            if obj_at[o] is None:
                obj_at[o] = person_at[p]
                history[o].append((person_at[p], last_move[p]))  # type: ignore[arg-type]
            facts.append(f"{p} {rng.choice(GRAB_VERBS)} the {o}.")
        elif task != "qa1" and r < 0.45 and droppable:
            p, o = rng.choice(droppable)
            carrier[o], obj_link[o] = None, i
            facts.append(f"{p} {rng.choice(DROP_VERBS)} the {o}.")
        else:
            p = rng.choice(PEOPLE)
            place = rng.choice([x for x in PLACES if x != person_at[p]])
            person_at[p], last_move[p] = place, i
            for o in OBJECTS:
                if carrier[o] == p:
                    obj_at[o], obj_placed_by[o] = place, i
                    history[o].append((place, i))
            facts.append(f"{p} {rng.choice(MOVE_VERBS)} to the {place}.")
    if task == "qa1":
        p = rng.choice([p for p in PEOPLE if person_at[p] is not None])
        return Story(task, tuple(facts), f"Where is {p}?", person_at[p], (last_move[p],))  # type: ignore[arg-type]
    if task == "qa2":
        placed = [o for o in OBJECTS if obj_at[o] is not None]
        if not placed:
            return None
        o = rng.choice(placed)
        support = tuple(sorted({obj_link[o], obj_placed_by[o]}))
        return Story(task, tuple(facts), f"Where is the {o}?", obj_at[o], support)  # type: ignore[arg-type]
    # the current place must not appear earlier in the history, or "before the {place}" is ambiguous
    moved = [o for o in OBJECTS if len(history[o]) >= 2
             and history[o][-1][0] not in {x for x, _ in history[o][:-1]}]
    if not moved:
        return None
    o = rng.choice(moved)
    (before, f_before), (now, f_now) = history[o][-2], history[o][-1]
    grab = max(g for g in grabs[o] if g <= f_now)
    return Story(task, tuple(facts), f"Where was the {o} before the {now}?", before,
                 tuple(sorted({f_before, f_now, grab})))


def simulate_story(task: str, n_facts: int | None = None, seed: int = 0) -> Story:
    """A story of `n_facts` facts (default DEFAULT_FACTS[task]) and a question on it, fixed by
    `seed`. Stories whose question would have no answer are redrawn from the same generator."""
    if task not in BABILONG_TASKS:
        raise ValueError(f"task must be one of {BABILONG_TASKS}, got {task!r}")
    n = DEFAULT_FACTS[task] if n_facts is None else check_int("n_facts", n_facts, 1)
    rng = random.Random(seed)
    for _ in range(1000):
        story = _simulate(task, n, rng)
        if story is not None:
            return story
    raise ValueError(f"n_facts={n} is too few for task {task!r}: no answerable story was drawn")


@dataclass(frozen=True)
class BabilongSample:
    """One example. input_ids: the `length` tokens read before answering; answer (a place) and
    answer_ids (tokens of " " + answer); fact_starts: the token index of each fact of
    story.facts in input_ids; haystack_start/_end: the span of the haystack with its facts."""

    task: str
    length: int
    index: int
    story: Story
    input_ids: list[int]
    answer: str
    answer_ids: list[int]
    fact_starts: tuple[int, ...]
    haystack_start: int
    haystack_end: int


class BabilongGenerator:
    """Deterministic BABILong-style samples of one task.

    Args:
        task: "qa1", "qa2" or "qa3".
        tokenizer: sizes everything in its tokens; default the byte tokenizer.
        documents: distractor text (held-out corpus documents or plain strings); may be None
            only for samples with no distractor (`length=None`).
        seed: with the sample index, fixes the story and where the distractor text starts.
        n_facts: facts per story (default DEFAULT_FACTS[task]).
    """

    def __init__(self, task: str, tokenizer: Tokenizer | None = None,
                 documents: Sequence[Document | str] | None = None, seed: int = 0,
                 n_facts: int | None = None) -> None:
        if task not in BABILONG_TASKS:
            raise ValueError(f"task must be one of {BABILONG_TASKS}, got {task!r}")
        self.task, self.seed, self.n_facts = task, check_int("seed", seed, 0), n_facts
        self.tokenizer = default_tokenizer(tokenizer)
        self.pool = None if documents is None else UnitPool.from_documents(documents, self.tokenizer)

    def sample(self, length: int | None, index: int = 0) -> BabilongSample:
        """Sample number `index` with exactly `length` input tokens (None: no distractor)."""
        index = check_int("index", index, 0)
        seed = derive_seed("babilong", self.task, self.seed, index)
        story = simulate_story(self.task, self.n_facts, seed)
        enc = self.tokenizer.encode
        pre, q = enc(_INSTRUCTION), enc(f"\nQuestion: {story.question}\nAnswer:")
        facts = [enc(f + " ") for f in story.facts]
        fixed = len(pre) + len(q) + sum(map(len, facts))
        h = 0 if length is None else check_int("length", length, 1) - fixed
        if h < 0:
            raise ValueError(f"length {length} is too short for this {self.task} story: its "
                             f"instruction, facts and question take {fixed} tokens")
        if h > 0 and self.pool is None:
            raise ValueError("documents are needed for the distractor text (or pass length=None)")
        rng = random.Random(derive_seed("babilong-haystack", self.task, self.seed, index))
        hay, bounds = (self.pool.haystack(h, rng.randrange(len(self.pool))) if h > 0 else ([], [0]))
        at = sorted(rng.choice(bounds) for _ in facts)
        ids, starts, prev = list(pre), [], 0
        for b, f in zip(at, facts):
            ids.extend(hay[prev:b])
            starts.append(len(ids))
            ids.extend(f)
            prev = b
        ids.extend(hay[prev:])
        end = len(ids)
        ids.extend(q)
        return BabilongSample(task=self.task, length=len(ids), index=index, story=story,
                              input_ids=ids, answer=story.answer, answer_ids=enc(" " + story.answer),
                              fact_starts=tuple(starts), haystack_start=len(pre), haystack_end=end)


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tasks, str) or not tasks or any(t not in BABILONG_TASKS for t in tasks):
        raise ValueError(f"tasks must be a non-empty sequence of {BABILONG_TASKS}, got {tasks!r}")
    return tuple(tasks)


def _batch(gens: dict[str, BabilongGenerator], tasks: tuple[str, ...], seq_len: int,
           batch_size: int, step: int, pad_id: int) -> tuple[Tensor, Tensor]:
    tok = next(iter(gens.values())).tokenizer
    # the answer and a full stop: `titans eval babilong` decodes past the answer and its exact match
    # fails "bedroomm", so a model must learn where the word ends (trained on the word alone, tiny
    # models answered " bedroomm" and scored 0 at every length)
    stop = tok.encode(".")
    longest = max(len(tok.encode(" " + p)) for p in PLACES) + len(stop)
    inputs = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((batch_size, seq_len), -100, dtype=torch.long)
    for r in range(batch_size):
        s = gens[tasks[r % len(tasks)]].sample(seq_len + 1 - longest, step * batch_size + r)
        seq = torch.tensor(s.input_ids + s.answer_ids + stop)
        n, a = len(seq) - 1, len(s.answer_ids) + len(stop)
        inputs[r, :n] = seq[:-1]
        targets[r, n - a:n] = seq[-a:]  # target t is token t + 1: the answer's tokens only
    return inputs, targets


def babilong_batch(tokenizer: Tokenizer | None, seq_len: int, batch_size: int, *,
                   documents: Sequence[Document | str] | None, tasks: Sequence[str] = BABILONG_TASKS,
                   seed: int = 0, step: int = 0, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """A fine-tuning batch (inputs, targets), LongTensors [batch_size, seq_len].

    Row r of batch `step` is sample number step * batch_size + r of task tasks[r % len(tasks)],
    sized so that its input + answer is at most seq_len + 1 tokens (the input is
    seq_len + 1 - the longest answer); inputs are those tokens but the last, targets the next
    tokens, -100 everywhere except on the answer's tokens and the full stop after it, so the loss
    is on the answer and where it ends only.
    Rows with a shorter answer are right-padded with pad_id (targets -100).
    """
    tasks = _check_tasks(tasks)
    tok = default_tokenizer(tokenizer)
    gens = {t: BabilongGenerator(t, tok, documents, seed) for t in dict.fromkeys(tasks)}
    return _batch(gens, tasks, check_int("seq_len", seq_len, 2), check_int("batch_size", batch_size, 1),
                  check_int("step", step, 0), pad_id)


def babilong_batches(tokenizer: Tokenizer | None, seq_len: int, batch_size: int, *,
                     documents: Sequence[Document | str] | None,
                     tasks: Sequence[str] = BABILONG_TASKS, seed: int = 0,
                     pad_id: int = 0) -> TaskBatches:
    """Endless resumable `babilong_batch`es for the Trainer (`titans train --task babilong`);
    the documents are split and tokenized once, not per batch."""
    tasks = _check_tasks(tasks)
    tok = default_tokenizer(tokenizer)
    gens = {t: BabilongGenerator(t, tok, documents, seed) for t in dict.fromkeys(tasks)}
    seq_len, batch_size = check_int("seq_len", seq_len, 2), check_int("batch_size", batch_size, 1)
    _batch(gens, tasks[:1], seq_len, 1, 0, pad_id)  # fail now, not at the first training step
    return TaskBatches(lambda step: _batch(gens, tasks, seq_len, batch_size, step, pad_id),
                       f"babilong:{','.join(tasks)}:seed={seed}:B={batch_size}:T={seq_len}")
