import json
import subprocess
import sys

from testing import RETAILROCKET, require, subprocess_env
from dsan.cli import main


def test_python_dash_m_dsan_lists_the_commands(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dsan", "--help"], env=subprocess_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("prepare", "train", "evaluate", "explain", "tune", "demo"):
        assert command in result.stdout


def test_demo_prepares_trains_evaluates_and_draws(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--sessions", "500", "--items", "100",
                 "--attention", "entmax-reference"]) == 0
    printed = capsys.readouterr().out
    assert "most-popular baseline" in printed and "HR@K" in printed
    assert (out / "attention.png").is_file()
    assert json.loads((out / "run" / "test_metrics.json").read_text())["test"]["samples"] > 0


def test_prepare_command_reports_errors_with_the_file(tmp_path, capsys):
    assert main(["prepare", "retailrocket", "--raw", str(tmp_path / "events.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "events.csv: no such file" in capsys.readouterr().err


def test_pop_baseline_on_retailrocket_counts_every_test_sample(capsys):
    assert main(["evaluate", "--model", "pop", "--data", str(require(RETAILROCKET))]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["samples"] == 15_132
    assert 0 < metrics["hr@20"] < 0.2  # popularity is a weak recommender on this catalogue
