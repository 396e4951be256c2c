"""The CUDA kernels' algorithms, run on the CPU by their twins (csrc/cpu/gpu_twins.h:
private ops entmax_cuda::_gpu_twin_forward / _gpu_twin_backward), against the float64
reference; and, on a GPU, the CUDA ops against the twins."""

from __future__ import annotations

import pytest
import torch

import entmax_cuda  # noqa: F401  (loads the ops)
from entmax_cuda.reference import entmax_reference_backward
from testing import (
    ALPHA_GRAD_RTOL_FLOAT32,
    ATOL,
    GRAD_RTOL,
    acc_dtype,
    alpha_as_kernel_sees_it,
    max_abs_diff,
    reference,
    requires_cuda,
)

twin_forward = torch.ops.entmax_cuda._gpu_twin_forward
twin_backward = torch.ops.entmax_cuda._gpu_twin_backward

# Each side of every step of the group ladder (8x8, 8x16, 16x16, 32x16, 32x32 lanes x
# entries), DSAN's 70 and 285, and long rows (a block or a cluster per row).
GROUP_LENGTHS = [1, 2, 63, 64, 65, 70, 128, 129, 256, 257, 285, 512, 513, 1024]
LONG_LENGTHS = [1025, 3001]
CLUSTER_SIZES = [1, 2, 8]
ALPHAS = [1.0, 1 + 1e-5, 1.1, 1.5, 1.75, 2.0, 2.5, 3.0]


def _scores(rows, n, scale, dtype):
    return (torch.randn(rows, n, dtype=torch.float64) * scale).to(dtype)


def _rows_alpha(rows, alpha, dtype):
    return torch.full((rows, 1), alpha, dtype=acc_dtype(dtype))


def _cases():
    for n in GROUP_LENGTHS:
        yield n, 1
    for n in LONG_LENGTHS:
        for blocks in CLUSTER_SIZES:
            yield n, blocks


CASES = list(_cases())
CASE_IDS = [f"n{n}-blocks{b}" for n, b in CASES]


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n,blocks", CASES, ids=CASE_IDS)
def test_twin_forward_matches_float64_reference(n, blocks, alpha):
    x = _scores(5, n, 3.0, torch.float32)
    y = twin_forward(x, _rows_alpha(5, alpha, torch.float32), -1, blocks)
    assert max_abs_diff(y, reference(x, alpha_as_kernel_sees_it(alpha, torch.float32))) <= ATOL[torch.float32]
    assert (y.double().sum(-1) - 1).abs().max().item() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,blocks", [(70, 1), (1024, 1), (2000, 4)])
def test_twin_forward_in_other_dtypes_matches_reference(n, blocks, dtype):
    x = _scores(4, n, 3.0, dtype)
    alpha = torch.tensor([1.0, 1.3, 1.5, 2.4], dtype=acc_dtype(dtype)).reshape(4, 1)
    y = twin_forward(x, alpha, -1, blocks)
    assert y.dtype == dtype
    assert max_abs_diff(y, reference(x, alpha.double())) <= ATOL[dtype]


