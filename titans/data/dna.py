"""DNA data (paper section 5.7): nucleotide tokenizer, tasks and genome windows (FASTA files: fasta.py).

Two tasks are built from nucleotide sequences:
- next-base language modelling: DNALMWindows cuts tokenized chromosomes into (x, y) pairs;
- sequence classification: a species task sampled from whole genomes (build_window_task,
  strains held out for test) or the user's labelled files (load_labeled_dir, which also
  reads the GenomicBenchmarks layout `<root>/{train,test}/<class>/*.txt`).

Shape legend
    N examples, W window / sequence length (bases)
    DNAClassificationSet: tokens [N, W] int64, labels [N] int64
    DNALMWindows item: x [W], y [W] int64 (y is x shifted by one base)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

# the FASTA side lives in fasta.py; its names are part of this module's API too
from .fasta import (FastaRecord, FastaSource, fetch_genomes, find_labeled_files, load_labeled_dir,
                    load_labeled_fasta, read_fasta)

__all__ = [
    "DNATokenizer", "FastaRecord", "read_fasta", "FastaSource", "fetch_genomes", "find_labeled_files",
    "load_labeled_fasta", "load_labeled_dir", "split_sources", "DNAClassificationSet",
    "DNAClassificationTask", "build_window_task", "DNALMWindows",
]

BASES = "ACGTN"
# IUPAC ambiguity codes: the base is uncertain, so the token is N.
_AMBIGUOUS = "RYSWKMBDHV"
_BAD = 255


class DNATokenizer:
    """Bases to ids: A=0, C=1, G=2, T=3, N=4, then the optional special tokens in order.

    Lowercase (soft-masked) bases are accepted; IUPAC ambiguity letters (R Y S W K M B D H V)
    become N; U (RNA) becomes T. Any other character raises ValueError. Special tokens
    (e.g. specials=("<pad>", "<cls>")) only exist as ids: the pad token, if any, is `pad_id`.
    """

    def __init__(self, specials: Sequence[str] = ()) -> None:
        specials = tuple(specials)
        if len(set(specials)) != len(specials) or any(len(s) < 2 for s in specials):
            raise ValueError(f"specials must be distinct strings of 2+ characters, got {specials}")
        self.vocab: tuple[str, ...] = tuple(BASES) + specials
        self.lut = np.full(256, _BAD, dtype=np.uint8)
        for i, b in enumerate(BASES):
            self.lut[ord(b)] = self.lut[ord(b.lower())] = i
        for b in _AMBIGUOUS:
            self.lut[ord(b)] = self.lut[ord(b.lower())] = BASES.index("N")
        self.lut[ord("U")] = self.lut[ord("u")] = BASES.index("T")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def pad_id(self) -> int | None:
        return self.vocab.index("<pad>") if "<pad>" in self.vocab else None

    def token_to_id(self, token: str) -> int:
        """Id of a base letter or special token."""
        if token not in self.vocab:
            raise ValueError(f"token {token!r} is not in the vocabulary {self.vocab}")
        return self.vocab.index(token)

    def encode_np(self, seq: str | bytes) -> np.ndarray:
        """seq -> uint8 ids [W] (the compact form used for whole genomes)."""
        raw = seq.encode("ascii", errors="replace") if isinstance(seq, str) else bytes(seq)
        ids = self.lut[np.frombuffer(raw, dtype=np.uint8)]
        bad = np.flatnonzero(ids == _BAD)
        if bad.size:
            p = int(bad[0])
            raise ValueError(f"seq has a non-nucleotide character {raw[p:p + 1]!r} at position {p}")
        return ids

    def encode(self, seq: str | bytes) -> Tensor:
        """seq -> int64 ids [W]."""
        return torch.from_numpy(self.encode_np(seq).astype(np.int64))

    def decode(self, ids: Sequence[int] | Tensor | np.ndarray) -> str:
        """ids -> string; special tokens are written out as their names."""
        ids = ids.tolist() if isinstance(ids, (Tensor, np.ndarray)) else list(ids)
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"ids must lie in [0, {self.vocab_size})")
        return "".join(self.vocab[i] for i in ids)


def split_sources(sources: Sequence[FastaSource], n_test: int = 1, seed: int = 0
                  ) -> tuple[list[FastaSource], list[FastaSource]]:
    """Hold out `n_test` files (strains) per label for test, chosen with a seeded shuffle.

    A label with n_test or fewer files keeps them all in train (and appears in no test
    file): build_window_task then splits its sequences by position instead.
    """
    if n_test < 1:
        raise ValueError(f"n_test must be >= 1, got {n_test}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in sorted({s.label for s in sources}):
        group = sorted((s for s in sources if s.label == label), key=lambda s: str(s.path))
        if len(group) <= n_test:
            train += group
            continue
        order = rng.permutation(len(group))
        test += [group[i] for i in sorted(order[:n_test])]
        train += [group[i] for i in sorted(order[n_test:])]
    return train, test


# --- datasets ------------------------------------------------------------------------------

class DNAClassificationSet(Dataset):
    """Token windows and class ids: item i is (tokens [W] int64, label int64)."""

    def __init__(self, tokens: Tensor, labels: Tensor) -> None:
        if tokens.ndim != 2 or labels.shape != tokens.shape[:1]:
            raise ValueError(f"tokens must be [N, W] and labels [N], got {tuple(tokens.shape)}, "
                             f"{tuple(labels.shape)}")
        self.tokens, self.labels = tokens.long(), labels.long()

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, str]], label_names: Sequence[str],
                   tokenizer: DNATokenizer, length: int | None = None) -> "DNAClassificationSet":
        """Tokenize (sequence, label) pairs. Longer sequences are cut to `length`; shorter
        ones are right-padded with the tokenizer's <pad> (needed when lengths differ)."""
        if not pairs:
            raise ValueError("pairs is empty")
        length = length or max(len(s) for s, _ in pairs)
        pad = tokenizer.pad_id
        tokens = torch.empty(len(pairs), length, dtype=torch.long)
        for i, (seq, _) in enumerate(pairs):
            ids = tokenizer.encode(seq[:length])
            if len(ids) < length and pad is None:
                raise ValueError(f"pairs: sequence {i} is shorter than length={length}; "
                                 "use DNATokenizer(specials=('<pad>',)) or a smaller length")
            tokens[i, :len(ids)] = ids
            tokens[i, len(ids):] = pad if pad is not None else 0
        index = {n: i for i, n in enumerate(label_names)}
        unknown = sorted({lab for _, lab in pairs} - set(index))
        if unknown:
            raise ValueError(f"label_names lacks labels {unknown}")
        return cls(tokens, torch.tensor([index[lab] for _, lab in pairs]))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.tokens[i], self.labels[i]


