"""The `entmax` library's API in entmax_cuda (functions, modules, Fenchel-Young losses)
against the library itself (entmax==1.3, the test extra) on the same inputs, where the
definitions agree: alpha in (1, 2], no fully masked rows; float64 unless said otherwise."""

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


# ---------------------------------------------------------------- the drop-in API

# (entmax_cuda's name, the library's name): functions, modules and losses of the drop-in.
DROP_IN = ["sparsemax", "entmax15", "entmax_bisect", "sparsemax_bisect",
           "Sparsemax", "Entmax15", "EntmaxBisect", "SparsemaxBisect",
           "sparsemax_loss", "entmax15_loss", "entmax_bisect_loss", "sparsemax_bisect_loss",
           "SparsemaxLoss", "Entmax15Loss", "EntmaxBisectLoss", "SparsemaxBisectLoss"]
# float32 against the library's float32: both round sums of n terms of size ~|x|.
ATOL_LIB_FLOAT32 = 1e-6
LOSS_RTOL_FLOAT32 = 1e-5

MAPPINGS = [  # (ours, the library's, alpha) for the normalising maps
    (entmax_cuda.sparsemax, entmax_lib.sparsemax, 2.0),
    (entmax_cuda.entmax15, entmax_lib.entmax15, 1.5),
    (entmax_cuda.sparsemax_bisect, entmax_lib.sparsemax_bisect, 2.0),
]
MAPPING_IDS = ["sparsemax", "entmax15", "sparsemax_bisect"]


@pytest.mark.parametrize("name", DROP_IN)
def test_drop_in_has_the_librarys_signature(name):
    ours = inspect.signature(getattr(entmax_cuda, name))
    theirs = inspect.signature(getattr(entmax_lib, name))
    assert [(p.name, p.default) for p in ours.parameters.values()] == [
        (p.name, p.default) for p in theirs.parameters.values()
    ]


@pytest.mark.parametrize("name", DROP_IN)
def test_import_entmax_cuda_as_entmax_switches_every_name(name):
    assert name in entmax_cuda.__all__


