import json

import numpy as np
import pytest

from testing import make_tiny_synthetic, train_tiny
from dsan.cli import main
from dsan.data import SessionData
from dsan.explain import explain, weight_scale


@pytest.fixture(scope="module")
def entmax_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsan-explain")
    data = make_tiny_synthetic(root / "data")
    train_tiny(data, root / "run", epochs=1, attention="entmax-reference")
    return root / "run"


def test_explain_writes_a_png_with_both_normalisers(entmax_run, tmp_path):
    out = tmp_path / "fig.png"
    result = explain(entmax_run, test_index=3, out_path=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = result["panels"]
    assert set(panels) == {"entmax-reference", "softmax"}
    assert 1 < panels["entmax-reference"]["alpha_self"] < 2
    assert "alpha_self" not in panels["softmax"] and "alpha_target" not in panels["softmax"]  # softmax has no alpha
    assert panels["softmax"]["self_zeros"] == 0 and panels["softmax"]["target_zeros"] == 0


def test_each_panel_is_coloured_from_its_smallest_non_zero_weight(entmax_run, tmp_path):
    assert weight_scale(np.array([[0.0, 0.2, 0.7], [0.1, 0.0, 0.0]])) == (0.1, 1.0)
    assert weight_scale(np.array([0.0, 1.0, 0.0])) == (0.1, 1.0)  # one weight of 1: a decade below it
    assert weight_scale(np.zeros(3)) == (1e-6, 1.0)
    result = explain(entmax_run, test_index=3, out_path=tmp_path / "fig.png")
    for panel in result["panels"].values():
        for low, high in panel["scale"].values():
            assert 0 < low < high == 1


def test_explain_shows_the_longest_test_prefix_by_default(entmax_run, tmp_path, capsys):
    assert main(["explain", "--run", str(entmax_run), "--out", str(tmp_path / "fig.png")]) == 0
    printed = json.loads(capsys.readouterr().out)
    data = SessionData.load(entmax_run.parent / "data")
    longest = max(len(s) for s in data.test_sessions) - 1
    assert len(printed["session"]) == longest
    assert "alpha_self" in printed["panels"]["entmax-reference"] and "alpha_self" not in printed["panels"]["softmax"]


def test_a_softmax_run_is_shown_beside_entmax_and_never_twice(entmax_run, tmp_path, capsys):
    result = explain(entmax_run, tmp_path / "fig.png", attention="softmax")
    assert set(result["panels"]) == {"softmax", "entmax-reference"}
    assert main(["explain", "--run", str(entmax_run), "--out", str(tmp_path / "x.png"),
                 "--compare-with", "entmax-reference"]) == 2
    assert "--compare-with entmax-reference is the normaliser shown already" in capsys.readouterr().err


def test_explain_rejects_an_index_outside_the_test_set(entmax_run, tmp_path, capsys):
    assert main(["explain", "--run", str(entmax_run), "--test-index", "999999", "--out", str(tmp_path / "x.png")]) == 2
    assert "out of range" in capsys.readouterr().err
