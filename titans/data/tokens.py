"""Token files on disk, and the batches a trainer and an evaluator read from them.

Shape legend
    N tokens in a file, B batch size, T sequence length
    TokenBatches / EvalWindows yield (inputs, targets): LongTensor [B, T] each, targets
    shifted by one token (targets[:, t] == inputs[:, t + 1] inside a window)

A prepared directory (`prepare`) holds

    train.bin, val.bin   the token ids of each split, flat, native little-endian, dtype from
                         meta.json (uint16 when the vocabulary has <= 65536 ids, else uint32);
                         every document is followed by a separator: the tokenizer's
                         end-of-text id, or the encoding of "\\n" when it has none (bytes)
    meta.json            tokenizer name/file, vocab size, eos id, dtype, separator, sources,
                         split rule, and per split: file, token/document/character counts and
                         the document names
    tokenizer.json       the tokenizer, for every tokenizer but "byte"
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .corpus import Document, load_documents, split_documents
from .tokenizer import TOKENIZER_FILE, BPETokenizer, Tokenizer, load_tokenizer, tokenizer_fingerprint

__all__ = ["prepare", "TokenFile", "StepBatches", "TokenBatches", "StreamBatches", "EvalWindows", "META_FILE", "token_dtype",
           "document_separator"]

META_FILE = "meta.json"
FORMAT = "titans-tokens/1"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size - 1) fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare(out_dir: str | os.PathLike, documents: Sequence[Document] | None = None, *,
            sources: str | Sequence[str] | None = None,
            text: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
            data_dir: str | os.PathLike | None = None,
            tokenizer: str | os.PathLike | Tokenizer = "byte", vocab_size: int = 4096,
            val_fraction: float = 0.1, seed: int = 0, split_paragraphs: bool = False,
            progress: Callable[[int], None] | None = None) -> dict:
    """Split, tokenize and write a corpus to `out_dir` (train.bin, val.bin, meta.json).

    Args:
        out_dir: the directory to write (created; files in it are replaced).
        documents: the documents; None loads them with
            `load_documents(sources, text, data_dir)`.
        tokenizer: "byte"; "bpe" to train a byte-level BPE of `vocab_size` on the TRAIN split
            only (so validation text never shapes the vocabulary); a tokenizer.json path or a
            directory holding one; or a Tokenizer.
        vocab_size: the BPE vocabulary size (only with tokenizer="bpe").
        val_fraction, seed: the document split (`split_documents`).
        split_paragraphs: local text files give one document per paragraph (`load_documents`).
        progress: called with the number of documents just written (e.g. a tqdm bar's update).

    Raises ValueError when a split would be empty (e.g. one text file is one document: all of
    it goes to one side).

    Returns:
        The meta dict, also written to `<out_dir>/meta.json`.
    """
    if documents is None:
        documents = load_documents(sources, text, data_dir, split_paragraphs=split_paragraphs)
    elif not documents:
        raise ValueError("documents: the corpus is empty")
    train, val = split_documents(documents, val_fraction, seed)
    for side, docs in (("training", train), ("validation", val)):
        if not docs and (side == "training" or val_fraction > 0):
            raise ValueError(f"the {side} split is empty: the corpus has {len(documents)} document(s) and "
                             f"whole documents go to one side; give more text files, or cut each file "
                             f"into documents at its blank lines (split_paragraphs=True; "
                             f"`titans data prepare --split-paragraphs`)")
    if isinstance(tokenizer, str) and tokenizer == "bpe":
        tok: Tokenizer = BPETokenizer.train((d.text for d in train), vocab_size)
    else:
        try:
            tok = load_tokenizer(tokenizer)
        except ValueError as e:
            raise ValueError(f"tokenizer must be 'byte', 'bpe', a tokenizer.json path or a "
                             f"directory holding one, or a Tokenizer ({e})") from None
    dtype = token_dtype(tok.vocab_size)
    sep = document_separator(tok)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, docs in (("train", train), ("val", val)):
        starts = _write_tokens(out / f"{split}.bin", docs, tok, sep, dtype, progress)
        n = starts[-1]
        splits[split] = {"file": f"{split}.bin", "tokens": n, "documents": len(docs),
                         "characters": sum(len(d.text) for d in docs),
                         "names": [d.name for d in docs],
                         "starts": starts[:-1]}   # each document's first token (eval ppl --by-position)
    tok_file = tok.save(out)
    if tok_file is None:  # a tokenizer.json left by an earlier run would contradict meta.json
        (out / TOKENIZER_FILE).unlink(missing_ok=True)
    meta = {
        "format": FORMAT,
        "tokenizer": tok.name,
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "tokenizer_file": TOKENIZER_FILE if tok_file is not None else None,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype.name,
        "separator": [int(i) for i in sep],
        "sources": list(dict.fromkeys(d.name.split("/", 1)[0] for d in documents)),
        "split": {"rule": "sha256(f'{seed}:{name}') / 2**64 < val_fraction, per source at "
                          "least one document in each split", "val_fraction": val_fraction,
                  "seed": seed},
        "splits": splits,
    }
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / META_FILE)
    return meta


def document_separator(tokenizer: Tokenizer) -> list[int]:
    """The ids written after every document of a prepared corpus: the end-of-text token, or
    "\n" for a tokenizer without one (the byte tokenizer). A model trained on the corpus saw
    it before every document, so it is also the prefix of a text scored on its own."""
    return [tokenizer.eos_id] if tokenizer.eos_id is not None else tokenizer.encode("\n")


def _write_tokens(path: Path, docs: Sequence[Document], tok: Tokenizer, sep: list[int],
                  dtype: np.dtype, progress: Callable[[int], None] | None = None) -> list[int]:
    """Write every document's ids followed by `sep`; where each document starts, and the number of
    tokens written as the last entry."""
    tmp = path.with_name(path.name + ".tmp")
    n, starts = 0, []
    batch = getattr(tok, "encode_batch", None)
    with open(tmp, "wb") as f:
        for i in range(0, len(docs), 256):
            texts = [d.text for d in docs[i:i + 256]]
            for ids in (batch(texts) if batch is not None else [tok.encode(t) for t in texts]):
                a = np.asarray(list(ids) + sep, dtype=np.int64)
                if a.size and (a.min() < 0 or a.max() >= tok.vocab_size):
                    raise ValueError(f"tokenizer {tok.name!r} gave an id outside [0, {tok.vocab_size})")
                a.astype(dtype.newbyteorder("<")).tofile(f)
                starts.append(n)
                n += a.size
            if progress is not None:
                progress(len(texts))
    os.replace(tmp, path)
    return starts + [n]


class TokenFile:
    """A read-only, memory-mapped 1-d array of token ids.

    Args:
        path: a prepared directory (or its meta.json), a .npy file (1-d integer array), or a
            raw .bin file. A .bin inside a prepared directory takes its dtype from meta.json;
            any other raw file needs `dtype`.
        split: which split of a prepared directory ("train" or "val").
        dtype: the integer dtype of a raw file (e.g. "uint16").

    Attributes:
        tokens: the ids, np.ndarray [N] (a memmap). path: the file read.
        meta: the meta.json dict, or None for a bare file.
        vocab_size: from meta.json, or None for a bare file.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train",
                 dtype: str | np.dtype | None = None) -> None:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"path {str(p)!r} does not exist")
        self.meta: dict | None = None
        if p.is_dir() or p.name == META_FILE:
            root = p if p.is_dir() else p.parent
            self.meta = _read_meta(root)
            if split not in self.meta["splits"]:
                raise ValueError(f"split must be one of {sorted(self.meta['splits'])}, got {split!r}")
            p = root / self.meta["splits"][split]["file"]
            dtype = self.meta["dtype"]
        elif p.suffix == ".npy":
            arr = np.load(p, mmap_mode="r")
            if arr.ndim != 1 or arr.dtype.kind not in "ui":
                raise ValueError(f"path: {str(p)!r} must hold a 1-d integer array, got "
                                 f"{arr.ndim}-d {arr.dtype}")
            self.path, self.tokens = p, arr
            self.vocab_size: int | None = None
            return
        elif dtype is None and (p.parent / META_FILE).is_file():
            meta = _read_meta(p.parent)
            if any(s["file"] == p.name for s in meta["splits"].values()):
                self.meta, dtype = meta, meta["dtype"]
        if dtype is None:
            raise ValueError(f"dtype is needed to read the raw token file {str(p)!r} "
                             f"(e.g. dtype='uint16')")
        dt = np.dtype(dtype)
        if dt.kind not in "ui":
            raise ValueError(f"dtype must be an integer dtype, got {dt}")
        dt = dt.newbyteorder("<")
        size = p.stat().st_size
        if size % dt.itemsize:
            raise ValueError(f"path: {str(p)!r} has {size} bytes, not a multiple of the "
                             f"{dt} item size {dt.itemsize}")
        # np.memmap refuses empty files; an empty split is still a valid (empty) array
        self.tokens = np.memmap(p, dtype=dt, mode="r") if size else np.zeros(0, dt)
        self.path = p
        self.vocab_size = self.meta["vocab_size"] if self.meta is not None else None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def tokenizer(self) -> Tokenizer:
        """The tokenizer recorded in meta.json (only for prepared directories)."""
        if self.meta is None:
            raise ValueError(f"path {str(self.path)!r} has no meta.json naming its tokenizer")
        if self.meta.get("tokenizer_file"):
            return load_tokenizer(self.path.parent / self.meta["tokenizer_file"])
        return load_tokenizer(self.meta["tokenizer"])

    def documents(self) -> list[tuple[str, int, int]]:
        """(name, start, end) of every document in this split of a prepared directory: tokens
        [start, end) are its ids and the separator after them."""
        info = next((s for s in (self.meta or {}).get("splits", {}).values() if s["file"] == self.path.name), None)
        if info is None:
            raise ValueError(f"path {str(self.path)!r} is not a split of a prepared directory: it has no documents")
        if "starts" not in info:
            raise ValueError(f"{str(self.path.parent)!r} was prepared before documents were recorded: run "
                             f"`titans data prepare` again")
        ends = info["starts"][1:] + [len(self)]
        return list(zip(info["names"], info["starts"], ends))

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, tokens={len(self)}, dtype={self.tokens.dtype})"


