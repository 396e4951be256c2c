"""Gradients of entmax_cuda.entmax in x and alpha: gradcheck, the reference backward,
alpha's shapes and dtypes, masking and edge cases."""

from __future__ import annotations

import pytest
import torch

import entmax_cuda
from testing import (
    ALPHA_GRAD_RTOL_FLOAT32,
    ATOL,
    GRAD_RTOL,
    REFERENCE_N_ITER,
    acc_dtype,
    alpha_as_kernel_sees_it,
    reference,
    requires_cuda,
)
from entmax_cuda.reference import entmax_bisect_reference, entmax_reference_backward

backward_op = torch.ops.entmax_cuda.entmax_backward

ALPHAS = [1.0, 1 + 1e-5, 1.001, 1.1, 1.5, 1.75, 1.99, 2.0, 2.5, 3.0]


def _scores(shape, scale: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


def _rows_alpha(x: torch.Tensor, alpha: float, dim: int = -1) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = 1
    return torch.full(shape, alpha, dtype=acc_dtype(x.dtype), device=x.device)


# ------------------------------------------------------------------ gradcheck

@pytest.mark.parametrize("alpha", [1.0001, 1.3, 1.5, 1.7, 2.0, 2.5])
def test_gradcheck_x_and_per_row_alpha(device, alpha):
    x = _scores((4, 7), 1.5, torch.float64, device).requires_grad_()
    a = torch.full((4, 1), alpha, dtype=torch.float64, device=device)
    a = (a + torch.linspace(0, 0.05, 4, dtype=torch.float64, device=device).reshape(4, 1)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, a: entmax_cuda.entmax(x, a), (x, a))


@pytest.mark.parametrize("alpha", [1.0001, 1.3, 1.7, 2.5])
def test_gradcheck_scalar_alpha_along_a_middle_dim(device, alpha):
    x = _scores((2, 6, 3), 1.5, torch.float64, device).requires_grad_()
    a = torch.tensor(alpha, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: entmax_cuda.entmax(x, a, dim=1), (x, a))


def test_gradcheck_per_head_alpha(device):
    x = _scores((2, 3, 2, 5), 1.5, torch.float64, device).requires_grad_()
    a = torch.tensor([1.2, 1.6, 2.3], dtype=torch.float64, device=device).reshape(1, 3, 1, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, a: entmax_cuda.entmax(x, a), (x, a))


def test_gradcheck_x_at_alpha_one_exactly(device):
    x = _scores((3, 6), 2.0, torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: entmax_cuda.entmax(x, 1.0), (x,))


def test_gradcheck_with_masked_entries(device):
    x = _scores((3, 8), 1.5, torch.float64, device)
    x[:, ::3] = float("-inf")
    x.requires_grad_()
    a = torch.tensor([[1.3], [1.7], [2.5]], dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: entmax_cuda.entmax(x, a), (x, a))


def test_alpha_gradient_at_alpha_one_is_the_one_sided_limit(device):
    x = _scores((5, 40), 2.0, torch.float64, device)
    dy = _scores((5, 40), 1.0, torch.float64, device)
    a = torch.ones(5, 1, dtype=torch.float64, device=device, requires_grad=True)
    p = entmax_cuda.entmax(x, a)
    p.backward(dy)
    # math doc section 5: dp/dalpha = (p/2)(sum_j p_j l_j^2 - l^2) with p = softmax
    soft = torch.softmax(x, -1)
    ell = soft.log()
    limit = (dy * soft / 2 * ((soft * ell**2).sum(-1, keepdim=True) - ell**2)).sum(-1, keepdim=True)
    torch.testing.assert_close(a.grad, limit, rtol=1e-10, atol=1e-12)
    # and the right-sided difference quotient approaches it
    h = 1e-7
    quotient = ((entmax_cuda.entmax(x, 1 + h) - entmax_cuda.entmax(x, 1.0)) * dy).sum(-1, keepdim=True) / h
    torch.testing.assert_close(a.grad, quotient, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ backward op vs reference

@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", [1, 2, 70, 285, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_op_matches_reference_backward(device, dtype, n, alpha):
    x = _scores((6, n), 3.0, dtype, device)
    y = entmax_cuda.entmax(x, alpha)
    dy = _scores((6, n), 1.0, dtype, device)
    dx, da = backward_op(dy, y, _rows_alpha(x, alpha), -1)
    assert dx.dtype == dtype and da.dtype == acc_dtype(dtype) and da.shape == (6, 1)
    a64 = alpha_as_kernel_sees_it(alpha, dtype)
    dx_ref, da_ref = entmax_reference_backward(y.cpu().double(), dy.cpu().double(), a64, -1, "stable")
    torch.testing.assert_close(dx.cpu().double(), dx_ref, rtol=GRAD_RTOL[dtype], atol=ATOL[dtype])
    alpha_rtol = GRAD_RTOL[dtype] if dtype == torch.float64 else ALPHA_GRAD_RTOL_FLOAT32
    torch.testing.assert_close(da.cpu().double(), da_ref, rtol=alpha_rtol, atol=ATOL[dtype])


@pytest.mark.parametrize("alpha", [1.1, 1.5, 1.75, 2.0, 2.5, 3.0])
def test_alpha_gradient_matches_the_textbook_form_away_from_one(device, alpha):
    x = _scores((6, 70), 2.0, torch.float64, device)
    y = entmax_cuda.entmax(x, alpha)
    dy = _scores((6, 70), 1.0, torch.float64, device)
    _, da = backward_op(dy, y, _rows_alpha(x, alpha), -1)
    _, da_textbook = entmax_reference_backward(y.cpu(), dy.cpu(), alpha, -1, "textbook")
    _, da_stable = entmax_reference_backward(y.cpu(), dy.cpu(), alpha, -1, "stable")
    _, da_centred = entmax_reference_backward(y.cpu(), dy.cpu(), alpha, -1, "centred")
    torch.testing.assert_close(da_stable, da_textbook, rtol=1e-12, atol=1e-12)  # the forms agree here
    torch.testing.assert_close(da_centred, da_textbook, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(da.cpu(), da_textbook, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_backward_matches_reference_within_its_precision(device, dtype, alpha):
    x = _scores((6, 70), 3.0, dtype, device)
    y = entmax_cuda.entmax(x, alpha)
    dy = _scores((6, 70), 1.0, dtype, device)
    dx, da = backward_op(dy, y, _rows_alpha(x, alpha), -1)
    assert dx.dtype == dtype and da.dtype == torch.float32
    # The alpha-gradient forms agree only when sum p = 1; a rounded p sums to 1 within its
    # precision, so each form has its own answer. The kernel's arithmetic (float32) is checked
    # against its own form in float64 on the same rounded p, and the result against the
    # gradient at the exact p of x within the half dtype's precision.
    dx_ref, da_ref = entmax_reference_backward(y.cpu().double(), dy.cpu().double(), alpha, -1, "centred")
    tol = ATOL[dtype]
    torch.testing.assert_close(dx.cpu().double(), dx_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(da.cpu().double(), da_ref, rtol=1e-4, atol=ATOL[torch.float32])
    p_exact = reference(x.cpu().double(), alpha)
    _, da_exact = entmax_reference_backward(p_exact, dy.cpu().double(), alpha, -1, "stable")
    scale = da_exact.abs().max().item() + 1.0
    assert (da.cpu().double() - da_exact).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_autograd_returns_grads_in_the_input_dtype(device, dtype):
    x = _scores((3, 20), 2.0, dtype, device).requires_grad_()
    a = torch.tensor(1.4, dtype=dtype, device=device, requires_grad=True)
    entmax_cuda.entmax(x, a).pow(2).sum().backward()
    assert x.grad.dtype == dtype and a.grad.dtype == dtype and a.grad.shape == ()
    assert torch.isfinite(x.grad).all() and torch.isfinite(a.grad)


@pytest.mark.parametrize("n", [70, 285, 4096])
def test_alpha_just_above_one_gradients_match_float64_reference(device, n):
    alpha = 1 + 1e-5
    x = _scores((8, n), 4.0, torch.float32, device).requires_grad_()
    a = torch.full((8, 1), alpha, dtype=torch.float32, device=device, requires_grad=True)
    dy = _scores((8, n), 1.0, torch.float32, device)
    entmax_cuda.entmax(x, a).backward(dy)
    a64 = alpha_as_kernel_sees_it(alpha, torch.float32)
    p64 = reference(x, a64)
    dx_ref, da_ref = entmax_reference_backward(p64, dy.cpu().double(), a64, -1, "stable")
    torch.testing.assert_close(x.grad.cpu().double(), dx_ref, rtol=0, atol=ATOL[torch.float32])
    torch.testing.assert_close(a.grad.cpu().double(), da_ref, rtol=ALPHA_GRAD_RTOL_FLOAT32, atol=0)


@pytest.mark.parametrize("alpha", [1.0, 1 + 1e-5])
@pytest.mark.parametrize("n", [4096, 100_000])
def test_float32_alpha_gradient_of_long_rows_matches_float64(device, n, alpha):
    # At alpha = 1 every finite entry is on the support: the sums run over the whole row.
    # (The CPU once summed alpha = 1 rows in plain float: 4e-5 off on 50k entries.)
    x = _scores((4, n), 3.0, torch.float64, "cpu")
    x[0, : n // 2] = float("-inf")
    dy = _scores((4, n), 1.0, torch.float64, "cpu")
    grads = {}
    for dtype in (torch.float32, torch.float64):
        a = torch.full((4, 1), alpha, dtype=torch.float64).to(dtype).to(device).requires_grad_()
        y = entmax_cuda.entmax(x.to(dtype).to(device), a)
        (y * dy.to(dtype).to(device)).sum().backward()
        grads[dtype] = a.grad.cpu().double()
    torch.testing.assert_close(grads[torch.float32], grads[torch.float64],
                               rtol=GRAD_RTOL[torch.float32], atol=ATOL[torch.float32])


# ------------------------------------------------------------------ the support edge for alpha > 2

def _rows_with_an_entry_at_the_support_edge(alpha: float, edge_ps) -> torch.Tensor:
    """float64 rows [0, u_edge, u_mid, -5] whose second entry gets p = edge_p (before rounding
    to float32): with p_1 = 1 - edge_p - p_mid known, t and each u follow from p = z^(1/eps)."""
    eps = alpha - 1
    rows = []
    for edge_p in edge_ps:
        p_mid = 0.25
        p_top = 1 - edge_p - p_mid
        t = (1 - p_top**eps) / eps
        u_of = lambda p: t + (p**eps - 1) / eps  # noqa: E731
        rows.append([0.0, u_of(edge_p), u_of(p_mid), -5.0])
    return torch.tensor(rows, dtype=torch.float64)


EDGE_PS = [1e-2, 1e-4, 1e-6, 3e-8]


@pytest.mark.parametrize("alpha", [2.1, 2.5, 3.0])
def test_float32_gradients_at_the_support_edge_match_float64(device, alpha):
    # An entry with 0 < p < 2^(-25/(alpha-1)) once made 1 + expm1((alpha-1) ln p) round to 0
    # in float32: NaN gradients for x and alpha (and for an alpha shared with other rows).
    x = _rows_with_an_entry_at_the_support_edge(alpha, EDGE_PS).to(torch.float32)
    dy = _scores(x.shape, 1.0, torch.float64, "cpu").to(torch.float32)
    a32 = alpha_as_kernel_sees_it(alpha, torch.float32).item()  # the same alpha in both runs
    grads = {}
    for dtype in (torch.float32, torch.float64):
        xd = x.detach().clone().to(dtype).to(device).requires_grad_()  # a fresh leaf per dtype
        rows = torch.full((len(EDGE_PS), 1), a32, dtype=dtype, device=device, requires_grad=True)
        shared = torch.tensor(a32, dtype=dtype, device=device, requires_grad=True)
        y = entmax_cuda.entmax(xd, rows)
        assert (y[:, 1] > 0).all()  # the edge entries stay on the support
        (y * dy.to(dtype).to(device)).sum().backward()
        (entmax_cuda.entmax(xd.detach(), shared) * dy.to(dtype).to(device)).sum().backward()
        grads[dtype] = [g.detach().cpu().double() for g in (xd.grad, rows.grad, shared.grad)]
    dx32, da32, shared32 = grads[torch.float32]
    dx64, da64, shared64 = grads[torch.float64]
    assert torch.isfinite(dx32).all() and torch.isfinite(da32).all() and torch.isfinite(shared32)
    torch.testing.assert_close(dx32, dx64, rtol=GRAD_RTOL[torch.float32], atol=ATOL[torch.float32])
    torch.testing.assert_close(da32, da64, rtol=ALPHA_GRAD_RTOL_FLOAT32, atol=ATOL[torch.float32])
    torch.testing.assert_close(shared32, shared64, rtol=ALPHA_GRAD_RTOL_FLOAT32, atol=ATOL[torch.float32])


@pytest.mark.parametrize("alpha_grad", [True, False])
@pytest.mark.parametrize("alpha", [2.1, 2.5, 3.0])
def test_float32_backward_op_at_the_support_edge_matches_the_float64_reference(device, alpha, alpha_grad):
    # The backward alone, from the same float32 output: float32 rows with alpha > 2 run in double.
    x = _rows_with_an_entry_at_the_support_edge(alpha, EDGE_PS).to(torch.float32).to(device)
    y = entmax_cuda.entmax(x, alpha)
    dy = _scores(x.shape, 1.0, torch.float32, device)
    dx, da = backward_op(dy, y, _rows_alpha(x, alpha), -1, alpha_grad)
    a64 = alpha_as_kernel_sees_it(alpha, torch.float32)
    dx_ref, da_ref = entmax_reference_backward(y.cpu().double(), dy.cpu().double(), a64, -1, "stable")
    torch.testing.assert_close(dx.cpu().double(), dx_ref, rtol=GRAD_RTOL[torch.float32], atol=ATOL[torch.float32])
    if alpha_grad:
        torch.testing.assert_close(da.cpu().double(), da_ref, rtol=ALPHA_GRAD_RTOL_FLOAT32, atol=ATOL[torch.float32])
    else:
        assert torch.equal(da, torch.zeros_like(da))


def test_the_issue_reproduction_has_finite_gradients(device):
    x = torch.tensor([0.0, -0.49999], device=device, requires_grad=True)
    a = torch.tensor(3.0, device=device, requires_grad=True)
    entmax_cuda.entmax(x, a).backward(torch.tensor([1.0, 0.0], device=device))
    x64 = x.detach().double().requires_grad_()
    a64 = a.detach().double().requires_grad_()
    entmax_cuda.entmax(x64, a64).backward(torch.tensor([1.0, 0.0], dtype=torch.float64, device=device))
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=GRAD_RTOL[torch.float32], atol=ATOL[torch.float32])
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=ALPHA_GRAD_RTOL_FLOAT32, atol=ATOL[torch.float32])


# ------------------------------------------------------------------ the x-gradient alone

@pytest.mark.parametrize("alpha", [1.0, 1.1, 1.5, 2.0, 2.5])
@pytest.mark.parametrize("n", [70, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_without_alpha_gradient_gives_the_same_x_gradient_and_zeros(device, dtype, n, alpha):
    x = _scores((6, n), 3.0, dtype, device)
    y = entmax_cuda.entmax(x, alpha)
    dy = _scores((6, n), 1.0, dtype, device)
    dx_full, _ = backward_op(dy, y, _rows_alpha(x, alpha), -1, True)
    dx, da = backward_op(dy, y, _rows_alpha(x, alpha), -1, False)
    assert torch.equal(da, torch.zeros_like(da))
    torch.testing.assert_close(dx, dx_full, rtol=GRAD_RTOL[dtype], atol=ATOL[dtype])


def test_autograd_asks_for_the_alpha_gradient_only_when_alpha_requires_it(device, monkeypatch):
    from entmax_cuda import ops

    calls = []
    real = ops.backward_op

    def spy(*args):
        calls.append(args[4])
        return real(*args)

    monkeypatch.setattr(ops, "backward_op", spy)
    x = _scores((3, 20), 2.0, torch.float32, device).requires_grad_()
    entmax_cuda.entmax(x, torch.full((3, 1), 1.5, device=device)).sum().backward()
    entmax_cuda.entmax(x, torch.full((3, 1), 1.5, device=device, requires_grad=True)).sum().backward()
    assert calls == [False, True]


# ------------------------------------------------------------------ alpha forms

def _reference_grads(x, alpha, dy, dim):
    x64 = x.detach().cpu().double().requires_grad_()
    a64 = alpha.detach().cpu().double().requires_grad_()
    entmax_bisect_reference(x64, a64, dim, REFERENCE_N_ITER).backward(dy.detach().cpu().double())
    return x64.grad, a64.grad


@pytest.mark.parametrize(
    "x_shape,alpha_shape,dim",
    [
        ((2, 3, 4, 30), (), -1),
        ((2, 3, 4, 30), (2, 3, 4, 1), -1),
        ((2, 3, 4, 30), (1, 3, 1, 1), -1),
        ((2, 3, 4, 30), (4, 1), -1),
        ((3, 30, 1), (3, 1, 1), 1),
        ((3, 30, 5), (3, 1, 1), 1),
        ((3, 30, 5), (1, 5), 1),
    ],
    ids=["0d", "per-row", "per-head", "trailing", "per-session-dim1", "per-session-broadcast", "per-column"],
)
def test_alpha_gradient_has_alphas_shape_and_matches_reference(device, x_shape, alpha_shape, dim):
    x = _scores(x_shape, 2.0, torch.float64, device).requires_grad_()
    alpha = (1.1 + torch.rand(alpha_shape, dtype=torch.float64) * 1.3).to(device).requires_grad_()
    dy = _scores(x_shape, 1.0, torch.float64, device)
    entmax_cuda.entmax(x, alpha, dim).backward(dy)
    assert alpha.grad.shape == alpha.shape and alpha.grad.dtype == alpha.dtype
    dx_ref, da_ref = _reference_grads(x, alpha, dy, dim)
    torch.testing.assert_close(x.grad.cpu(), dx_ref, rtol=GRAD_RTOL[torch.float64], atol=ATOL[torch.float64])
    torch.testing.assert_close(alpha.grad.cpu(), da_ref, rtol=GRAD_RTOL[torch.float64], atol=ATOL[torch.float64])


@pytest.mark.parametrize("alpha_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_alpha_gradient_comes_back_in_alphas_dtype_summed_over_rows(device, alpha_dtype):
    x = _scores((2, 3, 4, 30), 2.0, torch.float32, device)
    values = torch.tensor([1.25, 1.5, 1.75]).to(alpha_dtype)  # exact in every dtype
    head_alpha = values.reshape(1, 3, 1, 1).to(device).requires_grad_()
    dy = _scores((2, 3, 4, 30), 1.0, torch.float32, device)
    entmax_cuda.entmax(x, head_alpha).backward(dy)
    assert head_alpha.grad.dtype == alpha_dtype and head_alpha.grad.shape == (1, 3, 1, 1)
    row_alpha = values.float().reshape(1, 3, 1, 1).expand(2, 3, 4, 1).to(device).clone().requires_grad_()
    entmax_cuda.entmax(x, row_alpha).backward(dy)
    summed = row_alpha.grad.double().sum(dim=(0, 2), keepdim=True)
    rtol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(alpha_dtype, 1e-5)
    torch.testing.assert_close(head_alpha.grad.double(), summed, rtol=rtol, atol=0)


def test_float_alpha_needs_no_gradient_and_x_gradient_is_unchanged(device):
    x = _scores((4, 30), 2.0, torch.float64, device).requires_grad_()
    dy = _scores((4, 30), 1.0, torch.float64, device)
    entmax_cuda.entmax(x, 1.5).backward(dy)
    by_float = x.grad.clone()
    x.grad = None
    a = torch.tensor(1.5, dtype=torch.float64, device=device, requires_grad=True)
    entmax_cuda.entmax(x, a).backward(dy)
    torch.testing.assert_close(x.grad, by_float, rtol=GRAD_RTOL[torch.float64], atol=ATOL[torch.float64])


def test_only_alpha_requires_grad(device):
    x = _scores((4, 30), 2.0, torch.float64, device)
    a = torch.tensor(1.5, dtype=torch.float64, device=device, requires_grad=True)
    dy = _scores((4, 30), 1.0, torch.float64, device)
    entmax_cuda.entmax(x, a).backward(dy)
    _, da_ref = _reference_grads(x, a, dy, -1)
    torch.testing.assert_close(a.grad.cpu(), da_ref, rtol=GRAD_RTOL[torch.float64], atol=ATOL[torch.float64])


# ------------------------------------------------------------------ layouts

@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_backward_along_any_dim_matches_reference(device, dim):
    x = _scores((4, 5, 6), 2.0, torch.float64, device).requires_grad_()
    shape = [4, 5, 6]
    shape[dim] = 1
    a = (1.1 + torch.rand(shape, dtype=torch.float64) * 1.4).to(device).requires_grad_()
    dy = _scores((4, 5, 6), 1.0, torch.float64, device)
    entmax_cuda.entmax(x, a, dim).backward(dy)
    dx_ref, da_ref = _reference_grads(x, a, dy, dim)
    torch.testing.assert_close(x.grad.cpu(), dx_ref, rtol=GRAD_RTOL[torch.float64], atol=ATOL[torch.float64])
    torch.testing.assert_close(a.grad.cpu(), da_ref, rtol=GRAD_RTOL[torch.float64], atol=ATOL[torch.float64])


def test_non_contiguous_grad_output_gives_the_same_gradients(device):
    x = _scores((6, 40), 2.0, torch.float32, device).requires_grad_()
    a = torch.tensor(1.6, device=device, requires_grad=True)
    dy_base = _scores((40, 6), 1.0, torch.float32, device)
    entmax_cuda.entmax(x, a).backward(dy_base.t())
    grads = (x.grad.clone(), a.grad.clone())
    x.grad = a.grad = None
    entmax_cuda.entmax(x, a).backward(dy_base.t().contiguous())
    assert torch.equal(x.grad, grads[0]) and torch.equal(a.grad, grads[1])


def test_non_contiguous_input_gives_the_same_gradients(device):
    base = _scores((40, 12), 2.0, torch.float32, device)
    dy = _scores((6, 40), 1.0, torch.float32, device)
    strided = base.clone().requires_grad_()
    entmax_cuda.entmax(strided[::2, :6].t(), 1.5).backward(dy[:, :20])
    x_c = base[::2, :6].t().contiguous().requires_grad_()
    entmax_cuda.entmax(x_c, 1.5).backward(dy[:, :20])
    assert torch.equal(strided.grad[::2, :6].t(), x_c.grad)
    assert (strided.grad[1::2] == 0).all() and (strided.grad[:, 6:] == 0).all()


@pytest.mark.parametrize("shape,dim", [((0, 5), -1), ((3, 0), -1), ((2, 0, 4), 1)])
def test_empty_tensors_have_empty_gradients_and_zero_alpha_gradient(device, shape, dim):
    x = torch.randn(shape, device=device, requires_grad=True)
    a_shape = list(shape)
    a_shape[dim] = 1
    a = torch.full(a_shape, 1.5, device=device, requires_grad=True)
    s = torch.tensor(1.5, device=device, requires_grad=True)
    (entmax_cuda.entmax(x, a, dim).sum() + entmax_cuda.entmax(x, s, dim).sum()).backward()
    assert x.grad.shape == x.shape
    assert torch.equal(a.grad, torch.zeros_like(a))
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 2.5])
def test_rows_of_length_one_have_zero_gradients(device, alpha):
    x = _scores((4, 1), 3.0, torch.float64, device).requires_grad_()
    a = torch.full((4, 1), alpha, dtype=torch.float64, device=device, requires_grad=True)
    entmax_cuda.entmax(x, a).backward(_scores((4, 1), 1.0, torch.float64, device))
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(a.grad, torch.zeros_like(a))


# ------------------------------------------------------------------ special values

@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 2.5])
def test_masked_entries_get_zero_gradient_and_the_rest_matches_the_unmasked_row(device, alpha):
    x = _scores((3, 40), 2.0, torch.float64, device)
    mask = torch.zeros(3, 40, dtype=torch.bool, device=device)
    mask[:, 1::4] = True
    mask[2, :30] = True
    xm = x.masked_fill(mask, float("-inf")).requires_grad_()
    a = torch.full((3, 1), alpha, dtype=torch.float64, device=device, requires_grad=True)
    dy = _scores((3, 40), 1.0, torch.float64, device)
    entmax_cuda.entmax(xm, a).backward(dy)
    assert (xm.grad[mask] == 0).all()
    for r in range(3):
        kept = x[r][~mask[r]].clone().requires_grad_()
        ar = torch.tensor(alpha, dtype=torch.float64, device=device, requires_grad=True)
        entmax_cuda.entmax(kept, ar).backward(dy[r][~mask[r]])
        torch.testing.assert_close(xm.grad[r][~mask[r]], kept.grad, rtol=0, atol=ATOL[torch.float64])
        torch.testing.assert_close(a.grad[r, 0], ar.grad, rtol=GRAD_RTOL[torch.float64], atol=ATOL[torch.float64])


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_masked_row_has_zero_gradient_for_x_and_alpha(device, dtype, alpha):
    x = _scores((3, 20), 2.0, dtype, device)
    x[1] = float("-inf")
    x.requires_grad_()
    row_alpha = torch.full((3, 1), alpha, dtype=dtype, device=device, requires_grad=True)
    dy = _scores((3, 20), 1.0, dtype, device)
    entmax_cuda.entmax(x, row_alpha).backward(dy)
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    assert row_alpha.grad[1, 0].item() == 0.0
    assert torch.isfinite(x.grad).all() and torch.isfinite(row_alpha.grad).all()
    # a shared alpha gets exactly the other rows' gradient
    scalar_alpha = torch.tensor(alpha, dtype=dtype, device=device, requires_grad=True)
    entmax_cuda.entmax(x.detach(), scalar_alpha).backward(dy)
    torch.testing.assert_close(scalar_alpha.grad, row_alpha.grad[[0, 2]].sum(), rtol=1e-6, atol=0)


def test_nan_row_does_not_touch_the_gradients_of_other_rows(device):
    x = _scores((3, 20), 2.0, torch.float32, device)
    x[0, 5] = float("nan")
    x.requires_grad_()
    a = torch.full((3, 1), 1.5, device=device, requires_grad=True)
    dy = _scores((3, 20), 1.0, torch.float32, device)
    entmax_cuda.entmax(x, a).backward(dy)
    clean = x.detach()[1:].clone().requires_grad_()
    a_clean = torch.full((2, 1), 1.5, device=device, requires_grad=True)
    entmax_cuda.entmax(clean, a_clean).backward(dy[1:])
    torch.testing.assert_close(x.grad[1:], clean.grad, rtol=GRAD_RTOL[torch.float32], atol=ATOL[torch.float32])
    torch.testing.assert_close(a.grad[1:], a_clean.grad, rtol=ALPHA_GRAD_RTOL_FLOAT32, atol=ATOL[torch.float32])
    assert torch.isnan(x.grad[0]).all() and torch.isnan(a.grad[0]).all()


# ------------------------------------------------------------------ CUDA vs CPU

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 70, 285, 4096, 100_000])
def test_cuda_gradients_equal_cpu_gradients(dtype, n):
    rows = 12 if n <= 4096 else 2
    x = _scores((rows, n), 3.0, dtype, "cpu")
    x[0, : n // 2] = float("-inf")
    if rows > 2:
        x[2] = float("-inf")
    # alpha <= 2: above 2 the x-gradient g = p^(2 - alpha) is unbounded at the support edge
    alpha = torch.linspace(1.0, 2.0, rows, dtype=torch.float64).reshape(rows, 1).to(dtype)
    head_alpha = torch.tensor(1.4, dtype=dtype)
    dy = _scores((rows, n), 1.0, dtype, "cpu")
    grads = {}
    for dev in ("cpu", "cuda"):
        # fresh leaves on each device (x.to("cpu") would return x itself)
        xd = x.detach().clone().to(dev).requires_grad_()
        ad = alpha.detach().clone().to(dev).requires_grad_()
        hd = head_alpha.detach().clone().to(dev).requires_grad_()
        (entmax_cuda.entmax(xd, ad) * dy.to(dev)).sum().backward()
        (entmax_cuda.entmax(xd.detach(), hd) * dy.to(dev)).sum().backward()
        grads[dev] = (xd.grad.cpu(), ad.grad.cpu(), hd.grad.cpu())
    for got, want in zip(grads["cuda"], grads["cpu"]):
        torch.testing.assert_close(got, want, rtol=GRAD_RTOL[dtype], atol=ATOL[dtype])


def test_double_backward_raises_not_implemented(device):
    # a second derivative that silently came back as zeros would corrupt gradient penalties:
    # the documented answer is an explicit NotImplementedError
    x = _scores((2, 6), 1.0, torch.float64, device).requires_grad_()
    w = _scores((2, 6), 1.0, torch.float64, device)
    (g,) = torch.autograd.grad((entmax_cuda.entmax(x, 1.5) * w).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(g.square().sum(), x)
