"""The package as a user gets it: `python -m build` makes an sdist that carries the memory op's C++
source and a wheel built from that sdist; the wheel, installed into a fresh virtual environment
outside the checkout, runs `titans --version`, prepares a corpus and trains a tiny model 5 steps.

The fresh environment gets its dependencies (torch, numpy, ...) from the environment running the
tests through a .pth line, so nothing is downloaded and torch is not installed twice; that line
adds the directory only, without running its .pth files, so the checkout's editable install
(a finder in those .pth files) cannot stand in for the wheel. About 30 s on 2 cores."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

import titans

ROOT = Path(__file__).resolve().parents[1]
CPP = "titans/ops/csrc/chunk_native.cpp"


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    pytest.importorskip("build", reason="`python -m build` comes with the dev extra")
    out = tmp_path_factory.mktemp("dist")
    # the sdist first, then the wheel from the unpacked sdist (what `python -m build` does), so a
    # file missing from the sdist breaks the wheel too; no isolation: no download of setuptools
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def test_sdist_and_wheel_carry_the_cpp_source_and_the_version(dist):
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
    version = titans.__version__
    assert sdist.name == f"titans_lm-{version}.tar.gz" and wheel.name == f"titans_lm-{version}-py3-none-any.whl"
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {CPP, "titans/_version.py", "CHANGELOG.md", "pyproject.toml", "README.md"} <= names
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(f"titans_lm-{version}.dist-info/METADATA").decode()
        entry = zf.read(f"titans_lm-{version}.dist-info/entry_points.txt").decode()
    assert CPP in names and "titans/models/hub.py" in names
    assert not any(n.startswith(("tests/", "experiments/", "benchmarks/")) for n in names)
    assert "Name: titans-lm\n" in meta and f"Version: {version}\n" in meta
    assert "titans = titans.cli:main" in entry


def test_the_wheel_installs_and_trains_outside_the_checkout(dist, tmp_path):
    import torch
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "titans_test_deps.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    (wheel,) = dist.glob("*.whl")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "--quiet", str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    work = tmp_path / "work"  # outside the checkout: nothing can import the source tree by accident
    work.mkdir()
    (work / "book.txt").write_text("\n\n".join(f"Paragraph {i}: it was the best of times, it was the worst "
                                               f"of times." for i in range(80)))
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    clean.update(OMP_NUM_THREADS="1", TITANS_DATA=str(tmp_path / "data"))

    def run(*argv: str) -> str:
        done = subprocess.run([str(env / "bin" / argv[0]), *argv[1:]], cwd=work, env=clean, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert run("titans", "--version") == f"titans {titans.__version__}\n"
    where = run("python", "-c", "import titans, titans.ops.native as n; print(titans.__file__); "
                                "print(n._SOURCE.is_file())").split()
    assert where[0].startswith(str(env)) and where[1] == "True"  # the installed copy, with its C++ source
    run("titans", "data", "prepare", "--text", "book.txt", "--split-paragraphs", "--out", "corpus")
    out = run("titans", "train", "--preset", "tiny", "--variant", "lmm", "--steps", "5", "--batch-size", "2",
              "--seq-len", "32", "--eval-every", "0", "--eval-batches", "1", "--data", "corpus", "--out", "run")
    assert "validation: loss" in out
    assert (work / "run" / "checkpoints" / "step_000005" / "model.safetensors").is_file()
