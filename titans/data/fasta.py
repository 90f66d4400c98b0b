"""FASTA files and labelled genome sources for the DNA tasks (paper section 5.7; titans.data.dna).

read_fasta reads plain or gzip FASTA; a FastaSource is a file with its class label. Sources come
from Debian's ragout-examples package (fetch_genomes, fetched at set-up time through apt) or
from the user's directories (find_labeled_files, load_labeled_dir: `<root>/<label>/*.fa`, and
the GenomicBenchmarks layout `<root>/{train,test}/<class>/*.txt`).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .corpus import default_data_dir

__all__ = ["FastaRecord", "read_fasta", "FastaSource", "SPECIES", "fetch_genomes", "find_labeled_files",
           "load_labeled_fasta", "load_labeled_dir"]


# --- FASTA ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class FastaRecord:
    """One FASTA record: `name` is the header's first word, `description` the whole header."""

    name: str
    description: str
    seq: str


def _open_text(path: Path):
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="ascii") if gz else open(path, encoding="ascii")


def read_fasta(path: str | os.PathLike) -> list[FastaRecord]:
    """All records of a FASTA file, plain or gzip (detected from the content, not the name).

    Sequence lines are joined with whitespace removed; case is kept (tokenize to normalise).
    Lines starting with ';' are comments.
    """
    path = Path(path)
    records: list[FastaRecord] = []
    header: str | None = None
    parts: list[str] = []
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line or line.startswith(";"):
                    continue
                if line.startswith(">"):
                    if header is not None:
                        records.append(_record(header, parts))
                    header, parts = line[1:].strip(), []
                elif header is None:
                    raise ValueError(f"path {str(path)!r}, line {lineno}: sequence before the first '>' header")
                else:
                    parts.append("".join(line.split()))
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:  # binary or truncated: name the file
        raise ValueError(f"path {str(path)!r}: not a readable FASTA file ({e})") from None
    if header is not None:
        records.append(_record(header, parts))
    if not records:
        raise ValueError(f"path {str(path)!r} holds no FASTA record")
    return records


def _record(header: str, parts: list[str]) -> FastaRecord:
    return FastaRecord(name=header.split()[0] if header else "", description=header, seq="".join(parts))


# --- sources: genomes with a label ---------------------------------------------------------

@dataclass(frozen=True)
class FastaSource:
    """A FASTA file and its class label; `strain` is the file name without extensions."""

    path: Path
    label: str

    @property
    def strain(self) -> str:
        name = self.path.name
        for ext in (".gz", ".fasta", ".fa", ".fna", ".txt"):
            name = name.removesuffix(ext)
        return name


# Directory names in Debian's ragout-examples -> species labels.
SPECIES = {"E.Coli": "escherichia_coli", "H.Pylori": "helicobacter_pylori",
           "S.Aureus": "staphylococcus_aureus", "V.Cholerae": "vibrio_cholerae"}
_EXAMPLES = Path("usr/share/doc/ragout/examples")


def fetch_genomes(data_dir: str | os.PathLike | None = None) -> list[FastaSource]:
    """The reference chromosomes of Debian's `ragout-examples` package, labelled by species.

    The first call runs `apt-get download ragout-examples` (no root needed) in a temporary
    directory and `dpkg -x` into <data_dir>/dna/ragout-examples; later calls only list the
    files. Returns 16 sources: 2 E. coli, 5 H. pylori, 5 S. aureus, 4 V. cholerae strains.
    """
    root = (Path(data_dir) if data_dir is not None else default_data_dir()) / "dna" / "ragout-examples"
    if not (root / _EXAMPLES).is_dir():
        for tool in ("apt-get", "dpkg"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"fetch_genomes needs `{tool}` (a Debian/Ubuntu system); elsewhere "
                                   "bring your own FASTA files (find_labeled_files, load_labeled_fasta)")
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(["apt-get", "download", "ragout-examples"], cwd=tmp,
                                  capture_output=True, text=True)
            debs = sorted(Path(tmp).glob("ragout-examples_*.deb"))
            if proc.returncode != 0 or not debs:
                raise RuntimeError("`apt-get download ragout-examples` failed (if the package is not "
                                   f"found, run `apt-get update` as root first):\n{proc.stderr.strip()}")
            staging = root.with_name(root.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            proc = subprocess.run(["dpkg", "-x", str(debs[0]), str(staging)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"`dpkg -x {debs[0].name}` failed:\n{proc.stderr.strip()}")
            shutil.rmtree(root, ignore_errors=True)
            staging.rename(root)  # only a complete extraction is ever seen as cached
    files = sorted((root / _EXAMPLES).glob("*/references/*.fasta.gz"))
    if not files:
        raise RuntimeError(f"no reference FASTA under {root / _EXAMPLES}")
    return [FastaSource(f, SPECIES.get(f.parent.parent.name, f.parent.parent.name.lower())) for f in files]


_SEQ_EXTS = (".fa", ".fasta", ".fna", ".txt")


def find_labeled_files(root: str | os.PathLike) -> list[FastaSource]:
    """Files under <root>/<label>/ named *.fa, *.fasta, *.fna, *.txt (each optionally .gz)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root {str(root)!r} is not a directory")
    out = [FastaSource(f, d.name) for d in sorted(root.iterdir()) if d.is_dir()
           for f in sorted(d.iterdir()) if f.is_file() and f.name.removesuffix(".gz").endswith(_SEQ_EXTS)]
    if not out:
        raise ValueError(f"root {str(root)!r} has no <label>/<file>.fa(sta)/.fna/.txt sequence files")
    return out


def _read_sequences(path: Path) -> list[str]:
    """FASTA records, or for .txt (GenomicBenchmarks) the whole file as one raw sequence."""
    if path.name.removesuffix(".gz").endswith(".txt"):
        with _open_text(path) as fh:
            seq = "".join(fh.read().split())
        if not seq:
            raise ValueError(f"path {str(path)!r} is empty")
        return [seq]
    return [r.seq for r in read_fasta(path)]


def load_labeled_fasta(pairs: Sequence[tuple[str | os.PathLike, str]]) -> list[tuple[str, str]]:
    """(sequence, label) for every record of every (path, label) file: each record is one example."""
    if not pairs:
        raise ValueError("pairs is empty")
    return [(seq, label) for path, label in pairs for seq in _read_sequences(Path(path))]


def load_labeled_dir(root: str | os.PathLike) -> dict[str, list[tuple[str, str]]]:
    """Labelled examples from <root>/<label>/*; with <root>/train and <root>/test (and
    optionally val or valid) subdirectories, one entry per split: the GenomicBenchmarks
    layout, where every .txt file is one sequence. Otherwise a single entry "all"."""
    root = Path(root)
    splits = [s for s in ("train", "val", "valid", "test") if (root / s).is_dir()]
    if {"train", "test"} <= set(splits):
        return {s: load_labeled_fasta([(f.path, f.label) for f in find_labeled_files(root / s)])
                for s in splits}
    return {"all": load_labeled_fasta([(f.path, f.label) for f in find_labeled_files(root)])}
