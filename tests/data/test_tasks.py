"""Long-context task generators: S-NIAH, BABILong-style QA, MQAR, copy; lengths and scoring."""

from __future__ import annotations

import re

import pytest
import torch

from titans.data import ByteTokenizer
from titans.data.tasks import (BABILONG_TASKS, NIAH_TASKS, BabilongGenerator, NiahGenerator,
                               babilong_batch, babilong_batches, copy_batch, evaluate_recall,
                               make_niah_sample, masked_accuracy, mqar_batch, normalize_answer, passkey_batch,
                               parse_length, parse_lengths, recall_batches, score_answer,
                               selective_copy_batch, simulate_story)
from titans.data.tasks.babilong import DROP_VERBS, GRAB_VERBS, MOVE_VERBS
from titans.data.tasks.recall import AUTO_JITTER, NO_LEAD_IN

TOK = ByteTokenizer()
# synthetic essay text: no digits, so a number needle can only be found where it was put
DOCS = ["The river runs past the old mill. Children play near the water! Who built the bridge? "
        "Nobody remembers the name of the builder. " * 6,
        "Winter came early that year. The fields were white for weeks. People stayed inside and "
        "told long stories by the fire, stories without any end at all. " * 5]


# -- lengths and scoring --------------------------------------------------------------------

def test_parse_lengths():
    assert parse_length("4K") == 4096 and parse_length("1M") == 1048576 and parse_length(1500) == 1500
    assert parse_length("0.5K") == 512
    assert parse_lengths("1K, 2K,3000") == [1024, 2048, 3000]
    for bad in ("4G", "-1", "0.3K", ""):
        with pytest.raises(ValueError, match="length"):
            parse_length(bad)


@pytest.mark.parametrize("generated,answer,ok", [
    ("12345", "12345", True), (" 12345. Remember it", "12345", True), ("\n12345\n", "12345", True),
    ("  Kitchen\tand", "kitchen", True), ("123456", "12345", False), ("1234", "12345", False),
    ("The 12345", "12345", False), ("", "12345", False),
    ("a1b2-c3 done", "A1B2-C3", True), ("kitchens", "kitchen", False),
])
def test_score_answer_exact(generated, answer, ok):
    assert score_answer(generated, answer) is ok


def test_score_answer_contains_and_errors():
    assert score_answer("The 12345", "12345", "contains") and not score_answer("1234", "12345", "contains")
    assert normalize_answer(" A\x00b \n C ") == "a b c"
    with pytest.raises(ValueError, match="mode"):
        score_answer("x", "x", "fuzzy")
    with pytest.raises(ValueError, match="answer"):
        score_answer("x", "  ")


# -- S-NIAH -----------------------------------------------------------------------------------

def _boundaries(text: str) -> list[int]:
    """Where a sentence starts in a haystack text (computed from the text, not the generator)."""
    return [0] + [i for i in range(2, len(text)) if text[i - 1] == " " and text[i - 2] in ".!?"] + [len(text)]


