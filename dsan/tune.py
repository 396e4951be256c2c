"""The technical appendix's grid search, selected on validation; resumable.

Each grid point trains in OUT/runs/<point>-<digest of the whole configuration>, so a run is
reused only by a call with exactly the same settings (data, epochs, attention, batch size ...)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
from pathlib import Path

from .checkpoint import load_model
from .config import RunConfig, check_value
from .data import SessionData
from .device import choose_device
from .errors import ConfigError
from .evaluate import check_catalogue, evaluate_model
from .files import write_atomically
from .train import prepare_run, train

APPENDIX_GRID = {
    "lr": [0.0003, 0.0005, 0.001, 0.003],
    "dropout": [0.0, 0.3, 0.5],
    "wk": [1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0],
}
# what `tune` fixes: selection on validation, no refit, its own --data
NOT_TUNE_OPTIONS = ("data", "selection", "refit", *APPENDIX_GRID)
# resources, not settings: they do not enter a run's key
NOT_IN_RUN_KEY = ("device", "threads", "max_minutes")
SUBSET_HELP = ("grid values to use instead of the appendix's, e.g. 'lr=0.001,0.003;wk=10,20': each named "
               "parameter takes the values given, a parameter not named keeps all its appendix values "
               f"({'; '.join(f'{k}={v}' for k, v in APPENDIX_GRID.items())})")


def parse_subset(text: str | None) -> dict:
    """'lr=0.001,0.003;wk=10,20' -> {'lr': [0.001, 0.003], 'wk': [10.0, 20.0], 'dropout': the grid's}."""
    grid = {k: list(v) for k, v in APPENDIX_GRID.items()}
    if not text:
        return grid
    for part in text.split(";"):
        if not part.strip():
            continue
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in grid or not values.strip():
            raise ConfigError(f"--subset: expected NAME=V1,V2 with NAME one of {', '.join(grid)}, got {part!r}")
        try:
            grid[name] = [float(v) if v.isascii() else float("not ASCII") for v in values.split(",")]
        except ValueError:
            raise ConfigError(f"--subset: a value of {part!r} is not a number") from None
        for value in grid[name]:
            check_value(name, value, "--subset: ")
    return grid


def point_name(point: dict) -> str:
    return "_".join(f"{k}={point[k]:g}" for k in APPENDIX_GRID)


def run_key(config: RunConfig) -> str:
    """A digest of every setting that can change a run's result."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_IN_RUN_KEY}
    settings["data"] = str(Path(config.data).resolve())
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def tune(base: RunConfig, out_dir, grid: dict, quiet: bool = True, log=print) -> list:
    """Trains every grid point with the settings of `base` (data included), selects on
    validation, tests the selected point once; writes OUT/results.csv and OUT/results.md."""
    if base.selection != "valid" or base.refit:
        raise ConfigError("dsan tune selects on validation: it needs selection valid and no refit")
    out_dir = Path(out_dir)
    rows = []
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    for number, point in enumerate(points, 1):
        config = dataclasses.replace(base, **point)
        run_dir = out_dir / "runs" / f"{point_name(point)}-{run_key(config)}"
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():  # finished earlier with exactly these settings
            summary = json.loads(summary_path.read_text())
            log(f"[{number}/{len(points)}] {point_name(point)}: done earlier ({run_dir})")
        else:
            resume = (run_dir / "last.pt").exists()
            config = prepare_run(run_dir, overrides=dataclasses.asdict(config), resume=resume)
            log(f"[{number}/{len(points)}] {point_name(point)}: training in {run_dir}")
            summary = train(config, run_dir, resume=resume, quiet=quiet, evaluate_test=False)
            write_atomically({summary_path: json.dumps(summary, indent=2) + "\n"})
        rows.append({**point, "selected_epoch": summary["selected_epoch"], "epochs_run": summary["epochs_run"],
                     **{f"valid_{k}": v for k, v in summary["valid"].items() if k != "samples"},
                     "run": str(run_dir)})
    metric = f"valid_{base.selection_metric}"
    rows.sort(key=lambda r: -r[metric])
    best = rows[0]
    # the test set is evaluated once, for the point selected on validation
    model, state = load_model(best["run"], "best")
    data = SessionData.load(base.data, base.protocol)
    check_catalogue(model, state, data, Path(best["run"]) / "best.pt")
    device = choose_device(base.device)
    test = evaluate_model(model.to(device), data.samples(data.test_sessions, model.max_session_length, "test set"),
                          base.eval_batch_size, device)
    for row in rows:
        row["selected"] = row is best
    write_tables(out_dir, rows, metric, best, test, base)
    log(f"selected on {metric}: {point_name(best)}; test hr@20 {test['hr@20']:.4f} mrr@20 {test['mrr@20']:.4f}")
    return rows


def write_tables(out_dir: Path, rows: list, metric: str, best: dict, test: dict, base: RunConfig) -> None:
    columns = list(rows[0].keys())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(rows)
    shown = ["lr", "dropout", "wk", "selected_epoch", "valid_hr@20", "valid_mrr@20", "valid_hr@10", "valid_mrr@10",
             "selected"]
    fixed = {k: v for k, v in dataclasses.asdict(base).items() if k not in APPENDIX_GRID}
    lines = [f"# Grid search (sorted by {metric}, selected on validation)", "",
             "Settings of every run: " + ", ".join(f"{k} {v}" for k, v in fixed.items() if v is not None), "",
             "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        cells = [f"{row[c]:.4f}" if c.startswith("valid") else f"{row[c]:g}" if isinstance(row[c], float)
                 else ("**yes**" if row[c] else "") if c == "selected" else str(row[c]) for c in shown]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Test of the selected point ({point_name(best)}), evaluated once: "
              + ", ".join(f"{k} {test[k]:.4f}" for k in ("hr@5", "mrr@5", "hr@10", "mrr@10", "hr@20", "mrr@20")), ""]
    write_atomically({out_dir / "results.csv": buffer.getvalue(), out_dir / "results.md": "\n".join(lines)})
