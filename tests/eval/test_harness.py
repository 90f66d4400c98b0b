"""The lm-evaluation-harness adapter, offline: a local multiple-choice task scored through the
harness equals our own log-likelihood computation, rolling log-likelihood equals `titans eval
ppl --text`, and inputs longer than a piece are scored whole (the state carries)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from titans import TitansConfig, TitansLM
from titans.cli import main
from titans.data import ByteTokenizer
from titans.eval.harness import TitansHarnessLM  # the harness extra is part of the dev install

QUESTIONS = [
    ("The capital of France is", ["Paris", "a fish", "blue"], 0),
    ("Two plus two equals", ["five", "four", "a song"], 1),
    ("Water freezes when it is", ["hot", "loud", "cold"], 2),
    ("The sun rises in the", ["east", "west", "sea"], 0),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TitansLM(TitansConfig.from_preset("tiny", variant="mac")).eval()


class Request:  # what the harness passes: .args
    def __init__(self, *args):
        self.args = args


def direct_logprob(model, context_ids, cont_ids) -> float:
    """log p(cont | context) by one plain forward pass over the whole input."""
    ids = torch.tensor([context_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    n = len(context_ids)
    return sum(logp[n - 1 + j, t].item() for j, t in enumerate(cont_ids))


def test_loglikelihood_and_rolling_equal_a_full_pass_at_any_piece(model):
    tok = ByteTokenizer()
    context, cont = "abc " * 40, " the end"  # 160 + 8 tokens: many pieces of 16
    sep = tok.encode("\n")
    want = direct_logprob(model, sep + tok.encode(context), tok.encode(cont))
    for piece in (16, 4096):
        lm = TitansHarnessLM((model, tok), piece=piece)
        (score, greedy), = lm.loglikelihood([Request(context, cont)])
        assert score == pytest.approx(want, abs=1e-4) and isinstance(greedy, bool)
        rolling, = lm.loglikelihood_rolling([Request(context)])
        assert rolling == pytest.approx(direct_logprob(model, sep, tok.encode(context)), abs=1e-4)
    # two continuations of one context: each scored from the shared context state
    lm = TitansHarnessLM((model, tok), piece=16)
    a, b = lm.loglikelihood([Request(context, " x"), Request(context, " yy")])
    assert a[0] == pytest.approx(direct_logprob(model, sep + tok.encode(context), tok.encode(" x")), abs=1e-4)
    assert b[0] == pytest.approx(direct_logprob(model, sep + tok.encode(context), tok.encode(" yy")), abs=1e-4)


def test_generate_until_stops_at_the_stop_string(model):
    lm = TitansHarnessLM((model, ByteTokenizer()), piece=8)
    out, = lm.generate_until([Request("hello", {"until": ["\n"], "max_gen_toks": 12})])
    assert isinstance(out, str) and "\n" not in out and len(out) <= 12  # a byte each (or U+FFFD)


def test_a_local_multiple_choice_task_scores_as_we_compute_it(model, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(dict(question=q, choices=c, answer=a)) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "task.yaml").write_text(f"""task: titans_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    tok = ByteTokenizer()
    lm = TitansHarnessLM((model, tok), piece=16)
    results = lm_eval.simple_evaluate(model=lm, tasks=["titans_local_mc"],
                                      task_manager=TaskManager(include_path=str(tmp_path)))
    got = results["results"]["titans_local_mc"]
    # our own computation: the harness puts " " between question and choice
    sep = tok.encode("\n")
    right = right_norm = 0
    for q, choices, answer in QUESTIONS:
        scores = [direct_logprob(model, sep + tok.encode(q), tok.encode(" " + c)) for c in choices]
        norm = [s / len(c) for s, c in zip(scores, choices)]  # acc_norm: per character of the choice
        right += max(range(len(choices)), key=scores.__getitem__) == answer
        right_norm += max(range(len(choices)), key=norm.__getitem__) == answer
    assert got["acc,none"] == pytest.approx(right / len(QUESTIONS))
    assert got["acc_norm,none"] == pytest.approx(right_norm / len(QUESTIONS))


def test_rolling_equals_eval_ppl_text(model, tmp_path, capsys):
    text = "It was the best of times, it was the worst of times. " * 6
    (tmp_path / "t.txt").write_text(text)
    model.save_pretrained(tmp_path / "m")
    assert main(["eval", "ppl", "--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"),
                 "--seq-len", "32"]) == 0
    line = capsys.readouterr().out
    count = int(line.split(": ")[1].split(" tokens")[0].replace(",", ""))
    loss = float(line.split("loss ")[1].split(",")[0])
    rolling, = TitansHarnessLM((model, ByteTokenizer()), piece=32).loglikelihood_rolling([Request(text)])
    assert count == len(text.encode()) and -rolling / count == pytest.approx(loss, abs=1e-4)
    assert math.isfinite(rolling)
