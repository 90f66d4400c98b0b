"""Loss by position on long documents (titans/eval/by_position.py, `titans eval by-position`):
the carried losses are the losses of one full pass over the document, the reset losses those of
each piece read alone, bucketed by piece index."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from titans import TitansConfig, TitansLM
from titans.cli import main
from titans.eval.by_position import loss_by_position


def _by_hand(model, ids, P, buckets):
    n = min((ids.numel() - 1) // P, max(hi for _, hi in buckets))
    x, y = ids[:n * P], ids[1:n * P + 1]
    with torch.no_grad():
        full = F.cross_entropy(model(x[None]).logits[0], y, reduction="none").view(n, P).sum(1)
        alone = F.cross_entropy(model(x.view(n, P)).logits.flatten(0, 1), y, reduction="none").view(n, P).sum(1)
        # piece i read after piece i - 1, from an empty state (the first piece alone)
        after = torch.stack([alone[0]] + [F.cross_entropy(model(x[(i - 1) * P:(i + 1) * P][None]).logits[0, P:],
                                                          y[i * P:(i + 1) * P], reduction="sum") for i in range(1, n)])
    return tuple([t[lo:min(hi, n)].sum().item() / (P * (min(hi, n) - lo)) for lo, hi in buckets]
                 for t in (full, alone, after))


@pytest.mark.parametrize("variant", ["lmm", "mac"])
def test_carried_is_one_full_pass_and_reset_is_each_piece_alone(variant):
    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant=variant)).eval()
    ids = torch.randint(0, 256, (16 * 24 + 5,))
    buckets = ((0, 1), (1, 4), (4, 16), (16, 64))
    seen = []
    got = loss_by_position(model, [ids], piece=24, buckets=buckets, batch_size=5, progress=seen.append)
    assert sum(seen) == (3 * 16 - 1) * 24      # carried, reset, previous (none for the first piece)
    carried, reset, previous = _by_hand(model, ids, 24, buckets[:3])
    assert got.count == [24, 72, 288, 0] and got.documents == 1
    torch.testing.assert_close(torch.tensor(got.carried[:3]), torch.tensor(carried), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got.reset[:3]), torch.tensor(reset), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got.previous[:3]), torch.tensor(previous), rtol=1e-5, atol=1e-5)
    assert got.carried[0] == pytest.approx(got.reset[0], abs=1e-6) == got.previous[0]   # the first piece: empty
    assert got.carried[1] != pytest.approx(got.reset[1], abs=1e-4)        # past it the state matters
    assert got.previous[2] != pytest.approx(got.carried[2], abs=1e-4)     # and more than one piece of it
    assert got.previous[2] != pytest.approx(got.reset[2], abs=1e-4)
    assert all(math.isnan(v) for v in (got.carried[3], got.reset[3], got.previous[3]))   # no document reaches 16x


def test_reset_only_scores_the_same_reset_pieces_and_no_carried_ones():
    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant="transformer")).eval()
    ids = torch.randint(0, 256, (5 * 16 + 1,))
    both = loss_by_position(model, [ids], piece=16, buckets=((0, 1), (1, 4), (4, 16)))
    seen = []
    only = loss_by_position(model, [ids], piece=16, buckets=((0, 1), (1, 4), (4, 16)), carried=False,
                            progress=seen.append)
    assert only.reset == both.reset and only.count == both.count == [16, 48, 16]
    assert all(math.isnan(c) for c in only.carried + only.previous) and sum(seen) == 5 * 16   # the reset pass only


def test_bad_arguments():
    model = TitansLM(TitansConfig.from_preset("tiny", variant="lmm"))
    with pytest.raises(ValueError, match="piece"):
        loss_by_position(model, [], piece=0)
    with pytest.raises(ValueError, match="buckets"):
        loss_by_position(model, [], piece=4, buckets=((2, 1),))


def test_cli_table_json_and_errors(tmp_path, capsys):
    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant="lmm"))
    model.save_pretrained(tmp_path / "m")
    text = tmp_path / "doc.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)   # 2,700 bytes
    assert main(["eval", "by-position", "--model", str(tmp_path / "m"), "--text", str(text), "--piece", "64",
                 "--min-pieces", "16", "--json", str(tmp_path / "out.json"), "--baseline", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "4-16x" in out and "c - best short" in out and "c - p" in out
    assert main(["eval", "by-position", "--model", str(tmp_path / "m"), "--text", str(text), "--piece", "64",
                 "--min-pieces", "16", "--reset-only", "--json", str(tmp_path / "reset.json")]) == 0
    reset_rows = json.loads((tmp_path / "reset.json").read_text())["model"]["rows"]
    full_rows = json.loads((tmp_path / "out.json").read_text())["model"]["rows"]
    assert [r["reset"] for r in reset_rows[:3]] == [r["reset"] for r in full_rows[:3]]
    assert math.isnan(reset_rows[1]["carried"]) and not math.isnan(full_rows[1]["carried"])
    rows = json.loads((tmp_path / "out.json").read_text())["model"]["rows"]
    assert [r["bucket"] for r in rows][:3] == ["0-1x", "1-4x", "4-16x"] and rows[2]["tokens"] == 12 * 64
    assert rows[2]["carried_minus_previous"] == pytest.approx(rows[2]["carried"] - rows[2]["previous"])
    # a saved model has no training length; a document shorter than --min-pieces is refused
    assert main(["eval", "by-position", "--model", str(tmp_path / "m"), "--text", str(text)]) == 2
    assert "give --piece" in capsys.readouterr().err
    assert main(["eval", "by-position", "--model", str(tmp_path / "m"), "--text", str(text), "--piece", "64",
                 "--min-pieces", "100"]) == 2
    assert "no document of at least 100 pieces" in capsys.readouterr().err
