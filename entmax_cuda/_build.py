"""Loads the compiled kernels (entmax_cuda._C) with errors that say what to run."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

_REBUILD = (
    "Rebuild it from the source tree with `pip install .`, or `pip install -e .` to build in place "
    "(add --no-build-isolation on a machine without network)."
)
# What setup.py records in _build_info.py; a build that lacks one is older than this code.
BUILD_INFO_FIELDS = ("TORCH_VERSION", "TORCH_CUDA_VERSION", "MIN_TORCH", "WITH_CUDA", "CUDA_ARCHS",
                     "CUDA_SASS", "CUDA_PTX")


CUDA_KERNELS_LOADED = False


def _torch_version_tuple(v: str) -> tuple[int, int]:
    major, minor = v.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _unbuilt_source_tree() -> Path | None:
    """The checkout this package was imported from, when it holds no built kernels."""
    package_dir = Path(__file__).resolve().parent
    if (package_dir.parent / "setup.py").is_file() and not any(package_dir.glob("_C.*")):
        return package_dir.parent
    return None


def _source_tree_message(root: Path) -> str:
    return (f"entmax_cuda was imported from the source tree at {root}, which holds no built kernels "
            "(python puts the current directory first on sys.path). Run from another directory "
            "(or `python -P`) to use the installed package, or build in place with `pip install -e .` "
            "(add --no-build-isolation on a machine without network).")


def build_info():
    try:
        from . import _build_info
    except ImportError as exc:
        root = _unbuilt_source_tree()
        if root is not None:
            raise ImportError(_source_tree_message(root)) from exc
        raise ImportError(
            "entmax_cuda's compiled kernels are not built (entmax_cuda/_build_info.py is missing). " + _REBUILD
        ) from exc
    missing = [name for name in BUILD_INFO_FIELDS if not hasattr(_build_info, name)]
    if missing:
        raise ImportError(
            f"entmax_cuda's compiled kernels are older than its Python code ({_build_info.__file__} lacks "
            f"{', '.join(missing)}). " + _REBUILD
        )
    return _build_info


def load_library() -> None:
    info = build_info()
    if _torch_version_tuple(torch.__version__) < _torch_version_tuple(info.MIN_TORCH):
        raise ImportError(
            f"entmax_cuda needs torch >= {info.MIN_TORCH} at run time (it uses the LibTorch stable ABI); "
            f"this is torch {torch.__version__}. Upgrade torch, then " + _REBUILD
        )
    _import_extension("entmax_cuda._C", info)
    global CUDA_KERNELS_LOADED
    # The CUDA kernels live in their own module: a CPU-only torch still gets the CPU kernels.
    if info.WITH_CUDA and torch.version.cuda is not None:
        _import_extension("entmax_cuda._C_cuda", info)
        CUDA_KERNELS_LOADED = True


def _import_extension(name: str, info) -> None:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        root = _unbuilt_source_tree()
        if root is not None:
            raise ImportError(_source_tree_message(root)) from exc
        raise ImportError(
            f"entmax_cuda's compiled kernels ({name}) could not be loaded ({exc}). They were built against "
            f"torch {info.TORCH_VERSION}; this is torch {torch.__version__}. " + _REBUILD
        ) from exc


def cuda_unavailable_reason() -> str | None:
    """Why CUDA tensors cannot be used with this build, or None if they can."""
    if CUDA_KERNELS_LOADED:
        return None
    info = build_info()
    if not info.WITH_CUDA:
        return ("entmax_cuda was built without CUDA kernels. Rebuild with a CUDA build of torch and the CUDA "
                "toolkit (set CUDA_HOME; ENTMAX_CUDA=1 forces it): `pip install --no-build-isolation .`")
    return (f"entmax_cuda's CUDA kernels are built, but this torch ({torch.__version__}) is a CPU build: "
            "install a CUDA build of torch")
