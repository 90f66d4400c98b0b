"""DNA data: tokenizer, FASTA parsing, labelled files, the strain-held-out species task, LM windows."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

import titans.data.fasta as fasta
from titans.data.dna import (DNAClassificationSet, DNALMWindows, DNATokenizer, FastaSource,
                             build_window_task, fetch_genomes, find_labeled_files,
                             load_labeled_dir, load_labeled_fasta, read_fasta, split_sources)
from titans.eval.metrics import accuracy


def test_tokenizer_ids_round_trip_and_normalisation():
    tok = DNATokenizer()
    assert tok.encode("ACGTN").tolist() == [0, 1, 2, 3, 4]
    assert tok.encode("acgtn").tolist() == [0, 1, 2, 3, 4]            # soft-masked bases
    assert tok.decode(tok.encode("RYKMacgu")) == "NNNNACGT"            # IUPAC -> N, U -> T
    seq = "GATTACANNCG"
    assert tok.decode(tok.encode(seq)) == seq
    assert tok.encode(b"TTA").dtype == torch.int64
    with pytest.raises(ValueError, match="seq has a non-nucleotide character b'-' at position 2"):
        tok.encode("AC-GT")
    with pytest.raises(ValueError, match="non-nucleotide"):
        tok.encode("ACGé")


def test_tokenizer_specials():
    tok = DNATokenizer(specials=("<pad>", "<cls>"))
    assert tok.vocab_size == 7 and tok.pad_id == 5 and tok.token_to_id("<cls>") == 6
    assert tok.decode([6, 0, 5]) == "<cls>A<pad>"
    assert DNATokenizer().pad_id is None
    with pytest.raises(ValueError, match="specials"):
        DNATokenizer(specials=("X",))
    with pytest.raises(ValueError, match="ids must lie"):
        tok.decode([7])


def test_read_fasta_plain_gz_multirecord(tmp_path):
    text = ">chr1 first record\nACGT\nacgt\n\n; a comment\n>chr2\nNNAC\nGT  \n"
    plain = tmp_path / "x.fa"
    plain.write_text(text)
    gz = tmp_path / "x.fasta.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write(text)
    for path in (plain, gz):
        recs = read_fasta(path)
        assert [r.name for r in recs] == ["chr1", "chr2"]
        assert recs[0].description == "chr1 first record"
        assert recs[0].seq == "ACGTacgt" and recs[1].seq == "NNACGT"
    bad = tmp_path / "bad.fa"
    bad.write_text("ACGT\n>late\nAC\n")
    with pytest.raises(ValueError, match="line 1: sequence before the first '>'"):
        read_fasta(bad)
    empty = tmp_path / "empty.fa"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no FASTA record"):
        read_fasta(empty)
    binary = tmp_path / "binary.fa"
    binary.write_bytes(b">x\nAC\xff\xfeGT\n")
    with pytest.raises(ValueError, match=r"binary.fa': not a readable FASTA file"):
        read_fasta(binary)


def make_genomes(tmp_path, n_strains={"alpha": 3, "beta": 2, "gamma": 1}, length=1000, seed=0):
    """Random genomes per species; every strain's sequence is distinct and recognisable."""
    rng = np.random.default_rng(seed)
    sources = []
    for label, n in n_strains.items():
        (tmp_path / label).mkdir()
        for k in range(n):
            seq = "".join(rng.choice(list("ACGT"), size=length))
            p = tmp_path / label / f"strain{k}.fasta.gz"
            with gzip.open(p, "wt") as fh:
                fh.write(f">{label}_{k}\n{seq[:length // 2]}\n{seq[length // 2:]}\n")
            sources.append(FastaSource(p, label))
    return sources


def test_split_sources_holds_out_whole_files(tmp_path):
    sources = make_genomes(tmp_path)
    train, test = split_sources(sources, n_test=1, seed=3)
    assert not {s.path for s in train} & {s.path for s in test}
    assert sorted(s.label for s in test) == ["alpha", "beta"]           # gamma has one file only
    assert len(train) == 4 and {s.strain for s in train if s.label == "gamma"} == {"strain0"}
    with pytest.raises(ValueError, match="n_test"):
        split_sources(sources, n_test=0)


