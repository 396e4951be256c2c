"""Shared fixtures and helpers of the test suite.

`device` runs a test on the CPU always and on CUDA when a GPU is visible (CUDA
variants are marked `cuda`, so a GPU machine selects them with `-m cuda`).
The tolerances of the entmax tests live here, once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

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


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread_for_entmax_tests(request):
    """One intra-op thread in the entmax tests: the reference's many small tensor ops slow
    down 10-100x when threads oversubscribe a busy machine. The kernels' multi-threaded
    path has a test of its own (test_multithreaded_cpu_forward_equals_single_threaded)."""
    if not request.module.__name__.startswith("test_entmax"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_data_path(*parts: str) -> Path:
    """A path under ../shared/data (beside the checkout); skips the test if it is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


@pytest.fixture
def shared_data():
    return shared_data_path


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