@pytest.mark.parametrize("task", NIAH_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_niah_needle_at_stated_depth(task, depth):
    s = NiahGenerator(task, TOK, DOCS, seed=1).sample(700, depth, index=2)
    ids = s.input_ids
    assert len(ids) == 700 == s.length
    assert TOK.decode(ids[s.needle_start:s.needle_end]) == s.needle + " "
    assert s.answer in s.needle and TOK.decode(s.answer_ids) == " " + s.answer
    text = TOK.decode(ids)
    assert text.count(s.needle) == 1
    assert text.endswith(s.question)
    hay = TOK.decode(ids[s.haystack_start:s.needle_start] + ids[s.needle_end:s.haystack_end])
    h = len(hay)
    assert s.haystack_end - s.haystack_start - (s.needle_end - s.needle_start) == h
    best = min(_boundaries(hay), key=lambda b: (abs(b - depth * h), b))
    assert s.needle_start - s.haystack_start == best
    assert abs(s.actual_depth - depth) < 0.1
    if depth == 0.0:
        assert s.needle_start == s.haystack_start
    if depth == 1.0:
        assert s.needle_end == s.haystack_end


def test_niah_depth_ties_go_to_the_earlier_boundary():
    gen = NiahGenerator("n", TOK, ["Aa. " * 300], seed=0)  # every sentence is 4 tokens
    first = gen.sample(600, 0.5)
    fixed = first.length - (first.haystack_end - first.haystack_start - (first.needle_end - first.needle_start))
    s = gen.sample(fixed + 512, 6 / 512)  # H = 512: boundaries 0, 4, 8, ...; 6 is halfway
    assert s.needle_start - s.haystack_start == 4
    assert gen.sample(fixed + 512, 7 / 512).needle_start - s.haystack_start == 8


def test_niah_templates():
    pk = make_niah_sample("pk", 400, 0.5, seed=0)
    assert re.fullmatch(r"The pass key is \d{5}\. Remember it\.", pk.needle) and pk.key is None
    assert pk.question.endswith("What is the pass key? The pass key is")
    ids = pk.input_ids
    hay = TOK.decode(ids[pk.haystack_start:pk.needle_start] + ids[pk.needle_end:pk.haystack_end])
    assert "The sky is blue." in hay and not re.search(r"\d", hay)
    n = make_niah_sample("n", 400, 0.5, documents=DOCS)
    assert n.needle == f"One of the special magic numbers for {n.key} is: {n.answer}." and len(n.answer) == 7
    w = make_niah_sample("w", 400, 0.5, documents=DOCS)
    assert w.answer.isalpha() and "magic words" in w.needle
    u = make_niah_sample("uuid", 400, 0.5, documents=DOCS)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", u.answer)


def test_niah_deterministic_with_seed():
    a = NiahGenerator("n", TOK, DOCS, seed=5)
    b = NiahGenerator("n", TOK, DOCS, seed=5)
    assert a.sample(500, 0.4, 3) == b.sample(500, 0.4, 3)
    assert a.sample(500, 0.4, 3) != NiahGenerator("n", TOK, DOCS, seed=6).sample(500, 0.4, 3)
    assert a.sample(500, 0.4, 3).answer != a.sample(500, 0.4, 4).answer
    # one index holds the same needle at every depth and length
    assert a.sample(500, 0.0, 3).needle == a.sample(800, 1.0, 3).needle


def test_niah_sized_in_tokens_of_a_bpe_tokenizer():
    from titans.data import BPETokenizer
    bpe = BPETokenizer.train(DOCS * 3, vocab_size=300, min_frequency=2)
    s = NiahGenerator("w", bpe, DOCS, seed=0).sample(320, 0.5)
    assert len(s.input_ids) == 320 < len(bpe.decode(s.input_ids))
    assert bpe.decode(s.input_ids[s.needle_start:s.needle_end]) == s.needle + " "


def test_niah_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        NiahGenerator("multi")
    with pytest.raises(ValueError, match="documents"):
        NiahGenerator("n", TOK)
    with pytest.raises(ValueError, match="length 100 is too short"):
        make_niah_sample("pk", 100, 0.5)
    with pytest.raises(ValueError, match="depth"):
        make_niah_sample("pk", 400, 1.5)


# -- BABILong ----------------------------------------------------------------------------------

_FACT = re.compile(r"(\w+) (" + "|".join(MOVE_VERBS + GRAB_VERBS + DROP_VERBS) + r") (?:to )?the (\w+)\.")


def _replay(facts, question):
    """An independent reading of a story: parse each fact, track the world, answer."""
    at, carrier, obj_at, hist = {}, {}, {}, {}
    for f in facts:
        person, verb, thing = _FACT.fullmatch(f).groups()
        if verb in MOVE_VERBS:
            at[person] = thing
            for o, p in carrier.items():
                if p == person:
                    obj_at[o] = thing
                    hist[o].append(thing)
        elif verb in GRAB_VERBS:
            carrier[thing] = person
            if thing not in obj_at:
                obj_at[thing] = at[person]
                hist[thing] = [at[person]]
            assert obj_at[thing] == at[person], "grabbed an object somewhere else"
        else:
            assert carrier.get(thing) == person, "dropped an object not carried"
            carrier[thing] = None
    if m := re.fullmatch(r"Where is (\w+)\?", question):
        return at[m.group(1)]
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return obj_at[m.group(1)]
    m = re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question)
    h = hist[m.group(1)]
    assert h[-1] == m.group(2) and h.count(m.group(2)) == 1
    return h[-2]


