import pytest

from testing import make_tiny_synthetic, tiny_config
from dsan.cli import main
from dsan.explain import explain
from dsan.train import train


@pytest.fixture(scope="module")
def entmax_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsan-explain")
    data = make_tiny_synthetic(root / "data")
    train(tiny_config(data, root / "run", epochs=1, attention="entmax-reference"), quiet=True)
    return root / "run"


def test_explain_writes_a_png_with_both_normalisers(entmax_run, tmp_path):
    out = tmp_path / "fig.png"
    result = explain(entmax_run, test_index=3, out_path=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = result["panels"]
    assert set(panels) == {"entmax-reference", "softmax"}
    # same weights: the learned alpha of the self-attention does not depend on the normaliser
    assert panels["entmax-reference"]["alpha_self"] == panels["softmax"]["alpha_self"]
    assert 1 < panels["entmax-reference"]["alpha_self"] < 2
    assert panels["softmax"]["self_zeros"] == 0 and panels["softmax"]["target_zeros"] == 0


def test_explain_rejects_an_index_outside_the_test_set(entmax_run, tmp_path, capsys):
    assert main(["explain", "--run", str(entmax_run), "--test-index", "999999", "--out", str(tmp_path / "x.png")]) == 2
    assert "out of range" in capsys.readouterr().err
