"""The Fenchel-Young loss modules and functions under torch.compile(fullgraph=True): equal to eager
(value and gradients in X and a tensor alpha) for every reduction and with ignored samples, and an
out-of-range target still fails instead of giving a number: eager raises the ValueError naming the
index; compiled code runs the same check as a graph op (torch._assert_async: a RuntimeError on the
CPU, a device-side assert on CUDA), since a compiled graph cannot branch on the targets' values.

The grid runs on the aot_eager backend (Dynamo's full graph, AOTAutograd and the fake kernels: what
broke); one reduction per module, and the bad-target check, on inductor too (its generated code)."""

from __future__ import annotations

import pytest
import torch

import entmax_cuda
from testing import ATOL, GRAD_RTOL

pytestmark = pytest.mark.slow  # torch.compile

MODULES = {
    "SparsemaxLoss": lambda **kw: entmax_cuda.SparsemaxLoss(**kw),
    "Entmax15Loss": lambda **kw: entmax_cuda.Entmax15Loss(**kw),
    "EntmaxBisectLoss": lambda **kw: entmax_cuda.EntmaxBisectLoss(alpha=1.3, **kw),
    "EntmaxBisectLoss-tensor-alpha": lambda **kw: entmax_cuda.EntmaxBisectLoss(
        alpha=torch.tensor(1.7, dtype=torch.float64, requires_grad=True), **kw),
    "SparsemaxBisectLoss": lambda **kw: entmax_cuda.SparsemaxBisectLoss(**kw),
}
REDUCTIONS = ["none", "mean", "elementwise_mean", "sum"]


def _data(device, dtype=torch.float32, n=9, C=7, ignore_index=-100):
    X = (torch.randn(n, C, dtype=torch.float64) * 2).to(dtype).to(device)
    target = torch.randint(0, C, (n,))
    target[[1, 5]] = ignore_index  # ignored samples in every case
    return X, target.to(device)


def _value_and_grads(fn, X, target, alpha):
    leaves = [X.detach().clone().requires_grad_()]
    if alpha is not None:
        leaves.append(alpha)
    loss = fn(leaves[0], target)
    weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    grads = torch.autograd.grad((loss * weight).sum(), leaves)
    return loss.detach(), grads


def _assert_compiled_equals_eager(module, X, target, backend):
    torch._dynamo.reset()  # every module shares one forward: start each case without recompile history
    alpha = module.alpha if isinstance(getattr(module, "alpha", None), torch.Tensor) else None
    compiled = torch.compile(module, fullgraph=True, backend=backend)  # fullgraph: a graph break raises
    want, want_grads = _value_and_grads(module, X, target, alpha)
    got, got_grads = _value_and_grads(compiled, X, target, alpha)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL[X.dtype])
    for g, w in zip(got_grads, want_grads):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=GRAD_RTOL[X.dtype], atol=ATOL[X.dtype])
    assert want_grads[0][[1, 5]].eq(0).all()  # ignored samples: no gradient


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(MODULES))
def test_loss_module_compiles_fullgraph_and_equals_eager(device, name, reduction):
    X, target = _data(device)
    module = MODULES[name](reduction=reduction)
    _assert_compiled_equals_eager(module, X, target, "aot_eager")


@pytest.mark.parametrize("name", list(MODULES))
def test_loss_module_compiled_by_inductor_equals_eager(device, name):
    X, target = _data(device)
    _assert_compiled_equals_eager(MODULES[name](reduction="mean"), X, target, "inductor")


def test_non_default_ignore_index_and_float64_compiled(device):
    X, target = _data(device, dtype=torch.float64, ignore_index=3)
    _assert_compiled_equals_eager(entmax_cuda.Entmax15Loss(ignore_index=3, reduction="sum"), X, target, "aot_eager")
    X, target = _data(device, ignore_index=-1)  # a negative ignore_index is honoured (torch's rule)
    _assert_compiled_equals_eager(entmax_cuda.SparsemaxLoss(ignore_index=-1, reduction="none"), X, target,
                                  "aot_eager")


@pytest.mark.parametrize("fn", [entmax_cuda.sparsemax_loss, entmax_cuda.entmax15_loss, entmax_cuda.entmax_bisect_loss,
                                entmax_cuda.sparsemax_bisect_loss])
def test_loss_functions_compile_fullgraph(device, fn):
    torch._dynamo.reset()
    X = torch.randn(6, 5, device=device)
    target = torch.tensor([0, 4, 2, 1, 3, 0], device=device)
    got, got_grads = _value_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), X, target, None)
    want, want_grads = _value_and_grads(fn, X, target, None)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL[X.dtype])
    torch.testing.assert_close(got_grads[0], want_grads[0], rtol=GRAD_RTOL[X.dtype], atol=ATOL[X.dtype])


BAD_TARGETS = [7, -1, 100]  # C = 7; -1 is not the ignore_index (-100)


@pytest.mark.parametrize("bad", BAD_TARGETS)
@pytest.mark.parametrize("name", ["SparsemaxLoss", "EntmaxBisectLoss"])
def test_eager_out_of_range_target_is_a_clear_error(name, bad):
    X, target = _data("cpu")
    target[3] = bad
    with pytest.raises(ValueError, match=rf"target holds class index {bad}, outside \[0, 7\).*not ignore_index"):
        MODULES[name](reduction="mean")(X, target)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("bad", BAD_TARGETS)
def test_compiled_out_of_range_target_raises_instead_of_a_number(backend, bad):
    """CPU only: on CUDA the compiled check is a device-side assert, which ends the process's CUDA context."""
    torch._dynamo.reset()
    X, target = _data("cpu")
    compiled = torch.compile(entmax_cuda.Entmax15Loss(reduction="sum"), fullgraph=True, backend=backend)
    compiled(X, target)  # valid targets: compiles and runs
    target[3] = bad
    with pytest.raises(RuntimeError, match=r"Entmax15Loss: target holds a class index outside"):
        compiled(X, target)


def test_compiled_path_gives_nan_not_a_number_should_the_assert_be_dropped(monkeypatch):
    """The compiled branch run eagerly with its assert removed: the bad sample's loss and gradient
    are NaN, the others are unchanged (what compiled code would give without the assert)."""
    X, target = _data("cpu")
    want = entmax_cuda.SparsemaxLoss(reduction="none")(X, target)
    target[3] = 9
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch, "_assert_async", lambda *args: None)
    Xg = X.clone().requires_grad_()
    loss = entmax_cuda.SparsemaxLoss(reduction="none")(Xg, target)
    loss.sum().backward()
    assert loss[3].isnan() and Xg.grad[3].isnan().all()
    others = [i for i in range(len(target)) if i != 3]
    torch.testing.assert_close(loss[others], want[others], rtol=0, atol=0)
    assert Xg.grad[others].isfinite().all()