@dataclass
class DNAClassificationTask:
    """train / val / test sets with balanced classes, label names, and which files fed each split."""

    labels: list[str]
    train: DNAClassificationSet
    val: DNAClassificationSet
    test: DNAClassificationSet
    sources: dict[str, list[str]] = field(default_factory=dict)


def build_window_task(sources: Sequence[FastaSource], window: int = 500, n_train: int = 1000,
                      n_val: int = 200, n_test: int = 500, *, n_test_sources: int = 1,
                      val_fraction: float = 0.1, test_fraction: float = 0.2,
                      max_n_fraction: float = 0.05, seed: int = 0,
                      tokenizer: DNATokenizer | None = None) -> DNAClassificationTask:
    """Species (label) classification of random `window`-base windows of genomes.

    Split: split_sources holds out `n_test_sources` files per label for test. Train and
    val come from the other files: val from the last `val_fraction` of each record, train
    from the rest, so they share no base. A label with too few files for a held-out strain
    is split by position instead: per record, train | val | test regions with fractions
    (1 - val - test, val_fraction, test_fraction). Every label gets exactly n_train, n_val,
    n_test windows (balanced); windows with more than `max_n_fraction` N are redrawn.
    """
    if window < 1 or min(n_train, n_val, n_test) < 1:
        raise ValueError(f"window and n_train/n_val/n_test must be >= 1, got {window}, "
                         f"{n_train}/{n_val}/{n_test}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be in (0, 1) with sum < 1, "
                         f"got {val_fraction}, {test_fraction}")
    tok = tokenizer or DNATokenizer()
    train_src, test_src = split_sources(sources, n_test_sources, seed)
    held = {s.label for s in test_src}
    labels = sorted({s.label for s in sources})
    regions: dict[str, dict[str, list]] = {sp: {lab: [] for lab in labels} for sp in ("train", "val", "test")}
    used: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for src in list(train_src) + list(test_src):
        in_test = src in test_src
        for rec in read_fasta(src.path):
            try:
                ids = tok.encode_np(rec.seq)
            except ValueError as e:  # name the file and record, not only the position
                raise ValueError(f"path {str(src.path)!r}, record {rec.name!r}: {e}") from None
            n = len(ids)
            if in_test:
                cuts = {"test": (0, n)}
            elif src.label in held:
                cuts = {"train": (0, int(n * (1 - val_fraction))), "val": (int(n * (1 - val_fraction)), n)}
            else:
                a, b = int(n * (1 - val_fraction - test_fraction)), int(n * (1 - test_fraction))
                cuts = {"train": (0, a), "val": (a, b), "test": (b, n)}
            for sp, (lo, hi) in cuts.items():
                regions[sp][src.label].append((ids, lo, hi))
                tag = f"{src.label}:{src.strain}" + ("" if (lo, hi) == (0, n) else f"[{lo}:{hi}]")
                used[sp].append(f"{tag} {rec.name}")
    rng = np.random.default_rng(seed)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    sets = {}
    for sp, count in counts.items():
        toks, labs = [], []
        for li, lab in enumerate(labels):
            toks.append(_sample_windows(regions[sp][lab], window, count, max_n_fraction, rng, f"{lab}/{sp}"))
            labs.append(torch.full((count,), li, dtype=torch.long))
        sets[sp] = DNAClassificationSet(torch.cat(toks), torch.cat(labs))
    return DNAClassificationTask(labels, sets["train"], sets["val"], sets["test"], used)