@pytest.mark.parametrize("ours, theirs, alpha", MAPPINGS, ids=MAPPING_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, dim", [((5, 70), -1), ((3, 4, 9), 1), ((6, 2, 3), 0), ((4, 285), 1)])
def test_mappings_match_the_library_values_and_gradients(device, ours, theirs, alpha, dtype, shape, dim):
    x = _x(shape, device).to(dtype)
    dy = _x(shape, device, 1.0).to(dtype)
    results = []
    for fn in (ours, theirs):
        xr = x.clone().requires_grad_()
        y = fn(xr, dim=dim)
        y.backward(dy)
        results.append((y, xr.grad))
    (y_ours, dx_ours), (y_lib, dx_lib) = results
    atol = ATOL_LIB if dtype == torch.float64 else ATOL_LIB_FLOAT32
    assert y_ours.dtype == dtype
    torch.testing.assert_close(y_ours, y_lib, rtol=0, atol=atol)
    torch.testing.assert_close(dx_ours, dx_lib, rtol=0, atol=10 * atol)  # dy - mean over the support


@pytest.mark.parametrize("k", [None, 1, 3, 100])
def test_k_is_accepted_and_does_not_change_the_result(device, k):
    x = _x((4, 20), device)
    assert torch.equal(entmax_cuda.sparsemax(x, -1, k), entmax_cuda.entmax(x, 2.0))
    assert torch.equal(entmax_cuda.entmax15(x, k=k), entmax_cuda.entmax(x, 1.5))
    torch.testing.assert_close(entmax_cuda.entmax15(x, k=k), entmax_lib.entmax15(x, k=k), rtol=0, atol=ATOL_LIB)


@pytest.mark.parametrize("module_name, args, attrs", [
    ("Sparsemax", {"dim": 0, "k": 5}, ("dim", "k")),
    ("Entmax15", {"dim": 1}, ("dim", "k")),
    ("EntmaxBisect", {"alpha": 1.3, "dim": 0, "n_iter": 60}, ("alpha", "dim", "n_iter")),
    ("SparsemaxBisect", {"dim": 1}, ("dim", "n_iter")),
])
def test_modules_match_the_library(device, module_name, args, attrs):
    ours = getattr(entmax_cuda, module_name)(**args)
    theirs = getattr(entmax_lib, module_name)(**args)
    for attr in attrs:
        assert getattr(ours, attr) == getattr(theirs, attr)
    x = _x((6, 9), device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=ATOL_LIB)


def test_entmax_bisect_module_learns_a_parameter_alpha(device):
    alpha = torch.nn.Parameter(torch.tensor(1.4, dtype=torch.float64, device=device))
    module = entmax_cuda.EntmaxBisect(alpha=alpha)
    assert [name for name, _ in module.named_parameters()] == ["alpha"]
    x = _x((3, 10), device)
    dy = _x((3, 10), device, 1.0)
    module(x).backward(dy)
    lib_alpha = alpha.detach().clone().requires_grad_()
    entmax_lib.entmax_bisect(x, lib_alpha).backward(dy)
    torch.testing.assert_close(alpha.grad, lib_alpha.grad, rtol=1e-8, atol=1e-10)


def test_alpha_one_is_softmax_where_the_library_is_not(device):
    x = _x((4, 12), device)
    torch.testing.assert_close(entmax_cuda.entmax_bisect(x, 1.0), torch.softmax(x, -1), rtol=0, atol=ATOL_LIB)
    assert not torch.allclose(entmax_lib.entmax_bisect(x, 1.0), torch.softmax(x, -1))  # it gives 1/n


@pytest.mark.parametrize("call, error, match", [
    (lambda x: entmax_cuda.sparsemax(x, k=0), ValueError, "sparsemax: k must be None or a positive integer"),
    (lambda x: entmax_cuda.entmax15(x, k=2.5), ValueError, "entmax15: k"),
    (lambda x: entmax_cuda.entmax_bisect(x, n_iter=0), ValueError, "entmax_bisect: n_iter must be a positive"),
    (lambda x: entmax_cuda.entmax_bisect(x, n_iter=True), ValueError, "n_iter"),
    (lambda x: entmax_cuda.entmax_bisect(x, ensure_sum_one=1), TypeError, "ensure_sum_one must be True or False"),
    (lambda x: entmax_cuda.entmax_bisect(x, alpha=0.5), ValueError, "entmax_bisect: alpha must be a finite number >= 1"),
    (lambda x: entmax_cuda.sparsemax_bisect(x, n_iter=-3), ValueError, "sparsemax_bisect: n_iter"),
    (lambda x: entmax_cuda.sparsemax(x, dim=2), IndexError, "sparsemax: dim 2 is out of range"),
    (lambda x: entmax_cuda.entmax15(x, dim=1.0), TypeError, "entmax15: dim must be an integer"),
    (lambda x: entmax_cuda.sparsemax(x.long()), TypeError, "sparsemax: x must be float16"),
    (lambda x: entmax_cuda.Sparsemax(k=-1), ValueError, "Sparsemax: k"),
    (lambda x: entmax_cuda.Entmax15(k="all"), ValueError, "Entmax15: k"),
    (lambda x: entmax_cuda.EntmaxBisect(alpha=float("nan")), ValueError, "EntmaxBisect: alpha"),
    (lambda x: entmax_cuda.EntmaxBisect(alpha=torch.tensor(2)), TypeError, "EntmaxBisect: alpha must be a floating"),
    (lambda x: entmax_cuda.EntmaxBisect(n_iter=0.5), ValueError, "EntmaxBisect: n_iter"),
    (lambda x: entmax_cuda.SparsemaxBisect(n_iter=0), ValueError, "SparsemaxBisect: n_iter"),
])
def test_bad_arguments_name_the_function_and_the_problem(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(3, 5))


# ---------------------------------------------------------------- Fenchel-Young losses

LOSSES = [  # (ours, the library's, constructor arguments shared by both)
    ("SparsemaxLoss", {}),
    ("Entmax15Loss", {}),
    ("EntmaxBisectLoss", {"alpha": 1.3}),
    ("EntmaxBisectLoss", {"alpha": 1.75}),
    ("SparsemaxBisectLoss", {}),
]
LOSS_IDS = ["sparsemax", "entmax15", "bisect-1.3", "bisect-1.75", "sparsemax_bisect"]


def _targets(n, n_classes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_classes, (n,), generator=gen).to(device)


def _loss_and_grad(module, x, target):
    xr = x.clone().requires_grad_()
    loss = module(xr, target)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), xr.grad


