"""The registered torch ops: schemas, fake kernels, autograd registration
(torch.library.opcheck) and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

import entmax_cuda
from testing import ATOL, GRAD_RTOL, acc_dtype, requires_cuda

forward = torch.ops.entmax_cuda.entmax_forward
backward = torch.ops.entmax_cuda.entmax_backward

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _forward_samples(device: str, dtype: torch.dtype):
    """(x, alpha_rows, dim) argument tuples: contiguous, transposed, stepped, 3-d along a middle dim."""
    acc = acc_dtype(dtype)
    grad = dtype in (torch.float32, torch.float64)

    def x_of(*shape):
        return (torch.randn(*shape) * 2).to(dtype).to(device).requires_grad_(grad)

    def rows(*shape):
        return (1.0 + torch.rand(*shape) * 1.5).to(acc).to(device).requires_grad_(grad)

    contiguous = x_of(4, 9)
    transposed = x_of(9, 4).detach().t().requires_grad_(grad)
    stepped = x_of(8, 18).detach()[::2, ::2].requires_grad_(grad)
    yield contiguous, rows(4, 1), -1
    yield transposed, rows(4, 1), 1
    yield stepped, rows(1, 9), 0
    yield x_of(2, 7, 3), rows(2, 1, 3), 1
    yield x_of(3, 1), rows(3, 1), -1


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_forward(device, dtype):
    for args in _forward_samples(device, dtype):
        torch.library.opcheck(forward, args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_backward(device, dtype):
    for x, alpha, dim in _forward_samples(device, dtype):
        x, alpha = x.detach(), alpha.detach()
        y = forward(x, alpha, dim)
        dy = torch.randn_like(y)
        torch.library.opcheck(backward, (dy, y, alpha, dim))
        torch.library.opcheck(backward, (dy, y, alpha, dim, False))  # the x-gradient alone
        if y.dim() == 2:  # a strided grad_output
            dy_strided = torch.randn(y.shape[1], y.shape[0], dtype=y.dtype, device=device).t()
            torch.library.opcheck(backward, (dy_strided, y, alpha, dim))


def test_opcheck_forward_with_masked_rows(device):
    x = torch.randn(3, 6, dtype=torch.float64, device=device)
    x[0] = float("-inf")
    x[1, ::2] = float("-inf")
    alpha = torch.tensor([[1.5], [1.0], [2.2]], dtype=torch.float64, device=device)
    torch.library.opcheck(forward, (x.requires_grad_(), alpha.requires_grad_(), -1))


def test_forward_op_rejects_alpha_of_the_wrong_dtype_or_shape(device):
    x = torch.randn(3, 5, device=device)
    with pytest.raises(RuntimeError, match="alpha"):
        forward(x, torch.full((3, 1), 1.5, dtype=torch.float64, device=device), -1)
    with pytest.raises(RuntimeError, match="alpha"):
        forward(x, torch.full((3, 5), 1.5, device=device), -1)
    with pytest.raises(RuntimeError, match="alpha"):
        forward(x, torch.full((1, 1), 1.5, device=device), -1)


class _HeadAttention(torch.nn.Module):
    """scores -> entmax with a learnable alpha per head -> weighted values."""

    def __init__(self, heads: int):
        super().__init__()
        self.alpha_logit = torch.nn.Parameter(torch.linspace(-2.0, 2.0, heads))

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        alpha = (1 + torch.sigmoid(self.alpha_logit)).reshape(1, -1, 1, 1)
        return entmax_cuda.entmax(scores, alpha, dim=-1) @ v


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    model = _HeadAttention(heads=3).to(device)
    q, k, v = (torch.randn(2, 3, 5, 8, device=device, requires_grad=True) for _ in range(3))
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break raises

    out_eager = model(q, k, v)
    grads_eager = torch.autograd.grad(out_eager.square().sum(), (q, k, v, model.alpha_logit))
    out_compiled = compiled(q, k, v)
    grads_compiled = torch.autograd.grad(out_compiled.square().sum(), (q, k, v, model.alpha_logit))

    torch.testing.assert_close(out_compiled, out_eager, rtol=0, atol=ATOL[torch.float32])
    for got, want in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, want, rtol=GRAD_RTOL[torch.float32], atol=ATOL[torch.float32])


@pytest.mark.slow
def test_torch_compile_sees_no_graph_break(device):
    torch._dynamo.reset()
    x = torch.randn(4, 6, device=device)
    alpha = torch.full((4, 1), 1.3, device=device)

    def fn(x, alpha):
        return entmax_cuda.entmax(x * 2, alpha, dim=-1).sum(-1)

    explanation = torch._dynamo.explain(fn)(x, alpha)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@requires_cuda
def test_cuda_forward_and_backward_do_not_synchronize_the_host():
    x = torch.randn(8, 4, 70, device="cuda", requires_grad=True)
    alpha = torch.full((1, 4, 1), 1.5, device="cuda", requires_grad=True)
    dy = torch.randn(8, 4, 70, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = entmax_cuda.entmax(x, alpha)
        y.backward(dy)
        entmax_cuda.entmax(x.detach(), 1.3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and alpha.grad is not None


@requires_cuda
def test_cuda_kernels_run_on_the_current_stream():
    x = torch.randn(64, 1000, device="cuda")
    expected = entmax_cuda.entmax(x, 1.5)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1_000_000)  # keeps the side stream busy: a kernel on another stream would race
        y = entmax_cuda.entmax(x * 1.0, 1.5)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(y, expected)
