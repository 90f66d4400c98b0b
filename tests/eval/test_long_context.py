"""Long-context evaluation: streaming prefill, stream_eval, S-NIAH and BABILong harnesses."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from titans import TitansConfig, TitansLM
from titans.data import ByteTokenizer
from titans.data.tasks import BabilongGenerator
from titans.data.tasks.babilong import PLACES
from titans.eval.babilong import (BabilongRecord, babilong_accuracy, evaluate_babilong,
                                  format_babilong_table, plot_babilong)
from titans.eval.niah import NiahRecord, evaluate_niah, format_niah_table, niah_accuracy, plot_niah
from titans.eval.stream import (format_stream_result, greedy_answer, nonfinite_state, prefill,
                                state_bytes, stream_eval)

TOK = ByteTokenizer()
DOCS = ["The river runs past the old mill. Children play near the water! Who built the bridge? "
        "Nobody remembers the name of the builder. " * 6]


def tiny(variant: str = "lmm") -> TitansLM:
    torch.manual_seed(0)
    return TitansLM(TitansConfig.from_preset("tiny", variant=variant, n_layers=1)).eval()


class Oracle:
    """Wraps a real model; `generate` answers from everything the model was fed (a regex on the
    streamed text) and checks that the state it gets has seen all of it."""

    def __init__(self, model: TitansLM, find: "callable") -> None:
        self.model, self.find, self.seen = model, find, []

    def __call__(self, ids, state=None):
        self.seen.append(ids)
        return self.model(ids, state=state)

    def generate(self, last, max_new_tokens, temperature=1.0, state=None):
        assert temperature == 0
        fed = torch.cat(self.seen + [last], dim=1)
        self.seen = []
        assert state.position == fed.shape[1] - 1  # the state carried the whole prefill
        rows = [TOK.encode(" " + self.find(TOK.decode(r.tolist())) + ".\n")[:max_new_tokens] for r in fed]
        rows = [r + [32] * (max_new_tokens - len(r)) for r in rows]
        return torch.cat([last, torch.tensor(rows)], dim=1)


# -- streaming path -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["lmm", "mag"])
def test_prefill_in_pieces_equals_one_pass(variant):
    model = tiny(variant)
    x = torch.randint(0, 256, (2, 150))
    with torch.no_grad():
        full = model(x)
    state, last = prefill(model, x, piece=37)
    torch.testing.assert_close(last, full.logits[:, -1], rtol=1e-4, atol=1e-4)
    assert state.position == 150 and not nonfinite_state(state)
    with pytest.raises(ValueError, match="piece"):
        prefill(model, x, piece=0)
    new = greedy_answer(model, x, 3, piece=64)
    assert new.shape == (2, 3)
    torch.testing.assert_close(new[:, 0], full.logits[:, -1].argmax(-1))


def test_stream_eval_reports_constant_state_and_finite_values():
    result = stream_eval(tiny(), 3000, piece=512, checkpoints=(1024, 2048, 10**6), seed=1)
    assert [c["tokens"] for c in result["checkpoints"]] == [1024, 2048, 3000]
    assert result["finite"] and result["state_constant"] and result["first_nonfinite_logits"] is None
    for c in result["checkpoints"]:
        assert c["tokens_per_s"] > 0 and c["peak_rss"] >= c["rss"] > 0 and c["state_bytes"] > 0
        assert c["nonfinite"] == []
    assert result["tokens_per_s"] > 0 and isinstance(result["rss_growth"], int)
    text = format_stream_result(result)
    assert "3,000" in text and "constant" in text and "finite" in text and "min |W|" in text


def test_stream_eval_reports_the_smallest_memory_norm():
    model, x = tiny(), torch.randint(0, 256, (1, 1024), generator=torch.Generator().manual_seed(1))
    result = stream_eval(model, 1024, piece=512, checkpoints=(512,), source=x)
    state, _ = prefill(model, x, piece=512)
    norms = [w.norm().item() for s in state.memories().values() for w in s.memory.weights]
    assert norms and result["checkpoints"][-1]["memory_norm"] == pytest.approx(min(norms), rel=1e-5)
    assert stream_eval(tiny("transformer"), 64, piece=64)["checkpoints"][0]["memory_norm"] is None


def test_stream_eval_sees_a_growing_cache_in_full_attention():
    result = stream_eval(tiny("transformer"), 600, piece=200, checkpoints=(200, 400))
    sizes = [c["state_bytes"] for c in result["checkpoints"]]
    assert sizes[0] < sizes[1] < sizes[2] and not result["state_constant"]


def test_stream_eval_feeds_the_source_in_cut_pieces_and_reports_nans():
    fed = []

    def stub(ids, state=None):
        fed.append(ids.clone())
        w = (state["w"] if state is not None else torch.zeros(2)) + 1
        if sum(f.shape[1] for f in fed) > 8:
            w = w * float("nan")
        return SimpleNamespace(logits=torch.zeros(*ids.shape, 5), state={"w": w})

    source = np.array([1, 2, 3])
    result = stream_eval(stub, 10, piece=4, checkpoints=(6,), source=source, vocab_size=5)
    assert [f.shape[1] for f in fed] == [4, 2, 4]  # cut to stop exactly at the checkpoint
    assert torch.cat(fed, 1).flatten().tolist() == [1, 2, 3] * 3 + [1]  # repeated source
    assert result["checkpoints"][0]["nonfinite"] == []
    assert not result["finite"] and result["checkpoints"][1]["nonfinite"] == ["state.w"]
    with pytest.raises(ValueError, match="vocab_size"):
        stream_eval(stub, 10, source=np.array([7]), vocab_size=5)


def test_nonfinite_state_names_the_tensor():
    model = tiny()
    state, _ = prefill(model, torch.randint(0, 256, (1, 40)), piece=16)
    assert nonfinite_state(state) == [] and state_bytes(state) > 0
    mem = state.layers["blocks.0"].memory
    mem.weights[0][0, 0, 0, 0] = float("inf")
    assert nonfinite_state(state) == ["state.layers.blocks.0.memory.weights[0]"]


# -- S-NIAH ----------------------------------------------------------------------------------

def test_evaluate_niah_end_to_end_on_an_untrained_model(tmp_path):
    records = evaluate_niah(tiny(), TOK, "pk", [300, 400], depths=3, n_samples=2, piece=128,
                            batch_size=2)
    assert len(records) == 2 * 3 * 2
    assert [(r.length, r.depth) for r in records[:4]] == [(300, 0.0), (300, 0.0), (300, 0.5), (300, 0.5)]
    for r in records:
        assert isinstance(r, NiahRecord) and re.fullmatch(r"\d{5}", r.answer)
        assert isinstance(r.generated, str) and r.correct in (True, False)
    assert set(niah_accuracy(records)) == {(n, d) for n in (300, 400) for d in (0.0, 0.5, 1.0)}


def test_evaluate_niah_scores_a_right_and_a_wrong_model(tmp_path):
    right = Oracle(tiny(), lambda t: re.search(r"pass key is (\d+)\. Remember", t).group(1))
    records = evaluate_niah(right, TOK, "pk", ["300"], depths=[0.0, 1.0], n_samples=2, piece=100)
    assert all(r.correct for r in records) and len(records) == 4
    wrong = Oracle(tiny(), lambda t: "12")
    assert not any(r.correct for r in evaluate_niah(wrong, TOK, "pk", [300], [0.5], 2, piece=100))
    essay = Oracle(tiny(), lambda t: re.search(r"magic uuids for [\w-]+ is: ([\w-]+)\.", t).group(1))
    records = evaluate_niah(essay, TOK, "uuid", [400], [0.25], 1, documents=DOCS, piece=90)
    assert records[0].correct and len(records[0].answer) == 36
    table = format_niah_table(records + [NiahRecord("uuid", 400, 0.75, 0, "a", "b", False, 0)])
    assert re.search(r"0\.25\s+100\.0", table) and re.search(r"0\.75\s+0\.0", table)
    assert re.search(r"mean\s+50\.0", table)
    plot_niah(records, tmp_path / "niah.png")
    assert (tmp_path / "niah.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="depths"):
        evaluate_niah(right, TOK, "pk", [300], depths=[1.2])
    with pytest.raises(ValueError, match="mode"):
        evaluate_niah(right, TOK, "pk", [300], depths=[0.5], scoring="fuzzy")


# -- BABILong -----------------------------------------------------------------------------------

def test_evaluate_babilong_accuracy_by_task_and_length(tmp_path):
    answers = {}
    for task in ("qa1", "qa3"):
        gen = BabilongGenerator(task, TOK, DOCS, seed=0)
        for n in (700, 900):
            for i in range(2):
                s = gen.sample(n, i)
                answers[TOK.decode(s.input_ids)] = s.answer
    oracle = Oracle(tiny(), lambda t: answers[t])
    records = evaluate_babilong(oracle, TOK, ["qa1", "qa3"], [700, 900], n_samples=2,
                                documents=DOCS, piece=256, batch_size=2)
    assert len(records) == 8 and all(isinstance(r, BabilongRecord) and r.correct for r in records)
    assert babilong_accuracy(records) == {(t, n): 1.0 for t in ("qa1", "qa3") for n in (700, 900)}
    untrained = evaluate_babilong(tiny(), TOK, "qa2", ["1K"], n_samples=1, documents=DOCS, piece=512)
    assert len(untrained) == 1 and untrained[0].length == 1024 and untrained[0].answer in PLACES
    table = format_babilong_table(records + untrained)
    assert re.search(r"qa1\s+100\.0\s+100\.0\s+-", table)
    plot_babilong(records, tmp_path / "babilong.png")
    assert (tmp_path / "babilong.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="tasks"):
        evaluate_babilong(oracle, TOK, ["qa9"], [700])


def test_lengths_too_short_are_refused_before_the_first_sample():
    # qa1's stories fit in 450 tokens, qa3's (more facts) do not: nothing is scored before the error
    done = []
    with pytest.raises(ValueError, match=r"length 450 is too short for qa3 \(its stories need up to \d+ tokens\)$"):
        evaluate_babilong(tiny(), TOK, ["qa1", "qa3"], [2048, 450], n_samples=2, documents=DOCS, piece=512,
                          progress=done.append)
    with pytest.raises(ValueError, match="length 20 is too short for task 'pk'"):
        evaluate_niah(tiny(), TOK, "pk", [512, 20], depths=2, progress=done.append)
    assert done == []
