"""Training configuration: defaults < config file (YAML or JSON) < command line."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

# The technical appendix's best setting on both data sets, and the original's training setup.
DEFAULTS = {
    "data": None,
    "run": None,
    "epochs": 50,
    "batch_size": 512,
    "eval_batch_size": 512,
    "lr": 1e-3,
    "dropout": 0.5,
    "wk": 20.0,
    "embedding_dim": 100,
    "attention": "adaptive-entmax",
    "patience": 3,
    "seed": 1,
    "device": "auto",
    "valid_fraction": 0.1,
    "bucket_pool": 64,  # batches per length-sorting pool; 0 = plain random batches
    "selection_metric": "hr@20",
    "select_on_test": False,
    "refit": False,  # after validation picks epoch E: retrain on all training sessions for E epochs, test that
    "threads": None,
    "max_minutes": None,  # stop after the epoch that would overrun this wall-clock budget, then test
    "max_train_batches": None,  # debugging / timing slices only
    "max_eval_batches": None,
}


class ConfigError(ValueError):
    pass


def read_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {unknown}; known: {sorted(DEFAULTS)}")
    return values


def resolve(config_file=None, overrides=None, base=None) -> dict:
    """base (defaults, or a run's saved config) < config file < overrides that are not None."""
    config = dict(DEFAULTS if base is None else base)
    if config_file:
        config.update(read_config_file(config_file))
    for key, value in (overrides or {}).items():
        if value is not None:
            if key not in DEFAULTS:
                raise ConfigError(f"unknown option {key!r}")
            config[key] = value
    validate(config)
    return config


def validate(config: dict) -> None:
    checks = [
        (config["epochs"] >= 1, "epochs must be >= 1"),
        (config["batch_size"] >= 1, "batch_size must be >= 1"),
        (config["lr"] > 0, "lr must be > 0"),
        (0 <= config["dropout"] < 1, "dropout must be in [0, 1)"),
        (config["patience"] >= 1, "patience must be >= 1"),
        (0 <= config["valid_fraction"] < 1, "valid_fraction must be in [0, 1)"),
        (config["selection_metric"] in {f"{m}@{k}" for m in ("hr", "mrr", "ndcg") for k in (5, 10, 20)},
         "selection_metric must be one of hr|mrr|ndcg @5|10|20"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if config["refit"] and (config["select_on_test"] or config["valid_fraction"] == 0):
        raise ConfigError("refit retrains for the epoch count picked on validation: it needs valid_fraction > 0 "
                          "and no select_on_test")


def save_config(config: dict, run_dir) -> None:
    from .checkpoint import atomic_write_text

    atomic_write_text(Path(run_dir) / "config.yaml", yaml.safe_dump(config, sort_keys=True))
