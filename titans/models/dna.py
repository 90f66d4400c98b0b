"""DNA models (paper section 5.7): next-base LM config, a pooled classifier, Markov baselines.

Shape legend
    B batch, W bases per sequence, V vocabulary (5: A C G T N, plus any specials), K classes,
    dim model width, k Markov order (bases of context)
    tokens: [B, W] int64   LM logits: [B, W, V]   class logits: [B, K]

- Next-base language modelling is TitansLM with the DNA vocabulary: dna_config builds it.
- DNAClassifier is the same backbone (embedding, blocks, final norm) with the hidden states
  mean-pooled over the sequence (pad positions left out) and a linear head to K classes.
  The backbone is causal, so a pad token at the end never changes a real position.
- MarkovChain is the classic baseline for both tasks: an order-k model with add-alpha
  counts, one per class for classification (a naive-Bayes species classifier).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from .config import TitansConfig
from .lm import TitansLM

__all__ = ["DNA_VOCAB_SIZE", "dna_config", "DNAClassifier", "MarkovChain"]

# A, C, G, T, N: titans.data.dna.DNATokenizer() without specials
DNA_VOCAB_SIZE = 5


def dna_config(preset: str = "tiny", variant: str = "lmm", vocab_size: int = DNA_VOCAB_SIZE,
               **overrides: Any) -> TitansConfig:
    """A TitansConfig preset with the nucleotide vocabulary (pass DNATokenizer(...).vocab_size
    when the tokenizer has special tokens). TitansLM(dna_config()) is the next-base LM."""
    return TitansConfig.from_preset(preset, variant, vocab_size=vocab_size, **overrides)


class DNAClassifier(nn.Module):
    """Sequence classification: TitansLM backbone, masked mean pooling, linear head.

    logits = model(tokens): tokens [B, W] -> [B, K].

    Args:
        config: the backbone (e.g. dna_config("tiny", "lmm")).
        n_classes: K.
        pad_id: a token id left out of the mean (None: every position counts).
        dropout: on the pooled features.
    """

    def __init__(self, config: TitansConfig, n_classes: int, pad_id: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
        if pad_id is not None and not 0 <= pad_id < config.vocab_size:
            raise ValueError(f"pad_id must lie in [0, vocab_size={config.vocab_size}), got {pad_id}")
        self.backbone = TitansLM(config)   # its tied LM head is unused here (and costs nothing)
        self.config, self.n_classes, self.pad_id = config, n_classes, pad_id
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(config.dim, n_classes)
        nn.init.normal_(self.head.weight, std=config.init_std)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_lm(cls, lm: TitansLM, n_classes: int, **kwargs: Any) -> "DNAClassifier":
        """A classifier whose backbone starts from a trained next-base LM (pretrain, then fine-tune)."""
        model = cls(lm.config, n_classes, **kwargs)
        model.backbone.load_state_dict(lm.state_dict())
        return model

    def hidden(self, tokens: Tensor) -> Tensor:
        """tokens [B, W] -> final-norm hidden states [B, W, dim]."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
            raise ValueError(f"tokens must be an integer tensor [B, W], got "
                             f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"tokens must lie in [0, vocab_size={self.config.vocab_size})")
        x = self.backbone.embed(tokens)
        for block in self.backbone.blocks:
            x, _ = block(x)
        return self.backbone.norm(x)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [B, W] -> class logits [B, K] (float32)."""
        h = self.hidden(tokens).float()
        if self.pad_id is None:
            pooled = h.mean(dim=1)
        else:
            keep = (tokens != self.pad_id).unsqueeze(-1).float()          # [B, W, 1]
            pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.head(self.drop(pooled))


class MarkovChain:
    """Order-k Markov models of token sequences, one per class, with add-alpha smoothing.

    p(x_t | x_{t-k} .. x_{t-1}) = (count(context, x_t) + alpha) / (count(context) + alpha V).
    With n_classes = 1 it is a language model (log_probs, mean_nll); with more, `class_log_likelihood`
    scores each sequence under every class's chain (naive Bayes with equal priors).

    Args:
        order: k >= 0 (0 is base composition).  vocab_size: V.  n_classes: K.  alpha: smoothing.
    """

    def __init__(self, order: int, vocab_size: int = DNA_VOCAB_SIZE, n_classes: int = 1, alpha: float = 1.0) -> None:
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(f"order must be an integer >= 0, got {order!r}")
        if vocab_size < 2 or n_classes < 1 or not alpha > 0:
            raise ValueError(f"vocab_size must be >= 2, n_classes >= 1 and alpha > 0, got "
                             f"{vocab_size}, {n_classes}, {alpha}")
        if vocab_size ** (order + 1) * n_classes > 2 ** 28:
            raise ValueError(f"order={order}: {vocab_size}^{order + 1} x {n_classes} counts is too many")
        self.order, self.vocab_size, self.n_classes, self.alpha = order, vocab_size, n_classes, alpha
        self.counts = np.zeros((n_classes, vocab_size ** order, vocab_size), dtype=np.float64)

    def _codes(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """seqs [N, W] -> (context codes [N, W - k], next tokens [N, W - k])."""
        k, V, W = self.order, self.vocab_size, seqs.shape[1]
        if W <= k:
            raise ValueError(f"sequences must be longer than order={k}, got length {W}")
        if seqs.size and (seqs.min() < 0 or seqs.max() >= V):
            raise ValueError(f"tokens must lie in [0, vocab_size={V})")
        ctx = np.zeros((seqs.shape[0], W - k), dtype=np.int64)
        for j in range(k):
            ctx = ctx * V + seqs[:, j:W - k + j]
        return ctx, seqs[:, k:].astype(np.int64)

    def fit(self, sequences: Iterable[np.ndarray | Tensor], labels: Iterable[int] | None = None) -> "MarkovChain":
        """Add the transitions of each sequence [W] (or of each row of a [N, W] batch) to the
        counts of its class (labels; None means class 0). Calls accumulate."""
        seqs = list(sequences)
        labs = [0] * len(seqs) if labels is None else [int(c) for c in labels]
        if len(labs) != len(seqs):
            raise ValueError(f"labels has {len(labs)} entries for {len(seqs)} sequences")
        if any(not 0 <= c < self.n_classes for c in labs):
            raise ValueError(f"labels must lie in [0, n_classes={self.n_classes})")
        V = self.vocab_size
        for s, c in zip(seqs, labs):
            ctx, nxt = self._codes(np.asarray(s, dtype=np.int64).reshape(1, -1))
            self.counts[c] += np.bincount((ctx * V + nxt).ravel(), minlength=self.counts[c].size
                                          ).reshape(self.counts[c].shape)
        return self

    def _log_table(self) -> np.ndarray:
        c = self.counts + self.alpha
        return np.log(c) - np.log(c.sum(-1, keepdims=True))               # [K, V^k, V]

    def log_probs(self, seqs: np.ndarray | Tensor, cls: int = 0) -> np.ndarray:
        """Natural-log probability of every token after the first k: [N, W] -> [N, W - k]."""
        ctx, nxt = self._codes(np.atleast_2d(np.asarray(seqs, dtype=np.int64)))
        return self._log_table()[cls][ctx, nxt]

    def mean_nll(self, seqs: np.ndarray | Tensor, cls: int = 0) -> float:
        """Mean negative log-likelihood in nats per predicted token (bits: / ln 2)."""
        return float(-self.log_probs(seqs, cls).mean())

    def class_log_likelihood(self, seqs: np.ndarray | Tensor) -> np.ndarray:
        """Total log-likelihood of each sequence under each class: [N, W] -> [N, K]."""
        ctx, nxt = self._codes(np.atleast_2d(np.asarray(seqs, dtype=np.int64)))
        table = self._log_table()
        return np.stack([table[c][ctx, nxt].sum(-1) for c in range(self.n_classes)], axis=-1)
