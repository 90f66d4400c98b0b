"""Tokenizers: raw UTF-8 bytes, or a byte-level BPE trained on the corpus.

Both follow one small protocol (`Tokenizer`): `encode(str) -> list[int]`,
`decode(list[int]) -> str`, `vocab_size`, `eos_id` (or None), `name` and `save(dir)`.

- `ByteTokenizer`: ids are the UTF-8 bytes of the text (vocab 256, no special tokens). The
  default for tiny CPU models: nothing to train and nothing to save.
- `BPETokenizer`: a `tokenizers` (Hugging Face) tokenizer kept in a `tokenizer.json`. Our own
  is a byte-level BPE with one special token, `<|endoftext|>` (id 0), trained with
  `BPETokenizer.train`; any other local `tokenizer.json` loads too (`load_tokenizer`).

The `tokenizers` package is imported only when a BPE tokenizer is built or loaded, so the
byte tokenizer works without it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

__all__ = ["Tokenizer", "ByteTokenizer", "BPETokenizer", "load_tokenizer", "tokenizer_fingerprint",
           "EOS_TOKEN", "TOKENIZER_FILE"]

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
# End-of-text tokens of common tokenizer.json files (GPT-2, Llama 3, Llama/T5, Gemma), tried in
# order when a foreign tokenizer is loaded.
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, trainer and generator need from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        """The ids of `text` (no special tokens added)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; inverse of `encode` on its outputs."""
        ...

    def save(self, directory: str | os.PathLike) -> Path | None:
        """Write what is needed to load this tokenizer again into `directory`; the path or None."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no training, no special tokens (eos_id is None).

    Decoding a cut-off multi-byte character gives U+FFFD (errors="replace") instead of failing,
    which matters when a model samples arbitrary byte sequences.
    """

    name = "byte"
    vocab_size = 256
    eos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        try:
            data = bytes(int(i) for i in ids)
        except ValueError as e:  # an id outside 0..255
            raise ValueError(f"ids must be byte values in [0, 256): {e}") from None
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        """Nothing to save: the name "byte" is enough to load it again (`load_tokenizer("byte")`)."""
        return None

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class BPETokenizer:
    """A tokenizer kept in a Hugging Face `tokenizer.json` (our byte-level BPE or any other).

    Args:
        tokenizer: a `tokenizers.Tokenizer`.
        name: the name recorded in meta.json and checkpoints; defaults to "bpe" for BPE models
            and the lower-cased model type (e.g. "wordpiece") otherwise.
    """

    def __init__(self, tokenizer: Any, name: str | None = None) -> None:
        self._tok = tokenizer
        if name is None:
            model_type = type(tokenizer.model).__name__.lower()
            name = "bpe" if model_type == "bpe" else model_type
        self.name = name
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id: int | None = next(
            (i for i in (tokenizer.token_to_id(t) for t in _EOS_CANDIDATES) if i is not None), None)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, *, min_frequency: int = 2
              ) -> "BPETokenizer":
        """Train a byte-level BPE on `texts` (an iterable of documents).

        The vocabulary holds `<|endoftext|>` (id 0), the 256 byte symbols and up to
        `vocab_size - 257` merges (fewer if the corpus runs out of pairs seen `min_frequency`
        times). No normaliser and no prefix space, so `decode(encode(s)) == s` for any string.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(f"vocab_size must be an integer >= 257 (256 bytes + end-of-text), "
                             f"got {vocab_size!r}")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be an integer >= 1, got {min_frequency!r}")
        tk = _import_tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, name="bpe")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "BPETokenizer":
        """Load a `tokenizer.json` file."""
        tk = _import_tokenizers()
        try:
            tok = tk.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"path {str(path)!r} is not a valid tokenizer.json: {e}") from None
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts (the Rust side runs them in parallel)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `<directory>/tokenizer.json` (the directory is created if needed)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / TOKENIZER_FILE
        self._tok.save(str(path))
        return path

    def __repr__(self) -> str:
        return f"BPETokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(path_or_name: str | os.PathLike | Tokenizer) -> Tokenizer:
    """A tokenizer from "byte", a tokenizer.json file, or a directory that holds one.

    A Tokenizer instance is returned as is, so callers can accept either.
    """
    if not isinstance(path_or_name, (str, os.PathLike)):
        if isinstance(path_or_name, Tokenizer):
            return path_or_name
        raise ValueError(f"path_or_name must be 'byte' or a path, got {type(path_or_name).__name__}")
    if isinstance(path_or_name, str) and path_or_name == "byte":
        return ByteTokenizer()
    path = Path(path_or_name)
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise ValueError(f"path_or_name: directory {str(path)!r} holds no {TOKENIZER_FILE}")
        path = path / TOKENIZER_FILE
    elif not path.is_file():
        raise ValueError(f"path_or_name must be 'byte', a {TOKENIZER_FILE} file or a directory "
                         f"holding one; {str(path_or_name)!r} is none of these")
    return BPETokenizer.from_file(path)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """What identifies a tokenizer's mapping from text to ids: "byte", or the sha256 of a
    tokenizer.json's canonical form (two BPEs trained on different text differ even though
    both are named "bpe"). Stored with prepared data and with every checkpoint; the
    evaluations refuse data whose fingerprint is not the run's."""
    inner = getattr(tokenizer, "_tok", None)
    if inner is None:
        return tokenizer.name
    return "sha256:" + hashlib.sha256(inner.to_str().encode("utf-8")).hexdigest()[:16]


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ImportError("BPE tokenizers need the `tokenizers` package: pip install tokenizers"
                          ) from None
    return tokenizers
