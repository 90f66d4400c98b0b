"""Tokenizers: byte round trip, BPE train/save/load, loading by name or path, bad input."""

from __future__ import annotations

import pytest

from titans.data.tokenizer import (EOS_TOKEN, BPETokenizer, ByteTokenizer, Tokenizer,
                                   load_tokenizer)

TEXT = "Héllo wörld — 日本語 🙂\nnew line\ttab"
CORPUS = ["the cat sat on the mat. " * 20, "the dog sat on the log! " * 20,
          "a cat and a dog met on the mat " * 20]


def test_byte_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert len(ids) > len(TEXT)  # the non-ASCII characters take several bytes
    assert tok.decode(ids) == TEXT
    assert (tok.vocab_size, tok.eos_id, tok.name) == (256, None, "byte")
    assert isinstance(tok, Tokenizer)
    # a multi-byte character cut in half decodes to U+FFFD instead of failing
    assert tok.decode(list("é".encode())[:1] + [65]) == "\ufffdA"
    with pytest.raises(ValueError, match="ids must be byte values"):
        tok.decode([65, 256])
    with pytest.raises(ValueError, match="text must be a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_bpe_train_save_load(tmp_path):
    tok = BPETokenizer.train(CORPUS, vocab_size=300)
    assert isinstance(tok, Tokenizer)
    assert tok.name == "bpe" and tok.eos_id == 0
    assert 257 < tok.vocab_size <= 300
    # merges were learned: the training text takes fewer tokens than bytes
    assert len(tok.encode(CORPUS[0])) < len(CORPUS[0].encode()) / 3
    # exact round trip, also on unseen non-ASCII text
    for s in (CORPUS[1], TEXT, " leading space", ""):
        assert tok.decode(tok.encode(s)) == s
    assert tok.decode([tok.eos_id]) == EOS_TOKEN
    assert tok.encode_batch([TEXT, CORPUS[0]]) == [tok.encode(TEXT), tok.encode(CORPUS[0])]

    path = tok.save(tmp_path / "model")
    assert path == tmp_path / "model" / "tokenizer.json"
    for source in (tmp_path / "model", path, str(path)):
        again = load_tokenizer(source)
        assert isinstance(again, BPETokenizer)
        assert (again.name, again.vocab_size, again.eos_id) == ("bpe", tok.vocab_size, 0)
        assert again.encode(TEXT + CORPUS[2]) == tok.encode(TEXT + CORPUS[2])


def test_foreign_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    hf = HFTokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hello": 2, "world": 3},
                                      unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert (tok.name, tok.vocab_size, tok.eos_id) == ("wordlevel", 4, 1)
    assert tok.encode("hello world") == [2, 3]


def test_load_by_name_and_errors(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    tok = ByteTokenizer()
    assert load_tokenizer(tok) is tok
    assert ByteTokenizer().save(tmp_path) is None and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="path_or_name must be 'byte'.*'gpt2'"):
        load_tokenizer("gpt2")
    with pytest.raises(ValueError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="path_or_name must be 'byte' or a path"):
        load_tokenizer(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 257"):
        BPETokenizer.train(CORPUS, vocab_size=256)
