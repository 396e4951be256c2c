"""The errors a user can cause. The command line prints each as one line and exits with status 2."""

from __future__ import annotations

import importlib

INTERRUPTED_STATUS = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)
EXTRA_HINT = 'pip install -e ".[dsan]" in a checkout, or pip install ".[dsan]"'


class DsanError(Exception):
    """A problem with the user's input, data, files or environment (not a bug)."""


class ConfigError(DsanError):
    """An option's value, or a config file, is invalid."""


class DataError(DsanError):
    """A data file is malformed or yields nothing usable; the message names file and line."""


class RunError(DsanError):
    """A run directory cannot be used as asked."""


class CheckpointError(DsanError):
    """A checkpoint file is missing, corrupt or not a dsan checkpoint."""


class AttentionUnavailable(DsanError):
    """The chosen normaliser needs a package that cannot be imported."""


def require_extra(module: str):
    """Imports one of dsan's optional dependencies (pyyaml, tqdm, matplotlib), or says how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DsanError(f"this command needs {module.split('.')[0]} ({e}); install dsan's extras: {EXTRA_HINT}") from None
