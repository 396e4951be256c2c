import csv
import dataclasses

import pytest

from testing import TINY_TRAINING, make_tiny_synthetic
from dsan.config import resolve
from dsan.errors import ConfigError
from dsan.tune import APPENDIX_GRID, parse_subset, tune


def test_subset_parsing_keeps_the_appendix_grid_elsewhere():
    grid = parse_subset("lr=0.001,0.003;wk=20")
    assert grid["lr"] == [0.001, 0.003] and grid["wk"] == [20.0] and grid["dropout"] == APPENDIX_GRID["dropout"]
    assert len(APPENDIX_GRID["lr"]) * len(APPENDIX_GRID["dropout"]) * len(APPENDIX_GRID["wk"]) == 84
    for bad, message in [("momentum=0.9", "NAME one of lr, dropout, wk"), ("lr=fast", "is not a number"),
                         ("lr=\u0661", "is not a number"), ("dropout=1.5", "--subset: dropout must be < 1")]:
        with pytest.raises(ConfigError, match=message):
            parse_subset(bad)


def test_tune_selects_on_validation_writes_tables_resumes_and_keys_runs_by_all_settings(tmp_path):
    data = make_tiny_synthetic(tmp_path / "data")
    grid = parse_subset("lr=0.01,0.00001;dropout=0;wk=20")
    base = resolve(overrides=dict(TINY_TRAINING, data=str(data), epochs=1))
    messages = []
    rows = tune(base, tmp_path / "tune", grid, log=messages.append)
    assert len(rows) == 2
    selected = [r for r in rows if r["selected"]]
    assert len(selected) == 1 and selected[0]["lr"] == 0.01  # a usable lr beats 1e-5 on validation
    with open(tmp_path / "tune" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in table] == [0.01, 0.00001]
    markdown = (tmp_path / "tune" / "results.md").read_text()
    assert "**yes**" in markdown and "evaluated once" in markdown and "epochs 1" in markdown
    messages.clear()
    tune(base, tmp_path / "tune", grid, log=messages.append)
    assert sum("done earlier" in m for m in messages) == 2
    # another setting (here the batch size) is another run: nothing of the first call is reused
    messages.clear()
    rows_64 = tune(dataclasses.replace(base, batch_size=32), tmp_path / "tune", grid, log=messages.append)
    assert sum("done earlier" in m for m in messages) == 0
    assert {r["run"] for r in rows_64}.isdisjoint({r["run"] for r in rows})
    assert len(list((tmp_path / "tune" / "runs").iterdir())) == 4


def test_tune_needs_selection_on_validation(tmp_path):
    with pytest.raises(ConfigError, match="dsan tune selects on validation"):
        tune(resolve(overrides={"selection": "test", "data": str(tmp_path)}), tmp_path / "t", parse_subset("lr=0.01"))
