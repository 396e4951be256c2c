"""Checkpoints: written atomically, loaded as weights only (never code from a pickle), and
checked to be dsan checkpoints before use."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError
from .files import write_atomically

REQUIRED_KEYS = ("model", "model_args")
MODEL_SIZES = ("n_items", "max_session_length", "embedding_dim")


def save_checkpoint(state: dict, path) -> None:
    """Serialised in memory first: torch.save reports a full disk as a RuntimeError, a plain
    write as the OSError that write_atomically turns into a clear message."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically({path: buffer.getvalue()})


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would precede the one-line error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a foreign file can fail anywhere in the unpickler (KeyError, EOFError, ...)
        said = str(e).strip().split(". ")[0].splitlines()[0][:160] if str(e).strip() else ""
        reason = f": {said}" if said and isinstance(e, (RuntimeError, pickle.UnpicklingError, EOFError)) else ""
        raise CheckpointError(f"{path}: not a readable dsan checkpoint (corrupt, truncated or written by another "
                              f"program){reason}") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path}: not a dsan checkpoint (expected the keys {', '.join(REQUIRED_KEYS)})")
    return state


def restore(module, state_dict, path) -> None:
    """module.load_state_dict, with a clear error when the checkpoint's tensors do not fit."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        # torch's first line only announces the list ("Error(s) in loading state_dict for DSAN:")
        detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
        raise CheckpointError(f"{path}: its tensors do not fit this model ({detail[:200]})") from None


def load_model(run_dir, which: str = "best", attention: str | None = None, map_location="cpu"):
    """(model in eval mode, checkpoint) from RUN/{best,last}.pt."""
    from .model import DSAN

    path = Path(run_dir) / f"{which}.pt"
    state = load_checkpoint(path, map_location)
    try:
        args = dict(state["model_args"])
        for name in MODEL_SIZES:  # checked here: torch would fail on a negative size with a RuntimeError
            value = args.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if attention is not None:
            args["attention"] = attention
        model = DSAN(**args)
    except (TypeError, ValueError, RuntimeError, ConfigError) as e:
        if isinstance(e, ConfigError) and attention is not None:
            raise  # the --attention the user gave, not the checkpoint's
        raise CheckpointError(f"{path}: its model_args do not describe a DSAN model ({e})") from None
    restore(model, state["model"], path)
    model.eval()
    return model, state
