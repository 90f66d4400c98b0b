"""Bad input to the `titans` command: every case ends in one error line (exit 2) or a documented
safe fallback, never a traceback and never a silently wrong result."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from titans.cli import main

TEXT = "\n\n".join(f"Paragraph {i}: it was the best of times, it was the worst of times, number {i}."
                   for i in range(60))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A byte corpus, a BPE corpus, an LM run with checkpoints at steps 2 and 4, an MQAR run."""
    root = tmp_path_factory.mktemp("cli")
    docs = root / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text(TEXT[i * 40:])
    (root / "one.txt").write_text(TEXT)
    assert main(["data", "prepare", "--text", str(docs), "--val-fraction", "0.3", "--out", str(root / "byte")]) == 0
    assert main(["data", "prepare", "--text", str(docs), "--val-fraction", "0.3", "--tokenizer", "bpe",
                 "--vocab-size", "300", "--out", str(root / "bpe")]) == 0
    common = ["--preset", "tiny", "--variant", "lmm", "--batch-size", "2", "--eval-every", "0", "--eval-batches", "1"]
    assert main(["train", *common, "--data", str(root / "byte"), "--steps", "4", "--seq-len", "32",
                 "--ckpt-every", "2", "--out", str(root / "lm")]) == 0
    assert main(["train", *common, "--task", "mqar", "--task-arg", "n_pairs=2", "--seq-len", "32", "--steps", "2",
                 "--out", str(root / "mqar")]) == 0
    return root


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    line = err.splitlines()[-1]  # warnings (e.g. a skipped checkpoint) may come first
    assert line.startswith("titans: error:") and "Traceback" not in err, err
    return line


# (argv with {root} for the fixture's directory, a piece of the one-line error)
BAD = [
    (["info", "--preset", "tiny", "--set", "conv=maybe"], "conv must be true or false, got 'maybe'"),
    (["info", "--preset", "tiny", "--set", "max_lr=abc"], "max_lr must be a number, got 'abc'"),
    (["info", "--preset", "tiny", "--set", "memory_depth=1.5"], "memory_depth must be an integer"),
    (["info", "--preset", "tiny", "--set", "no_such_field=1"], "unknown field(s) ['no_such_field']"),
    (["info", "--set", "variant=mag"], "choose the variant with --variant"),
    (["info", "--preset", "tiny", "--set", "dim=64", "--set", "dim=32"], "--set dim is given twice"),
    (["train", "--preset", "tiny", "--out", "{root}/one.txt", "--steps", "1"], "is a file, not a run directory"),
    (["train", "--preset", "tiny", "--data", "{root}/byte", "--out", "{root}/lm", "--steps", "9"], "add --resume"),
    (["train", "--resume", "--out", "{root}/lm", "--steps", "3"], "--steps 3 is below the run's step 4"),
    (["train", "--resume", "--out", "{root}/lm", "--preset", "small", "--steps", "9"], "dim=256 (flags) vs 64 (the run)"),
    (["train", "--resume", "--out", "{root}/lm", "--set", "momentum=true", "--steps", "9"], "momentum=True (flags)"),
    (["train", "--resume", "--out", "{root}/mqar", "--task", "copy", "--steps", "9"], "--task copy but the run"),
    (["train", "--preset", "tiny", "--task", "mqar", "--task-arg", "n_pairs=abc", "--seq-len", "32", "--steps", "1",
      "--out", "{root}/x1"], "n_pairs must be an integer, got 'abc'"),
    (["train", "--preset", "tiny", "--task", "mqar", "--task-arg", "bogus=1", "--seq-len", "32", "--steps", "1",
      "--out", "{root}/x2"], "unknown argument(s) ['bogus']"),
    (["train", "--preset", "tiny", "--task", "lm", "--task-arg", "n_pairs=2", "--steps", "1", "--out", "{root}/x3"],
     "--task-arg is for the recall tasks"),
    (["eval", "ppl", "--model", "{root}/lm", "--data", "{root}/bpe"], "was prepared with tokenizer bpe"),
    (["train", "--init", "{root}/lm", "--data", "{root}/bpe", "--steps", "1", "--out", "{root}/x4"],
     "was prepared with tokenizer bpe"),
    (["eval", "recall", "--model", "{root}/lm"], "must be given"),
    (["eval", "recall", "--model", "{root}/mqar", "--task-arg", "n_pairs=x"], "n_pairs must be an integer"),
    (["data", "prepare", "--text", "{root}/one.txt", "--out", "{root}/x5"], "--split-paragraphs"),
    (["data", "prepare", "--text", "{root}/nul.txt", "--out", "{root}/x6"], "NUL bytes"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[:2]) + f" [{i}]" for i, (a, _) in enumerate(BAD)])
