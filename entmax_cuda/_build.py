"""Loads the compiled kernels (entmax_cuda._C) with errors that say what to run."""

from __future__ import annotations

import importlib

import torch

_REBUILD = (
    "Rebuild it from the source tree with `pip install .` "
    "(or `pip install --no-build-isolation .` on a machine without network)."
)


def _torch_version_tuple(v: str) -> tuple[int, int]:
    major, minor = v.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def build_info():
    try:
        from . import _build_info
    except ImportError as exc:
        raise ImportError(
            "entmax_cuda's compiled kernels are not built (entmax_cuda/_build_info.py is missing). " + _REBUILD
        ) from exc
    return _build_info


def load_library() -> None:
    info = build_info()
    if _torch_version_tuple(torch.__version__) < _torch_version_tuple(info.MIN_TORCH):
        raise ImportError(
            f"entmax_cuda needs torch >= {info.MIN_TORCH} at run time (it uses the LibTorch stable ABI); "
            f"this is torch {torch.__version__}. Upgrade torch, then " + _REBUILD
        )
    if info.WITH_CUDA and torch.version.cuda is None:
        raise ImportError(
            f"entmax_cuda was built with CUDA kernels (against torch {info.TORCH_VERSION}) but this torch "
            f"({torch.__version__}) is a CPU build. Install a CUDA build of torch, or rebuild for the CPU "
            "with `ENTMAX_CUDA=0 pip install .`."
        )
    try:
        importlib.import_module("entmax_cuda._C")
    except ImportError as exc:
        raise ImportError(
            f"entmax_cuda's compiled kernels could not be loaded ({exc}). They were built against torch "
            f"{info.TORCH_VERSION}; this is torch {torch.__version__}. " + _REBUILD
        ) from exc
