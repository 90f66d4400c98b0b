"""DNA models: the LM config, the pooled classifier (padding, shapes, learning), Markov chains by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from titans.models.dna import DNA_VOCAB_SIZE, DNAClassifier, MarkovChain, dna_config
from titans.models.lm import TitansLM

TINY = dict(dim=32, n_layers=1, heads=2, chunk_size=8, segment_len=16)


def test_dna_config_is_an_lm_over_bases():
    cfg = dna_config("tiny", "lmm", **TINY)
    assert cfg.vocab_size == DNA_VOCAB_SIZE == 5 and cfg.dim == 32
    assert dna_config(vocab_size=7).vocab_size == 7
    lm = TitansLM(cfg)
    out = lm(torch.randint(0, 5, (2, 12)))
    assert out.logits.shape == (2, 12, 5)


def test_classifier_shapes_and_bad_input():
    torch.manual_seed(0)
    m = DNAClassifier(dna_config(**TINY), n_classes=3)
    assert m(torch.randint(0, 5, (4, 20))).shape == (4, 3)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=5\)"):
        m(torch.full((1, 4), 5))
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        m(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="n_classes must be an integer >= 2"):
        DNAClassifier(dna_config(**TINY), n_classes=1)
    with pytest.raises(ValueError, match="pad_id must lie"):
        DNAClassifier(dna_config(**TINY), n_classes=2, pad_id=9)


def test_padding_at_the_end_does_not_change_the_logits():
    # The backbone is causal and the mean leaves pads out: right-padding is invisible.
    torch.manual_seed(0)
    m = DNAClassifier(dna_config(vocab_size=6, **TINY), n_classes=2, pad_id=5).eval()
    x = torch.randint(0, 5, (3, 20))
    padded = torch.cat([x, torch.full((3, 7), 5)], dim=1)
    assert torch.allclose(m(x), m(padded), atol=1e-5)
    plain = DNAClassifier(dna_config(vocab_size=6, **TINY), n_classes=2).eval()
    plain.load_state_dict(m.state_dict())
    assert not torch.allclose(plain(x), plain(padded), atol=1e-5)    # without pad_id the pads count


def test_from_lm_starts_from_the_lm_weights():
    torch.manual_seed(0)
    lm = TitansLM(dna_config(**TINY))
    clf = DNAClassifier.from_lm(lm, n_classes=2)
    assert torch.equal(clf.backbone.embed.weight, lm.embed.weight)
    assert torch.equal(clf.backbone.blocks[0].mixer.wo.weight, lm.blocks[0].mixer.wo.weight)


def _gc_task(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 draws bases with GC 70 %, class 1 with GC 30 % (A C G T probabilities)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([[0.15, 0.35, 0.35, 0.15], [0.35, 0.15, 0.15, 0.35]])
    labels = torch.arange(n) % 2
    tokens = torch.multinomial(probs[labels], length, replacement=True, generator=g)
    return tokens, labels


def test_classifier_learns_gc_content():
    torch.manual_seed(0)
    x, y = _gc_task(64, 32, seed=0)
    xt, yt = _gc_task(64, 32, seed=1)
    m = DNAClassifier(dna_config(**TINY), n_classes=2)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 2
    with torch.no_grad():
        assert (m.eval()(xt).argmax(-1) == yt).float().mean() > 0.9


def test_markov_order1_hand_computed():
    # "AACA" = 0 0 1 0: transitions A->A, A->C, C->A. With alpha = 1 and V = 5:
    # p(A|A) = p(C|A) = (1 + 1) / (2 + 5) = 2/7, p(A|C) = (1 + 1) / (1 + 5) = 1/3.
    mc = MarkovChain(1).fit([np.array([0, 0, 1, 0])])
    lp = mc.log_probs(np.array([0, 0, 1, 0]))
    assert np.allclose(lp, np.log([[2 / 7, 2 / 7, 1 / 3]]))
    assert mc.mean_nll(np.array([[0, 0, 1, 0]])) == pytest.approx(-np.log([2 / 7, 2 / 7, 1 / 3]).mean())
    # order 0 is composition: A 3, C 1 over 4 bases -> p(A) = 4/9, p(G) = 1/9
    m0 = MarkovChain(0).fit([np.array([0, 0, 1, 0])])
    assert np.allclose(np.exp(m0.log_probs(np.array([0, 2]))), [[4 / 9, 1 / 9]])


def test_markov_context_code_and_classes():
    mc = MarkovChain(2, vocab_size=5, n_classes=2)
    ctx, nxt = mc._codes(np.array([[3, 1, 4, 2]]))
    # contexts (3, 1) -> 3*5 + 1 = 16 and (1, 4) -> 9; next tokens 4 and 2
    assert ctx.tolist() == [[16, 9]] and nxt.tolist() == [[4, 2]]
    mc.fit([np.array([0, 1] * 20), np.array([2, 3] * 20)], labels=[0, 1])
    ll = mc.class_log_likelihood(np.array([[0, 1, 0, 1, 0], [2, 3, 2, 3, 2], [3, 2, 3, 2, 3]]))
    assert ll.shape == (3, 2) and ll.argmax(-1).tolist() == [0, 1, 1]
    # the row sums equal log_probs under each class
    assert np.allclose(ll[:, 1], mc.log_probs(np.array([[0, 1, 0, 1, 0], [2, 3, 2, 3, 2], [3, 2, 3, 2, 3]]), 1).sum(-1))


def test_markov_bad_input():
    with pytest.raises(ValueError, match="order must be an integer >= 0"):
        MarkovChain(-1)
    with pytest.raises(ValueError, match="longer than order=3"):
        MarkovChain(3).fit([np.array([0, 1, 2])])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, n_classes=1\)"):
        MarkovChain(1).fit([np.array([0, 1, 2])], labels=[1])
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=5\)"):
        MarkovChain(1).fit([np.array([0, 7])])
    with pytest.raises(ValueError, match="too many"):
        MarkovChain(20)
    assert math.isclose(MarkovChain(1).mean_nll(np.array([0, 1, 2])), math.log(5))   # unfitted: uniform
