"""Forward of entmax_cuda.entmax against the float64 reference and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

import entmax_cuda
from testing import (
    ATOL,
    SUM_ATOL,
    acc_dtype,
    alpha_as_kernel_sees_it,
    max_abs_diff,
    reference,
    requires_cuda,
    sparsemax_by_sorting,
)

ALPHAS = [1.0, 1 + 1e-5, 1.001, 1.1, 1.5, 1.75, 1.99, 2.0, 2.5, 3.0]
LENGTHS = [1, 2, 70, 285, 1000, 4096]
SCALES = [1.0, 4.0]


def _scores(rows: int, n: int, scale: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    return (torch.randn(rows, n, dtype=torch.float64) * scale).to(dtype).to(device)


def _rows_for(n: int) -> int:
    return 8 if n <= 1000 else 3


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_float64_reference(device, dtype, n, alpha, scale):
    x = _scores(_rows_for(n), n, scale, dtype, device)
    y = entmax_cuda.entmax(x, alpha, dim=-1)
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    expected = reference(x, alpha_as_kernel_sees_it(alpha, dtype))
    assert max_abs_diff(y, expected) <= ATOL[dtype]


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_matches_reference_within_its_precision(device, dtype, n, alpha):
    x = _scores(_rows_for(n), n, 4.0, dtype, device)
    y = entmax_cuda.entmax(x, alpha, dim=-1)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    expected = reference(x, alpha_as_kernel_sees_it(alpha, dtype))  # of the half-rounded input
    assert max_abs_diff(y, expected) <= ATOL[dtype]


def _long_row_reference(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """float64 reference of one long row. Entries more than 1/(alpha-1) below the max
    are 0 for every threshold (math doc section 8): the bisection runs on the others,
    and 60 halvings of the bracket (<= ln d wide) reach the float64 floor."""
    from entmax_cuda.reference import entmax_reference_forward

    x = x.detach().cpu().double().reshape(-1)
    a = alpha_as_kernel_sees_it(alpha, torch.float32)
    keep = x - x.max() > -1 / (a - 1)
    out = torch.zeros_like(x)
    out[keep] = entmax_reference_forward(x[keep], a, -1, n_iter=60)
    return out.reshape(1, -1)


@pytest.mark.parametrize("alpha", [1 + 1e-5, 1.5, 2.5])
def test_long_row_of_a_million_entries_matches_reference(device, alpha):
    n = 1 << 20
    x = _scores(1, n, 4.0, torch.float32, device)
    x[0, 12345] = 25.0  # a clear winner far out, as attention rows often have
    y = entmax_cuda.entmax(x, alpha)
    assert max_abs_diff(y, _long_row_reference(x, alpha)) <= ATOL[torch.float32]
    assert abs(y.double().sum().item() - 1) <= SUM_ATOL


def test_multithreaded_cpu_forward_equals_single_threaded():
    x = _scores(512, 300, 3.0, torch.float32, "cpu")
    alpha = torch.linspace(1.0, 2.6, 512).reshape(512, 1)
    single = entmax_cuda.entmax(x, alpha)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        multi = entmax_cuda.entmax(x, alpha)
        x.requires_grad_(True)
        alpha_leaf = alpha.clone().requires_grad_(True)
        entmax_cuda.entmax(x, alpha_leaf).sum().backward()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(multi, single)
    grads_multi = (x.grad.clone(), alpha_leaf.grad.clone())
    x.grad = None
    alpha_leaf.grad = None
    entmax_cuda.entmax(x, alpha_leaf).sum().backward()
    assert torch.equal(x.grad, grads_multi[0]) and torch.equal(alpha_leaf.grad, grads_multi[1])


# The CPU solves short rows in batches of 16, one row per SIMD lane (the CUDA kernels several
# rows per warp): a row's result must not depend on the rows solved beside it.
MIXED_ALPHAS = [1.5, 2.0, 1.3, 2.5, 1.0, 1.5, 1.5, 1.75, 1.0001, 3.0, 1.5, 2.0, 1.9, 1.1, 1.5, 1.5, 1.5, 2.0, 1.25]


@pytest.mark.parametrize("n", [70, 285, 1000])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(device, n):
    rows = len(MIXED_ALPHAS)
    x = _scores(rows, n, 3.0, torch.float32, device)
    x[3, ::2] = float("-inf")
    x[7] = float("-inf")  # all masked
    x[11, 5] = float("nan")
    alpha = torch.tensor(MIXED_ALPHAS, device=device).reshape(rows, 1)
    dy = _scores(rows, n, 1.0, torch.float32, device)
    y = entmax_cuda.entmax(x, alpha)
    dx, da = torch.ops.entmax_cuda.entmax_backward(dy, y, alpha, -1)
    for r in range(rows):
        y_alone = entmax_cuda.entmax(x[r : r + 1], alpha[r : r + 1])
        assert torch.equal(y[r : r + 1], y_alone) or (torch.isnan(y[r]).all() and torch.isnan(y_alone).all())
        dx_alone, da_alone = torch.ops.entmax_cuda.entmax_backward(dy[r : r + 1], y[r : r + 1], alpha[r : r + 1], -1)
        torch.testing.assert_close(dx[r : r + 1], dx_alone, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(da[r : r + 1], da_alone, rtol=0, atol=0, equal_nan=True)
    finite = [r for r in range(rows) if r != 11]
    for r in finite:
        a = alpha_as_kernel_sees_it(MIXED_ALPHAS[r], torch.float32)
        assert max_abs_diff(y[r], reference(x[r], a)) <= ATOL[torch.float32]


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_peaked_and_tied_rows_match_reference(device, dtype, alpha):
    # peaked rows once broke bisection rules of the form f(mid) * f(lo) >= 0 (math doc section 3)
    x = _scores(6, 285, 0.1, dtype, device)
    x[0, 17] = 50.0  # one dominant entry
    x[1, :3] = 8.0  # a dominant tie
    x[2] = 3.0  # all equal: uniform
    x[3, 100] = 1e-3  # a near tie at the top
    x[4] *= 1000.0  # very spread
    x[5, ::2] = -30.0  # two well separated groups
    y = entmax_cuda.entmax(x, alpha)
    assert max_abs_diff(y, reference(x, alpha_as_kernel_sees_it(alpha, dtype))) <= ATOL[dtype]
    assert max_abs_diff(y[2], torch.full((285,), 1 / 285, dtype=torch.float64)) <= ATOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 70, 285, 4096])
def test_alpha_one_is_softmax(device, dtype, n):
    x = _scores(6, n, 4.0, dtype, device)
    y = entmax_cuda.entmax(x, 1.0)
    assert max_abs_diff(y, torch.softmax(x.double(), dim=-1)) <= ATOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 70, 285, 4096])
def test_alpha_two_is_sparsemax(device, dtype, n):
    x = _scores(6, n, 1.0, dtype, device)
    y = entmax_cuda.entmax(x, 2.0)
    assert max_abs_diff(y, sparsemax_by_sorting(x.double())) <= ATOL[dtype]
    assert (y == 0).any()


def test_sparsemax_helper_is_correct():
    x = torch.tensor([[0.0, 0.5, 3.0], [1.0, 1.2, 0.9]], dtype=torch.float64)
    expected = torch.tensor([[0.0, 0.0, 1.0], [0.3, 0.5, 0.2]], dtype=torch.float64)
    torch.testing.assert_close(sparsemax_by_sorting(x), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", [70, 285, 4096])
def test_alpha_just_above_one_is_continuous_with_softmax(device, n):
    x = _scores(8, n, 4.0, torch.float32, device)
    alpha = 1 + 1e-5
    y = entmax_cuda.entmax(x, alpha)
    assert max_abs_diff(y, reference(x, alpha_as_kernel_sees_it(alpha, torch.float32))) <= ATOL[torch.float32]
    assert max_abs_diff(y, torch.softmax(x.double(), -1)) <= 1e-4  # within O(eps) of softmax


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", [2, 70, 285, 4096])
def test_outputs_are_a_distribution(device, n, alpha):
    y = entmax_cuda.entmax(_scores(8, n, 4.0, torch.float32, device), alpha)
    assert (y >= 0).all()
    assert (y.double().sum(-1) - 1).abs().max().item() <= SUM_ATOL


@pytest.mark.parametrize("alpha", [1.5, 1.75, 2.0, 2.5, 3.0])
@pytest.mark.parametrize("n", [70, 285])
def test_alpha_from_one_and_a_half_gives_exact_zeros(device, n, alpha):
    y = entmax_cuda.entmax(_scores(8, n, 4.0, torch.float32, device), alpha)
    assert ((y == 0).sum(-1) > 0).all()


def test_alpha_below_one_and_a_half_on_flat_rows_is_dense(device):
    y = entmax_cuda.entmax(_scores(4, 70, 0.1, torch.float32, device), 1.1)
    assert (y > 0).all()


# ------------------------------------------------------------------ alpha forms

def test_alpha_forms_give_the_same_output(device):
    x = _scores(2 * 3 * 5, 70, 2.0, torch.float32, device).reshape(2, 3, 5, 70)
    by_float = entmax_cuda.entmax(x, 1.3)
    by_0d = entmax_cuda.entmax(x, torch.tensor(1.3, device=device))
    by_row = entmax_cuda.entmax(x, torch.full((2, 3, 5, 1), 1.3, device=device))
    by_head = entmax_cuda.entmax(x, torch.full((1, 3, 1, 1), 1.3, device=device))
    by_low_rank = entmax_cuda.entmax(x, torch.full((5, 1), 1.3, device=device))
    for y in (by_0d, by_row, by_head, by_low_rank):
        assert torch.equal(y, by_float)


def test_per_head_alpha_applies_each_heads_alpha(device):
    alphas = [1.0, 1.2, 1.5, 2.0, 2.7]
    x = _scores(2 * 5 * 4, 70, 3.0, torch.float32, device).reshape(2, 5, 4, 70)
    y = entmax_cuda.entmax(x, torch.tensor(alphas, device=device).reshape(1, 5, 1, 1))
    for h, a in enumerate(alphas):
        expected = reference(x[:, h], alpha_as_kernel_sees_it(a, torch.float32))
        assert max_abs_diff(y[:, h], expected) <= ATOL[torch.float32]


def test_per_session_alpha_along_dim_one(device):
    # DSAN: x (B, L, 1) normalised over L, one alpha per session (B, 1, 1)
    alphas = torch.tensor([1.05, 1.5, 1.95], dtype=torch.float64)
    x = _scores(3, 70, 3.0, torch.float64, device).unsqueeze(-1)
    y = entmax_cuda.entmax(x, alphas.reshape(3, 1, 1).to(device), dim=1)
    assert y.shape == (3, 70, 1)
    for b in range(3):
        assert max_abs_diff(y[b, :, 0], reference(x[b, :, 0], alphas[b])) <= ATOL[torch.float64]


# ------------------------------------------------------------------ layouts

@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2])
def test_any_dim_matches_reference(device, dim):
    x = (torch.randn(5, 6, 7, dtype=torch.float64) * 3).to(device)
    y = entmax_cuda.entmax(x, 1.5, dim=dim)
    assert y.shape == x.shape
    assert max_abs_diff(y, reference(x, 1.5, dim=dim)) <= ATOL[torch.float64]
    assert (y.double().sum(dim) - 1).abs().max().item() <= 1e-12


def test_dim_out_of_range_raises(device):
    with pytest.raises(IndexError):
        entmax_cuda.entmax(torch.randn(3, 4, device=device), 1.5, dim=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs_match_contiguous(device, dtype):
    base = _scores(40, 60, 3.0, dtype, device)
    transposed = base.t()  # rows along dim 0 of the view: strided
    assert not transposed.is_contiguous()
    assert torch.equal(entmax_cuda.entmax(transposed, 1.5, dim=-1), entmax_cuda.entmax(transposed.contiguous(), 1.5))
    along_dim0 = entmax_cuda.entmax(transposed, 1.5, dim=0)  # strided rows: another kernel path may round differently
    assert max_abs_diff(along_dim0, entmax_cuda.entmax(base, 1.5, dim=-1).t()) <= ATOL[dtype]
    stepped = base[::3, 1::2]
    assert not stepped.is_contiguous()
    assert torch.equal(entmax_cuda.entmax(stepped, 1.7), entmax_cuda.entmax(stepped.contiguous(), 1.7))
    expanded = base[:1].expand(5, 60)
    assert torch.equal(entmax_cuda.entmax(expanded, 1.7), entmax_cuda.entmax(expanded.contiguous(), 1.7))


def test_non_contiguous_alpha_is_read_correctly(device):
    x = _scores(6, 50, 2.0, torch.float32, device)
    alpha = torch.linspace(1.0, 2.5, 12, device=device)[::2].reshape(6, 1)
    assert not alpha.is_contiguous()
    assert torch.equal(entmax_cuda.entmax(x, alpha), entmax_cuda.entmax(x, alpha.contiguous()))


@pytest.mark.parametrize("shape,dim", [((0, 5), -1), ((3, 0), -1), ((3, 0), 0), ((2, 0, 4), 1), ((0,), 0)])
def test_empty_tensors_give_empty_output(device, shape, dim):
    x = torch.randn(shape, device=device)
    y = entmax_cuda.entmax(x, 1.5, dim=dim)
    assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_rows_of_length_one_give_one(device, dtype, alpha):
    x = (torch.randn(4, 1) * 100).to(dtype).to(device)
    assert torch.equal(entmax_cuda.entmax(x, alpha), torch.ones_like(x))


def test_shift_invariance_and_scale_dependence(device):
    x = _scores(4, 70, 2.0, torch.float64, device)
    y = entmax_cuda.entmax(x, 1.5)
    assert max_abs_diff(entmax_cuda.entmax(x + 100.0, 1.5), y) <= 1e-12
    assert max_abs_diff(entmax_cuda.entmax(x * 2, 1.5), y) > 1e-3


# ------------------------------------------------------------------ special values

@pytest.mark.parametrize("alpha", [1.0, 1 + 1e-5, 1.5, 2.0, 2.5])
def test_minus_inf_entries_are_zero_and_the_rest_is_entmax_of_the_unmasked(device, alpha):
    x = _scores(4, 70, 2.0, torch.float32, device)
    mask = torch.zeros(4, 70, dtype=torch.bool, device=device)
    mask[:, ::3] = True
    mask[1, :60] = True  # mask the max too
    masked = x.masked_fill(mask, float("-inf"))
    y = entmax_cuda.entmax(masked, alpha)
    assert (y[mask] == 0).all()
    for r in range(4):
        kept = x[r][~mask[r]]
        expected = reference(kept, alpha_as_kernel_sees_it(alpha, torch.float32))
        assert max_abs_diff(y[r][~mask[r]], expected) <= ATOL[torch.float32]
        assert max_abs_diff(y[r][~mask[r]], entmax_cuda.entmax(kept, alpha)) <= ATOL[torch.float32]


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_all_masked_row_returns_zeros(device, dtype, alpha):
    x = _scores(3, 20, 1.0, dtype, device)
    x[1] = float("-inf")
    y = entmax_cuda.entmax(x, alpha)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    expected = reference(x[[0, 2]], alpha_as_kernel_sees_it(alpha, dtype))
    assert max_abs_diff(y[[0, 2]], expected) <= ATOL[dtype]


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0])
def test_single_unmasked_entry_gets_all_the_mass(device, alpha):
    x = torch.full((2, 10), float("-inf"), device=device)
    x[0, 3] = -5.0
    x[1, 9] = 1e4
    y = entmax_cuda.entmax(x, alpha)
    expected = torch.zeros_like(y)
    expected[0, 3] = expected[1, 9] = 1.0
    assert torch.equal(y, expected)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 2.5])
def test_nan_in_a_row_gives_nan_in_that_row_only(device, alpha):
    x = _scores(3, 30, 2.0, torch.float32, device)
    x[1, 7] = float("nan")
    y = entmax_cuda.entmax(x, alpha)
    assert torch.isnan(y[1]).all()
    assert torch.isfinite(y[[0, 2]]).all()
    assert max_abs_diff(y[[0, 2]], entmax_cuda.entmax(x[[0, 2]], alpha)) <= ATOL[torch.float32]


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0])
def test_plus_inf_in_a_row_gives_nan_in_that_row_only(device, alpha):
    # +inf - max(x) is NaN: like softmax, the row is NaN (never a plausible distribution)
    x = _scores(3, 30, 2.0, torch.float32, device)
    x[0, 4] = float("inf")
    y = entmax_cuda.entmax(x, alpha)
    assert torch.isnan(y[0]).all()
    assert max_abs_diff(y[1:], entmax_cuda.entmax(x[1:], alpha)) <= ATOL[torch.float32]


def test_large_finite_scores_do_not_overflow(device):
    x = torch.tensor([[3e38, 3e38 - 1e32, -3e38], [1e30, 0.0, -1e30]], device=device)
    for alpha in (1.0, 1.5, 2.0):
        y = entmax_cuda.entmax(x, alpha)
        assert torch.isfinite(y).all()
        assert (y.double().sum(-1) - 1).abs().max().item() <= SUM_ATOL


# ------------------------------------------------------------------ invalid alpha

@pytest.mark.parametrize("alpha", [0.999, 0.0, -1.5, math.nan, math.inf, -math.inf])
def test_invalid_float_alpha_raises_value_error(device, alpha):
    with pytest.raises(ValueError, match="alpha"):
        entmax_cuda.entmax(torch.randn(2, 5, device=device), alpha)


@pytest.mark.parametrize("alpha", [True, "1.5", None, [1.5]])
def test_alpha_of_another_type_raises_type_error(device, alpha):
    with pytest.raises(TypeError, match="alpha"):
        entmax_cuda.entmax(torch.randn(2, 5, device=device), alpha)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_alpha_tensor_raises_type_error(device, dtype):
    with pytest.raises(TypeError, match="alpha"):
        entmax_cuda.entmax(torch.randn(2, 5, device=device), torch.ones(2, 1, dtype=dtype, device=device))


@pytest.mark.parametrize(
    "alpha_shape",
    [(2, 5), (1, 5), (3, 1), (2, 2, 1), (1, 2, 3, 1), (7,)],
    ids=["full", "size-along-dim", "wrong-rows", "extra-rows", "too-many-dims", "1d-along-dim"],
)
def test_alpha_of_wrong_shape_raises_value_error(device, alpha_shape):
    with pytest.raises(ValueError, match="alpha"):
        entmax_cuda.entmax(torch.randn(2, 5, device=device), torch.full(alpha_shape, 1.5, device=device))


def test_alpha_of_wrong_shape_raises_along_a_middle_dim(device):
    x = torch.randn(2, 5, 3, device=device)
    with pytest.raises(ValueError, match="alpha"):
        entmax_cuda.entmax(x, torch.full((2, 5, 1), 1.5, device=device), dim=1)
    assert entmax_cuda.entmax(x, torch.full((2, 1, 3), 1.5, device=device), dim=1).shape == x.shape


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_alpha_on_another_device_raises_value_error():
    with pytest.raises(ValueError, match="alpha"):
        entmax_cuda.entmax(torch.randn(2, 5, device="cuda"), torch.full((2, 1), 1.5))
    with pytest.raises(ValueError, match="alpha"):
        entmax_cuda.entmax(torch.randn(2, 5), torch.full((2, 1), 1.5, device="cuda"))


@pytest.mark.parametrize("bad", [0.5, 0.999999, -2.0, math.nan, -math.inf, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_invalid_alpha_in_a_tensor_gives_nan_in_exactly_those_rows(device, dtype, bad):
    x = _scores(4, 30, 2.0, dtype, device)
    alpha = torch.tensor([1.5, bad, 1.2, bad], dtype=dtype, device=device).reshape(4, 1)
    y = entmax_cuda.entmax(x, alpha)
    assert torch.isnan(y[[1, 3]]).all()
    assert torch.isfinite(y[[0, 2]]).all()
    assert max_abs_diff(y[0], entmax_cuda.entmax(x[0], 1.5)) <= ATOL[dtype]
    assert max_abs_diff(y[2], entmax_cuda.entmax(x[2], 1.2)) <= ATOL[dtype]


def test_x_of_integer_dtype_raises_type_error(device):
    with pytest.raises(TypeError):
        entmax_cuda.entmax(torch.arange(6, device=device).reshape(2, 3), 1.5)


def test_zero_dim_x_raises_value_error(device):
    with pytest.raises(ValueError):
        entmax_cuda.entmax(torch.tensor(1.0, device=device), 1.5)


# ------------------------------------------------------------------ CUDA vs CPU

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 70, 285, 1000, 4096, 100_000])
def test_cuda_forward_equals_cpu_forward(dtype, n):
    rows = 16 if n <= 4096 else 2
    x = _scores(rows, n, 3.0, dtype, "cpu")
    x[0, : n // 2] = float("-inf")
    if rows > 2:
        x[2] = float("-inf")
    alpha = torch.linspace(1.0, 3.0, rows, dtype=torch.float64).reshape(rows, 1).to(acc_dtype(dtype))
    y_cpu = entmax_cuda.entmax(x, alpha)
    y_cuda = entmax_cuda.entmax(x.cuda(), alpha.cuda())
    assert y_cuda.dtype == dtype and y_cuda.device.type == "cuda"
    assert max_abs_diff(y_cuda, y_cpu) <= ATOL[dtype]