@pytest.mark.parametrize("task", BABILONG_TASKS)
def test_babilong_answers_match_a_replay_of_the_facts(task):
    for seed in range(40):
        story = simulate_story(task, seed=seed)
        assert _replay(story.facts, story.question) == story.answer
        subject = re.search(r"Where (?:is|was) (?:the )?(\w+)", story.question).group(1)
        mentions = [i for i, f in enumerate(story.facts) if f.split()[0] == subject or f" {subject}." in f]
        if task == "qa1":  # the person's last move
            assert story.supporting == (mentions[-1],)
        elif task == "qa2":  # the object's last grab or drop, and its carrier's move
            assert mentions[-1] in story.supporting and len(story.supporting) == 2
        else:  # the move that took the object to the asked place, its move before, the grab
            now = re.search(r"before the (\w+)", story.question).group(1)
            assert story.facts[story.supporting[-1]].endswith(f"to the {now}.")
            assert len(story.supporting) == 3
    assert simulate_story(task, seed=3) == simulate_story(task, seed=3)


def test_babilong_sample_hides_the_facts_in_order():
    gen = BabilongGenerator("qa2", TOK, DOCS, seed=0)
    s = gen.sample(1200, index=4)
    assert len(s.input_ids) == 1200 and s == gen.sample(1200, index=4)
    assert list(s.fact_starts) == sorted(s.fact_starts)
    for start, fact in zip(s.fact_starts, s.story.facts):
        assert TOK.decode(s.input_ids[start:start + len(fact) + 1]) == fact + " "
    assert TOK.decode(s.input_ids).endswith(f"\nQuestion: {s.story.question}\nAnswer:")
    assert TOK.decode(s.answer_ids) == " " + s.answer
    bare = gen.sample(None, index=4)  # no distractor: the facts alone
    assert bare.story == s.story and bare.length == len(bare.input_ids) < 450
    with pytest.raises(ValueError, match="too short"):
        gen.sample(300, 0)
    with pytest.raises(ValueError, match="documents"):
        BabilongGenerator("qa1", TOK).sample(2000)
    with pytest.raises(ValueError, match="task"):
        BabilongGenerator("qa4")


def test_babilong_batch_masks_everything_but_the_answer_and_its_end():
    x, y = babilong_batch(None, 600, 3, documents=DOCS, seed=2, step=1)
    assert x.shape == y.shape == (3, 600)
    for r, task in enumerate(BABILONG_TASKS):
        s = BabilongGenerator(task, TOK, DOCS, seed=2).sample(600 + 1 - len(" bathroom."), 3 + r)
        scored = (y[r] != -100).nonzero().flatten()
        # the full stop is trained: `titans eval babilong` decodes past the answer, and its exact
        # match needs the word to end there
        answer = TOK.decode(y[r, scored].tolist())
        assert answer == " " + s.answer + "."
        assert score_answer(answer + "Th", s.answer) and not score_answer(answer[:-1] + "m", s.answer)
        assert x[r, :len(s.input_ids)].tolist() == s.input_ids
        assert (x[r, scored[1:]] == y[r, scored[:-1]]).all()  # targets are the next tokens
    batches = babilong_batches(None, 600, 3, documents=DOCS, seed=2)
    next(batches)
    state = batches.state_dict()
    again = babilong_batches(None, 600, 3, documents=DOCS, seed=2)
    again.load_state_dict(state)
    assert torch.equal(next(again)[1], y)
    with pytest.raises(ValueError, match="name"):
        babilong_batches(None, 600, 2, documents=DOCS, seed=2).load_state_dict(state)


# -- MQAR, copy, selective copy -------------------------------------------------------------

def test_mqar_targets_are_the_values_of_the_queried_keys():
    x, y = mqar_batch(4, 64, n_pairs=8, vocab_size=64, seed=0, step=3, n_queries=6)
    assert x.shape == y.shape == (4, 64)
    for b in range(4):
        kv = dict(zip(x[b, 0:16:2].tolist(), x[b, 1:16:2].tolist()))
        assert len(kv) == 8 and all(1 <= k < 32 <= v < 64 for k, v in kv.items())
        scored = (y[b] != -100).nonzero().flatten().tolist()
        assert len(scored) == 6 and min(scored) >= 16
        for t in scored:
            assert y[b, t] == kv[int(x[b, t])]  # the token after a queried key is its value
    assert torch.equal(mqar_batch(4, 64, 8, 64, seed=0, step=3, n_queries=6)[0], x)
    assert not torch.equal(mqar_batch(4, 64, 8, 64, seed=0, step=4, n_queries=6)[0], x)
    with pytest.raises(ValueError, match="seq_len"):
        mqar_batch(1, 20, 8, 64)
    with pytest.raises(ValueError, match="n_queries"):
        mqar_batch(1, 64, 4, 64, n_queries=5)
    with pytest.raises(ValueError, match="vocab_size"):
        mqar_batch(1, 64, 8, 16)