@pytest.mark.parametrize("name, kwargs", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("reduction", ["elementwise_mean", "sum", "none"])
@pytest.mark.parametrize("n_classes", [2, 10, 285])
def test_losses_match_the_library_values_and_gradients(device, name, kwargs, reduction, n_classes):
    x = _x((7, n_classes), device)
    target = _targets(7, n_classes, device)
    ours = _loss_and_grad(getattr(entmax_cuda, name)(reduction=reduction, **kwargs), x, target)
    theirs = _loss_and_grad(getattr(entmax_lib, name)(reduction=reduction, **kwargs), x, target)
    assert ours[0].shape == theirs[0].shape
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, kwargs", LOSSES, ids=LOSS_IDS)
def test_float32_losses_match_the_library(device, name, kwargs):
    x = _x((9, 40), device).float()
    target = _targets(9, 40, device)
    loss, grad = _loss_and_grad(getattr(entmax_cuda, name)(reduction="none", **kwargs), x, target)
    loss_lib, grad_lib = _loss_and_grad(getattr(entmax_lib, name)(reduction="none", **kwargs), x, target)
    assert loss.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(loss, loss_lib, rtol=LOSS_RTOL_FLOAT32, atol=LOSS_RTOL_FLOAT32)
    torch.testing.assert_close(grad, grad_lib, rtol=0, atol=ATOL_LIB_FLOAT32)


@pytest.mark.parametrize("name, alpha", [("sparsemax_loss", 2.0), ("entmax15_loss", 1.5),
                                         ("sparsemax_bisect_loss", 2.0), ("entmax_bisect_loss", 1.2)])
def test_loss_functions_match_the_library(device, name, alpha):
    x = _x((6, 11), device)
    target = _targets(6, 11, device)
    extra = (alpha,) if name == "entmax_bisect_loss" else ()
    ours = getattr(entmax_cuda, name)(x, target, *extra)
    theirs = getattr(entmax_lib, name)(x, target, *extra)
    assert ours.shape == (6,)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_loss_gradient_is_p_minus_onehot(device):
    x = _x((5, 8), device).requires_grad_()
    target = _targets(5, 8, device)
    grad_out = _x((5,), device, 1.0)
    entmax_cuda.entmax_bisect_loss(x, target, 1.6).backward(grad_out)
    p = entmax_cuda.entmax(x.detach(), 1.6)
    expected = grad_out[:, None] * (p - torch.nn.functional.one_hot(target, 8).double())
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name, kwargs", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("reduction", ["elementwise_mean", "sum", "none"])
def test_nonnegative_ignore_index_matches_the_library(device, name, kwargs, reduction):
    x = _x((8, 6), device)
    target = torch.tensor([0, 2, 5, 2, 1, 2, 3, 4], device=device)
    args = dict(ignore_index=2, reduction=reduction, **kwargs)
    ours = _loss_and_grad(getattr(entmax_cuda, name)(**args), x, target)
    theirs = _loss_and_grad(getattr(entmax_lib, name)(**args), x, target)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-12)
    assert (ours[1][target == 2] == 0).all()