def windows_of(path, w):
    seq = DNATokenizer().encode(read_fasta(path)[0].seq)
    return {tuple(seq[i:i + w].tolist()) for i in range(len(seq) - w + 1)}


def test_window_task_balanced_and_no_shared_source(tmp_path):
    sources = make_genomes(tmp_path)
    W = 50
    task = build_window_task(sources, window=W, n_train=12, n_val=4, n_test=6, seed=1)
    assert task.labels == ["alpha", "beta", "gamma"]
    assert task.train.tokens.shape == (36, W) and task.test.tokens.shape == (18, W)
    for split, n in ((task.train, 12), (task.val, 4), (task.test, 6)):
        assert torch.bincount(split.labels).tolist() == [n, n, n]
    _, held = split_sources(sources, 1, seed=1)
    held_paths = {s.path for s in held}
    for s in held:  # held-out strains feed test only, and no other file does (for their label)
        assert any(f"{s.label}:{s.strain} " in e for e in task.sources["test"])
        assert not any(f"{s.label}:{s.strain}" in e for e in task.sources["train"] + task.sources["val"])
        test_windows = {tuple(t.tolist()) for t, lab in zip(task.test.tokens, task.test.labels)
                        if task.labels[lab] == s.label}
        assert test_windows <= windows_of(s.path, W)
    # Every train window comes from a non-held-out file, and none from a held-out one.
    train_ok = set().union(*(windows_of(s.path, W) for s in sources if s.path not in held_paths))
    held_all = set().union(*(windows_of(s.path, W) for s in held))
    train_w = {tuple(t.tolist()) for t in task.train.tokens}
    assert train_w <= train_ok and not train_w & held_all


def test_single_file_label_is_split_by_position(tmp_path):
    sources = make_genomes(tmp_path, {"gamma": 1}, length=1000)
    task = build_window_task(sources, window=20, n_train=5, n_val=3, n_test=4,
                             val_fraction=0.1, test_fraction=0.2, seed=0)
    seq = DNATokenizer().encode(read_fasta(sources[0].path)[0].seq)
    region = lambda lo, hi: {tuple(seq[i:i + 20].tolist()) for i in range(lo, hi - 19)}  # noqa: E731
    assert {tuple(t.tolist()) for t in task.train.tokens} <= region(0, 700)
    assert {tuple(t.tolist()) for t in task.val.tokens} <= region(700, 800)
    assert {tuple(t.tolist()) for t in task.test.tokens} <= region(800, 1000)
    assert task.sources["test"] == ["gamma:strain0[800:1000] gamma_0"]


def test_window_task_errors(tmp_path):
    sources = make_genomes(tmp_path, {"a": 2}, length=100)
    with pytest.raises(ValueError, match="window=500: no sequence of a/train is long enough"):
        build_window_task(sources, window=500, n_train=2, n_val=1, n_test=1)
    with pytest.raises(ValueError, match="val_fraction"):
        build_window_task(sources, window=10, val_fraction=0.9, test_fraction=0.2)


