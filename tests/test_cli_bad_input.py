"""Bad input to the `titans` command: every case ends in one error line (exit 2) or a documented
safe fallback, never a traceback and never a silently wrong result."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import warnings

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
    assert main(["train", *common, "--task", "babilong", "--babilong-tasks", "qa1", "--text", str(docs),
                 "--seq-len", "400", "--steps", "1", "--out", str(root / "qa")]) == 0
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
    (["train", "--preset", "tiny", "--task-arg", "lead_in=5", "--steps", "1", "--out", "{root}/x3b"],
     "--task-arg is for the recall tasks, not --task lm"),   # no --task: the corpus, not a task
    (["eval", "ppl", "--model", "{root}/lm", "--data", "{root}/bpe"], "was prepared with tokenizer bpe"),
    (["train", "--init", "{root}/lm", "--data", "{root}/bpe", "--steps", "1", "--out", "{root}/x4"],
     "was prepared with tokenizer bpe"),
    (["eval", "recall", "--model", "{root}/lm"], "must be given"),
    (["eval", "recall", "--model", "{root}/mqar", "--task-arg", "n_pairs=x"], "n_pairs must be an integer"),
    (["data", "prepare", "--text", "{root}/one.txt", "--out", "{root}/x5"], "--split-paragraphs"),
    (["data", "prepare", "--text", "{root}/nul.txt", "--out", "{root}/x6"], "NUL bytes"),
    # output paths through a regular file: refused before any work (issue 31)
    (["export", "--model", "{root}/lm", "--out", "{root}/one.txt/x"], "one.txt is a file, not a directory"),
    (["train", "--preset", "tiny", "--steps", "1", "--out", "{root}/one.txt/run"], "one.txt is a file"),
    (["data", "prepare", "--text", "{root}/one.txt", "--split-paragraphs", "--out", "{root}/one.txt/x"],
     "one.txt is a file"),
    (["eval", "niah", "--model", "{root}/lm", "--lengths", "256", "--plot", "{root}/one.txt/p.png"],
     "one.txt is a file"),
    (["eval", "babilong", "--model", "{root}/lm", "--plot", "{root}/one.txt/p.png"], "one.txt is a file"),
    (["eval", "stream", "--model", "{root}/lm", "--tokens", "64", "--json", "{root}/one.txt/r.json"],
     "one.txt is a file"),
    (["eval", "harness", "--model", "{root}/lm", "--tasks", "piqa", "--json", "{root}/one.txt/r.json"],
     "one.txt is a file"),
    (["eval", "niah", "--model", "{root}/lm", "--plot", "{root}/p.txt"], "a plot is one of .png"),
    # --resume needs a run
    (["train", "--resume", "--out", "{root}/empty", "--steps", "2"], "no run in"),
    (["train", "--resume", "--out", "{root}/docs", "--steps", "2"], "start one without --resume"),
    (["train", "--resume", "--out", "{root}/nowhere", "--steps", "2"], "no run in"),
    # counts and lengths: 0 is an error, not a default
    (["train", "--preset", "tiny", "--seq-len", "0", "--steps", "1", "--out", "{root}/x7"],
     "argument --seq-len: expected an integer >= 1, got '0'"),
    (["eval", "niah", "--model", "{root}/lm", "--samples", "0"], "argument --samples"),
    (["eval", "niah", "--model", "{root}/lm", "--depths", "0,2"], "depths are fractions in [0, 1]"),
    (["eval", "niah", "--model", "{root}/lm", "--lengths", "1Q"], "--lengths 1Q"),
    # flags that do not apply
    (["train", "--init", "{root}/lm", "--variant", "mac", "--steps", "1", "--out", "{root}/x8"],
     "--variant does not apply with --init"),
    (["train", "--init", "{root}/lm", "--preset", "small", "--steps", "1", "--out", "{root}/x8"],
     "--preset does not apply with --init"),
    (["info", "--model", "{root}/lm", "--preset", "small", "--set", "dim=64"], "--preset and --set do not apply"),
    (["info", "--model", "{root}/lm", "--variant", "mag"], "--variant does not apply with --model"),
    (["eval", "stream", "--model", "{root}/lm", "--variant", "mag", "--tokens", "64"],
     "--variant does not apply with --model"),
    (["eval", "ppl", "--model", "{root}/lm", "--text", "{root}/one.txt", "--data", "{root}/byte"],
     "--data does not apply with --text"),
    (["eval", "niah", "--model", "{root}/lm", "--text", "{root}/one.txt"], "--text does not apply with --task pk"),
    (["train", "--preset", "tiny", "--data", "{root}/byte", "--val-data", "{root}/byte", "--steps", "1",
      "--out", "{root}/x9"], "--val-data does not apply with --data DIR"),
    (["train", "--preset", "tiny", "--babilong-tasks", "qa1", "--steps", "1", "--out", "{root}/x9"],
     "--babilong-tasks does not apply with --task lm"),
    (["data", "prepare", "--dna", "--text", "{root}/one.txt"], "--text does not apply with --dna"),
    (["data", "prepare", "--vocab-size", "300", "--text", "{root}/docs", "--out", "{root}/x10"],
     "--vocab-size does not apply with --tokenizer byte"),
    (["forecast", "--csv", "{root}/one.txt", "--steps-per-day", "24"], "--steps-per-day does not apply"),
    (["dna", "lm", "--n-train", "5"], "--n-train does not apply with dna lm"),
    # lengths and tasks checked before the first sample; sizes said in words
    (["eval", "babilong", "--model", "{root}/lm", "--lengths", "64,1K", "--samples", "2"],
     "length 64 is too short for qa1"),
    (["eval", "babilong", "--model", "{root}/lm", "--tasks", "qa1,qa9"], "--tasks qa1,qa9: choose from"),
    (["eval", "niah", "--model", "{root}/lm", "--lengths", "16,256"], "length 16 is too short"),
    (["eval", "ppl", "--model", "{root}/lm", "--seq-len", "100000000"], "is longer than the val split"),
    (["info", "--preset", "tiny", "--set", "dim=1000000000"], "cannot build the model (dim 1000000000"),
    (["eval", "harness", "--model", "{root}/lm", "--tasks", "piqa", "--limit", "-1"], "--limit must be > 0"),
    (["eval", "harness", "--model", "{root}/nowhere", "--tasks", "piqa"], "nowhere does not exist"),
    (["eval", "ppl", "--model", "{root}/badconfig"], "config.json' is not valid JSON"),
    # resume: batch size, sequence length and data come from the run; a contradiction names both
    (["train", "--resume", "--out", "{root}/lm", "--batch-size", "4", "--steps", "6"],
     "--batch-size 4 but the run in"),
    (["train", "--resume", "--out", "{root}/lm", "--seq-len", "64", "--steps", "6"], "trained with 32"),
    (["train", "--resume", "--out", "{root}/lm", "--data", "{root}/byte2", "--steps", "6"], "byte2 but the run"),
    (["train", "--resume", "--out", "{root}/qa", "--babilong-tasks", "qa2", "--steps", "3"],
     "--babilong-tasks qa2 but the run in"),
    (["train", "--resume", "--out", "{root}/qa", "--text", "{root}/one.txt", "--steps", "3"], "one.txt'] but the run"),
    (["eval", "recall", "--model", "{root}/mqar", "--piece", "64"], "--piece does not apply with eval recall"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[:2]) + f" [{i}]" for i, (a, _) in enumerate(BAD)])
def test_bad_input_is_one_line(world, capsys, argv, message):
    (world / "nul.txt").write_bytes(bytes(64))
    (world / "empty").mkdir(exist_ok=True)
    if not (world / "byte2").exists():  # the same corpus in another place: another data set to the run
        shutil.copytree(world / "byte", world / "byte2")
    if not (world / "badconfig").exists():
        assert main(["export", "--model", str(world / "lm"), "--out", str(world / "badconfig")]) == 0
        (world / "badconfig" / "config.json").write_text("{\"dim\": 64,")
    capsys.readouterr()
    line = _error(capsys, [a.replace("{root}", str(world)) for a in argv])
    assert message in line, line
    for stray in ("nowhere", "x7", "x8", "x9", "x10"):
        assert not (world / stray).exists(), f"{stray} was created by a refused command"


def test_argparse_errors_are_one_line_too(capsys):
    assert main(["train", "--steps", "ten"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("titans: error: argument --steps") and "titans train --help" in err


def test_warnings_are_one_line(world, capsys, tmp_path, monkeypatch):
    run = tmp_path / "lm"
    shutil.copytree(world / "lm", run)
    (sorted((run / "checkpoints").glob("step_*"))[-1] / "model.safetensors").write_bytes(b"junk")
    # what Python does outside pytest (which records warnings instead of showing them)
    monkeypatch.setattr(warnings, "showwarning", lambda message, category, filename, lineno, file=None, line=None:
                        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line)))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["eval", "ppl", "--model", str(run), "--seq-len", "32", "--max-windows", "1"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("titans: warning: skipping bad checkpoint") and err.count("\n") == 1, err


def test_resume_takes_batch_size_seq_len_and_data_from_the_run(world, capsys, tmp_path):
    run = tmp_path / "lm"
    shutil.copytree(world / "lm", run)  # trained with --batch-size 2 --seq-len 32 --data {root}/byte
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trainer notes that --steps changed the schedule
        assert main(["train", "--resume", "--out", str(run), "--steps", "5", "--eval-every", "0",
                     "--eval-batches", "1"]) == 0
    capsys.readouterr()
    state = json.loads((run / "checkpoints" / "step_000005" / "trainer_state.json").read_text())
    assert state["train_config"]["batch_size"] == 2 and state["train_config"]["seq_len"] == 32
    assert state["run"]["data"] == str((world / "byte").resolve())
    qa = tmp_path / "qa"  # a babilong run: its QA tasks and distractor text come from the record too
    shutil.copytree(world / "qa", qa)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", "--resume", "--out", str(qa), "--steps", "2", "--eval-every", "0",
                     "--eval-batches", "1"]) == 0
    state = json.loads((qa / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["run"]["babilong_tasks"] == "qa1" and state["run"]["text"] == [str((world / "docs").resolve())]


def test_plot_to_a_directory_lands_inside_it(world, capsys, tmp_path):
    assert main(["eval", "niah", "--model", str(world / "lm"), "--lengths", "256", "--depths", "0.5",
                 "--plot", str(tmp_path)]) == 0
    assert f"heatmap: {tmp_path / 'niah-pk.png'}" in capsys.readouterr().out
    assert (tmp_path / "niah-pk.png").is_file()
    assert main(["eval", "niah", "--model", str(world / "lm"), "--lengths", "256", "--depths", "0.5",
                 "--plot", str(tmp_path / "heat")]) == 0
    assert f"heatmap: {tmp_path / 'heat.png'}" in capsys.readouterr().out and (tmp_path / "heat.png").is_file()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_long_jobs_show_progress_on_a_terminal_unless_quiet(world, monkeypatch, capsys, quiet):
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    argv = ["eval", "stream", "--model", str(world / "lm"), "--tokens", "2K", "--piece", "512",
            "--checkpoints", "1K"]
    assert main(argv + ["--quiet"] * quiet) == 0
    assert ("/2.05k [" in err.getvalue()) != quiet, err.getvalue()  # the bar, cleared at the end


def test_no_progress_bar_when_stderr_is_not_a_terminal(world, capsys):
    assert main(["eval", "ppl", "--model", str(world / "lm"), "--seq-len", "32", "--max-windows", "2"]) == 0
    assert capsys.readouterr().err == ""


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
    assert "(default: 200)" in " ".join(capsys.readouterr().out.split())
    done = subprocess.run([sys.executable, "-m", "titans", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("titans ")


def test_help_of_every_subcommand_does_not_import_torch():
    # `titans --help` in 0.1 s instead of 2.1 s: the parser and the package import no torch
    code = ("import contextlib, io, sys\n"
            "from titans.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['eval', '--help'], ['eval', 'stream', '--help'],\n"
            "             ['eval', 'harness', '--help'], ['data', 'prepare', '--help'], ['generate', '--help'],\n"
            "             ['forecast', '--help'], ['dna', '--help'], ['export', '--help'], ['--version']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            main(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "heavy = [m for m in ('torch', 'numpy', 'huggingface_hub', 'lm_eval') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_one_place_maps_expected_exceptions_to_one_line():
    from titans.cli import error_message
    requests = pytest.importorskip("requests")  # lm-eval's and the hub's network errors derive from OSError
    assert error_message(NotADirectoryError(20, "Not a directory", "out/x.json")) == "out/x.json: Not a directory"
    assert error_message(requests.exceptions.ConnectionError("no route")) == "ConnectionError: no route"
    assert error_message(RuntimeError("Storage size\n  overflowed")) == "Storage size overflowed"
    assert error_message(json.JSONDecodeError("Expecting value", "{", 1)).startswith("JSONDecodeError: Expecting value")
    assert error_message(KeyError("x")) is None and error_message(TypeError("x")) is None  # bugs keep a traceback
