"""examples/sparse_lm.py at a tiny size: both runs, the plots and the summary; a second call
reports the finished runs without training again; an interrupted run resumes from its
checkpoint and ends where an uninterrupted one does."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is not installed (the dsan extra)")
pytestmark = pytest.mark.slow  # trains (tiny) models on the standard library

EXAMPLE = Path(__file__).parents[1] / "examples" / "sparse_lm.py"
TINY = ["--steps", "4", "--batch", "2", "--context", "24", "--layers", "2", "--heads", "2", "--width", "16",
        "--eval-every", "2", "--checkpoint-every", "2", "--eval-windows", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def sparse_lm():
    spec = importlib.util.spec_from_file_location("sparse_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["runs"]


def test_both_runs_train_and_write_their_plots(sparse_lm, tmp_path, capsys):
    sparse_lm.main(TINY + ["--out", str(tmp_path)])
    runs = summary(tmp_path)
    assert set(runs) == {"entmax", "softmax"}
    for r in runs.values():
        assert math.isfinite(r["valid_bpc"]) and 0 < r["valid_bpc"] < 10 and r["tokens_per_s"] > 0
        assert [h["step"] for h in r["history"]] == [0, 2, 4]
    assert runs["softmax"]["zero_share"] == [0.0, 0.0]  # softmax weights are never exactly zero
    assert all(0 <= z < 1 for z in runs["entmax"]["zero_share"])
    alphas = [a for row in runs["entmax"]["alpha"] for a in row]
    assert len(alphas) == 4 and all(1 < a < 2 for a in alphas) and any(a != 1.5 for a in alphas)
    for name in ("alpha.png", "sparsity.png", "attention_map.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "valid bits/byte" in capsys.readouterr().out

    sparse_lm.main(TINY + ["--out", str(tmp_path)])  # the same command again: nothing retrained
    assert "finished earlier, not repeated" in capsys.readouterr().out
    assert summary(tmp_path)["entmax"]["history"] == runs["entmax"]["history"]


def test_an_interrupted_run_resumes_from_its_checkpoint(sparse_lm, tmp_path, monkeypatch, capsys):
    args = TINY + ["--runs", "entmax"]
    sparse_lm.main(args + ["--out", str(tmp_path / "whole")])
    schedule = sparse_lm.schedule

    def interrupted(step, steps):
        if step == 3:
            raise KeyboardInterrupt
        return schedule(step, steps)

    monkeypatch.setattr(sparse_lm, "schedule", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sparse_lm.main(args + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(sparse_lm, "schedule", schedule)
    sparse_lm.main(args + ["--out", str(tmp_path / "cut")])
    assert "resuming: step 2 of 4" in capsys.readouterr().out
    whole, cut = summary(tmp_path / "whole")["entmax"], summary(tmp_path / "cut")["entmax"]
    assert cut["history"] == whole["history"]


def test_other_settings_in_the_same_folder_are_refused(sparse_lm, tmp_path):
    sparse_lm.main(TINY + ["--runs", "softmax", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="other settings"):
        sparse_lm.main(TINY + ["--runs", "softmax", "--out", str(tmp_path), "--lr", "0.01"])