def test_bad_input_is_one_line(world, capsys, argv, message):
    (world / "nul.txt").write_bytes(bytes(64))
    line = _error(capsys, [a.replace("{root}", str(world)) for a in argv])
    assert message in line, line


def test_typed_set_values_reach_the_config(capsys):
    assert main(["info", "--preset", "tiny", "--set", "momentum=False", "--set", "tie_embeddings=FALSE",
                 "--set", "block_pattern=swa,mag", "--set", "alpha_init=1e-3,2e-3", "--set", "memory_heads=none"]) == 0
    out = capsys.readouterr().out
    config = json.loads(out[out.index("{"):])
    assert config["momentum"] is False and config["tie_embeddings"] is False
    assert config["block_pattern"] == ["swa", "mag"] and config["alpha_init"] == [1e-3, 2e-3]
    assert config["memory_heads"] is None


def test_resume_reads_the_run_and_recall_reads_its_task(world, capsys):
    # no --preset, --variant, --data or --task: all come from the run
    assert main(["train", "--resume", "--out", str(world / "mqar"), "--steps", "3", "--batch-size", "2",
                 "--eval-every", "0", "--eval-batches", "1"]) == 0
    assert "model: lmm" in capsys.readouterr().out
    assert main(["eval", "recall", "--model", str(world / "mqar"), "--batch-size", "2", "--batches", "1"]) == 0
    assert "mqar (n_pairs=2 seq_len=32)" in capsys.readouterr().out
    assert main(["eval", "recall", "--model", str(world / "mqar"), "--task-arg", "seq_len=64", "--batch-size", "2",
                 "--batches", "1"]) == 0
    assert "n_pairs=2 seq_len=64" in capsys.readouterr().out


def test_checkpoint_changed_in_place_falls_back_and_inference_skips_the_optimizer(world, capsys, tmp_path):
    import shutil
    run = tmp_path / "lm"
    shutil.copytree(world / "lm", run)
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_000002", "step_000004"]
    # a damaged optimizer file does not matter to inference: the newest weights are used
    (ckpts[1] / "optimizer.pt").write_bytes(bytes((ckpts[1] / "optimizer.pt").stat().st_size))
    assert main(["eval", "ppl", "--model", str(run), "--seq-len", "32", "--max-windows", "2"]) == 0
    assert "checkpoint step 4" in capsys.readouterr().out
    # weights zeroed in place (same size): caught by the checksum, the previous checkpoint is used
    weights = ckpts[1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="sha256"):
        assert main(["eval", "ppl", "--model", str(run), "--seq-len", "32", "--max-windows", "2"]) == 0
    assert "checkpoint step 2" in capsys.readouterr().out


def test_prepare_text_writes_its_own_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TITANS_DATA", str(tmp_path / "cache"))
    (tmp_path / "book.txt").write_text(TEXT)
    assert main(["data", "prepare", "--text", str(tmp_path / "book.txt"), "--split-paragraphs"]) == 0
    out = capsys.readouterr().out
    assert "titans train --data" in out
    assert (tmp_path / "cache" / "corpus" / "text-book-byte" / "meta.json").exists()
    assert not (tmp_path / "cache" / "corpus" / "byte").exists()  # the default corpus is untouched


def test_plots_go_to_the_run_directory(world, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "niah", "--model", str(world / "lm"), "--lengths", "256", "--depths", "0,1"]) == 0
    assert (world / "lm" / "niah-pk.png").exists() and not list(tmp_path.iterdir())


def test_help_version_and_module_entry_point(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default: 200)" in capsys.readouterr().out
    done = subprocess.run([sys.executable, "-m", "titans", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("titans ")
