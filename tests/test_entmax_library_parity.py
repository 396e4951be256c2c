"""Parity with the `entmax` library (PyPI, the test extra) where the definitions agree:
alpha in (1, 2], no fully masked rows, float64."""

from __future__ import annotations

import inspect

import pytest
import torch

import entmax_cuda

entmax_lib = pytest.importorskip("entmax")

ATOL_LIB = 1e-12  # float64; the library bisects 50 times in the textbook form
ALPHAS = [1.1, 1.25, 1.5, 1.75, 2.0]


def _x(shape, device, scale=2.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(device)


def test_entmax_bisect_has_the_librarys_signature():
    ours = inspect.signature(entmax_cuda.entmax_bisect)
    theirs = inspect.signature(entmax_lib.entmax_bisect)
    assert [(p.name, p.default) for p in ours.parameters.values()] == [
        (p.name, p.default) for p in theirs.parameters.values()
    ]


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", [2, 70, 285])
def test_entmax_bisect_forward_matches_the_library(device, n, alpha):
    x = _x((5, n), device)
    ours = entmax_cuda.entmax_bisect(x, alpha)
    theirs = entmax_lib.entmax_bisect(x, alpha)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL_LIB)


@pytest.mark.parametrize("ensure_sum_one", [True, False])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_entmax_bisect_positional_and_keyword_arguments_match_the_library(device, dim, ensure_sum_one):
    x = _x((6, 7, 8), device)
    ours = entmax_cuda.entmax_bisect(x, 1.4, dim, 50, ensure_sum_one)
    theirs = entmax_lib.entmax_bisect(x, 1.4, dim, 50, ensure_sum_one)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL_LIB)
    ours_kw = entmax_cuda.entmax_bisect(X=x, alpha=1.4, dim=dim, n_iter=50, ensure_sum_one=ensure_sum_one)
    assert torch.equal(ours_kw, ours)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_entmax_bisect_gradients_match_the_library(device, alpha):
    x = _x((4, 30), device)
    dy = _x((4, 30), device, 1.0)
    row_alpha = torch.full((4, 1), alpha, dtype=torch.float64, device=device)
    row_alpha += torch.linspace(0, -0.05, 4, dtype=torch.float64, device=device).reshape(4, 1)
    grads = []
    for fn in (entmax_cuda.entmax_bisect, entmax_lib.entmax_bisect):
        xr = x.clone().requires_grad_()
        ar = row_alpha.clone().requires_grad_()
        fn(xr, ar, -1).backward(dy)
        grads.append((xr.grad, ar.grad))
    (dx_ours, da_ours), (dx_lib, da_lib) = grads
    torch.testing.assert_close(dx_ours, dx_lib, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(da_ours, da_lib, rtol=1e-8, atol=1e-10)


def test_scalar_alpha_tensor_gradient_matches_the_library(device):
    x = _x((3, 5, 20), device)
    dy = _x((3, 5, 20), device, 1.0)
    grads = []
    for fn in (entmax_cuda.entmax_bisect, entmax_lib.entmax_bisect):
        a = torch.tensor(1.6, dtype=torch.float64, device=device, requires_grad=True)
        fn(x, a, 1).backward(dy)
        grads.append(a.grad)
    assert grads[0].shape == grads[1].shape == ()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n", [2, 70, 285])
@pytest.mark.parametrize("alpha, closed_form", [(1.5, "entmax15"), (2.0, "sparsemax")])
def test_closed_form_alphas_match_the_library(device, n, alpha, closed_form):
    """alpha 1.5 and 2 against the library's exact (sorting) entmax15 and sparsemax."""
    x = _x((5, n), device).requires_grad_()
    dy = _x((5, n), device, 1.0)
    ours = entmax_cuda.entmax(x, alpha)
    (dx_ours,) = torch.autograd.grad(ours, x, dy)
    theirs = getattr(entmax_lib, closed_form)(x, dim=-1)
    (dx_lib,) = torch.autograd.grad(theirs, x, dy)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL_LIB)
    torch.testing.assert_close(dx_ours, dx_lib, rtol=1e-9, atol=1e-10)


def test_partially_masked_rows_match_the_library(device):
    x = _x((4, 30), device)
    x[:, ::4] = float("-inf")
    torch.testing.assert_close(entmax_cuda.entmax_bisect(x, 1.5), entmax_lib.entmax_bisect(x, 1.5),
                               rtol=0, atol=ATOL_LIB)
    torch.testing.assert_close(entmax_cuda.entmax(x, 1.5), entmax_lib.entmax15(x), rtol=0, atol=ATOL_LIB)
    torch.testing.assert_close(entmax_cuda.entmax(x, 2.0), entmax_lib.sparsemax(x), rtol=0, atol=ATOL_LIB)


def test_float32_entmax_bisect_is_at_least_as_accurate_as_the_library(device):
    x = _x((6, 285), device, 4.0)
    exact = entmax_cuda.entmax_bisect(x, 1.3)
    ours = entmax_cuda.entmax_bisect(x.float(), 1.3)
    theirs = entmax_lib.entmax_bisect(x.float(), 1.3)
    assert ours.dtype == torch.float32
    err_ours = (ours.double() - exact).abs().max().item()
    err_theirs = (theirs.double() - exact).abs().max().item()
    assert err_ours <= max(err_theirs, 1e-6)
