"""Helpers of the test suite, importable from every test file (`from testing import ...`).

Devices, dtypes and tolerances of the entmax tests (one place for each), the float64
reference, and the dsan tests' tiny data and training settings. Fixtures live in
conftest.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

_NO_GPU = "no CUDA GPU visible (torch.cuda.is_available() is False); run `pytest -m cuda` on a GPU machine"

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=_NO_GPU)],
    ),
]

# Tolerances (max abs error against the float64 reference), one place for all tests.
ATOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}
# Gradients, relative to their size: float32 evaluates g = p^(2-alpha) with a relative
# error of ~|(alpha-1) ln p| ulps (a few 1e-6 for tiny p at alpha 3); the float64
# alpha-gradient is held to 1e-8, the accuracy of the reference's own stable form.
GRAD_RTOL = {torch.float64: 1e-8, torch.float32: 1e-5}
SUM_ATOL = 1e-6  # |sum(p) - 1| for float32 outputs
ALPHA_GRAD_RTOL_FLOAT32 = 1e-4  # float32 alpha-gradient (the spec: at alpha = 1 + 1e-5 too)
REFERENCE_N_ITER = 100  # bisection steps of the float64 reference


def requires_cuda(test):
    """Marks a test that only makes sense with a GPU (e.g. CPU vs CUDA parity)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason=_NO_GPU)(test))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype (and alpha's dtype inside the op)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def alpha_as_kernel_sees_it(alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """The float64 value of alpha after rounding to the accumulation dtype of `dtype`."""
    return torch.tensor(alpha, dtype=acc_dtype(dtype)).double()


def reference(x: torch.Tensor, alpha, dim: int = -1) -> torch.Tensor:
    """float64 reference forward, on the CPU, of x as given (already rounded to its dtype)."""
    from entmax_cuda.reference import entmax_reference_forward

    if torch.is_tensor(alpha):
        alpha = alpha.detach().cpu().double()
    return entmax_reference_forward(x.detach().cpu().double(), alpha, dim, n_iter=REFERENCE_N_ITER)


def sparsemax_by_sorting(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Closed-form sparsemax (Martins & Astudillo, 2016) in x's dtype."""
    x = x.transpose(dim, -1)
    z, _ = torch.sort(x, dim=-1, descending=True)
    k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    cumsum = z.cumsum(-1)
    support = 1 + k * z > cumsum
    k_max = support.to(x.dtype).cumprod(-1).sum(-1, keepdim=True)
    tau = (cumsum.gather(-1, k_max.long() - 1) - 1) / k_max
    return torch.clamp(x - tau, min=0).transpose(dim, -1)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()


# ---------------------------------------------------------------- dsan tests

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
    """path, or skip the test naming what is missing."""
    if not path.exists():
        pytest.skip(f"real data not found: {path} (the shared data folder beside the checkout)")
    return path


def make_tiny_synthetic(out_dir, seed: int = 1):
    from dsan.data import prepare

    prepare("synthetic", out_dir, seed=seed, **TINY_SYNTHETIC)
    return Path(out_dir)


def tiny_config(data_dir, run_dir, resume: bool = False, **overrides):
    """The RunConfig of a tiny run (TINY_TRAINING, then `overrides`)."""
    from dsan.train import prepare_run

    return prepare_run(run_dir, overrides=dict(TINY_TRAINING, data=str(data_dir), **overrides), resume=resume)


def train_tiny(data_dir, run_dir, resume: bool = False, **overrides) -> dict:
    """Trains (quietly) and tests a tiny run in run_dir; returns its summary."""
    from dsan.train import train

    return train(tiny_config(data_dir, run_dir, resume, **overrides), run_dir, resume=resume, quiet=True)


def subprocess_env() -> dict:
    """Environment for `python -m dsan` in a subprocess (run it with cwd outside the checkout):
    the checkout goes on PYTHONPATH only when dsan is not installed."""
    import dsan

    env = dict(os.environ, OMP_NUM_THREADS="1")
    if Path(dsan.__file__).resolve().parents[1] == REPO_ROOT:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return env


# ---------------------------------------------------------------- CUDA kernels on the CPU

def cuda_include_dir():
    """The CUDA toolkit's include folder (cuda_fp16.h), or None."""
    from torch.utils import cpp_extension

    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return str(Path(root) / "include")
    return None


_EMULATION_LOADED = []  # the emulation's library, once loaded in this process


def _cpu_has_fma() -> bool:
    """Whether this x86-64 CPU has FMA3 (Linux: /proc/cpuinfo's flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " fma " in f" {line.split(':', 1)[-1].strip()} " for line in f)
    except OSError:
        return False


def load_attention_emulation(build_dir):
    """Builds tests/cuda_emulation (the CUDA attention kernels on the CPU) into build_dir with the C++
    compiler ($CXX, else c++; no ninja needed) and returns its ops, torch.ops.entmax_cuda_emulation.
    Build into a fresh folder: the kernel headers change without the source changing. None without the
    CUDA toolkit's headers or a compiler, or off Linux (the emulator uses glibc's ucontext). Built and
    loaded once per process: a second library registering the same ops crashes the process."""
    if _EMULATION_LOADED:
        return torch.ops.entmax_cuda_emulation
    import shutil
    import subprocess

    from torch.utils import cpp_extension

    include = cuda_include_dir()
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if include is None or compiler is None or not sys.platform.startswith("linux"):
        return None
    library = Path(build_dir) / "entmax_attention_emulation.so"
    libs = cpp_extension.library_paths()
    # Fused multiply-adds where the CPU has them, contracted wherever the compiler can, as nvcc does
    # (--fmad=true): the kernels' assumption that a score recomputed in a later pass has the same
    # bits then holds only if the source computes it the same way everywhere, as on a GPU.
    # (GCC forms FMAs from -O2, or at -O1 with -fexpensive-optimizations.)
    fma = ["-mfma", "-ffp-contract=fast", "-fexpensive-optimizations"] if _cpu_has_fma() else []
    command = [compiler, "-shared", "-fPIC", "-O1", "-std=c++17", "-Wno-unknown-pragmas", *fma,
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{include}",
               *(f"-I{p}" for p in cpp_extension.include_paths()),
               str(REPO_ROOT / "tests" / "cuda_emulation" / "attention_emulation.cpp"), "-o", str(library),
               *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch", "-ltorch_cpu"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the CUDA emulation failed:\n{' '.join(command)}\n{done.stderr[-4000:]}")
    torch.ops.load_library(str(library))
    _EMULATION_LOADED.append(library)
    return torch.ops.entmax_cuda_emulation