def test_copy_and_selective_copy_targets():
    x, y = copy_batch(2, 5, 12, seed=1, delay=3)
    assert x.shape == (2, 13)
    data = x[:, :5]
    assert (x[:, 5:8] == 0).all() and (x[:, 8] == 1).all()
    assert torch.equal(y[:, -5:], data) and (y[:, :-5] == -100).all()
    x, y = selective_copy_batch(3, 4, 20, 12, seed=1)
    assert x.shape == (3, 24)
    for b in range(3):
        region = x[b, :20]
        assert torch.equal(y[b, -4:], region[region != 0]) and x[b, 20] == 1
    with pytest.raises(ValueError, match="region"):
        selective_copy_batch(1, 5, 3, 12)


def test_passkey_batch_scores_the_needles_digits_and_where_they_end():
    x, y = passkey_batch(4, 400, 256, seed=3, step=2, jitter=0)
    assert x.shape == y.shape == (4, 400)
    positions = []
    for b in range(4):
        text = TOK.decode(x[b].tolist())
        key = re.search(r"The pass key is (\d{5})\. Remember it\.", text)
        assert key and text.endswith("What is the pass key? The pass key is " + key.group(1))
        # the scored targets are " " + the 5 digits + ".", the last 7 positions (inputs shifted by
        # one): a model that learns them passes `titans eval niah`'s exact scoring, which decodes on
        # past the answer and fails "123456"
        answer = TOK.decode(y[b, -7:].tolist())
        assert answer == " " + key.group(1) + "." and (y[b, :-7] == -100).all()
        assert score_answer(answer + "The", key.group(1)) and not score_answer(answer[:-1] + "1", key.group(1))
        positions.append(key.start())
    assert len(set(positions)) > 1  # the needle's depth varies within a batch
    assert torch.equal(passkey_batch(4, 400, 256, seed=3, step=2, jitter=0)[0], x)
    assert not torch.equal(passkey_batch(4, 400, 256, seed=3, step=3, jitter=0)[0], x)
    # held out: not the needles `titans eval niah --seed 0` draws for the same sample indices
    trained = [TOK.decode(row) for row in passkey_batch(64, 300, 256, seed=0, jitter=0)[1][:, -6:-1].tolist()]
    held = [NiahGenerator("pk", seed=0).sample(300, 0.5, i).answer for i in range(64)]
    assert len(set(trained)) == 64 and sum(a != b for a, b in zip(trained, held)) == 64
    with pytest.raises(ValueError, match="seq_len=100 is too short for task niah"):
        passkey_batch(1, 100, 256)
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        passkey_batch(1, 400, 64)
    assert torch.equal(next(recall_batches("niah", 4, 256, seed=3, seq_len=400))[0], passkey_batch(4, 400, 256, seed=3)[0])
    # all_tokens: the same rows, every target scored (language modelling on the pass-key text)
    x, y = passkey_batch(4, 400, 256, seed=3, jitter=0)
    xa, ya = next(recall_batches("niah", 4, 256, seed=3, seq_len=400, all_tokens="true", jitter="0"))
    assert torch.equal(xa, x) and (ya != -100).all() and torch.equal(ya[:, -7:], y[:, -7:])
    assert torch.equal(ya[:, :-1], xa[:, 1:])


def test_passkey_batch_jitter_moves_the_answer_within_the_row():
    x, y = passkey_batch(16, 400, 256, seed=3, step=2, jitter=31)
    assert x.shape == y.shape == (16, 400)
    ends = set()
    for b in range(16):
        scored = (y[b] != -100).nonzero().flatten()
        assert len(scored) == 7 and torch.equal(scored, torch.arange(scored[0], scored[0] + 7))
        end = int(scored[-1]) + 1
        assert 400 - 31 <= end <= 400
        ends.add(end)
        text = TOK.decode(x[b, :end].tolist())
        key = re.search(r"The pass key is (\d{5})\. Remember it\.", text)
        assert key and text.endswith("What is the pass key? The pass key is " + key.group(1))
        assert TOK.decode(y[b, scored].tolist()) == " " + key.group(1) + "."
    assert len(ends) > 4  # the answer sits at many places against any chunk or segment grid
    assert torch.equal(passkey_batch(16, 400, 256, seed=3, step=2, jitter=31)[0], x)
    assert torch.equal(next(recall_batches("niah", 16, 256, seed=3, seq_len=400, jitter="31"))[0],
                       passkey_batch(16, 400, 256, seed=3, jitter=31)[0])
    with pytest.raises(ValueError, match="too short for task niah with jitter=40"):
        passkey_batch(1, 256, 256, jitter=40)
    with pytest.raises(ValueError, match="jitter"):
        passkey_batch(1, 400, 256, jitter=-1)
    # the default: as much as the noise of a full row allows, at most AUTO_JITTER; 31 at 256
    for T, most in ((256, 31), (400, AUTO_JITTER)):
        x, y = passkey_batch(256, T, 256, seed=1)
        ends = {int((y[b] != -100).nonzero().max()) + 1 for b in range(256)}
        assert min(ends) == T - most and max(ends) == T
    assert passkey_batch(2, 226, 256)[0].shape == (2, 226)   # little room: a jitter of 1, no error


