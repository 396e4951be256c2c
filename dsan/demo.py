"""`dsan demo`: synthetic data -> training -> evaluation against the popularity baseline ->
attention heat map: a short run on the CPU."""

from __future__ import annotations

import time
from pathlib import Path

from .config import DEFAULTS
from .data import SYNTHETIC_ITEMS, SYNTHETIC_SESSIONS, prepare
from .evaluate import evaluate_popularity_on, metrics_table
from .explain import explain
from .model import attention_normaliser
from .train import prepare_run, train

DEMO_EPOCHS = 4
DEMO_BATCH_SIZE = 128


def run_demo(out, epochs: int = DEMO_EPOCHS, attention: str = DEFAULTS.attention, sessions: int = SYNTHETIC_SESSIONS,
             items: int = SYNTHETIC_ITEMS, report=print) -> dict:
    """Writes OUT/data, OUT/run and OUT/attention.png; returns the test metrics of DSAN and of the baseline.
    Running it again on the same OUT reuses (or continues) the finished run."""
    started = time.time()
    attention_normaliser(attention)  # an unusable normaliser stops the demo before it writes anything
    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    stats = prepare("synthetic", data_dir, synthetic_sessions=sessions, synthetic_items=items)
    report(f"[1/4] synthetic data in {data_dir}: {stats['n_items']} items, "
           f"{stats['train']['samples']} training / {stats['test']['samples']} test samples")
    resume = (run_dir / "last.pt").exists()
    config = prepare_run(run_dir, overrides={"data": str(data_dir), "epochs": epochs, "batch_size": DEMO_BATCH_SIZE,
                                             "attention": attention}, resume=resume)
    report(f"[2/4] training {epochs} epochs ({attention}) in {run_dir}")
    summary = train(config, run_dir, resume=resume)
    popularity, _ = evaluate_popularity_on(data_dir, "test", DEFAULTS.valid_fraction, None,
                                           DEFAULTS.eval_batch_size)
    report("[3/4] evaluation on the test set")
    report(metrics_table(f"DSAN ({attention}), epoch {summary['selected_epoch']} selected on validation:",
                         summary["test"]))
    report(metrics_table("most-popular baseline:", popularity))
    figure = out / "attention.png"
    shown = explain(run_dir, figure)
    alphas = shown["panels"][attention]
    report(f"[4/4] heat map of test sample {shown['test_index']} (the longest) in {figure}"
           + (f": alpha_1 {alphas['alpha_self']:.4f}, alpha_2 {alphas['alpha_target']:.4f}" if "alpha_self" in alphas
              else ""))
    report(f"demo done in {time.time() - started:.0f}s")
    return {"dsan": summary, "popularity": popularity, "figure": shown}
