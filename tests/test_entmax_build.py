"""Loading the compiled kernels: import errors say what to run; `python -m entmax_cuda.info`."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import entmax_cuda
from entmax_cuda import _build

from testing import REPO_ROOT


_REAL_BUILD_INFO = _build.build_info()


def _fake_build_info(**overrides):
    fields = {name: getattr(_REAL_BUILD_INFO, name)
              for name in ("TORCH_VERSION", "TORCH_CUDA_VERSION", "MIN_TORCH", "WITH_CUDA", "CUDA_ARCHS")}
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def _import_failing_for(module_name: str, message: str):
    real_import = importlib.import_module

    def import_module(name, *args, **kwargs):
        if name == module_name:
            raise ImportError(message)
        return real_import(name, *args, **kwargs)

    return import_module


def test_build_info_describes_this_build():
    info = _build.build_info()
    assert _build._torch_version_tuple(torch.__version__) >= _build._torch_version_tuple(info.MIN_TORCH)
    assert isinstance(info.WITH_CUDA, bool)
    if info.WITH_CUDA:
        assert info.CUDA_ARCHS


def test_kernels_are_registered_for_the_cpu():
    assert hasattr(torch.ops.entmax_cuda, "entmax_forward")
    assert hasattr(torch.ops.entmax_cuda, "entmax_backward")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("entmax_cuda::entmax_forward", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("entmax_cuda::entmax_backward", "CPU")


def test_cuda_build_registers_cuda_kernels():
    if not _REAL_BUILD_INFO.WITH_CUDA or torch.version.cuda is None:
        pytest.skip("this build has no CUDA kernels (ENTMAX_CUDA=0), or torch is a CPU build")
    assert _build.CUDA_KERNELS_LOADED
    for op in ("entmax_forward", "entmax_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"entmax_cuda::{op}", "CUDA")


@pytest.mark.parametrize("version,expected", [("2.14.1+cu130", (2, 14)), ("2.10.0", (2, 10)),
                                              ("2.9.1+cpu", (2, 9)), ("3.0.0a0+git1234", (3, 0))])
def test_torch_version_parsing(version, expected):
    assert _build._torch_version_tuple(version) == expected


def test_missing_build_info_says_to_rebuild(monkeypatch):
    monkeypatch.setitem(sys.modules, "entmax_cuda._build_info", None)  # import now raises ImportError
    monkeypatch.delattr(entmax_cuda, "_build_info", raising=False)
    with pytest.raises(ImportError, match=r"not built.*pip install"):
        _build.load_library()


def test_too_old_torch_says_what_to_upgrade_and_run(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu126")
    with pytest.raises(ImportError, match=r"torch >= 2\.10.*2\.9\.1.*pip install"):
        _build.load_library()


def test_build_needing_a_newer_torch_than_this_one_is_refused(monkeypatch):
    monkeypatch.setattr(_build, "build_info", lambda: _fake_build_info(MIN_TORCH="99.0"))
    with pytest.raises(ImportError, match=r"torch >= 99\.0.*pip install"):
        _build.load_library()


def test_cuda_build_on_a_cpu_torch_loads_the_cpu_kernels_and_says_why_cuda_is_off(monkeypatch):
    monkeypatch.setattr(_build, "build_info", lambda: _fake_build_info(WITH_CUDA=True))
    monkeypatch.setattr(_build, "CUDA_KERNELS_LOADED", False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(_build.importlib, "import_module",
                        _import_failing_for("entmax_cuda._C_cuda", "must not be imported on a CPU torch"))
    _build.load_library()
    assert _build.CUDA_KERNELS_LOADED is False
    reason = _build.cuda_unavailable_reason()
    assert reason is not None and "CPU build" in reason and "CUDA build of torch" in reason


def test_build_without_cuda_says_how_to_build_it():
    if _REAL_BUILD_INFO.WITH_CUDA:
        pytest.skip("this build has CUDA kernels")
    reason = _build.cuda_unavailable_reason()
    assert reason is not None and "without CUDA" in reason and "pip install" in reason


def test_unloadable_extension_names_the_torch_it_was_built_for(monkeypatch):
    monkeypatch.setattr(_build, "build_info", lambda: _fake_build_info(TORCH_VERSION="2.10.0+cu126"))
    monkeypatch.setattr(_build.importlib, "import_module",
                        _import_failing_for("entmax_cuda._C", "undefined symbol: _ZN5torch6stable3fooEv"))
    with pytest.raises(ImportError, match=r"undefined symbol.*built against torch 2\.10\.0\+cu126.*pip install"):
        _build.load_library()


def test_unloadable_cuda_extension_says_what_to_run(monkeypatch):
    monkeypatch.setattr(_build, "build_info", lambda: _fake_build_info(WITH_CUDA=True))
    monkeypatch.setattr(_build, "CUDA_KERNELS_LOADED", False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_build.importlib, "import_module",
                        _import_failing_for("entmax_cuda._C_cuda", "libcudart.so.13: cannot open shared object"))
    with pytest.raises(ImportError, match=r"_C_cuda.*libcudart.*pip install"):
        _build.load_library()


def test_info_module_runs_and_reports_the_build(tmp_path):
    # Run it on the entmax_cuda these tests import: the checkout only when that is where it
    # was built in place (an installed package must not be shadowed by the source tree).
    env = dict(os.environ)
    if Path(entmax_cuda.__file__).resolve().parents[1] == REPO_ROOT:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "entmax_cuda.info"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    info = _build.build_info()
    assert f"built against torch {info.TORCH_VERSION}" in out
    assert f"running torch          {torch.__version__}" in out
    assert ("not built" in out) == (not info.WITH_CUDA)
    assert "CPU threads" in out and "GPU visible" in out
    cuda_line = next(line for line in out.splitlines() if line.startswith("CUDA kernels loaded"))
    if not info.WITH_CUDA:
        assert "no: " in cuda_line and "pip install" in cuda_line
