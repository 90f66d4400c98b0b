"""The staged forward of streaming evaluation (titans.eval.stream.forward_staged) equals the model's forward."""

import pytest
import torch

from titans import TitansConfig, TitansLM
from titans.eval import stream
from titans.eval.stream import forward_staged, prefill, staged_available, token_logprobs

VARIANTS = ["lmm", "mac", "mag", "mal", "transformer", "swa"]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(autouse=True)
def _two_threads(monkeypatch):
    monkeypatch.setattr(stream, "STAGE_PIECE", 64)   # several sub-pieces on a short input
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", VARIANTS)
def test_staged_equals_forward(variant):
    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant)).eval()
    ids = torch.randint(0, 256, (2, 300))
    with torch.no_grad():
        head = model(ids[:, :37])
        ref = model(ids[:, 37:], state=head.state)
        assert staged_available(model, ids[:, 37:], head.state)
        state, logits = forward_staged(model, ids[:, 37:], head.state)
        _, last = forward_staged(model, ids[:, 37:], head.state, all_logits=False)
        assert _rel(logits, ref.logits) < 1e-5 and _rel(last, ref.logits[:, -1]) < 1e-5
        assert state.position == ref.state.position == 300 and state.shape == ref.state.shape
        # the states continue alike
        nxt = ids[:, :9]
        assert _rel(model(nxt, state=state).logits, model(nxt, state=ref.state).logits) < 1e-5


def test_inference_mode_is_kept():
    model = TitansLM(TitansConfig.from_preset("tiny", "mac")).eval()
    ids = torch.randint(0, 256, (1, 300))
    with torch.inference_mode():
        state, _ = forward_staged(model, ids)
        state, _ = forward_staged(model, ids, state)      # an inference-mode state, continued
    assert all(t.is_inference() for _, t in stream.state_tensors(state))
    with torch.no_grad():
        state, _ = forward_staged(model, ids)
    assert not any(t.is_inference() for _, t in stream.state_tensors(state))


def test_prefill_and_logprobs_take_it_and_agree():
    torch.manual_seed(1)
    model = TitansLM(TitansConfig.from_preset("tiny", "mac")).eval()
    ids = torch.randint(0, 256, (1, 400))
    with torch.no_grad():
        ref = model(ids)
    state, last = prefill(model, ids, piece=256)
    assert _rel(last, ref.logits[:, -1]) < 1e-5 and state.position == 400
    done = []
    logp, _, _ = token_logprobs(model, ids[0], piece=256, progress=done.append)
    assert sum(done) == 400 and len(done) == 7                     # sub-pieces of 64 as they finish
    ref_logp = torch.log_softmax(ref.logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    assert _rel(logp, ref_logp) < 1e-5


def test_not_taken_where_it_does_not_apply():
    model = TitansLM(TitansConfig.from_preset("tiny", "mac")).eval()
    ids = torch.randint(0, 256, (1, 300))
    assert not staged_available(model, ids)                       # autograd on
    with torch.no_grad():
        assert not staged_available(model, ids[:, :100])          # shorter than two sub-pieces
        assert not staged_available(model, ids + 256)             # out of the vocabulary: the model's error
        other = TitansLM(TitansConfig.from_preset("tiny", "lmm")).eval()
        assert not staged_available(model, ids, other(ids[:, :3]).state)   # another model's state
        assert not staged_available(model, ids, model(ids[:1, :3].expand(2, 3)).state)  # another batch
        torch.set_num_threads(1)
        assert not staged_available(model, ids)


@pytest.mark.parametrize("block", [0, 1])   # the first stage's, the second's
def test_an_error_in_a_stage_reaches_the_caller(monkeypatch, block):
    model = TitansLM(TitansConfig.from_preset("tiny", "mac")).eval()

    def broken(*args, **kwargs):
        raise RuntimeError("stage failed")

    monkeypatch.setattr(model.blocks[block], "forward", broken)
    with torch.no_grad(), pytest.raises(RuntimeError, match="stage failed"):
        forward_staged(model, torch.randint(0, 256, (1, 300)))
