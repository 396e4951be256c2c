"""Shared helpers of the dsan tests (tiny data, tiny training settings)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # a plain checkout works too; an installed dsan/entmax_cuda wins
    sys.path.append(str(REPO_ROOT))
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
RETAILROCKET = SHARED_DATA / "retailrocket"
RAW_DIGINETICA = SHARED_DATA / "raw" / "diginetica-sample-train-item-views.csv"
RAW_RETAILROCKET_SESSIONS = SHARED_DATA / "raw" / "retailrocket-sample-sessions.tsv"

# small enough for a few seconds per run on 2 CPU cores, large enough to learn something
TINY_SYNTHETIC = {"synthetic_sessions": 1200, "synthetic_items": 150}
TINY_TRAINING = {"epochs": 2, "batch_size": 64, "lr": 0.01, "eval_batch_size": 128, "embedding_dim": 16,
                 "attention": "softmax", "threads": 1, "device": "cpu"}


def require(path: Path):
    import pytest

    if not path.exists():
        pytest.skip(f"real data not found: {path} (the shared data folder beside the checkout)")
    return path


def make_tiny_synthetic(out_dir, seed: int = 1):
    from dsan.data import prepare

    prepare("synthetic", out_dir, seed=seed, **TINY_SYNTHETIC)
    return Path(out_dir)


def tiny_config(data_dir, run_dir, resume: bool = False, **overrides):
    from dsan.train import resolve_run_config

    return resolve_run_config(run_dir, overrides=dict(TINY_TRAINING, data=str(data_dir), **overrides),
                              resume=resume)


def subprocess_env() -> dict:
    """Environment for `python -m dsan` in a subprocess (run it with cwd outside the checkout):
    the checkout goes on PYTHONPATH only when dsan is not installed."""
    import os

    import dsan

    env = dict(os.environ, OMP_NUM_THREADS="1")
    if Path(dsan.__file__).resolve().parents[1] == REPO_ROOT:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return env