def test_passkey_batch_lead_in_makes_one_long_sample_answered_in_the_trained_tokens():
    leads, in_lead_in = [], []
    for step in range(40):
        x, y = passkey_batch(3, 300, 256, seed=2, step=step, lead_in=900)
        P = x.shape[1] - 300
        assert 0 <= P <= 900 and y.shape == x.shape
        leads.append(P)
        for b in range(3):
            scored = (y[b] != -100).nonzero().flatten()
            assert len(scored) == 7 and scored[0] >= P   # the answer is in the trained tokens
            end = int(scored[-1]) + 1
            text = TOK.decode(x[b, :end].tolist())     # one sample: instruction, needle, question
            assert text.startswith("There is an important piece of information")
            key = re.search(r"The pass key is (\d{5})\. Remember it\.", text)
            assert key and text.endswith("What is the pass key? The pass key is " + key.group(1))
            if P:
                in_lead_in.append(key.start() < P)
    zero = sum(P == 0 for P in leads) / len(leads)
    assert abs(zero - NO_LEAD_IN) < 0.2 and len(set(leads)) > 20
    # needles land in the lead-in too (the state must carry them into the trained tokens)
    assert any(in_lead_in) and not all(in_lead_in)
    assert torch.equal(passkey_batch(3, 300, 256, seed=2, step=5, lead_in=0)[0],
                       passkey_batch(3, 300, 256, seed=2, step=5)[0])
    with pytest.raises(ValueError, match="lead_in"):
        passkey_batch(1, 300, 256, lead_in=-1)


def test_masked_accuracy_and_recall_evaluation():
    targets = torch.tensor([[-100, 3, 4, -100], [5, -100, -100, -100]])
    pred = torch.tensor([[9, 3, 0, 9], [5, 1, 1, 1]])
    assert masked_accuracy(pred, targets) == pytest.approx(2 / 3)
    logits = torch.nn.functional.one_hot(pred, 10).float()
    assert masked_accuracy(logits, targets) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no scored"):
        masked_accuracy(pred, torch.full_like(targets, -100))

    class Oracle:  # reads the answer off the sequence: knows the task perfectly
        def __call__(self, inputs):
            logits = torch.zeros(*inputs.shape, 64)
            for b in range(inputs.shape[0]):
                kv = dict(zip(inputs[b, 0:8:2].tolist(), inputs[b, 1:8:2].tolist()))
                for t, k in enumerate(inputs[b].tolist()):
                    if t >= 8 and k in kv:
                        logits[b, t, kv[k]] = 1
            return type("Out", (), {"logits": logits})()
    kw = dict(seq_len=32, n_pairs=4)
    assert evaluate_recall(Oracle(), "mqar", 2, 64, n_batches=2, **kw) == 1.0
    batches = recall_batches("mqar", 2, 64, seed=7, **kw)
    first = next(batches)
    assert torch.equal(first[0], mqar_batch(2, vocab_size=64, seed=7, step=0, **kw)[0])
    with pytest.raises(ValueError, match=r"task copy: unknown argument\(s\) \['seq_len'\]"):
        recall_batches("copy", 2, 64, seq_len=10)
    with pytest.raises(ValueError, match=r"task copy: argument\(s\) \['n_tokens'\] must be given"):
        recall_batches("copy", 2, 64)
    with pytest.raises(ValueError, match="task mqar n_pairs must be an integer, got 'four'"):
        recall_batches("mqar", 2, 64, seq_len=32, n_pairs="four")
    assert torch.equal(next(recall_batches("mqar", 2, 64, seed=7, seq_len="32", n_pairs="4"))[0], first[0])
    with pytest.raises(ValueError, match="task"):
        recall_batches("sort", 2, 64)
