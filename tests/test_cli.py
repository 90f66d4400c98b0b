"""The `titans` command end to end on a tiny local corpus (no network), and its error lines."""

from __future__ import annotations

import json

import pytest

from titans.cli import main

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness. ") * 40


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANS_DATA", str(tmp_path / "cache"))
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text(TEXT[i * 50:] + f" document {i}.")
    assert main(["data", "prepare", "--text", str(docs), "--val-fraction", "0.3",
                 "--out", str(tmp_path / "cache" / "corpus" / "byte")]) == 0  # where train and eval look by default
    return tmp_path


def test_prepare_train_eval_generate_info(corpus, capsys):
    run = corpus / "run"
    assert main(["train", "--preset", "tiny", "--variant", "mac", "--steps", "3", "--batch-size", "2",
                 "--seq-len", "32", "--eval-every", "3", "--eval-batches", "2", "--ckpt-every", "3",
                 "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "validation: loss" in out and "perplexity" in out and "tokens/s" in out
    assert (run / "log.csv").exists() and (run / "checkpoints").is_dir()
    assert main(["eval", "ppl", "--model", str(run), "--seq-len", "32", "--max-windows", "3"]) == 0
    ppl = capsys.readouterr().out
    assert "perplexity" in ppl
    # exported the Hugging Face way, the model scores the same (and loads in Python the same way)
    assert main(["export", "--model", str(run), "--out", str(corpus / "exported")]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    card = (corpus / "exported" / "README.md").read_text()  # the model card: what the run recorded
    assert "variant | `mac`" in card and "step 3: 192 tokens (2 x 32 tokens x 1 per step)" in card
    assert "validation | loss" in card and "perplexity" in card and "pushed to the Hub" not in card
    assert "titans train --preset tiny --variant mac --steps 3" in card
    assert main(["eval", "ppl", "--model", str(corpus / "exported"), "--seq-len", "32", "--max-windows", "3"]) == 0
    assert capsys.readouterr().out.split("(")[0] == ppl.split("(")[0]
    assert main(["export", "--model", str(run), "--out", str(corpus / "exported")]) == 2  # not over a model
    capsys.readouterr()
    assert main(["generate", "--model", str(run), "--prompt", "It was", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("It was") and "decode 4 steps x 1" in captured.err
    # several samples decode as one batch; greedy, they are all the single sample's text
    assert main(["generate", "--model", str(run), "--prompt", "It was", "--max-new-tokens", "5",
                 "--temperature", "0", "--num-samples", "3", "--quiet"]) == 0
    batch = capsys.readouterr()
    assert batch.out.count("--- sample") == 3 and batch.err == ""
    assert batch.out.count(captured.out.strip()) == 3
    assert main(["info", "--model", str(run)]) == 0
    assert "parameters:" in capsys.readouterr().out
    # resuming a finished run with more steps continues from its checkpoint
    assert main(["train", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-every", "4",
                 "--eval-batches", "2", "--out", str(run), "--resume"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["eval", "ppl", "--model", "/nonexistent/run"], "does not exist"),
    (["train", "--preset", "tiny", "--data", "/nonexistent/corpus", "--steps", "1"], "no prepared corpus"),
    (["train", "--preset", "tiny", "--set", "dim", "--steps", "1"], "KEY=VALUE"),
    (["info", "--preset", "tiny", "--set", "dim=30", "--set", "heads=4"], "divisible"),
    (["train", "--config", "/nonexistent.yaml", "--steps", "1"], None),
    (["train", "--preset", "tiny", "--task", "mqar", "--seq-len", "64", "--task-arg", "seq_len=128",
      "--task-arg", "n_pairs=4", "--steps", "1"],
     "disagree"),
    (["train", "--preset", "tiny", "--task", "copy", "--task-arg", "n_tokens=8", "--seq-len", "999", "--steps", "1"],
     "makes sequences of"),
])
def test_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TITANS_DATA", str(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("titans: error:") and "\n" not in err and "Traceback" not in err
    if message:
        assert message in err


def test_corrupt_checkpoint_is_a_clear_error(corpus, capsys):
    run = corpus / "run"
    assert main(["train", "--preset", "tiny", "--variant", "lmm", "--steps", "2", "--batch-size", "2",
                 "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    weights = next((run / "checkpoints").glob("step_*")) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["generate", "--model", str(weights.parent), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "Traceback" not in err


def test_long_context_commands(corpus, capsys):
    docs = str(corpus / "docs")
    assert main(["eval", "stream", "--preset", "tiny", "--variant", "mac", "--tokens", "3K",
                 "--checkpoints", "1K,2K", "--piece", "512"]) == 0
    assert "tokens" in capsys.readouterr().out
    run = corpus / "mqar"
    # --seq-len alone sets the recall task's length
    assert main(["train", "--preset", "tiny", "--variant", "lmm", "--task", "mqar",
                 "--task-arg", "n_pairs=4", "--steps", "2", "--batch-size", "4", "--seq-len", "64",
                 "--eval-every", "2", "--eval-batches", "1", "--out", str(run)]) == 0
    assert main(["eval", "recall", "--model", str(run), "--task", "mqar", "--task-arg", "seq_len=64",
                 "--task-arg", "n_pairs=4", "--batch-size", "2", "--batches", "1"]) == 0
    assert "accuracy" in capsys.readouterr().out
    qa = corpus / "qa"
    assert main(["train", "--init", str(run), "--task", "babilong", "--text", docs, "--babilong-tasks", "qa1", "--steps", "1",
                 "--batch-size", "3", "--seq-len", "512", "--eval-every", "1", "--eval-batches", "1",
                 "--out", str(qa)]) == 0
    plot = corpus / "b.png"
    assert main(["eval", "babilong", "--model", str(qa), "--text", docs, "--tasks", "qa1", "--lengths", "600",
                 "--samples", "2", "--plot", str(plot)]) == 0
    assert "qa1" in capsys.readouterr().out
    heat = corpus / "n.png"
    assert main(["eval", "niah", "--model", str(qa), "--task", "pk", "--lengths", "256,512", "--depths", "0,1",
                 "--plot", str(heat)]) == 0
    assert heat.exists() and "%" in capsys.readouterr().out
    # pass keys with a lead-in: rows of up to 256 + 300 tokens, 256 of them trained
    pk = corpus / "pk"
    assert main(["train", "--init", str(run), "--task", "niah", "--seq-len", "256", "--task-arg", "lead_in=300",
                 "--steps", "3", "--batch-size", "2", "--eval-every", "3", "--eval-batches", "1", "--out", str(pk)]) == 0
    state = json.loads((pk / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["train_config"]["lead_in"] == 300 and state["train_config"]["seq_len"] == 256


def test_forecast_and_dna_commands(tmp_path, capsys):
    import numpy as np
    t = np.arange(400)
    rows = ["date,a,b"] + [f"2020-01-01 {i},{np.sin(i / 8):.4f},{np.cos(i / 5):.4f}" for i in t]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    assert main(["forecast", "--csv", str(tmp_path / "s.csv"), "--lookback", "24", "--horizons", "12",
                 "--max-steps", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "titans" in out and "dlinear" in out
    assert main(["forecast", "--quiet"]) == 2
    rng = np.random.default_rng(0)
    for label, gc in (("lowgc", 0.3), ("highgc", 0.7)):
        for strain in ("s1", "s2"):
            (tmp_path / "fa" / label).mkdir(parents=True, exist_ok=True)
            p = [(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2]
            seq = "".join(rng.choice(list("ACGT"), size=3000, p=p))
            (tmp_path / "fa" / label / f"{strain}.fa").write_text(f">{strain}\n{seq}\n")
    assert main(["dna", "classify", "--fasta-dir", str(tmp_path / "fa"), "--window", "64", "--n-train", "8",
                 "--n-val", "4", "--n-test", "4", "--steps", "2", "--batch-size", "4", "--quiet"]) == 0
    assert "accuracy" in capsys.readouterr().out.lower()


def test_train_on_pretokenized_files(tmp_path, capsys):
    import numpy as np
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", rng.integers(0, 256, 5000).astype(np.uint16))
    rng.integers(0, 256, 800).astype(np.uint16).tofile(tmp_path / "val.bin")
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "train.npy"), "--val-data",
                 str(tmp_path / "val.bin"), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                 "--eval-every", "2", "--eval-batches", "1", "--out", str(run)]) == 0
    assert "5,000 training tokens" in capsys.readouterr().out
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "train.npy"), "--steps", "1",
                 "--out", str(tmp_path / "r2")]) == 2
    assert "--val-data" in capsys.readouterr().err
