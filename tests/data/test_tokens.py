"""Token files: prepare writes exactly the tokenized documents; readers; the batch sampler's
determinism and exact resume; the validation windows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from titans.data.corpus import Document, split_documents
from titans.data.tokenizer import ByteTokenizer
from titans.data.tokens import EvalWindows, TokenBatches, TokenFile, prepare, token_dtype

DOCS = [Document(f"wiki/article {i}", f"Article {i}: the cat sat on the mat, ünï {i}. " * (1 + i % 3))
        for i in range(12)] + [Document("shakespeare/play", "To be, or not to be.\nThat is the question.")]


def expected(docs, encode, sep):
    return np.array([t for d in docs for t in encode(d.text) + sep], dtype=np.int64)


def test_prepare_bytes(tmp_path):
    meta = prepare(tmp_path / "out", DOCS, val_fraction=0.3, seed=1)
    train, val = split_documents(DOCS, 0.3, seed=1)
    assert train and val
    enc = ByteTokenizer().encode
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk == meta
    assert (meta["tokenizer"], meta["vocab_size"], meta["eos_id"], meta["dtype"]) == \
        ("byte", 256, None, "uint16")
    assert meta["separator"] == [10] and meta["tokenizer_file"] is None
    assert meta["sources"] == ["wiki", "shakespeare"]
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    prepare(tmp_path / "bpe", DOCS, tokenizer="bpe", vocab_size=280)
    prepare(tmp_path / "bpe", DOCS)  # re-prepared with bytes: the old tokenizer.json goes
    assert not (tmp_path / "bpe" / "tokenizer.json").exists()
    for split, docs in (("train", train), ("val", val)):
        want = expected(docs, enc, [10])
        tf = TokenFile(tmp_path / "out", split=split)
        assert tf.tokens.dtype == np.uint16 and isinstance(tf.tokens, np.memmap)
        np.testing.assert_array_equal(tf.tokens, want)
        m = meta["splits"][split]
        assert m["names"] == [d.name for d in docs] and m["documents"] == len(docs)
        assert m["tokens"] == len(want) and m["characters"] == sum(len(d.text) for d in docs)
        # the same file read raw: dtype from the meta.json beside it, or given
        np.testing.assert_array_equal(TokenFile(tmp_path / "out" / f"{split}.bin").tokens, want)
        raw = tmp_path / f"{split}.bin"
        raw.write_bytes((tmp_path / "out" / f"{split}.bin").read_bytes())
        np.testing.assert_array_equal(TokenFile(raw, dtype="uint16").tokens, want)
    assert isinstance(TokenFile(tmp_path / "out").tokenizer(), ByteTokenizer)


def test_prepare_bpe_trained_on_train_only(tmp_path):
    held_out = Document("wiki/zz held out", "qzxv qzxv qzxv " * 200)
    docs = DOCS + [held_out]
    # a split seed that puts the held-out document in validation
    seed = next(s for s in range(100) if held_out in split_documents(docs, 0.3, seed=s)[1])
    train, val = split_documents(docs, 0.3, seed=seed)
    meta = prepare(tmp_path, docs, tokenizer="bpe", vocab_size=300, val_fraction=0.3, seed=seed)
    tok = TokenFile(tmp_path).tokenizer()
    assert (meta["tokenizer"], meta["tokenizer_file"], meta["eos_id"]) == ("bpe", "tokenizer.json", 0)
    assert meta["vocab_size"] == tok.vocab_size and meta["separator"] == [0]
    for split, ds in (("train", train), ("val", val)):
        np.testing.assert_array_equal(TokenFile(tmp_path, split).tokens,
                                      expected(ds, tok.encode, [0]))
    # the validation-only word shaped no merge: it still costs one token per byte
    assert len(tok.encode(" qzxv")) == 5
    assert len(tok.encode(" the cat sat")) < 6


def test_prepare_from_text_and_tokenizer_file(tmp_path):
    (tmp_path / "a.txt").write_text("one document")
    (tmp_path / "b.txt").write_text("another document")
    prepare(tmp_path / "bpe", DOCS, tokenizer="bpe", vocab_size=280)
    meta = prepare(tmp_path / "out", text=tmp_path, tokenizer=tmp_path / "bpe" / "tokenizer.json",
                   val_fraction=0.5)
    assert meta["sources"] == ["text"] and meta["tokenizer"] == "bpe"
    assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 1
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_prepare_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer must be 'byte', 'bpe'.*'gpt2'"):
        prepare(tmp_path, DOCS, tokenizer="gpt2")
    with pytest.raises(ValueError, match="documents: the corpus is empty"):
        prepare(tmp_path, [])
    with pytest.raises(ValueError, match="vocab_size"):
        prepare(tmp_path, DOCS, tokenizer="bpe", vocab_size=100)
    with pytest.raises(ValueError, match="text path .* does not exist"):
        prepare(tmp_path, text=tmp_path / "nope")


def test_a_split_left_empty_is_an_error_that_says_how_to_fix_it(tmp_path):
    with pytest.raises(ValueError, match="validation split is empty.*split_paragraphs=True"):
        prepare(tmp_path, DOCS[:1])
    meta = prepare(tmp_path, DOCS[:1], val_fraction=0.0)  # no validation asked for: allowed
    assert meta["splits"]["val"]["tokens"] == 0
    with pytest.raises(ValueError, match="at least 2 tokens"):
        EvalWindows(TokenFile(tmp_path, "val"), seq_len=4)


def test_token_file_inputs(tmp_path):
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    arr = np.arange(70000, 70010, dtype=np.int32)
    np.save(tmp_path / "t.npy", arr)
    np.testing.assert_array_equal(TokenFile(tmp_path / "t.npy").tokens, arr)
    np.save(tmp_path / "2d.npy", arr.reshape(2, 5))
    with pytest.raises(ValueError, match="1-d integer array"):
        TokenFile(tmp_path / "2d.npy")
    (tmp_path / "raw.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match="dtype is needed"):
        TokenFile(tmp_path / "raw.bin")
    with pytest.raises(ValueError, match="not a multiple"):
        TokenFile(tmp_path / "raw.bin", dtype="uint16")
    with pytest.raises(ValueError, match="dtype must be an integer"):
        TokenFile(tmp_path / "raw.bin", dtype="float32")
    with pytest.raises(ValueError, match="does not exist"):
        TokenFile(tmp_path / "missing.bin", dtype="uint16")
    with pytest.raises(ValueError, match="holds no meta.json"):
        TokenFile(tmp_path)
    with pytest.raises(ValueError, match="no meta.json naming its tokenizer"):
        TokenFile(tmp_path / "t.npy").tokenizer()


def test_batches_windows_and_determinism():
    tokens = np.arange(50, dtype=np.uint16)
    sampler = TokenBatches(tokens, batch_size=4, seq_len=7, seed=3)
    last = 0
    for _ in range(200):
        x, y = next(sampler)
        assert x.shape == y.shape == (4, 7) and x.dtype == y.dtype == torch.int64
        # each row is a contiguous window of the file, targets shifted by one
        torch.testing.assert_close(x, x[:, :1] + torch.arange(7))
        torch.testing.assert_close(y, x + 1)
        last = max(last, int(y.max()))
    assert last == 49  # windows reach the last token, never beyond
    a = [next(TokenBatches(tokens, 4, 7, seed=3)) for _ in range(1)]
    b = TokenBatches(tokens, 4, 7, seed=3).batch(0)
    torch.testing.assert_close(a[0], b)
    c = TokenBatches(tokens, 4, 7, seed=4).batch(0)
    assert not torch.equal(a[0][0], c[0])


def test_batches_exact_resume(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 256, size=1000).astype(np.uint16)
    run = TokenBatches(tokens, batch_size=3, seq_len=16, seed=7)
    for _ in range(5):
        next(run)
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint file
    rest = [next(run) for _ in range(3)]
    resumed = TokenBatches(tokens, batch_size=3, seq_len=16, seed=7)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(rest, (next(resumed) for _ in range(3))):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other = TokenBatches(tokens, batch_size=2, seq_len=16, seed=7)
    with pytest.raises(ValueError, match="state_dict batch_size is 3"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len 16 needs at least 17 tokens"):
        TokenBatches(tokens[:16], batch_size=1, seq_len=16)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        TokenBatches(tokens, batch_size=0, seq_len=4)


def test_eval_windows():
    tokens = np.arange(11, dtype=np.uint16)
    ev = EvalWindows(tokens, seq_len=3, batch_size=2)
    batches = list(ev)
    assert (len(ev), len(batches), ev.num_targets) == (3, 3, 10)
    assert batches[0][0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert batches[0][1].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batches[1][0].tolist() == [[6, 7, 8]] and batches[2][0].tolist() == [[9]]
    # every token but the first is a target exactly once, in order
    assert torch.cat([y.flatten() for _, y in batches]).tolist() == list(range(1, 11))
    dropped = EvalWindows(tokens, 3, 2, drop_last=True)
    assert (len(dropped), dropped.num_targets) == (2, 9)
    short = list(EvalWindows(tokens, 3, 2, max_windows=1))
    assert len(short) == 1 and short[0][1].tolist() == [[1, 2, 3]]