def test_labeled_files_and_genomic_benchmarks_layout(tmp_path):
    gb = tmp_path / "human_nontata_promoters"
    for split, items in (("train", {"positive": ["ACGT", "GGCC"], "negative": ["TTTA"]}),
                         ("test", {"positive": ["acgn"], "negative": ["CCCC", "AAAT"]})):
        for label, seqs in items.items():
            (gb / split / label).mkdir(parents=True)
            for i, s in enumerate(seqs):
                (gb / split / label / f"{i}.txt").write_text(s + "\n")
    splits = load_labeled_dir(gb)
    assert set(splits) == {"train", "test"}
    assert sorted(splits["train"]) == [("ACGT", "positive"), ("GGCC", "positive"), ("TTTA", "negative")]
    ds = DNAClassificationSet.from_pairs(splits["test"], ["negative", "positive"], DNATokenizer())
    assert ds.tokens.shape == (3, 4) and sorted(ds.labels.tolist()) == [0, 0, 1]

    fa = tmp_path / "mine.fa"
    fa.write_text(">r1\nACGTAC\n>r2\nGG\n")
    pairs = load_labeled_fasta([(fa, "mine")])
    assert pairs == [("ACGTAC", "mine"), ("GG", "mine")]
    padded = DNAClassificationSet.from_pairs(pairs, ["mine"], DNATokenizer(specials=("<pad>",)), length=4)
    assert padded.tokens.tolist() == [[0, 1, 2, 3], [2, 2, 5, 5]]
    with pytest.raises(ValueError, match="shorter than length=6"):
        DNAClassificationSet.from_pairs(pairs, ["mine"], DNATokenizer())
    with pytest.raises(ValueError, match="label_names lacks"):
        DNAClassificationSet.from_pairs(pairs, ["other"], DNATokenizer(specials=("<pad>",)))
    assert [s.label for s in find_labeled_files(gb / "train")] == ["negative", "positive", "positive"]
    assert set(load_labeled_dir(gb / "train")) == {"all"}
    with pytest.raises(ValueError, match="has no <label>"):
        find_labeled_files(tmp_path / "human_nontata_promoters" / "train" / "positive")


def test_lm_windows_shift_by_one():
    seqs = [np.arange(11, dtype=np.uint8), np.arange(3, dtype=np.uint8)]
    ds = DNALMWindows(seqs, seq_len=4)
    assert len(ds) == 2                                    # 11 tokens: starts 0, 4; 3 tokens: none
    x, y = ds[1]
    assert x.tolist() == [4, 5, 6, 7] and y.tolist() == [5, 6, 7, 8] and x.dtype == torch.int64
    with pytest.raises(ValueError, match="seq_len=20"):
        DNALMWindows(seqs, seq_len=20)


def test_fetch_genomes_lists_cached_tree_and_needs_apt(tmp_path, monkeypatch):
    refs = tmp_path / "dna" / "ragout-examples" / "usr/share/doc/ragout/examples"
    for d, strain in (("E.Coli", "DH1"), ("H.Pylori", "G27"), ("Odd.Name", "X")):
        (refs / d / "references").mkdir(parents=True)
        with gzip.open(refs / d / "references" / f"{strain}.fasta.gz", "wt") as fh:
            fh.write(">r\nACGT\n")
    got = fetch_genomes(tmp_path)
    assert [(s.label, s.strain) for s in got] == [("escherichia_coli", "DH1"),
                                                 ("helicobacter_pylori", "G27"), ("odd.name", "X")]
    monkeypatch.setattr(fasta.shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="needs `apt-get`"):
        fetch_genomes(tmp_path / "empty")


def test_tiny_end_to_end_species_classification(tmp_path):
    # Two "species" with different GC content, two strains each: a pooled-embedding linear
    # classifier trained on one strain per species must classify the held-out strains.
    rng = np.random.default_rng(0)
    sources = []
    for label, p_gc in (("at_rich", 0.3), ("gc_rich", 0.7)):
        (tmp_path / label).mkdir()
        for k in range(2):
            probs = [(1 - p_gc) / 2, p_gc / 2, p_gc / 2, (1 - p_gc) / 2]
            seq = "".join(rng.choice(list("ACGT"), size=3000, p=probs))
            (tmp_path / label / f"s{k}.fa").write_text(f">{label}{k}\n{seq}\n")
    sources = find_labeled_files(tmp_path)
    task = build_window_task(sources, window=64, n_train=64, n_val=8, n_test=32, seed=0)
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(5, 8), torch.nn.Linear(8, 2)
    opt = torch.optim.Adam([*emb.parameters(), *head.parameters()], lr=0.05)
    for _ in range(40):
        opt.zero_grad()
        logits = head(emb(task.train.tokens).mean(dim=1))
        torch.nn.functional.cross_entropy(logits, task.train.labels).backward()
        opt.step()
    with torch.no_grad():
        test_logits = head(emb(task.test.tokens).mean(dim=1))
    assert accuracy(test_logits, task.test.labels) >= 0.9