def _sample_windows(regions: list, window: int, count: int, max_n_fraction: float,
                    rng: np.random.Generator, what: str) -> Tensor:
    """`count` windows drawn uniformly over all start positions of all regions."""
    spans = [(ids, lo, hi - window + 1) for ids, lo, hi in regions if hi - lo >= window]
    if not spans:
        raise ValueError(f"window={window}: no sequence of {what} is long enough")
    weights = np.array([hi - lo for _, lo, hi in spans], dtype=np.float64)
    weights /= weights.sum()
    out = np.empty((count, window), dtype=np.uint8)
    got, tries, n_id = 0, 0, BASES.index("N")
    while got < count:
        tries += 1
        if tries > 100 * count + 1000:
            raise ValueError(f"max_n_fraction={max_n_fraction}: too few windows of {what} pass the N filter")
        ids, lo, hi = spans[rng.choice(len(spans), p=weights)]
        s = int(rng.integers(lo, hi))
        w = ids[s:s + window]
        if np.count_nonzero(w == n_id) <= max_n_fraction * window:
            out[got] = w
            got += 1
    return torch.from_numpy(out.astype(np.int64))


class DNALMWindows(Dataset):
    """Next-base language modelling: non-overlapping windows of each sequence (never across
    two), item i = (x [W], y [W]) int64 with y[t] = the base after x[t]."""

    def __init__(self, sequences: Sequence[np.ndarray | Tensor], seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seqs = [torch.as_tensor(np.asarray(s)) for s in sequences]
        self.seq_len = seq_len
        # (sequence, start): a window needs seq_len + 1 tokens (the last target).
        self.index = [(j, st) for j, s in enumerate(self.seqs) for st in range(0, len(s) - seq_len, seq_len)]
        if not self.index:
            raise ValueError(f"seq_len={seq_len}: no sequence has seq_len + 1 tokens")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        j, s = self.index[i]
        chunk = self.seqs[j][s:s + self.seq_len + 1].long()
        return chunk[:-1], chunk[1:]