@pytest.mark.parametrize("n,blocks", [(70, 1), (513, 1), (3001, 2), (3001, 8)])
def test_twin_forward_special_rows(n, blocks):
    x = _scores(7, n, 2.0, torch.float32)
    x[1, 3] = float("nan")
    x[2] = float("-inf")
    x[3, ::2] = float("-inf")
    x[4, 0] = float("inf")
    x[5, n // 2] = 40.0  # one dominant entry
    alpha = torch.tensor([1.5, 1.5, 1.5, 1.2, 1.5, 2.7, float("nan")]).reshape(7, 1)
    y = twin_forward(x, alpha, -1, blocks)
    assert torch.isnan(y[[1, 4, 6]]).all()
    assert torch.equal(y[2], torch.zeros(n))
    assert (y[3, ::2] == 0).all()
    for r in (0, 3, 5):
        expected = reference(x[r], alpha_as_kernel_sees_it(alpha[r].item(), torch.float32))
        assert max_abs_diff(y[r], expected) <= ATOL[torch.float32]
    assert y[5, n // 2].item() == 1.0


@pytest.mark.parametrize("alpha", [1.3, 2.5])
def test_twin_long_rows_give_the_same_result_for_every_cluster_size(alpha):
    # each cluster size sums in its own order: close, and each within the reference's tolerance
    x = _scores(2, 5000, 3.0, torch.float32)
    ys = [twin_forward(x, _rows_alpha(2, alpha, torch.float32), -1, b) for b in (1, 2, 4, 8)]
    for y in ys[1:]:
        assert max_abs_diff(y, ys[0]) <= 2e-7


@pytest.mark.parametrize("alpha_grad", [True, False])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n,blocks", [(2, 1), (70, 1), (129, 1), (513, 1), (1024, 1), (3001, 1), (3001, 8)])
def test_twin_backward_matches_reference(n, blocks, alpha, alpha_grad):
    x = _scores(5, n, 3.0, torch.float32)
    a = _rows_alpha(5, alpha, torch.float32)
    y = twin_forward(x, a, -1, blocks)
    dy = _scores(5, n, 1.0, torch.float32)
    dx, da = twin_backward(dy, y, a, -1, alpha_grad, blocks)
    a64 = alpha_as_kernel_sees_it(alpha, torch.float32)
    dx_ref, da_ref = entmax_reference_backward(y.double(), dy.double(), a64, -1, "stable")
    torch.testing.assert_close(dx.double(), dx_ref, rtol=GRAD_RTOL[torch.float32], atol=ATOL[torch.float32])
    if alpha_grad:
        torch.testing.assert_close(da.double(), da_ref, rtol=ALPHA_GRAD_RTOL_FLOAT32, atol=ATOL[torch.float32])
    else:
        assert torch.equal(da, torch.zeros_like(da))


@pytest.mark.parametrize("n,blocks", [(70, 1), (3001, 4)])
def test_twin_backward_of_float64_rows_matches_reference(n, blocks):
    x = _scores(4, n, 3.0, torch.float64)
    a = torch.tensor([1.0, 1.2, 1.5, 2.5], dtype=torch.float64).reshape(4, 1)
    y = twin_forward(x, a, -1, blocks)
    dy = _scores(4, n, 1.0, torch.float64)
    dx, da = twin_backward(dy, y, a, -1, True, blocks)
    dx_ref, da_ref = entmax_reference_backward(y, dy, a, -1, "stable")
    torch.testing.assert_close(dx, dx_ref, rtol=GRAD_RTOL[torch.float64], atol=ATOL[torch.float64])
    torch.testing.assert_close(da, da_ref, rtol=GRAD_RTOL[torch.float64], atol=ATOL[torch.float64])


@pytest.mark.parametrize("alpha", [2.1, 2.5, 3.0])
@pytest.mark.parametrize("n,blocks", [(4, 1), (1500, 2)])
def test_twin_backward_at_the_support_edge_runs_in_double(n, blocks, alpha):
    # the CUDA kernels' double pass for float rows with alpha > 2
    from test_entmax_backward import EDGE_PS, _rows_with_an_entry_at_the_support_edge

    rows = _rows_with_an_entry_at_the_support_edge(alpha, EDGE_PS)
    x = torch.full((len(EDGE_PS), n), -50.0, dtype=torch.float64)
    x[:, :4] = rows
    x = x.to(torch.float32)
    a = _rows_alpha(len(EDGE_PS), alpha, torch.float32)
    y = twin_forward(x, a, -1, blocks)
    assert (y[:, 1] > 0).all()
    dy = _scores(len(EDGE_PS), n, 1.0, torch.float32)
    dx, da = twin_backward(dy, y, a, -1, True, blocks)
    a64 = alpha_as_kernel_sees_it(alpha, torch.float32)
    dx_ref, da_ref = entmax_reference_backward(y.double(), dy.double(), a64, -1, "stable")
    assert torch.isfinite(dx).all() and torch.isfinite(da).all()
    torch.testing.assert_close(dx.double(), dx_ref, rtol=GRAD_RTOL[torch.float32], atol=ATOL[torch.float32])
    torch.testing.assert_close(da.double(), da_ref, rtol=ALPHA_GRAD_RTOL_FLOAT32, atol=ATOL[torch.float32])


def test_twin_ops_reject_what_the_kernels_do_not_plan():
    x = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="last dimension"):
        twin_forward(x, torch.full((1, 5), 1.5), 0, 1)
    with pytest.raises(RuntimeError, match="blocks_per_row"):
        twin_forward(x, torch.full((3, 1), 1.5), -1, 3)


# ------------------------------------------------------------------ CUDA against the twins

@requires_cuda
@pytest.mark.parametrize("alpha_grad", [True, False])
@pytest.mark.parametrize("n", GROUP_LENGTHS + LONG_LENGTHS + [40841])
def test_cuda_kernels_agree_with_their_twins(n, alpha_grad):
    rows = 12
    x = _scores(rows, n, 3.0, torch.float32)
    x[0, : n // 2] = float("-inf")
    x[2] = float("-inf")
    x[3, n // 3] = float("nan")
    alpha = torch.linspace(1.0, 3.0, rows).reshape(rows, 1)
    dy = _scores(rows, n, 1.0, torch.float32)
    y_gpu = entmax_cuda.entmax(x.cuda(), alpha.cuda())
    # the GPU picks its cluster size from its SM count; every size gives the same within rounding
    y_twin = twin_forward(x, alpha, -1, 1)
    torch.testing.assert_close(y_gpu.cpu(), y_twin, rtol=0, atol=ATOL[torch.float32], equal_nan=True)
    dx_gpu, da_gpu = torch.ops.entmax_cuda.entmax_backward(dy.cuda(), y_gpu, alpha.cuda(), -1, alpha_grad)
    dx_twin, da_twin = twin_backward(dy, y_twin, alpha, -1, alpha_grad, 1)
    torch.testing.assert_close(dx_gpu.cpu(), dx_twin, rtol=GRAD_RTOL[torch.float32], atol=ATOL[torch.float32],
                               equal_nan=True)
    torch.testing.assert_close(da_gpu.cpu(), da_twin, rtol=ALPHA_GRAD_RTOL_FLOAT32, atol=ATOL[torch.float32],
                               equal_nan=True)


@requires_cuda
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_cuda_few_long_rows_use_clusters_and_match_the_cpu(rows):
    # fewer rows than multiprocessors: the row is split over a cluster of blocks (sm_90+)
    x = _scores(rows, 32768, 2.0, torch.float32)
    alpha = torch.linspace(1.05, 1.95, rows).reshape(rows, 1)
    y = entmax_cuda.entmax(x.cuda(), alpha.cuda()).cpu()
    assert max_abs_diff(y, entmax_cuda.entmax(x, alpha)) <= ATOL[torch.float32]
    dy = _scores(rows, 32768, 1.0, torch.float32)
    for alpha_grad in (True, False):
        dx_gpu, da_gpu = torch.ops.entmax_cuda.entmax_backward(dy.cuda(), y.cuda(), alpha.cuda(), -1, alpha_grad)
        dx_cpu, da_cpu = torch.ops.entmax_cuda.entmax_backward(dy, y, alpha, -1, alpha_grad)
        torch.testing.assert_close(dx_gpu.cpu(), dx_cpu, rtol=GRAD_RTOL[torch.float32], atol=ATOL[torch.float32])
        torch.testing.assert_close(da_gpu.cpu(), da_cpu, rtol=ALPHA_GRAD_RTOL_FLOAT32, atol=ATOL[torch.float32])