def _read_meta(root: Path) -> dict:
    f = root / META_FILE
    if not f.is_file():
        raise ValueError(f"path: {str(root)!r} holds no {META_FILE} (not a prepared directory)")
    meta = json.loads(f.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {str(f)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _as_tokens(tokens: TokenFile | np.ndarray | str | os.PathLike) -> np.ndarray:
    if isinstance(tokens, TokenFile):
        return tokens.tokens
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
            raise ValueError(f"token_file must be a 1-d integer array, got {tokens.ndim}-d {tokens.dtype}")
        return tokens
    if isinstance(tokens, (str, os.PathLike)):
        return TokenFile(tokens).tokens
    raise ValueError(f"token_file must be a TokenFile, a path or a 1-d array, got {type(tokens).__name__}")


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> tuple[Tensor, Tensor]:
    idx = starts[:, None] + np.arange(length + 1)
    w = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return w[:, :-1], w[:, 1:]


class StepBatches:
    """An endless batch iterator whose batch number s is `batch(s)`, a function of s alone, so
    a run resumes by restoring `step`. Subclasses define `batch` and their state checks."""

    step: int = 0

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __iter__(self) -> "StepBatches":
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        out = self.batch(self.step)
        self.step += 1
        return out


class TokenBatches(StepBatches):
    """Random training windows, reproducible and resumable to the exact batch.

    Batch number s draws its B window starts uniformly from [0, N - T - 1] with a generator
    seeded by (seed, s) alone, so the sequence of batches is a function of (seed, N, B, T)
    and resuming only needs the step: `state_dict()` / `load_state_dict()`.

    Args:
        token_file: a TokenFile, a path TokenFile accepts, or a 1-d integer array [N].
        batch_size: B.  seq_len: T (the file needs N >= T + 1 tokens).  seed: >= 0.

    Yields:
        (inputs, targets): LongTensor [B, T] each, targets = inputs shifted by one token.
    """

    def __init__(self, token_file: TokenFile | np.ndarray | str | os.PathLike, batch_size: int,
                 seq_len: int, seed: int = 0) -> None:
        self.tokens = _as_tokens(token_file)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.seed = _check_int("seed", seed, 0)
        if len(self.tokens) < self.seq_len + 1:
            raise ValueError(f"seq_len {seq_len} needs at least {seq_len + 1} tokens, the file "
                             f"has {len(self.tokens)}")
        self.step = 0

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The batch number `step` (does not move the position)."""
        rng = np.random.default_rng([self.seed, _check_int("step", step, 0)])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        return _windows(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict:
        """The position, plus what must match for the same batches to follow."""
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "num_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`; the next batch is the one the saved run would see."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "seq_len", "num_tokens"):
            if key not in state or state[key] != mine[key]:
                raise ValueError(f"state_dict {key} is {state.get(key)!r} but this sampler has "
                                 f"{mine[key]!r}: the batches would differ")
        self.step = _check_int("state_dict step", state.get("step"), 0)


class StreamBatches(StepBatches):
    """Training windows read along contiguous streams, for truncated backpropagation through time
    (TrainConfig.carry_state): row r of a batch continues row r of the previous one.

    Each row follows a stream of `windows` consecutive windows (windows * seq_len tokens from a
    random start), then all rows jump to new random starts together, the step at which the trainer
    starts them from an empty state again. With `micro_batches` micro-batches per optimizer step,
    micro-batch m continues micro-batch m of the previous step. Streams run across document
    boundaries: the corpus's separator marks them, as at inference over a long input.

    Batch number s is a function of (seed, s) alone: micro-batch m = s % micro_batches of step
    k = s // micro_batches is window k % windows of stream k // windows, whose B starts come from
    a generator seeded by (seed, k // windows, m).

    Args:
        token_file: a TokenFile, a path TokenFile accepts, or a 1-d integer array [N].
        batch_size: B.  seq_len: T.  windows: K >= 1 (the file needs N >= K T + 1 tokens).
        seed: >= 0.  micro_batches: the trainer's grad_accum.
    """

    def __init__(self, token_file: TokenFile | np.ndarray | str | os.PathLike, batch_size: int, seq_len: int,
                 windows: int, seed: int = 0, micro_batches: int = 1) -> None:
        self.tokens = _as_tokens(token_file)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.windows = _check_int("windows", windows, 1)
        self.seed = _check_int("seed", seed, 0)
        self.micro_batches = _check_int("micro_batches", micro_batches, 1)
        if len(self.tokens) < self.windows * self.seq_len + 1:
            raise ValueError(f"streams of {windows} windows of {seq_len} tokens need at least "
                             f"{self.windows * self.seq_len + 1} tokens, the file has {len(self.tokens)}")
        self.step = 0

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The batch number `step` (does not move the position)."""
        k, m = divmod(_check_int("step", step, 0), self.micro_batches)
        stream, j = divmod(k, self.windows)
        rng = np.random.default_rng([self.seed, stream, m])
        starts = rng.integers(0, len(self.tokens) - self.windows * self.seq_len, size=self.batch_size)
        return _windows(self.tokens, starts + j * self.seq_len, self.seq_len)

    def state_dict(self) -> dict:
        """The position, plus what must match for the same batches to follow."""
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "windows": self.windows, "micro_batches": self.micro_batches, "num_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`; the next batch is the one the saved run would see."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "seq_len", "windows", "micro_batches", "num_tokens"):
            if key not in state or state[key] != mine[key]:
                raise ValueError(f"state_dict {key} is {state.get(key)!r} but this sampler has "
                                 f"{mine[key]!r}: the batches would differ")
        self.step = _check_int("state_dict step", state.get("step"), 0)


class EvalWindows:
    """Consecutive non-overlapping windows over a file, for perplexity.

    Window i has inputs tokens[iT : iT + T] and targets tokens[iT + 1 : iT + T + 1], so every
    token but the first is a target exactly once. Full windows come in batches of up to B;
    the leftover r < T targets come last as one [1, r] batch unless `drop_last`.

    Args:
        token_file: a TokenFile, a path TokenFile accepts, or a 1-d integer array [N >= 2].
        seq_len: T.  batch_size: B.
        max_windows: use only the first this many full windows (and no leftover).
        drop_last: skip the leftover shorter window.
    """

    def __init__(self, token_file: TokenFile | np.ndarray | str | os.PathLike, seq_len: int,
                 batch_size: int = 1, *, max_windows: int | None = None,
                 drop_last: bool = False) -> None:
        self.tokens = _as_tokens(token_file)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if len(self.tokens) < 2:
            raise ValueError(f"token_file needs at least 2 tokens to score one, has {len(self.tokens)}")
        targets = len(self.tokens) - 1
        self.num_windows = targets // self.seq_len
        self.remainder = 0 if drop_last else targets - self.num_windows * self.seq_len
        if max_windows is not None and _check_int("max_windows", max_windows, 1) < self.num_windows:
            self.num_windows, self.remainder = max_windows, 0

    @property
    def num_targets(self) -> int:
        """How many tokens are scored in one pass."""
        return self.num_windows * self.seq_len + self.remainder

    def __len__(self) -> int:
        return math.ceil(self.num_windows / self.batch_size) + (1 if self.remainder else 0)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        T = self.seq_len
        for i in range(0, self.num_windows, self.batch_size):
            starts = np.arange(i, min(i + self.batch_size, self.num_windows)) * T
            yield _windows(self.tokens, starts, T)
        if self.remainder:
            yield _windows(self.tokens, np.array([self.num_windows * T]), self.remainder)
