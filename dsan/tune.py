"""The technical appendix's grid search, selected on validation; resumable."""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

from . import config as config_module
from .checkpoint import atomic_write_text, load_model
from .data import PrefixSamples, SessionData
from .evaluate import evaluate_model
from .train import train

APPENDIX_GRID = {
    "lr": [0.0003, 0.0005, 0.001, 0.003],
    "dropout": [0.0, 0.3, 0.5],
    "wk": [1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0],
}


def parse_subset(text: str | None) -> dict:
    """'lr=0.001,0.003;wk=10,20' -> {'lr': [0.001, 0.003], 'wk': [10.0, 20.0]}; others keep the grid."""
    grid = {k: list(v) for k, v in APPENDIX_GRID.items()}
    if not text:
        return grid
    for part in text.split(";"):
        if not part.strip():
            continue
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in grid or not values:
            raise ValueError(f"--subset: expected NAME=V1,V2 with NAME in {sorted(grid)}, got {part!r}")
        try:
            grid[name] = [float(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--subset: non-numeric value in {part!r}") from None
    return grid


def combo_name(combo: dict) -> str:
    return "_".join(f"{k}={combo[k]:g}" for k in APPENDIX_GRID)


def tune(data_dir, out_dir, grid: dict, base_overrides: dict, quiet: bool = True, log=print) -> list:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    for number, combo in enumerate(combos, 1):
        run_dir = out_dir / "runs" / combo_name(combo)
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():  # finished earlier: resumable
            summary = json.loads(summary_path.read_text())
            log(f"[{number}/{len(combos)}] {combo_name(combo)}: done earlier")
        else:
            overrides = dict(base_overrides, data=str(data_dir), **combo)
            resume = (run_dir / "last.pt").exists()
            from .train import resolve_run_config

            config = resolve_run_config(run_dir, overrides=overrides, resume=resume)
            log(f"[{number}/{len(combos)}] {combo_name(combo)}: training")
            summary = train(config, resume=resume, quiet=quiet, evaluate_test=False)
            atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
        rows.append({**combo, "selected_epoch": summary["selected_epoch"], "epochs_run": summary["epochs_run"],
                     **{f"valid_{k}": v for k, v in summary["valid"].items() if k != "samples"},
                     "run": str(run_dir)})
    metric = f"valid_{base_overrides.get('selection_metric') or config_module.DEFAULTS['selection_metric']}"
    rows.sort(key=lambda r: -r[metric])
    best = rows[0]
    # the test set is evaluated once, for the combination selected on validation
    model, _ = load_model(best["run"], "best")
    data = SessionData.load(data_dir)
    test = evaluate_model(model, PrefixSamples(data.test_sessions, data.protocol.min_prefix), 512)
    for row in rows:
        row["selected"] = row is best
    write_tables(out_dir, rows, metric, best, test)
    log(f"selected on {metric}: {combo_name(best)}; test hr@20 {test['hr@20']:.4f} mrr@20 {test['mrr@20']:.4f}")
    return rows


def write_tables(out_dir: Path, rows: list, metric: str, best: dict, test: dict) -> None:
    columns = list(rows[0].keys())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "results.csv", buffer.getvalue())
    shown = ["lr", "dropout", "wk", "selected_epoch", "valid_hr@20", "valid_mrr@20", "valid_hr@10", "valid_mrr@10",
             "selected"]
    lines = [f"# Grid search (sorted by {metric}, selected on validation)", "",
             "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        cells = [f"{row[c]:.4f}" if c.startswith("valid") else f"{row[c]:g}" if isinstance(row[c], float)
                 else ("**yes**" if row[c] else "") if c == "selected" else str(row[c]) for c in shown]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Test of the selected combination ({combo_name(best)}), evaluated once: "
              + ", ".join(f"{k} {test[k]:.4f}" for k in ("hr@5", "mrr@5", "hr@10", "mrr@10", "hr@20", "mrr@20")), ""]
    atomic_write_text(out_dir / "results.md", "\n".join(lines))
