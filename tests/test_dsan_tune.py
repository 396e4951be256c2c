import csv

import pytest

from testing import TINY_TRAINING, make_tiny_synthetic
from dsan.tune import APPENDIX_GRID, parse_subset, tune


def test_subset_parsing_keeps_the_appendix_grid_elsewhere():
    grid = parse_subset("lr=0.001,0.003;wk=20")
    assert grid["lr"] == [0.001, 0.003] and grid["wk"] == [20.0] and grid["dropout"] == APPENDIX_GRID["dropout"]
    assert len(APPENDIX_GRID["lr"]) * len(APPENDIX_GRID["dropout"]) * len(APPENDIX_GRID["wk"]) == 84
    with pytest.raises(ValueError, match="--subset"):
        parse_subset("momentum=0.9")


def test_tune_selects_on_validation_writes_tables_and_resumes(tmp_path):
    data = make_tiny_synthetic(tmp_path / "data")
    grid = parse_subset("lr=0.01,0.00001;dropout=0;wk=20")
    overrides = {k: v for k, v in TINY_TRAINING.items() if k != "lr"}
    overrides["epochs"] = 1
    messages = []
    rows = tune(data, tmp_path / "tune", grid, overrides, log=messages.append)
    assert len(rows) == 2
    selected = [r for r in rows if r["selected"]]
    assert len(selected) == 1 and selected[0]["lr"] == 0.01  # a usable lr beats 1e-5 on validation
    with open(tmp_path / "tune" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in table] == [0.01, 0.00001]
    markdown = (tmp_path / "tune" / "results.md").read_text()
    assert "**yes**" in markdown and "evaluated once" in markdown
    messages.clear()
    tune(data, tmp_path / "tune", grid, overrides, log=messages.append)
    assert sum("done earlier" in m for m in messages) == 2
