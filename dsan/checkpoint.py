"""Atomic file writes and checkpoint loading (weights only: no foreign pickles)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(state: dict, path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_model(run_dir, which: str = "best", attention: str | None = None, map_location="cpu"):
    """(model in eval mode, checkpoint) from RUN/{best,last}.pt."""
    from .model import DSAN

    state = load_checkpoint(Path(run_dir) / f"{which}.pt", map_location)
    args = dict(state["model_args"])
    if attention is not None:
        args["attention"] = attention
    model = DSAN(**args)
    model.load_state_dict(state["model"])
    model.eval()
    return model, state