@pytest.mark.parametrize("ignore_index", [-100, -1])
@pytest.mark.parametrize("name, kwargs", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("reduction", ["elementwise_mean", "sum", "none"])
def test_negative_ignore_index_is_honoured(device, name, kwargs, reduction, ignore_index):
    """The library indexes with a negative ignore_index and fails (its issue #21); the loss over
    the kept samples equals the library's on those samples alone."""
    x = _x((8, 6), device)
    target = torch.tensor([0, ignore_index, 5, 2, ignore_index, 1, 3, 4], device=device)
    kept = target != ignore_index
    loss, grad = _loss_and_grad(getattr(entmax_cuda, name)(ignore_index=ignore_index, reduction=reduction,
                                                           **kwargs), x, target)
    loss_lib, grad_lib = _loss_and_grad(getattr(entmax_lib, name)(reduction=reduction, **kwargs),
                                        x[kept], target[kept])
    if reduction == "none":
        assert (loss[~kept] == 0).all()
        loss = loss[kept]
    torch.testing.assert_close(loss, loss_lib, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad[kept], grad_lib, rtol=0, atol=1e-12)
    assert (grad[~kept] == 0).all()
    with pytest.raises(RuntimeError, match="out of bounds"):
        getattr(entmax_lib, name)(ignore_index=ignore_index, **kwargs)(x, target)


def test_mean_of_all_ignored_samples_is_nan_as_in_the_library_and_torch(device):
    x = _x((3, 4), device)
    target = torch.full((3,), 1, device=device)
    ours = entmax_cuda.SparsemaxLoss(ignore_index=1)(x, target)
    theirs = entmax_lib.SparsemaxLoss(ignore_index=1)(x, target)
    assert torch.isnan(ours) and torch.isnan(theirs)
    assert torch.isnan(torch.nn.functional.cross_entropy(x, target, ignore_index=1))
    assert entmax_cuda.SparsemaxLoss(ignore_index=1, reduction="sum")(x, target) == 0


def test_mean_reduction_accepts_torchs_name(device):
    x = _x((5, 7), device)
    target = _targets(5, 7, device)
    assert torch.equal(entmax_cuda.Entmax15Loss(reduction="mean")(x, target),
                       entmax_cuda.Entmax15Loss(reduction="elementwise_mean")(x, target))


def test_alpha_one_loss_is_cross_entropy(device):
    x = _x((6, 9), device)
    target = _targets(6, 9, device)
    torch.testing.assert_close(entmax_cuda.EntmaxBisectLoss(alpha=1.0)(x, target),
                               torch.nn.functional.cross_entropy(x, target), rtol=1e-12, atol=1e-12)


def test_tensor_alpha_loss_matches_the_library_and_gets_a_gradient(device):
    """The library accepts a 0-d tensor alpha but gives it no gradient (its loss's backward
    returns None for alpha); here alpha gets dL/dalpha."""
    x = _x((6, 9), device)
    target = _targets(6, 9, device)
    alpha = torch.tensor(1.4, dtype=torch.float64, device=device, requires_grad=True)
    ours = entmax_cuda.EntmaxBisectLoss(alpha=alpha)(x, target)
    lib_alpha = alpha.detach().clone().requires_grad_()
    theirs = entmax_lib.EntmaxBisectLoss(alpha=lib_alpha)(x, target)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours.backward()
    theirs.backward()
    assert lib_alpha.grad is None
    assert alpha.grad is not None and alpha.grad.shape == ()


@pytest.mark.parametrize("alpha", [1.01, 1.3, 1.5, 2.0, 2.5, 3.0])
def test_alpha_gradient_of_the_loss_matches_finite_differences(device, alpha):
    x = _x((5, 12), device)
    target = _targets(5, 12, device)
    a = torch.tensor(alpha, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: entmax_cuda.entmax_bisect_loss(x, target, a), (a,),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)


def test_alpha_gradient_of_the_loss_is_continuous_at_one(device):
    """At alpha = 1 (cross-entropy) the gradient is the one-sided limit: Richardson-extrapolated
    forward differences."""
    x = _x((5, 12), device)
    target = _targets(5, 12, device)
    a = torch.tensor(1.0, dtype=torch.float64, device=device, requires_grad=True)
    entmax_cuda.entmax_bisect_loss(x, target, a).sum().backward()

    def forward_difference(h):
        total = lambda al: entmax_cuda.entmax_bisect_loss(x, target, al).sum().item()  # noqa: E731
        return (total(1.0 + h) - total(1.0)) / h

    h = 1e-4
    extrapolated = 2 * forward_difference(h / 2) - forward_difference(h)
    assert a.grad.item() == pytest.approx(extrapolated, rel=1e-6)


def test_per_sample_alpha_gives_each_sample_its_own_loss_and_gradient(device):
    x = _x((4, 10), device)
    target = _targets(4, 10, device)
    alphas = torch.tensor([1.0, 1.2, 1.5, 2.0], dtype=torch.float64, device=device)
    for shape in [(4,), (4, 1)]:
        a = alphas.reshape(shape).clone().requires_grad_()
        loss = entmax_cuda.entmax_bisect_loss(x, target, a)
        assert loss.shape == (4,)
        loss.sum().backward()
        for i, alpha in enumerate(alphas.tolist()):
            single = torch.tensor(alpha, dtype=torch.float64, device=device, requires_grad=True)
            one = entmax_cuda.entmax_bisect_loss(x[i:i + 1], target[i:i + 1], single)
            one.sum().backward()
            torch.testing.assert_close(loss[i], one[0], rtol=0, atol=1e-14)
            torch.testing.assert_close(a.grad.reshape(4)[i], single.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loss_is_computed_in_float32(device, dtype):
    x = _x((6, 20), device)
    target = _targets(6, 20, device)
    loss = entmax_cuda.Entmax15Loss(reduction="none")(x.to(dtype), target)
    exact = entmax_cuda.Entmax15Loss(reduction="none")(x.to(dtype).double(), target)
    assert loss.dtype == dtype
    # float32 inside, then one rounding to the output dtype
    torch.testing.assert_close(loss.double(), exact, rtol=torch.finfo(dtype).eps / 2, atol=1e-6)


def test_masked_scores_give_a_finite_loss_unless_the_target_is_masked(device):
    x = _x((3, 6), device)
    x[:, 4:] = float("-inf")
    target = torch.tensor([0, 3, 5], device=device)
    loss = entmax_cuda.entmax_bisect_loss(x, target, 1.5)
    assert torch.isfinite(loss[:2]).all() and loss[2] == float("inf")
    torch.testing.assert_close(loss[:2], entmax_lib.entmax_bisect_loss(x[:2, :4], target[:2], 1.5),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call, error, match", [
    (lambda x, t: entmax_cuda.SparsemaxLoss(reduction="avg"), ValueError, "reduction must be one of"),
    (lambda x, t: entmax_cuda.Entmax15Loss(ignore_index=1.5), TypeError, "ignore_index must be an integer"),
    (lambda x, t: entmax_cuda.EntmaxBisectLoss(alpha=0.9), ValueError, "EntmaxBisectLoss: alpha"),
    (lambda x, t: entmax_cuda.SparsemaxLoss(k=0), ValueError, "SparsemaxLoss: k"),
    (lambda x, t: entmax_cuda.SparsemaxLoss()(x, t + 5), ValueError,
     r"SparsemaxLoss: target holds class index [5-9], outside \[0, 5\).*not ignore_index \(-100\)"),
    (lambda x, t: entmax_cuda.sparsemax_loss(x, t - 4), ValueError, r"sparsemax_loss: target holds class index -"),
    (lambda x, t: entmax_cuda.sparsemax_loss(x, t[:3]), ValueError, r"target has shape \(3,\) but X \(4, 5\)"),
    (lambda x, t: entmax_cuda.sparsemax_loss(x, t[:, None]), ValueError, r"target has shape \(4, 1\)"),
    (lambda x, t: entmax_cuda.entmax15_loss(x, t.float()), TypeError, "integer class indices, got torch.float32"),
    (lambda x, t: entmax_cuda.entmax15_loss(x, t > 0), TypeError, "integer class indices, got torch.bool"),
    (lambda x, t: entmax_cuda.entmax15_loss(x, [0, 1, 2, 3]), TypeError, "target must be a tensor"),
    (lambda x, t: entmax_cuda.entmax15_loss(x[None], t), ValueError, r"X must be 2-D .* got shape \(1, 4, 5\)"),
    (lambda x, t: entmax_cuda.entmax15_loss(x[0], t), ValueError, r"X must be 2-D"),
    (lambda x, t: entmax_cuda.entmax15_loss(x.long(), t), TypeError, "X must be float16|x must be float16"),
    (lambda x, t: entmax_cuda.entmax_bisect_loss(x, t, torch.ones(3, dtype=torch.float64)), ValueError,
     "does not broadcast"),
    (lambda x, t: entmax_cuda.entmax_bisect_loss(x, t, n_iter=0), ValueError, "n_iter"),
])
def test_bad_loss_arguments_raise_clear_errors(call, error, match):
    x = torch.randn(4, 5, dtype=torch.float64)
    target = torch.tensor([0, 1, 4, 2])
    with pytest.raises(error, match=match):
        call(x, target)
